"""One run per output directory: the lock (held, stale after SIGKILL, on another host), the refusal to start a fresh
run over another run's files, trainer.overwrite moving them aside, config.yaml, and ranks deciding together."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from vlkit.cli import main
from vlkit.config import ConfigError, load_config
from vlkit.train.run_dir import CONFIG_FILE, LOCK_FILE, claim_output_dir

sys.path.insert(0, str(Path(__file__).parent))
from fixed_task import FixedDataCLIPTask  # noqa: E402
from train_worker import BASE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HOLDER = "import sys; from vlkit.train.run_dir import acquire_lock; lock = acquire_lock(sys.argv[1]); print('held', flush=True); sys.stdin.read()"  # noqa: E501


def config(out: Path, *extra: str):
    overrides = [*BASE, f"trainer.output_dir={out}", "trainer.max_steps=1", "trainer.micro_batch_size=8", *extra]
    return load_config("clip-tiny", overrides)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / "run"`` until it is killed."""
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_directory_in_use_is_refused_naming_the_holder(holder):
    out, proc = holder
    with pytest.raises(ConfigError) as e:
        claim_output_dir(config(out))
    message = str(e.value)
    assert f"pid {proc.pid} on host {socket.gethostname()} since " in message
    assert f"trainer.output_dir={out} is in use by another run" in message
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left alone
    assert not (out / CONFIG_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, but not reaped yet: a zombie still has its pid
    lock = claim_output_dir(config(out))
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_FILE).exists()
    lock.release()  # twice is harmless


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    foreign = {"pid": 1, "host": "elsewhere.example", "started": "2026-01-01T00:00:00+00:00", "token": "x"}
    (out / LOCK_FILE).write_text(json.dumps(foreign))
    with pytest.raises(ConfigError, match="cannot check from here whether that run is still alive") as e:
        claim_output_dir(config(out))
    assert "pid 1 on host elsewhere.example" in str(e.value) and f"delete {out / LOCK_FILE}" in str(e.value)
    assert json.loads((out / LOCK_FILE).read_text()) == foreign


def test_config_yaml_is_the_resolved_config_and_loads(tmp_path):
    cfg = config(tmp_path / "run", "optim.lr=0.125")
    lock = claim_output_dir(cfg)
    loaded = load_config(tmp_path / "run" / CONFIG_FILE)
    assert asdict(loaded) == asdict(cfg) and loaded.optim.lr == 0.125
    lock.release()


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_fresh_run_over_another_run_exits_2_and_overwrite_moves_it_aside(tmp_path, capsys):
    from vlkit.train.trainer import Trainer

    out = tmp_path / "run"
    Trainer(config(out), FixedDataCLIPTask).fit()
    assert not (out / LOCK_FILE).exists()  # released at the end
    before = digest(out)
    assert "checkpoints/step_00000001/model.safetensors" in before and "metrics.jsonl" in before
    capsys.readouterr()

    # The same command again, end to end: exit 2, one line naming the three ways on, nothing touched.
    assert main(["train", "clip-tiny", *BASE, f"trainer.output_dir={out}", "trainer.micro_batch_size=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"vlkit train: error: trainer.output_dir={out} holds another run")
    assert "checkpoints up to step_00000001" in err and "metrics.jsonl" in err
    for way in ("trainer.checkpoint.resume=latest", "another trainer.output_dir", "trainer.overwrite=true"):
        assert way in err
    assert digest(out) == before

    trainer = Trainer(config(out, "trainer.overwrite=true"), FixedDataCLIPTask)
    (old,) = tmp_path.glob("run.old-*")
    assert trainer.run_lock.moved == [(out, old)]
    assert f"moved the previous run in {out} to {old}" in capsys.readouterr().out
    assert digest(old) == before  # every file of the old run, intact, in its new place
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, LOCK_FILE]
    trainer.fit()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # its own metrics, not appended to the old


# Each line is one write (torchrun's ranks share the pipe, unbuffered: print's separate write of the newline let two
# ranks' lines run together).
WORKER = """
import sys
from vlkit.config import ConfigError, load_config
from vlkit.parallel import cleanup, init_distributed
from vlkit.train.run_dir import claim_output_dir
info = init_distributed("cpu")
for out in sys.argv[1:]:
    cfg = load_config("clip-tiny", [f"trainer.output_dir={out}"])
    try:
        lock = claim_output_dir(cfg, info.rank, info.world_size)
        sys.stdout.write(f"rank {info.rank} claimed {out}: lock file {lock.path}\\n")
        lock.release()
    except ConfigError as e:
        sys.stdout.write(f"rank {info.rank} refused: {e}\\n")
    sys.stdout.flush()
cleanup()
"""


def test_ranks_of_one_run_share_the_lock_and_the_refusal(tmp_path, torchrun):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    result = torchrun(script, 2, str(fresh), str(used), timeout=120)
    lines = result.stdout.splitlines()
    assert f"rank 0 claimed {fresh}: lock file {fresh / LOCK_FILE}" in lines
    assert f"rank 1 claimed {fresh}: lock file None" in lines  # only rank 0 holds it
    refusals = sorted(line.split(": ", 1)[1] for line in lines if " refused: " in line)
    assert len(refusals) == 2 and refusals[0] == refusals[1] and "holds another run (metrics.jsonl)" in refusals[0]
