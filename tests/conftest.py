"""Shared fixtures. ``torchrun`` launches a worker script on N local gloo ranks and fails the test on non-zero exit."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(script), *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if result.returncode != 0:
        pytest.fail(f"torchrun {Path(script).name} {' '.join(args)} exited {result.returncode}:\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")  # fmt: skip
    return result


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny matrices gain nothing from a second one, and on a busy 2-core machine
    OpenMP's waits for a descheduled thread dominate their run time. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
