"""engine.py in this process: accumulation groups, the learning rate that is logged, evaluation progress, memory.

A linear model on fixed random batches keeps every step exact and fast; the end-to-end runs are in test_trainer.py.
"""

from __future__ import annotations

import contextlib
import logging
import re

import pytest
import torch
from torch import nn

from engine import EpochMeters, TrainState, accumulation_group, evaluate, train_one_epoch
from lr_scheduler import IterLRScheduler, LRSchedule
from utils.amp import GradientStepper

NUM_BATCHES, ACCUMULATION, BATCH, FEATURES, CLASSES = 23, 3, 4, 6, 3


class _Records(logging.Handler):
    """Keeps the messages a logger emits."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log() -> tuple[logging.Logger, _Records]:
    logger = logging.getLogger("focal.test_engine")
    logger.setLevel(logging.INFO)
    records = _Records()
    logger.addHandler(records)
    yield logger, records
    logger.removeHandler(records)


class _CountsNoSync(nn.Linear):
    """A linear model with DDP's ``no_sync`` hook, counting the micro-batches whose gradients it kept local."""

    def __init__(self) -> None:
        super().__init__(FEATURES, CLASSES)
        self.unsynced = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced += 1
        yield


def _batches(num: int = NUM_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, FEATURES, generator=generator), torch.randint(CLASSES, (BATCH,), generator=generator))
        for _ in range(num)
    ]


def _state(model: nn.Module, schedule: LRSchedule, accumulation: int = ACCUMULATION, **kwargs) -> TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=schedule.base_lr)
    return TrainState(
        optimizer=optimizer,
        scheduler=IterLRScheduler(optimizer, schedule),
        stepper=GradientStepper(None, "cpu"),
        criterion=nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
        amp_dtype=None,
        accumulation_steps=accumulation,
        **kwargs,
    )


def _constant(lr: float = 0.1) -> LRSchedule:
    return LRSchedule("cosine", base_lr=lr, warmup_lr=lr, min_lr=lr, warmup_steps=0, total_steps=100)


def _model(cls: type[nn.Linear] = nn.Linear) -> nn.Linear:
    torch.manual_seed(1)
    return cls(FEATURES, CLASSES) if cls is nn.Linear else cls()


@pytest.mark.parametrize(
    ("num_steps", "groups"),
    [(6, [(False, 3), (False, 3), (True, 3)] * 2), (5, [(False, 3), (False, 3), (True, 3), (False, 2), (True, 2)])],
)
def test_accumulation_groups_end_with_a_step_and_the_last_takes_the_remainder(num_steps, groups):
    assert [accumulation_group(step, num_steps, 3) for step in range(num_steps)] == groups


def test_epoch_that_accumulation_does_not_divide_steps_on_its_last_micro_batches(log):
    """23 batches, accumulation 3: 8 optimizer steps, the last over the 2 remaining micro-batches (averaged over 2)."""
    batches = _batches()
    expected = _model()
    lr = 0.1
    for first in range(0, NUM_BATCHES, ACCUMULATION):  # plain SGD on each group's mean gradient
        group = batches[first : first + ACCUMULATION]
        expected.zero_grad()
        for samples, targets in group:
            (nn.functional.cross_entropy(expected(samples), targets) / len(group)).backward()
        with torch.no_grad():
            for param in expected.parameters():
                param -= lr * param.grad

    model = _model()
    state = _state(model, _constant(lr))
    stats = train_one_epoch(model, batches, state, 0, 1, None, log[0])
    assert state.global_step == 8 and stats["steps_done"] == NUM_BATCHES
    for param, reference in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(param.detach(), reference.detach(), rtol=0, atol=1e-6)
    assert all(param.grad is None for param in model.parameters())  # nothing left over for the next epoch


def test_ddp_synchronises_on_the_last_micro_batch_of_every_step_the_remainder_included(log):
    model = _model(_CountsNoSync)
    train_one_epoch(model, _batches(), _state(model, _constant()), 0, 1, None, log[0])
    assert model.unsynced == NUM_BATCHES - 8  # all but the 8 micro-batches that end a step


def test_an_epoch_stopped_and_continued_ends_bit_exactly_where_an_uninterrupted_one_does(log):
    """The remainder step keeps resume exact: stop after a step mid-epoch, continue from there with the averages."""
    batches = _batches()
    schedule = LRSchedule("cosine", base_lr=0.1, warmup_lr=0.01, min_lr=0.001, warmup_steps=3, total_steps=8)
    whole_model = _model()
    whole_state = _state(whole_model, schedule)
    whole = train_one_epoch(whole_model, batches, whole_state, 0, 1, None, log[0])

    model = _model()
    polls = iter(range(100))
    state = _state(model, schedule, stop_requested=lambda: next(polls) == 4)  # asked during micro-batch 4
    meters = EpochMeters()
    first = train_one_epoch(model, batches, state, 0, 1, None, log[0], meters=meters)
    assert state.stopped and first["steps_done"] == 6  # after the step that micro-batch 5 ends
    state.stop_requested = lambda: False
    rest = train_one_epoch(model, batches[6:], state, 0, 1, None, log[0], start_step=6, meters=meters)

    assert state.global_step == whole_state.global_step == 8
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole_model.parameters(), strict=True))
    assert (rest["train_loss"], rest["lr"]) == (whole["train_loss"], whole["lr"])


def _logged_lrs(messages: list[str]) -> list[float]:
    return [float(m) for m in re.findall(r"^Train: \[0/1\]\[\d+/\d+\]\teta \S+ lr (\S+)", "\n".join(messages), re.M)]


def test_logged_and_returned_learning_rates_are_the_ones_the_steps_used(log):
    """Step 0 logs warmup_lr (not step 1's rate); the epoch's lr is its last step's (not the next one, min_lr)."""
    schedule = LRSchedule("cosine", base_lr=0.5, warmup_lr=0.125, min_lr=0.0625, warmup_steps=2, total_steps=4)
    model = _model()
    state = _state(model, schedule, accumulation=1, print_freq=1)
    stats = train_one_epoch(model, _batches(4), state, 0, 1, None, log[0])
    assert _logged_lrs(log[1].messages) == pytest.approx([schedule.lr_at(step) for step in range(4)], abs=1e-6)
    assert stats["lr"] == schedule.lr_at(3) != schedule.min_lr


def test_a_cpu_step_log_gives_the_peak_resident_memory_by_name(log):
    model = _model()
    train_one_epoch(model, _batches(2), _state(model, _constant(), accumulation=1), 0, 1, None, log[0])
    step_lines = [m for m in log[1].messages if m.startswith("Train: [0/1]")]
    assert step_lines and all(re.search(r"\tpeak rss [1-9]\d*MB$", line) for line in step_lines), step_lines
    assert not any("mem 0MB" in line for line in step_lines)


@pytest.mark.parametrize(("name", "prefix"), [("", "Test"), ("EMA", "Test (EMA)")])
def test_evaluation_logs_its_progress_every_print_freq_batches_and_names_the_ema(log, name, prefix):
    model = _model()
    result = evaluate(model, _batches(6), torch.device("cpu"), None, log[0], print_freq=2, name=name)
    progress = [m for m in log[1].messages if m.startswith(prefix + ":")]
    pattern = re.escape(prefix) + r": \[(\d)/6\]\teta \d+:\d\d:\d\d\t[\d.]+ images/s\tacc1 ([\d.]+) over the (\d+) "
    matches = [re.match(pattern, line) for line in progress]
    assert all(matches), progress
    assert [int(m.group(1)) for m in matches] == [1, 3, 5, 6]  # after batches 0, 2, 4 and the last
    assert [int(m.group(3)) for m in matches] == [BATCH, 3 * BATCH, 5 * BATCH, 6 * BATCH]
    assert float(matches[-1].group(2)) == pytest.approx(result["acc1"], abs=1e-3)  # the running top-1 ends exact
    summary = [m for m in log[1].messages if m.startswith(" * ")]
    assert len(summary) == 1 and summary[0].startswith(f" * {name} Acc@1" if name else " * Acc@1")
