"""Strict loading of released-layout state dicts into our models.

Released checkpoints also store derived buffers (v1 index tables and ring selections, shift masks). Ours are
rebuilt from the configuration (non-persistent; modules list the released ones with ``released_buffers()``), so
each stored one is compared with what the model computes: a difference means the checkpoint belongs to another
configuration, and is an error. Every other key must match a parameter or persistent buffer by name and shape.

Some buffers cannot be rebuilt and are loaded (v2's top-K key indices record torch.topk's tie-breaks). A module
holding such buffers checks the checkpoint's values with ``loaded_buffer_problems(buffers) -> {name: reason}``
(its own buffers, by local name, shapes already matching); any reason is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model; the message names the offending keys and shapes."""


def released_derived_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every derived buffer a released checkpoint of this architecture holds, by full state_dict key."""
    buffers = {}
    for name, module in model.named_modules():
        released = getattr(module, "released_buffers", None)
        if callable(released):
            prefix = f"{name}." if name else ""
            buffers.update({prefix + key: value for key, value in released().items()})
    return buffers


def loaded_buffer_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """'key: reason' for every persistent buffer in ``state_dict`` that its module refuses."""
    problems = []
    for name, module in model.named_modules():
        check = getattr(module, "loaded_buffer_problems", None)
        if not callable(check):
            continue
        prefix = f"{name}." if name else ""
        own = {
            key: state_dict[prefix + key]
            for key, buffer in module.named_buffers(recurse=False)
            if prefix + key in state_dict and state_dict[prefix + key].shape == buffer.shape
        }
        problems += [f"{prefix}{key}: {reason}" for key, reason in check(own).items()]
    return problems


def _summarise(keys: list[str], limit: int | None = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if limit is not None and len(keys) > limit else "")


def key_problems(missing: list[str], unexpected: list[str], limit: int | None = 8) -> list[str]:
    """'missing keys: ...' and 'unexpected keys: ...' for those of the two that are not empty.

    Each names at most ``limit`` keys and then their count; ``limit=None`` names them all.
    """
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing, limit)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected, limit)}")
    return problems


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate ``state_dict`` against ``model``; return the entries to load (derived buffers removed).

    Raises CheckpointMismatchError naming missing / unexpected keys, shape mismatches, derived buffers that
    differ from what the model computes, and loaded buffers that their modules refuse.
    """
    derived = released_derived_buffers(model)
    expected = model.state_dict()
    to_load, wrong_derived = {}, []
    for key, value in state_dict.items():
        if key in derived and key not in expected:
            reference = derived[key]
            if value.shape != reference.shape or not torch.equal(value.to(reference.dtype), reference):
                wrong_derived.append(f"{key} {tuple(value.shape)} (model computes {tuple(reference.shape)})")
        else:
            to_load[key] = value
    missing = [k for k in expected if k not in to_load]
    unexpected = [k for k in to_load if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in to_load.items()
        if k in expected and v.shape != expected[k].shape
    ]
    invalid = loaded_buffer_problems(model, to_load)
    problems = key_problems(missing, unexpected)
    if shapes:
        problems.append(f"shape mismatches: {_summarise(shapes)}")
    if wrong_derived:
        problems.append(f"derived buffers differ from this configuration: {_summarise(wrong_derived)}")
    if invalid:
        problems.append(f"invalid buffers: {_summarise(invalid)}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return to_load


def load_official_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a released-layout (or our own) state dict strictly; see ``check_state_dict`` for the checks.

    A ``{'model': state_dict, ...}`` checkpoint is unwrapped. Returns the model.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    model.load_state_dict(check_state_dict(model, state_dict), strict=True)
    return model
