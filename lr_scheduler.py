"""Per-iteration learning-rate schedules: linear warmup, then cosine, linear or step decay.

Everything is counted in optimizer steps, so with gradient accumulation the caller passes the number
of optimizer updates (not micro-batches). The learning rate is a pure function of the step
(``LRSchedule.lr_at``); the scheduler only remembers the step, so a resumed run reproduces the same
learning rates bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from yacs.config import CfgNode

from utils.errors import ConfigError
from utils.logger import get_logger

__all__ = ["SCHEDULE_NAMES", "IterLRScheduler", "LRSchedule", "build_scheduler"]

_logger = get_logger(__name__)

SCHEDULE_NAMES = ("cosine", "linear", "step")


@dataclass(frozen=True)
class LRSchedule:
    """Warmup from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then ``name`` decay.

    'cosine' and 'linear' go from ``base_lr`` at the end of warmup to ``min_lr`` at ``total_steps``
    (and stay there). 'step' multiplies ``base_lr`` by ``decay_rate`` every ``decay_steps`` steps,
    counted from step 0 as in released Swin, so warmup epochs count towards the first decay.
    """

    name: str
    base_lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_steps: int = 1
    decay_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ConfigError(
                f"unknown LR scheduler {self.name!r} (TRAIN.LR_SCHEDULER.NAME); expected one of {SCHEDULE_NAMES}"
            )
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ConfigError(
                "LR schedule needs warmup_steps >= 0 and total_steps >= 0 (TRAIN.WARMUP_EPOCHS, TRAIN.EPOCHS), got "
                f"{self.warmup_steps} and {self.total_steps}"
            )
        if self.name == "step" and self.decay_steps < 1:
            raise ConfigError(
                f"step LR schedule needs decay_steps >= 1 (TRAIN.LR_SCHEDULER.DECAY_EPOCHS), got {self.decay_steps}"
            )

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if self.name == "step":
            return self.base_lr * self.decay_rate ** (step // self.decay_steps)
        decay_span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_span)
        if self.name == "cosine":
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        return self.base_lr + (self.min_lr - self.base_lr) * progress


class IterLRScheduler:
    """Sets every parameter group's learning rate from an ``LRSchedule``, once per optimizer step.

    Kept instead of timm's ``CosineLRScheduler(warmup_prefix=True)`` (the same cosine rates): timm's
    state_dict stores the schedule itself, so a resume would keep the old schedule when TRAIN.EPOCHS is
    raised; ours stores only the step and recomputes the rate from the config (resume rules, ``resume.py``).

    After construction the optimizer holds the rate of step 0. Call ``step()`` after each optimizer
    step, or ``step_update(n)`` with the number of optimizer steps taken so far.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step_update(self, global_step: int) -> None:
        """Set the learning rate for the optimizer step numbered ``global_step`` (0-based)."""
        self.step_count = global_step
        self._apply()

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.step_update(self.step_count + 1)

    def get_last_lr(self) -> list[float]:
        """The learning rate of each parameter group, as torch schedulers report it."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The step and the schedule, as plain Python values (safe for weights-only loading)."""
        return {"step": self.step_count, "schedule": dataclasses.asdict(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved step. With an unchanged config the schedule is the saved one and the learning rates
        match an uninterrupted run exactly. A configured schedule that differs (say, TRAIN.EPOCHS raised to extend a
        run) wins, with a warning giving the rate before and after: the config says what the rest of the run does.
        """
        saved, step = LRSchedule(**state["schedule"]), int(state["step"])
        if saved != self.schedule:
            _logger.warning(
                "the configured LR schedule differs from the checkpoint's: continuing on %s instead of %s, so the "
                "learning rate at step %d is %.3g instead of %.3g",
                self.schedule,
                saved,
                step,
                self.schedule.lr_at(step),
                saved.lr_at(step),
            )
        self.step_update(step)


def build_scheduler(
    config: CfgNode,
    optimizer: torch.optim.Optimizer,
    n_iter_per_epoch: int,
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
) -> IterLRScheduler:
    """The TRAIN.LR_SCHEDULER schedule in optimizer steps (``n_iter_per_epoch`` of them per epoch).

    The learning rates are the already scaled ones from ``optim.scale_learning_rates``. A warmup that is
    not shorter than the run is allowed (short test runs) but warned about with the numbers: the rate
    never reaches ``base_lr`` or never decays.
    """
    if n_iter_per_epoch < 1:
        raise ValueError(f"n_iter_per_epoch must be at least 1, got {n_iter_per_epoch}")
    sched_cfg = config.TRAIN.LR_SCHEDULER
    schedule = LRSchedule(
        name=sched_cfg.NAME.lower(),
        base_lr=base_lr,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        warmup_steps=int(config.TRAIN.WARMUP_EPOCHS * n_iter_per_epoch),
        total_steps=int(config.TRAIN.EPOCHS * n_iter_per_epoch),
        decay_steps=int(sched_cfg.DECAY_EPOCHS * n_iter_per_epoch),
        decay_rate=sched_cfg.DECAY_RATE,
    )
    _logger.info("LR schedule: %s", schedule)
    if 0 < schedule.total_steps <= schedule.warmup_steps:
        _logger.warning(
            "the LR warmup (TRAIN.WARMUP_EPOCHS %s = %d steps) is not shorter than the run (TRAIN.EPOCHS %s = %d "
            "steps): the learning rate peaks at %.3g on the last step instead of reaching the base rate %.3g, and "
            "never decays",
            config.TRAIN.WARMUP_EPOCHS,
            schedule.warmup_steps,
            config.TRAIN.EPOCHS,
            schedule.total_steps,
            schedule.lr_at(schedule.total_steps - 1),
            base_lr,
        )
    return IterLRScheduler(optimizer, schedule)
