"""DistributedDataParallel (gloo, CPU) over an rnndsl module, in two processes."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import ddp_worker  # noqa: E402

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    two_ranks_match_one_process(tmp_path, "gloo")


def two_ranks_match_one_process(tmp_path, backend: str):
    """Two ranks of tests/ddp_worker.py on `backend` end with the parameters of one process
    (on the CPU) trained on the whole batch."""
    root = str(HERE.parent)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, str(HERE), os.environ.get("PYTHONPATH", "")])}
    port, world = free_port(), 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(r), str(world),
                               str(port), str(outs[r]), backend], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    ranks = [torch.load(o) for o in outs]

    x, y, lengths = ddp_worker.data()
    single = ddp_worker.train(ddp_worker.build(), x, y, lengths)
    before = dict(ddp_worker.build().named_parameters())
    for name, p in single.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], p.detach(), atol=1e-10, rtol=1e-10)
        assert not torch.equal(p, before[name]), f"{name} did not train"
