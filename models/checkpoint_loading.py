"""Strict loading of released-layout state dicts into our models.

Released checkpoints also store derived buffers (v1 index tables and ring selections, shift masks). Ours are
rebuilt from the configuration (non-persistent; modules list the released ones with ``released_buffers()``), so
each stored one is compared with what the model computes: a difference means the checkpoint belongs to another
configuration, and is an error. Every other key must match a parameter or persistent buffer by name and shape.

Some buffers cannot be rebuilt and are loaded (v2's top-K key indices record torch.topk's tie-breaks). A module
holding such buffers checks the checkpoint's values with ``loaded_buffer_problems(buffers) -> {name: reason}``
(its own buffers, by local name, shapes already matching); any reason is an error.

Through timm (``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``) the same checks
run in ``checkpoint_filter_fn``; ``load_pretrained_file`` reads the file with ``utils.checkpoint.load_checkpoint_file``
(weights only, plus the yacs ``CfgNode`` released files pickle their config in: timm's own loader refuses that).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from utils.checkpoint import load_checkpoint_file
from utils.errors import CheckpointError


class CheckpointMismatchError(CheckpointError, ValueError):
    """A state dict that does not fit the model; the message names the offending keys and shapes."""


# The names of the derived buffers released modules store (their ``released_buffers()``), whatever the configuration:
# a checkpoint of another window, image size or number of levels holds ones this model does not.
RELEASED_BUFFER_NAME = re.compile(
    r"(^|\.)(relative_position_index(_\d+)?|valid_ind_rolled|valid_ind_unfold_\d+|attn_mask)$"
)


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


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint: unwrapped from ``{'model': ...}`` / ``{'state_dict': ...}`` (ours, released,
    timm's), without DDP's ``module.`` prefix; a bare state dict is returned as it is."""
    for wrapper in ("model", "state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
    state_dict = dict(checkpoint)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def load_official_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a released-layout (or our own) state dict strictly; see ``check_state_dict`` for the checks.

    A wrapped checkpoint is unwrapped (``unwrap_state_dict``). Returns the model.
    """
    model.load_state_dict(check_state_dict(model, unwrap_state_dict(state_dict)), strict=True)
    return model


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: a released or own checkpoint -> the entries to load into ``model``.

    The checkpoint is a state dict or ``{'model': state_dict, ...}``; it is checked as strictly as by
    ``load_official_weights`` (``check_state_dict``), except for the head when the model was built for another number
    of classes than its pretrained cfg's (``num_classes`` other than 1000): then, as timm does, the checkpoint's head
    is dropped and the model keeps its freshly initialised one.
    """
    state_dict = unwrap_state_dict(checkpoint)
    checkpoint_classes = getattr(model, "pretrained_cfg", {}).get("num_classes")
    if checkpoint_classes is not None and model.num_classes != checkpoint_classes:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
        state_dict.update({f"head.{key}": value for key, value in model.head.state_dict().items()})
    return check_state_dict(model, state_dict)


def load_pretrained_file(model: nn.Module, path: str) -> nn.Module:
    """Load a checkpoint file (``.pth`` or ``.safetensors``, ours or released, v1 or v2) into ``model`` through
    ``checkpoint_filter_fn``, strictly and without running code from the file. Returns the model."""
    model.load_state_dict(checkpoint_filter_fn(load_checkpoint_file(path), model), strict=True)
    return model
