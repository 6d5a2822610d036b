"""YACS configuration: defaults, YAML files with ``BASE:`` inheritance, and command-line overrides.

Key names follow the released Focal Transformer / Swin ``config.py`` so released YAML files merge
unchanged. Files are read with ``yaml.safe_load``; nothing in a config is ever executed.
An unknown key or a value of the wrong type is a ``ConfigError`` that names the key (and suggests the
closest valid one).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from utils.errors import ConfigError

_C = CN()

# Base config files merged before this one (paths relative to the file that names them).
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data settings
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size for a single process (GPU); the total batch is this x world size x accumulation steps.
_C.DATA.BATCH_SIZE = 128
# Path to the dataset root (holds train/ and val/, or the zip files in zip mode).
_C.DATA.DATA_PATH = ""
# Dataset name: 'imagenet' (folder or zip layout) or 'toy' (embedded, generated demo data).
_C.DATA.DATASET = "imagenet"
# Input image size (square).
_C.DATA.IMG_SIZE = 224
# Interpolation for resizing: 'random', 'bilinear' or 'bicubic'.
_C.DATA.INTERPOLATION = "bicubic"
# Read images from train.zip / val.zip (with train_map.txt / val_map.txt) instead of folders.
_C.DATA.ZIP_MODE = False
# Zip-mode cache: 'no' (read lazily), 'part' (each process caches its shard), 'full' (cache everything).
_C.DATA.CACHE_MODE = "part"
# Pin CPU memory in the DataLoader for faster host-to-device copies.
_C.DATA.PIN_MEMORY = True
# Number of data loading worker processes per training process.
_C.DATA.NUM_WORKERS = 8
# Skip (log and count) unreadable images instead of stopping with an error naming the file; evaluation leaves
# them out of its accuracy and reports how many as num_skipped.
_C.DATA.SKIP_CORRUPT = False
# Toy dataset: folder that holds the generated images (empty: <repo>/.cache/toy_data).
_C.DATA.TOY_ROOT = ""
# Toy dataset: side of the generated images in pixels.
_C.DATA.TOY_IMAGE_SIZE = 64
# Toy dataset: training images per class.
_C.DATA.TOY_TRAIN_PER_CLASS = 100
# Toy dataset: validation images per class.
_C.DATA.TOY_VAL_PER_CLASS = 20

# -----------------------------------------------------------------------------
# Model settings
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model family: 'focal' (v1) or 'focalv2' (focal-fast).
_C.MODEL.TYPE = "focal"
# Model name: names the output folder (and a registered variant where one exists).
_C.MODEL.NAME = "focal_tiny_patch4_window7_224"
# Checkpoint to fine-tune from (weights only; see --pretrained).
_C.MODEL.PRETRAINED = ""
# Checkpoint to resume from (model, optimizer, scheduler, ...), or to evaluate with --eval.
_C.MODEL.RESUME = ""
# Number of classes of the classifier head.
_C.MODEL.NUM_CLASSES = 1000
# Dropout rate before the head and after the embeddings.
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth rate (linearly increasing over blocks).
_C.MODEL.DROP_PATH_RATE = 0.1
# Label smoothing (used when Mixup/CutMix are off; otherwise folded into Mixup's soft targets).
_C.MODEL.LABEL_SMOOTHING = 0.1

# Focal Transformer parameters (names as in the released configs)
_C.MODEL.FOCAL = CN()
# Patch size of the stem.
_C.MODEL.FOCAL.PATCH_SIZE = 4
# Input channels.
_C.MODEL.FOCAL.IN_CHANS = 3
# Embedding dimension of stage 0 (doubles every stage).
_C.MODEL.FOCAL.EMBED_DIM = 96
# Number of blocks per stage.
_C.MODEL.FOCAL.DEPTHS = [2, 2, 6, 2]
# Number of attention heads per stage.
_C.MODEL.FOCAL.NUM_HEADS = [3, 6, 12, 24]
# Window size of the fine-grained attention.
_C.MODEL.FOCAL.WINDOW_SIZE = 7
# MLP hidden size / embedding size.
_C.MODEL.FOCAL.MLP_RATIO = 4.0
# Bias in the qkv projection.
_C.MODEL.FOCAL.QKV_BIAS = True
# Attention scale override; None, False or 0 mean head_dim ** -0.5 (the released default is False).
_C.MODEL.FOCAL.QK_SCALE = None
# Absolute position embedding.
_C.MODEL.FOCAL.APE = False
# LayerNorm after the stem.
_C.MODEL.FOCAL.PATCH_NORM = True
# Shift the windows of odd blocks by window_size // 2 (Swin-style).
_C.MODEL.FOCAL.USE_SHIFT = False
# Stages that get pooled (coarse) focal levels; the others only have the window and the ring.
_C.MODEL.FOCAL.FOCAL_STAGES = [0, 1, 2, 3]
# Focal levels per stage (1: window + ring; 2+: plus pooled levels).
_C.MODEL.FOCAL.FOCAL_LEVELS = [1, 1, 1, 1]
# Focal window (pooled neighbourhood size) per stage.
_C.MODEL.FOCAL.FOCAL_WINDOWS = [7, 5, 3, 1]
# Pooling of the coarse levels: 'fc', 'conv', 'mean', 'max' or 'none'.
_C.MODEL.FOCAL.FOCAL_POOL = "fc"
# Focal-fast (v2) only: number of nearest tokens / pooled windows each window attends to.
_C.MODEL.FOCAL.FOCAL_TOPK = 128
# Accepted for compatibility; the released model ignores it (the ring is set by EXPAND_SIZES).
_C.MODEL.FOCAL.EXPAND_STAGES = [0, 1, 2, 3]
# Width of the expanded ring of fine tokens around each window, per stage.
_C.MODEL.FOCAL.EXPAND_SIZES = [3, 3, 3, 3]
# Which blocks expand: 'all', 'even' (only odd-index blocks expand) or 'odd' (only even-index blocks).
_C.MODEL.FOCAL.EXPAND_LAYER = "all"
# Convolutional stem (7x7/s4) and downsampling (3x3/s2) instead of patchify convolutions.
_C.MODEL.FOCAL.USE_CONV_EMBED = False
# Layer scale (learned per-channel residual gains).
_C.MODEL.FOCAL.USE_LAYERSCALE = False
# Initial value of the layer scale gains.
_C.MODEL.FOCAL.LAYERSCALE_VALUE = 1e-4
# GroupNorm before each downsampling convolution.
_C.MODEL.FOCAL.USE_PRE_NORM = False

# -----------------------------------------------------------------------------
# Training settings
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
# First epoch (set by resume).
_C.TRAIN.START_EPOCH = 0
# Total training epochs.
_C.TRAIN.EPOCHS = 300
# Linear warmup epochs.
_C.TRAIN.WARMUP_EPOCHS = 20
# AdamW weight decay (not applied to norms, biases, position tables).
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rate at a total batch of 512 (scaled linearly with the total batch).
_C.TRAIN.BASE_LR = 5e-4
# Learning rate at the start of warmup (at a total batch of 512).
_C.TRAIN.WARMUP_LR = 5e-7
# Final learning rate of the cosine schedule (at a total batch of 512).
_C.TRAIN.MIN_LR = 5e-6
# Gradient clipping max norm (0 disables clipping; the norm is still logged).
_C.TRAIN.CLIP_GRAD = 5.0
# Resume automatically from the newest valid checkpoint in the output folder.
_C.TRAIN.AUTO_RESUME = True
# Gradient accumulation steps (0 or 1: none).
_C.TRAIN.ACCUMULATION_STEPS = 1
# Gradient checkpointing of every block (saves memory, costs compute).
_C.TRAIN.USE_CHECKPOINT = False
# Compile the model with torch.compile.
_C.TRAIN.COMPILE = False
# Skip an optimizer step whose loss is not finite instead of stopping.
_C.TRAIN.SKIP_NONFINITE = False

# LR scheduler
_C.TRAIN.LR_SCHEDULER = CN()
# Scheduler after warmup: 'cosine', 'linear' or 'step'.
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
# Step scheduler: epochs between decays.
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# Step scheduler: multiplicative decay.
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# Optimizer: 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = "adamw"
# AdamW epsilon.
_C.TRAIN.OPTIMIZER.EPS = 1e-8
# AdamW betas.
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# SGD momentum.
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# -----------------------------------------------------------------------------
# Augmentation settings
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Colour jitter strength (used when AUTO_AUGMENT is empty).
_C.AUG.COLOR_JITTER = 0.4
# timm auto-augment policy string ('' or 'none' disables it).
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
# Random erasing probability.
_C.AUG.REPROB = 0.25
# Random erasing mode.
_C.AUG.REMODE = "pixel"
# Random erasing count.
_C.AUG.RECOUNT = 1
# Mixup alpha (> 0 enables Mixup).
_C.AUG.MIXUP = 0.8
# CutMix alpha (> 0 enables CutMix).
_C.AUG.CUTMIX = 1.0
# CutMix min/max area ratio (overrides alpha when set).
_C.AUG.CUTMIX_MINMAX = None
# Probability of applying Mixup or CutMix to a batch.
_C.AUG.MIXUP_PROB = 1.0
# Probability of switching to CutMix when both are enabled.
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# How to apply Mixup/CutMix: 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Testing settings
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Resize to int(IMG_SIZE / 0.875) then centre crop (the ImageNet protocol); False: resize to IMG_SIZE.
_C.TEST.CROP = True
# Accepted for compatibility; evaluation always counts every image exactly once.
_C.TEST.SEQUENTIAL = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision: 'bf16', 'fp16', 'none', or 'auto' (bf16 on GPUs that support it, else off).
_C.AMP_DTYPE = "auto"
# Released flag, still accepted: 'O0' turns mixed precision off, other levels use native autocast.
_C.AMP_OPT_LEVEL = ""
# Output root; the run folder is <OUTPUT>/<MODEL.NAME>/<TAG>.
_C.OUTPUT = ""
# Tag of the run.
_C.TAG = "default"
# Save a checkpoint every SAVE_FREQ epochs (plus 'last' every epoch and 'best').
_C.SAVE_FREQ = 1
# Number of periodic checkpoints to keep (newest first); 'last' and 'best' are always kept.
_C.SAVE_KEEP = 3
# Log every PRINT_FREQ steps.
_C.PRINT_FREQ = 10
# Random seed: the data order and each image's augmentation derive from it (data/resumable.py); each process
# seeds its global generators with SEED + rank.
_C.SEED = 0
# Keep an exponential moving average of the weights (evaluated and checkpointed beside the model).
_C.MODEL_EMA = False
# EMA decay per optimizer step.
_C.MODEL_EMA_DECAY = 0.9999
# Ramp the EMA decay up over the first updates: min(decay, (1 + n) / (10 + n)).
_C.MODEL_EMA_WARMUP = True
# With --eval: evaluate the checkpoint's EMA weights instead of the model's.
_C.EVAL_EMA = False
# Only evaluate.
_C.EVAL_MODE = False
# Only measure throughput.
_C.THROUGHPUT_MODE = False
# Local rank (set from the environment by torchrun).
_C.LOCAL_RANK = 0


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# Keys whose default is None (unset): the type a set value takes, and the values that mean unset.
_OPTIONAL_KEYS = {
    "MODEL.FOCAL.QK_SCALE": (0.0, (None, False)),  # the released configs write False
    "AUG.CUTMIX_MINMAX": ([0.0], (None,)),
}
# Text keys that take one of a few names (``_check_values`` also checks the auto-augment policy's shape).
_CHOICES = {
    "DATA.INTERPOLATION": ("random", "bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"),
    "AUG.REMODE": ("pixel", "rand", "const"),
    "AUG.MIXUP_MODE": ("batch", "pair", "elem"),
}
# timm's policy strings: a policy name, then '-'-separated sections of a key and a number (RandAugment also takes
# 't<transforms>'); timm itself refuses unknown keys when the transform is built.
_AUTO_AUGMENT = re.compile(r"(rand|augmix|original|originalr|v0|v0r|3a)(-([a-z]+\d[\d.]*|t\w+))*")


def _coerce(value: Any, default: Any, full_key: str) -> Any:
    """Return ``value`` converted to the type of ``default``; raise ConfigError when impossible."""
    if default is None:
        kind, unset = _OPTIONAL_KEYS.get(full_key, (None, ()))
        if kind is None or any(value is u for u in unset):
            return value
        return _coerce(value, kind, full_key)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '5e-4' as a string
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            if default:  # items take the type of the first default item
                value = [_coerce(item, default[0], f"{full_key}[{i}]") for i, item in enumerate(value)]
            return type(default)(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise ConfigError(f"config key {full_key} expects {type(default).__name__}, got {type(value).__name__} {value!r}")


def _merge_dict(node: CN, values: dict, prefix: str = "") -> None:
    """Merge a plain dict into ``node``, checking every key and type against the defaults."""
    for key, value in values.items():
        full_key = f"{prefix}{key}"
        if key not in node:
            candidates = [f"{prefix}{k}" for k in node]
            raise ConfigError(f"unknown config key {full_key}{_closest(full_key, candidates)}")
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full_key} is a section, got {value!r}")
            _merge_dict(node[key], value, f"{full_key}.")
        else:
            node[key] = _coerce(value, node[key], full_key)


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def merge_config_file(config: CN, path: str, _seen: tuple[str, ...] = ()) -> None:
    """Merge ``path`` into ``config``, after its ``BASE:`` files (relative to ``path``)."""
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"config file {path} includes itself through BASE")
    values = _load_yaml(path)
    bases = values.pop("BASE", None) or []
    for base in [bases] if isinstance(bases, str) else bases:
        if base:
            merge_config_file(config, os.path.join(os.path.dirname(path), base), (*_seen, real))
    config.defrost()
    _merge_dict(config, values)
    config.freeze()


def merge_opts(config: CN, opts: list[str]) -> None:
    """Merge ``KEY VALUE`` pairs (values parsed as YAML scalars or lists)."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    config.defrost()
    for key, raw in zip(opts[0::2], opts[1::2]):
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node or not isinstance(node[part], CN):
                prefix = ".".join(parents[:depth])
                raise ConfigError(
                    f"unknown config key {key}{_closest(part, list(node.keys()))}"
                    + (f" under {prefix}" if prefix else "")
                )
            node = node[part]
        if leaf in node and isinstance(node[leaf], str):
            value = raw  # text keys take the raw string ('1', 'yes' stay text)
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise ConfigError(f"--opts {key}: cannot parse value {raw!r} ({error.problem})") from None
        _merge_dict(node, {leaf: value}, ".".join(parents) + "." if parents else "")
    config.freeze()


def _check_values(config: CN) -> None:
    """Refuse values that have the right type but mean nothing (each would fail, or be ignored, much later)."""
    for key, names in _CHOICES.items():
        section, leaf = key.split(".")
        if config[section][leaf] not in names:
            raise ConfigError(f"{key} must be one of {names}, got {config[section][leaf]!r}")
    policy = config.AUG.AUTO_AUGMENT
    if policy not in ("", "none") and not _AUTO_AUGMENT.fullmatch(policy):
        raise ConfigError(
            f"AUG.AUTO_AUGMENT {policy!r} is not a timm policy: '' or 'none', or rand / augmix / original / v0 "
            "followed by -<key><number> sections, e.g. 'rand-m9-mstd0.5-inc1'"
        )
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not (len(minmax) == 2 and 0.0 < minmax[0] < minmax[1] <= 1.0):
        raise ConfigError(f"AUG.CUTMIX_MINMAX must be None or [min, max] with 0 < min < max <= 1, got {minmax}")
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    if accumulation < 0:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS must be >= 0 (0 and 1: no accumulation), got {accumulation}")


def get_default_config() -> CN:
    """A fresh copy of the defaults."""
    return _C.clone()


def _amp_from_opt_level(level: str) -> str:
    return "none" if level.upper() == "O0" else "auto"


# Command-line flags -> config keys (flags whose value is copied unchanged when given).
_FLAG_KEYS = {
    "batch_size": "DATA.BATCH_SIZE",
    "data_path": "DATA.DATA_PATH",
    "dataset": "DATA.DATASET",
    "cache_mode": "DATA.CACHE_MODE",
    "pretrained": "MODEL.PRETRAINED",
    "resume": "MODEL.RESUME",
    "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
    "amp_dtype": "AMP_DTYPE",
    "output": "OUTPUT",
    "tag": "TAG",
    "seed": "SEED",
}


def update_config(config: CN, args: argparse.Namespace) -> None:
    """Apply ``--cfg``, ``--opts`` and the dedicated flags of ``args`` to ``config`` (in that order)."""
    if getattr(args, "cfg", None):
        merge_config_file(config, args.cfg)
    if getattr(args, "opts", None):
        merge_opts(config, args.opts)
    config.defrost()
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            section, _, leaf = key.rpartition(".")
            node = config
            for part in filter(None, section.split(".")):
                node = node[part]
            node[leaf] = _coerce(value, node[leaf], key)
    if getattr(args, "zip", False):
        config.DATA.ZIP_MODE = True
    if getattr(args, "cache_mode", None) and not config.DATA.ZIP_MODE:
        raise ConfigError("--cache-mode applies to the zip layout only: add --zip (or DATA.ZIP_MODE True), or drop it")
    if getattr(args, "use_checkpoint", False):
        config.TRAIN.USE_CHECKPOINT = True
    if getattr(args, "amp_opt_level", None):
        config.AMP_OPT_LEVEL = args.amp_opt_level
        if getattr(args, "amp_dtype", None) is None:
            config.AMP_DTYPE = _amp_from_opt_level(args.amp_opt_level)
    if getattr(args, "eval", False):
        config.EVAL_MODE = True
    _check_values(config)
    if config.EVAL_MODE and not config.MODEL.RESUME:
        raise ConfigError("--eval evaluates the checkpoint given by --resume (MODEL.RESUME), and none was given")
    if getattr(args, "throughput", False):
        config.THROUGHPUT_MODE = True
    if not config.OUTPUT:
        config.OUTPUT = "output"
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


def get_config(args: argparse.Namespace | None = None) -> CN:
    """Defaults merged with ``args`` (a clone: the module defaults are never modified)."""
    config = get_default_config()
    if args is not None:
        update_config(config, args)
    return config
