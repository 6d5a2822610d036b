import logging
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the fused Triton attention kernels run on CPU tensors through Triton's interpreter; it must be chosen
# before the kernels are defined (when ``models`` is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)  # the golden fixtures were produced with 2 threads
# Where a GPU runs the tests, fp32 must mean fp32: no TF32 in convolutions or matrix products.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# Set (to 1) by .ci/run: without triton the fused-kernel and compile tests skip, so CI refuses to start instead.
REQUIRE_TRITON = "FOCAL_REQUIRE_TRITON"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(REQUIRE_TRITON) != "1":
        return
    from models import fused_focal_attention  # the tests skip on the triton this module could import

    if fused_focal_attention.triton is None:
        raise pytest.UsageError(
            f"{REQUIRE_TRITON}=1 but triton cannot be imported: the fused-kernel and compile tests would skip "
            "(CPU-only torch builds lack it; pip install -r requirements.txt installs it on Linux)"
        )


# pytest's outcome keys -> the words of the summary line.
STATS_LABELS = {"passed": "passed", "skipped": "skipped", "failed": "failed", "error": "errors"}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line with every count, zeros included, so a run's log always states how many tests were skipped."""
    stats = terminalreporter.stats
    counts = {label: len(stats.get(key, [])) for key, label in STATS_LABELS.items()}
    terminalreporter.write_line("test counts: " + ", ".join(f"{count} {label}" for label, count in counts.items()))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the toy data of one test module (generated on first use by the runs that name it)."""
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(autouse=True)
def _close_run_logger():
    """In-process runs (``main.main``) attach handlers to the 'focal' logger; close them after each test."""
    yield
    logger = logging.getLogger("focal")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
