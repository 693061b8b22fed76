"""Every subcommand against a battery of bad inputs (issue 13): a user's mistake exits 2 with one line naming the
file / key / option, an environment failure exits 1 with one paragraph, never a traceback, nothing written outside the
output directory, and a previous checkpoint untouched."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
VIT_DOC_BLOCK = """\
encoder_seq_length: 196
max_position_embeddings: ${.encoder_seq_length}
num_layers: 12
hidden_size: 768
ffn_hidden_size: 3072
num_attention_heads: 12
hidden_dropout: 0.1
attention_dropout: 0.
vision_pretraining_type: "classify"
num_classes: 1000
patch_dim: 16
img_h: 224
img_w: 224
num_channels: 3
"""


@pytest.fixture
def bad(tmp_path, monkeypatch):
    """A folder of bad inputs, the working directory set to an empty ``cwd/`` (to catch stray writes) and ``out/``
    as the only place a command may write."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.yaml").write_text("")
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (d / "syntax.yaml").write_text("model:\n  arch: clip\n  vision: [1, 2\ntrainer:\n  max_steps: 3\n")
    (d / "vit_doc.yaml").write_text(VIT_DOC_BLOCK)
    (d / "a_dir.yaml").mkdir()
    (d / "empty.csv").write_text("filepath,title\n")
    (d / "bad.json").write_text('[{"id": "s0", "conversations": [}]')
    (d / "noconv.json").write_text(json.dumps([{"id": "s7", "image": "x.png"}]))
    (d / "garbage.tar").write_bytes(b"\x01not a tar" * 200)
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00broken" * 50)
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{not json")
    (d / "model" / "model.safetensors").write_bytes(b"\xff" * 64)
    (d / "unreadable.yaml").write_text("model:\n  arch: clip\n")
    (d / "unreadable.yaml").chmod(0)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("VLKIT_DEBUG", raising=False)
    return d


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(argv: list[str], capsys, tmp_path: Path) -> tuple[int, str, str]:
    """Run ``vlkit argv`` in process; check no traceback and no file written outside ``tmp_path / "out"``."""
    before = _files(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    written = {f for f in _files(tmp_path) - before if not f.startswith("out")}
    assert not written, f"vlkit {' '.join(argv)} wrote outside the output directory: {sorted(written)}"
    return code, out, err


# (argv with {d} for the bad-input folder and {out} for the output directory, the words the message must hold)
USER_MISTAKES = [
    # config: file, syntax, encoding, kind of path, keys, types, sizes
    (["info", "{d}/missing.yaml"], ["missing.yaml"]),
    (["info", "{d}/syntax.yaml"], ["syntax.yaml", "line 4, column 8"]),
    (["train", "{d}/syntax.yaml"], ["syntax.yaml", "not valid YAML"]),
    (["info", "{d}/garbage.bin"], ["garbage.bin"]),
    (["info", "{d}/a_dir.yaml"], ["a_dir.yaml"]),
    (["info", "{d}/vit_doc.yaml"], ["vit_doc.yaml", "model.arch: vit_classifier"]),
    (["info", "clip-b16", "model.vision.num_layers=many"], ["model.vision.num_layers"]),
    (["info", "clip-b16", "model.vision.num_layerz=2"], ["num_layerz", "num_layers"]),
    (["info", "clip-b16", "trainer.max_steps=-5"], ["trainer.max_steps"]),
    (["info", "clip-b16", "not-an-override"], ["not-an-override"]),
    (["info", "clip-b61"], ["clip-b61", "clip-b16"]),
    # training inputs that are wrong before any work
    (["train", "neva-tiny-finetune", "trainer.output_dir={out}"], ["run neva-tiny-pretrain first"]),
    (
        [
            "train",
            "clip-tiny",
            "data.kind=webdataset",
            "data.train_path=/nonexistent/{{000..003}}.tar",
            "trainer.output_dir={out}",
        ],
        ["data.train_path", "/nonexistent", "matches no file"],
    ),  # fmt: skip
    (
        ["train", "clip-tiny", "data.kind=webdataset", "data.train_path={d}/nope/", "trainer.output_dir={out}"],
        ["data.train_path", "nope"],
    ),  # fmt: skip
    (
        [
            "train",
            "clip-tiny",
            "trainer.checkpoint.resume=/nonexistent/ckpt",
            "data.kind=webdataset",
            "data.train_path={d}/garbage.tar",
            "trainer.output_dir={out}",
        ],
        ["/nonexistent/ckpt"],
    ),  # fmt: skip
    (
        [
            "train",
            "clip-tiny",
            "model.text.vocab_size=512",
            "model.text.eot_token_id=511",
            "data.kind=webdataset",
            "data.train_path={d}/garbage.tar",
            "trainer.output_dir={out}",
        ],
        ["model.text.vocab_size=512", "49408"],
    ),  # fmt: skip
    # evaluation
    (["eval", "zeroshot", "--model", "{d}/nowhere", "--data", "{d}"], ["nowhere"]),
    (["eval", "retrieval", "--model", "{d}/model", "--data", "{d}/garbage.tar"], ["model"]),
    (["eval", "classify", "--model", "{d}/garbage.bin", "--data", "{d}"], ["garbage.bin"]),
    (["eval", "vqa", "--model", "{d}/nowhere", "--data", "{d}/bad.json"], ["nowhere"]),
    # predict, convert, chat
    (["predict", "--model", "{d}/model", "{d}/nothing.png"], ["nothing.png"]),
    (["predict", "--model", "{d}/nowhere", "{d}/garbage.png"], ["nowhere"]),
    (["convert", "{d}/nowhere", "--out", "{out}"], ["nowhere"]),
    (["convert", "{d}/garbage.bin", "--out", "{out}"], ["garbage.bin"]),
    (["convert", "{d}/model", "--out", "{out}"], ["model"]),
    (["convert", "--to", "hf", "{d}/model", "--out", "{d}/garbage.bin"], ["garbage.bin"]),
    (["chat", "--model", "{d}/nowhere", "--image", "{d}/garbage.png", "--prompt", "hi"], ["nowhere"]),
    # data tools: a directory for a file and the reverse
    (["data", "check", "{d}/a_dir.yaml"], ["a_dir.yaml"]),
    (["data", "shapes", "--out", "{d}/garbage.bin"], ["garbage.bin"]),
    # argparse: huge numbers and wrong types for typed options
    (["eval", "zeroshot", "--model", "{d}/model", "--data", "{d}", "--batch-size", "-3"], ["--batch-size"]),
    (["predict", "--model", "{d}/model", "--topk", "1e99", "{d}/garbage.png"], ["--topk"]),
]


@pytest.mark.parametrize(("argv", "named"), USER_MISTAKES, ids=[" ".join(a[:3]) for a, _ in USER_MISTAKES])
def test_a_users_mistake_is_one_named_line_and_exit_2(argv, named, bad, tmp_path, capsys):
    argv = [a.format(d=bad, out=tmp_path / "out") for a in argv]
    code, _, err = run(argv, capsys, tmp_path)
    assert code == 2, err
    for word in named:
        assert word in err, f"{word!r} not in: {err}"
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1, err  # one line (argparse adds its usage above its own)


def test_a_syntax_error_names_the_file_and_line_in_one_line(bad, tmp_path, capsys):
    code, _, err = run(["info", str(bad / "syntax.yaml")], capsys, tmp_path)
    assert code == 2
    assert err.strip() == (
        f"vlkit info: error: {bad / 'syntax.yaml'}: not valid YAML: line 4, column 8: did not find expected ',' or "
        "']' (while parsing a flow sequence)"
    )


def test_the_vit_document_block_gets_one_hint_not_one_error_per_key(bad, tmp_path, capsys):
    _, _, err = run(["info", str(bad / "vit_doc.yaml")], capsys, tmp_path)
    assert err.count("unknown key") == 0 and "14 keys are unknown" in err and "base: vit-b16" in err


@pytest.mark.skipif(ROOT, reason="chmod 0 does not stop root from reading")
def test_an_unreadable_config_is_named(bad, tmp_path, capsys):
    code, _, err = run(["info", str(bad / "unreadable.yaml")], capsys, tmp_path)
    assert code == 2 and "unreadable.yaml" in err and "Permission denied" in err


def test_options_may_follow_the_overrides(capsys):
    assert main(["info", "clip-b16", "--json", "model.vision.num_layers=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["model"]["vision"]["num_layers"] == 2


def test_empty_csv_and_broken_llava_data_in_training_are_named(bad, tmp_path, capsys):
    out = tmp_path / "out"
    csv = ["train", "clip-tiny", "data.kind=csv", f"data.train_path={bad / 'empty.csv'}", f"trainer.output_dir={out}"]
    code, _, err = run(csv, capsys, tmp_path)
    assert code == 2 and err.strip() == f"vlkit train: error: {bad / 'empty.csv'}: no data rows"


def test_broken_llava_files_are_one_named_error(bad):
    from vlkit.data.llava import load_llava_records
    from vlkit.utils.errors import DataError

    with pytest.raises(DataError, match=r"bad\.json: not valid JSON \(.*line 1"):
        load_llava_records(bad / "bad.json", "vicuna_v1")
    with pytest.raises(DataError, match=r"(?s)noconv\.json: 1 malformed sample.*id 's7'.*'conversations'"):
        load_llava_records(bad / "noconv.json", "vicuna_v1")


def test_image_in_an_answer_is_reported_naming_the_sample(tmp_path):
    from vlkit.data.llava import load_llava_records
    from vlkit.utils.errors import DataError

    data = tmp_path / "d.json"
    turns = [{"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "this <image> here"}]
    data.write_text(json.dumps([{"id": "q1", "image": "a.png", "conversations": turns}]))
    with pytest.raises(DataError, match=r"id 'q1'\): turn 1 \(gpt\) contains <image>"):
        load_llava_records(data, "vicuna_v1")


# ------------------------------------------------------------------------------------ environment failures and bugs


def _fail_with(monkeypatch, exc: BaseException) -> None:
    import vlkit.info

    def describe(*args, **kwargs):
        raise exc

    monkeypatch.setattr(vlkit.info, "describe", describe)


@pytest.mark.parametrize(
    ("exc", "what"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/ckpt/model.safetensors"), "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk is full"),
        (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })... os error 28"), "disk"),
        (MemoryError(), "memory ran out"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"), "memory ran out"),
        (type("DistBackendError", (RuntimeError,), {})("peer 3 gone"), "another process of the run"),
    ],
)
def test_an_environment_failure_is_one_paragraph_and_exit_1(exc, what, monkeypatch, capsys):
    _fail_with(monkeypatch, exc)
    assert main(["info", "clip-b16"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("vlkit info: ") and what in err and "last complete checkpoint" in err


def test_a_bug_keeps_its_traceback_and_debug_shows_everything(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyError("internal"))
    with pytest.raises(KeyError):
        main(["info", "clip-b16"])
    from vlkit.config import ConfigError

    _fail_with(monkeypatch, ConfigError("model.x: bad"))
    assert main(["info", "clip-b16"]) == 2
    with pytest.raises(ConfigError):
        main(["info", "clip-b16", "--debug"])
    monkeypatch.setenv("VLKIT_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["info", "clip-b16"])


def test_disk_full_while_checkpointing_exits_1_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from fixed_task import FixedDataCLIPTask
    from train_worker import BASE

    import vlkit.tasks
    import vlkit.train.checkpoint as ckpt

    monkeypatch.setattr(vlkit.tasks, "task_for", lambda arch: FixedDataCLIPTask)
    real, calls = ckpt._save_tensors, []

    def save(tensors, file):
        calls.append(file)
        if "step_00000002" in str(file):  # the second checkpoint meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        real(tensors, file)

    monkeypatch.setattr(ckpt, "_save_tensors", save)
    out = tmp_path / "out"
    argv = ["train", "clip-tiny", *BASE, f"trainer.output_dir={out}", "trainer.max_steps=3",
            "trainer.micro_batch_size=8", "trainer.checkpoint.every_n_steps=1"]  # fmt: skip
    code, _, err = run(argv, capsys, tmp_path)
    assert code == 1, err
    assert "the disk is full" in err and "last complete checkpoint" in err and "step_00000002" in err
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]  # no half-written step 2
    import vlkit

    assert vlkit.load_model(checkpoints / "step_00000001") is not None


# ------------------------------------------------------------------------------------------- real processes


def _vlkit(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLKIT_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, env=env, **kw)


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    proc = _vlkit("info", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"vlkit info: error: {tmp_path / 'bad.yaml'}: not valid YAML")


# A command whose output is far larger than a pipe's buffer, so that writing goes on after the reader has left.
LONG_OUTPUT = """
import sys
import vlkit.cli, vlkit.info
vlkit.info.describe = lambda *a, **k: {"lines": 200000}
vlkit.info.format_report = lambda report, **k: "\\n".join(f"line {i}" for i in range(report["lines"]))
sys.exit(vlkit.cli.main(["info", "clip-tiny"]))
"""


def test_a_closed_pipe_ends_quietly():
    # `vlkit info ... | head -1`: the reader goes away after one line.
    cmd = f"{sys.executable} -c '{LONG_OUTPUT}' | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert proc.stdout == "line 0\n"
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141  # what a pipe-closed program gives (128 + SIGPIPE)


@pytest.mark.parametrize("command", ["info", "train", "eval", "predict", "convert", "chat", "data", "bench", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: vlkit" in capsys.readouterr().out
