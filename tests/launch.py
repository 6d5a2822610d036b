"""Run main.py the way users do (plain python or torchrun) from tests, on tiny toy data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A micro model and a tiny toy split: a few seconds per epoch on 2 CPU cores.
TINY_OPTS = [
    "DATA.TOY_TRAIN_PER_CLASS", "8",
    "DATA.TOY_VAL_PER_CLASS", "3",
    "DATA.BATCH_SIZE", "16",
    "DATA.NUM_WORKERS", "0",
    "MODEL.FOCAL.EMBED_DIM", "8",
    "MODEL.FOCAL.DEPTHS", "[1, 1, 1, 1]",
    "MODEL.FOCAL.NUM_HEADS", "[1, 1, 2, 2]",
    "TRAIN.EPOCHS", "2",
    "TRAIN.WARMUP_EPOCHS", "1",
    "PRINT_FREQ", "1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def main_args(output: Path, toy_root: Path, *extra: str, opts: list[str] | None = None) -> list[str]:
    """Arguments of main.py for the demo config on tiny toy data under ``toy_root``."""
    all_opts = [*TINY_OPTS, "DATA.TOY_ROOT", str(toy_root), *(opts or [])]
    return ["main.py", "--cfg", "configs/demo.yaml", "--output", str(output), *extra, "--opts", *all_opts]


def run_main(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run main.py with ``args`` in one process (nproc 1) or under torchrun with ``nproc`` processes."""
    if nproc == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def run_two_nodes(args: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents on localhost (``--nnodes 2``, one process each) meeting at a c10d rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=focaltest",
                *args,
            ],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip
    results = []
    for agent in agents:
        out, _ = agent.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, ""))
    return results


def run_dir(output: Path) -> Path:
    """The run folder main.py writes for the demo config: <output>/<MODEL.NAME>/<TAG>."""
    return output / "focal_demo_patch2_window4_32" / "default"
