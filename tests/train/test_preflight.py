"""vlkit train refuses what it can check cheaply -- data paths that match nothing, a model the machine cannot hold --
before the model is built (issue 13: "cheap checks first", "absurd sizes")."""

from __future__ import annotations

import pytest

import vlkit.models
import vlkit.models.factory
import vlkit.tasks
from vlkit.cli import main
from vlkit.utils import memory


@pytest.fixture(autouse=True)
def no_model_built(monkeypatch):
    """Building a real model or task fails the test: every refusal here must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the pre-flight checks refused the config")

    monkeypatch.setattr(vlkit.tasks, "task_for", refuse)
    monkeypatch.setattr("vlkit.train.cli._fit", refuse)


def _train(capsys, tmp_path, *overrides: str) -> tuple[int, str]:
    code = main(["train", "clip-tiny", f"trainer.output_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.kind=webdataset", "data.train_path=/nonexistent/{000..003}.tar"], "none of its 4 paths exists"),
        (["data.kind=webdataset", "data.train_path=nope/"], "matches no file"),
        (["data.kind=webdataset", "data.train_path=/nonexistent/*.tar"], "matches no file"),
        (["data.kind=csv", "data.train_path=/nonexistent/train.csv"], "no such file"),
        (["data.kind=imagefolder", "data.train_path=/nonexistent/imagenet/train"], "no such directory"),
    ],
)
def test_train_path_matching_nothing_exits_2_naming_the_key(capsys, tmp_path, monkeypatch, overrides, named):
    monkeypatch.chdir(tmp_path)
    code, err = _train(capsys, tmp_path, *overrides)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vlkit train: error: data.train_path=")
    assert named in err
    assert overrides[1].split("=", 1)[1] in err  # the pattern as given
    assert not (tmp_path / "run").exists()  # nothing written


def test_shard_folder_without_shards_and_val_path(capsys, tmp_path):
    empty = tmp_path / "shards"
    empty.mkdir()
    code, err = _train(capsys, tmp_path, "data.kind=webdataset", f"data.train_path={empty}")
    assert code == 2 and f"the directory {empty} holds no .tar shard" in err
    (empty / "000.tar").write_bytes(b"")
    code, err = _train(capsys, tmp_path, "data.kind=webdataset", f"data.train_path={empty}",
                       f"data.val_path={tmp_path}/val/{{0..1}}.tar")  # fmt: skip
    assert code == 2 and "data.val_path=" in err and "the folder " + str(tmp_path / "val") in err


def test_wrong_kind_of_path(capsys, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("filepath,title\n")
    code, err = _train(capsys, tmp_path, "data.kind=imagefolder", f"data.train_path={csv}")
    assert code == 2 and "a file, expected an ImageFolder root" in err
    code, err = _train(capsys, tmp_path, "data.kind=csv", f"data.train_path={tmp_path}")
    assert code == 2 and "a directory, expected a CSV/TSV file" in err


def test_llava_json_and_image_folder(capsys, tmp_path):
    code, err = _train(capsys, tmp_path, "data.kind=llava", f"data.train_path={tmp_path}/missing.json")
    assert code == 2 and "data.train_path=" in err and "a LLaVA .json/.jsonl file" in err
    data = tmp_path / "chat.json"
    data.write_text("[]")
    code, err = _train(capsys, tmp_path, "data.kind=llava", f"data.train_path={data}",
                       f"data.image_folder={tmp_path}/images")  # fmt: skip
    assert code == 2 and "data.image_folder=" in err and "no such directory" in err


def test_remote_and_synthetic_sources_pass_the_data_check(tmp_path):
    from vlkit.config import load_config
    from vlkit.train.preflight import check_data_paths

    for overrides in (
        ["data.kind=webdataset", "data.train_path=pipe:curl -s http://x/{000..003}.tar"],
        ["data.kind=webdataset", "data.train_path=s3://bucket/{000..003}.tar", "data.val_path=https://x/val.tar"],
        ["data.kind=synthetic_shapes", f"data.train_path={tmp_path}/not-yet-written"],
    ):
        check_data_paths(load_config("clip-tiny", overrides).data)  # no error


def test_absurd_width_is_refused_with_its_key_and_the_size(capsys, tmp_path):
    code, err = _train(capsys, tmp_path, "model.vision.hidden_size=1200000000")
    assert code == 2
    assert "model.vision.hidden_size=1200000000" in err and "EB" in err


def test_too_large_for_this_machine_names_the_numbers(capsys, tmp_path, monkeypatch):
    # clip-tiny trains in ~40 MB of state; a machine of 100 kB cannot hold it. Its largest tensor is the text
    # tower's token table, so the vocabulary size is the key named.
    monkeypatch.setattr(memory, "host_memory", lambda: 100_000)
    synthetic = f"data.train_path={tmp_path}/shapes"
    code, err = _train(capsys, tmp_path, synthetic, "trainer.accelerator=cpu")
    assert code == 2
    assert err.startswith("vlkit train: error: model.text.vocab_size=49408: training needs at least ~")
    assert "x 16 bytes (fp32 weights, gradients and adamw state), this machine has 100 kB" in err


def test_real_presets_fit_info_and_clip_e14_is_refused_for_training(capsys, monkeypatch):
    from vlkit.config import load_config
    from vlkit.train.preflight import check_training_memory

    monkeypatch.setattr(memory, "host_memory", lambda: 24 * 10**9)
    check_training_memory(load_config("clip-b16", ["trainer.accelerator=cpu"]))  # 2.4 GB of 24: fits
    with pytest.raises(memory.TooLargeError, match=r"training needs at least ~73 GB: 4,581,086,465 trainable .* 24 GB"):
        check_training_memory(load_config("clip-e14", ["trainer.accelerator=cpu"]))
    # A locked image tower has no gradients or optimizer state: counted at 4 bytes per parameter.
    locked = load_config("clip-b16", ["trainer.accelerator=cpu", "model.lock_image=true"])
    model = vlkit.models.create_model(locked, device="meta")
    from vlkit.train.preflight import _freeze_as_the_task_will

    _freeze_as_the_task_will(model, locked)
    est = memory.estimate_training(model, locked.model)
    assert est.bytes == 63_428_097 * 16 + 86_192_640 * 4  # text + logit scale train, the vision tower is frozen


def test_info_reports_the_estimate_and_refuses_nothing(capsys, monkeypatch):
    import json

    monkeypatch.setattr(memory, "host_memory", lambda: 100_000)
    assert main(["info", "clip-tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mem, params = report["memory"], report["parameters"]["total"]
    assert mem["weights_bytes"] == params * 4 and mem["training_bytes"] == params * 16
    assert mem["machine_bytes"] == 100_000 and mem["fits"] == {"weights": False, "training": False}
    assert main(["info", "clip-tiny", "--no-config"]) == 0
    assert "more than this machine holds" in capsys.readouterr().out
