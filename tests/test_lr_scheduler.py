"""Per-iteration learning-rate schedules: warmup, cosine / linear / step decay, exact resume."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from config import get_default_config
from lr_scheduler import IterLRScheduler, LRSchedule, build_scheduler
from utils.errors import ConfigError

BASE_LR, WARMUP_LR, MIN_LR = 1e-3, 1e-6, 1e-5
ITERS = 10  # optimizer steps per epoch


def _scheduler(name: str = "cosine", epochs: int = 20, warmup_epochs: int = 5) -> IterLRScheduler:
    config = get_default_config()
    config.defrost()
    config.TRAIN.EPOCHS = epochs
    config.TRAIN.WARMUP_EPOCHS = warmup_epochs
    config.TRAIN.LR_SCHEDULER.NAME = name
    config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 6
    config.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return build_scheduler(config, optimizer, ITERS, BASE_LR, WARMUP_LR, MIN_LR)


def _lrs(scheduler: IterLRScheduler, steps: int) -> list[float]:
    """The learning rate the optimizer holds before each of the next ``steps`` steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return lrs


def test_warmup_starts_at_warmup_lr_and_ends_at_base_lr():
    scheduler = _scheduler()
    assert scheduler.optimizer.param_groups[0]["lr"] == WARMUP_LR
    schedule = scheduler.schedule
    assert schedule.lr_at(25) == pytest.approx((WARMUP_LR + BASE_LR) / 2)
    assert schedule.lr_at(50) == BASE_LR


def test_warmup_is_increasing_linearly():
    lrs = [_scheduler().schedule.lr_at(step) for step in range(51)]
    increments = [b - a for a, b in zip(lrs, lrs[1:])]
    assert increments == pytest.approx([(BASE_LR - WARMUP_LR) / 50] * 50)


def test_cosine_continues_from_warmup_without_a_jump():
    schedule = _scheduler().schedule
    warmup_end = 50
    step_size = (BASE_LR - WARMUP_LR) / warmup_end
    before, at, after = (schedule.lr_at(warmup_end + offset) for offset in (-1, 0, 1))
    assert at - before == pytest.approx(step_size)
    assert 0 < at - after < step_size  # cosine starts flat
    assert at == BASE_LR


def test_cosine_midpoint_and_end():
    schedule = _scheduler().schedule
    assert schedule.lr_at(125) == pytest.approx((BASE_LR + MIN_LR) / 2)
    assert schedule.lr_at(200) == pytest.approx(MIN_LR)
    assert schedule.lr_at(500) == pytest.approx(MIN_LR)


def test_cosine_follows_the_formula():
    schedule = _scheduler().schedule
    step = 80
    progress = (step - 50) / 150
    expected = MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * progress))
    assert schedule.lr_at(step) == pytest.approx(expected)


def test_linear_decays_to_min_lr():
    schedule = _scheduler("linear").schedule
    assert schedule.lr_at(50) == BASE_LR
    assert schedule.lr_at(125) == pytest.approx((BASE_LR + MIN_LR) / 2)
    assert schedule.lr_at(200) == pytest.approx(MIN_LR)


def test_step_decays_every_decay_epochs_counted_from_the_start():
    schedule = _scheduler("step", warmup_epochs=2).schedule
    assert schedule.lr_at(0) == WARMUP_LR
    assert schedule.lr_at(20) == BASE_LR
    assert schedule.lr_at(59) == BASE_LR
    assert schedule.lr_at(60) == pytest.approx(BASE_LR * 0.5)
    assert schedule.lr_at(125) == pytest.approx(BASE_LR * 0.25)


def test_zero_warmup_starts_at_base_lr():
    assert _scheduler(warmup_epochs=0).schedule.lr_at(0) == BASE_LR


def test_step_update_sets_the_rate_of_that_step():
    scheduler = _scheduler()
    scheduler.step_update(125)
    assert scheduler.get_last_lr() == [scheduler.schedule.lr_at(125)]


def test_resume_from_state_dict_gives_identical_learning_rates():
    original = _scheduler()
    _lrs(original, 37)
    state = original.state_dict()
    expected = _lrs(original, 100)

    resumed = _scheduler()
    resumed.load_state_dict(state)
    assert _lrs(resumed, 100) == expected  # bit-exact, not approximate


def test_a_changed_config_wins_over_the_saved_schedule(caplog, monkeypatch):
    """Raising TRAIN.EPOCHS on resume extends the run: the rest follows the longer schedule (not the min LR the
    saved, shorter one has reached)."""
    monkeypatch.setattr(logging.getLogger("focal"), "propagate", True)  # a run's logger stops at its own handlers
    original = _scheduler(epochs=20)
    _lrs(original, 150)
    resumed = _scheduler(epochs=30)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(original.state_dict())
    assert resumed.schedule == _scheduler(epochs=30).schedule
    assert resumed.get_last_lr() == [resumed.schedule.lr_at(150)] != original.get_last_lr()
    assert "configured LR schedule differs" in caplog.text


def test_unknown_scheduler_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="poly"):
        _scheduler("poly")


def test_schedule_state_is_plain_python():
    state = _scheduler().state_dict()
    assert all(isinstance(value, (int, float, str)) for value in state["schedule"].values())
    assert LRSchedule(**state["schedule"]).lr_at(0) == WARMUP_LR


@pytest.mark.parametrize(("epochs", "warmup_epochs"), [(1, 2), (2, 2)])
def test_a_warmup_not_shorter_than_the_run_is_warned_about_with_the_numbers(caplog, monkeypatch, epochs, warmup_epochs):
    """TRAIN.EPOCHS 1 with 2 warmup epochs never reaches the base rate; 2 and 2 end at the peak without decaying."""
    monkeypatch.setattr(logging.getLogger("focal"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        schedule = _scheduler(epochs=epochs, warmup_epochs=warmup_epochs).schedule
    # By record: after other tests a record can reach pytest's capture by two handler paths.
    records = {id(record): record for record in caplog.records if record.levelno == logging.WARNING}
    warnings = [record.getMessage() for record in records.values()]
    assert len(warnings) == 1, warnings
    peak = schedule.lr_at(epochs * ITERS - 1)
    assert peak < BASE_LR
    assert (
        f"TRAIN.WARMUP_EPOCHS {warmup_epochs} = {warmup_epochs * ITERS} steps) is not shorter than the run "
        f"(TRAIN.EPOCHS {epochs} = {epochs * ITERS} steps): the learning rate peaks at {peak:.3g}"
    ) in warnings[0]
    assert f"base rate {BASE_LR:.3g}" in warnings[0]


def test_a_warmup_shorter_than_the_run_is_not_warned_about(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("focal"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        _scheduler(epochs=3, warmup_epochs=2)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
