"""Image transforms and Mixup/CutMix built from the config, as in the released Swin/Focal ``build.py``.

Deviations from the released code, both for inputs larger than the model's (e.g. the toy set drawn at
40 px, trained at 32 px): at IMG_SIZE <= 32 training resizes to IMG_SIZE before ``RandomCrop(padding=4)``, and
evaluation always resizes (the released code assumed 32 px CIFAR-like inputs there).

timm's RandAugment asks Pillow to posterize to 0 bits (a black image) when the sampled magnitude reaches
its maximum; recent Pillow (13 here) rejects 0 bits with a ValueError that would stop a run at random. The
augmentation ops of the training transform are given a posterize that keeps timm's 0-bit result.
"""

from __future__ import annotations

from collections.abc import Iterator

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms
from yacs.config import CfgNode

from utils.errors import ConfigError

# ImageNet evaluation protocol: resize to IMG_SIZE / 0.875 (224 -> 256), then centre crop IMG_SIZE.
EVAL_CROP_PCT = 0.875
# Largest input size trained with a padded random crop instead of a random resized crop.
SMALL_IMG_SIZE = 32


def _optional(value: str) -> str | None:
    return None if value in ("", "none") else value


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize op, with 0 bits giving the black image older Pillow gave (Pillow 13 raises)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: transforms.Compose) -> Iterator[auto_augment.AugmentOp]:
    """The ops of the RandAugment / AutoAugment / AugMix stages of ``transform``."""
    for stage in transform.transforms:
        if isinstance(stage, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
            yield from stage.ops
        elif isinstance(stage, auto_augment.AutoAugment):
            for sub_policy in stage.policy:
                yield from sub_policy


def _train_transform(config: CfgNode) -> transforms.Compose:
    """timm's ImageNet training pipeline (random resized crop, flip, RandAugment, random erasing)."""
    aug = config.AUG
    size = config.DATA.IMG_SIZE
    try:
        transform = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=_optional(aug.AUTO_AUGMENT),
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
        )
    except AssertionError as error:  # timm's policy parsers assert on a section they do not know
        raise ConfigError(f"timm cannot build AUG.AUTO_AUGMENT {aug.AUTO_AUGMENT!r}: {error}") from None
    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    if size <= SMALL_IMG_SIZE:
        interpolation = _fixed_interpolation(config.DATA.INTERPOLATION)
        transform.transforms[0] = transforms.Compose(
            [transforms.Resize(size, interpolation=interpolation), transforms.RandomCrop(size, padding=4)]
        )
    return transform


def _fixed_interpolation(name: str) -> transforms.InterpolationMode:
    """DATA.INTERPOLATION as a fixed mode ('random' only makes sense in training: bicubic)."""
    return str_to_interp_mode("bicubic" if name == "random" else name)


def _eval_transform(config: CfgNode) -> transforms.Compose:
    """Deterministic resize (and centre crop when TEST.CROP), then normalisation."""
    size = config.DATA.IMG_SIZE
    interpolation = _fixed_interpolation(config.DATA.INTERPOLATION)
    if config.TEST.CROP:
        resize = [
            transforms.Resize(int(size / EVAL_CROP_PCT), interpolation=interpolation),
            transforms.CenterCrop(size),
        ]
    else:
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    return transforms.Compose(
        [*resize, transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    )


def build_transform(is_train: bool, config: CfgNode) -> transforms.Compose:
    """The image transform of the training or the evaluation split (PIL image -> normalised tensor)."""
    return _train_transform(config) if is_train else _eval_transform(config)


def build_mixup(config: CfgNode) -> Mixup | None:
    """Batch-level Mixup/CutMix producing smoothed soft targets, or None when both are off."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.CUTMIX,
        cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=config.MODEL.NUM_CLASSES,
    )
