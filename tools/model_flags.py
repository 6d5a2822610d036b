"""The model a command-line tool's flags name: ``--cfg`` / ``--opts`` (a training run's config) or ``--model`` /
``--model-args`` (a registered Focal variant). Shared by ``export.py`` and ``visualize_attention.py``."""

from __future__ import annotations

import argparse
import json

from torch import nn

from utils.errors import ToolError


def model_from_flags(args: argparse.Namespace) -> nn.Module:
    """The model of ``args.cfg`` (with ``args.opts``) or of ``args.model`` (with ``args.model_args``, JSON); a flag
    that names no buildable model is a ``ToolError`` with status 2."""
    import timm

    import models
    from config import ConfigError, get_config

    if args.cfg:
        try:
            return models.build_model(get_config(argparse.Namespace(cfg=args.cfg, opts=args.opts)))
        except ConfigError as error:
            raise ToolError(str(error), status=2) from None
    if args.model not in models.FOCAL_VARIANTS:
        raise ToolError(f"--model {args.model} is not a registered Focal variant", status=2)
    try:
        model_args = json.loads(args.model_args)
    except ValueError as error:
        raise ToolError(f"--model-args is not JSON: {error}", status=2) from None
    return timm.create_model(args.model, **model_args)
