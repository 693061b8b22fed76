"""Ring and gathered losses on 2 and 4 gloo ranks under torchrun, against the single-process float64 result.

``dist_worker.py`` runs on every rank and exits non-zero on any mismatch (see its docstring for what is
compared). The ranks talk over 127.0.0.1 only, so the test needs no network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_distributed_losses_equal_single_process(nproc):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parent), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    log = proc.stdout[-6000:] + "\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{log}"
    assert "FAIL" not in proc.stdout, log
    # Every rank ran the checks (ranks 1 and 3 of four also run a sub-group ring).
    per_rank = [proc.stdout.count(f"[rank {r}] ok") for r in range(nproc)]
    assert min(per_rank) >= 90, per_rank
