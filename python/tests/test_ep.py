"""Expert parallelism (ep_size = 2) against DeepSpeed's own layer: runs tests/ep_worker.py
under ``torchrun --nproc_per_node 2`` (gloo, CPU) and expects every rank to report
``EP OK``. See ep_worker.py for what is compared.

The run cannot hang: the worker has a watchdog and process-group timeouts, and this test
kills the whole process group it started (torchrun and its workers) after TIMEOUT_S.
"""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("torch.distributed")

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240
WORKER_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_matches_deepspeed(diffs):
    env = dict(os.environ)
    # The ranks import the moe_engine this process imported (the installed package, or a
    # source folder holding a built extension), not whatever sits beside the tests.
    import moe_engine

    pkg_root = str(Path(moe_engine.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_root, env.get("PYTHONPATH", "")] if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["EP_WORKER_TIMEOUT"] = str(WORKER_TIMEOUT_S)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(HERE / "ep_worker.py"),
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=str(HERE.parent), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{out[-8000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for name, value in re.findall(r"max \|engine - deepspeed\| (.+?)\s+([0-9.e+-]+)$", out, re.M):
        diffs("ep " + name, float(value))
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{out[-8000:]}"
    for r in range(2):
        assert re.search(rf"^\[r{r}\] EP OK", out, re.M), f"rank {r} did not report EP OK:\n{out[-8000:]}"
