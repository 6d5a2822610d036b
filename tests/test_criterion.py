"""Label smoothing reaches the training loss whether Mixup/CutMix are on or off.

With Mixup or CutMix, smoothing is folded into Mixup's soft targets and the loss is a plain soft-target cross-entropy;
without them, ``build_criterion`` smooths the hard labels itself. Either way the loss the training loop minimises must
be the cross-entropy against the smoothed (and mixed) label distribution, which these tests compute independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import get_default_config
from data.build import build_loader
from main import build_criterion

NUM_CLASSES = 10  # the toy set's
BATCH = 8
SIDE = 16  # image side: CutMix boxes of several sizes fit
# Labels of the batch: every image is mixed with the one at the mirrored position (timm's x.flip(0)), of another class.
LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])

MIXING = {"none": (0.0, 0.0), "mixup": (0.8, 0.0), "cutmix": (0.0, 1.0), "both": (0.8, 1.0)}
SMOOTHING = [0.0, 0.1]


def _config(toy_root: Path, mixing: str, smoothing: float):
    """The default recipe on a tiny toy set, with Mixup/CutMix and label smoothing set as given."""
    cfg = get_default_config()
    cfg.defrost()
    cfg.DATA.DATASET = "toy"
    cfg.DATA.TOY_ROOT = str(toy_root)
    cfg.DATA.TOY_IMAGE_SIZE = SIDE
    cfg.DATA.TOY_TRAIN_PER_CLASS = 1
    cfg.DATA.TOY_VAL_PER_CLASS = 1
    cfg.DATA.IMG_SIZE = SIDE
    cfg.DATA.BATCH_SIZE = BATCH
    cfg.DATA.NUM_WORKERS = 0
    cfg.MODEL.NUM_CLASSES = NUM_CLASSES
    cfg.AUG.MIXUP, cfg.AUG.CUTMIX = MIXING[mixing]
    cfg.MODEL.LABEL_SMOOTHING = smoothing
    cfg.freeze()
    return cfg


def _training_targets(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The targets the training loop hands the criterion for a batch of ``LABELS``, and the label distribution they
    must stand for: (targets, expected (B, NUM_CLASSES), each image's weight lam (B,), whether Mixup/CutMix ran).

    Image i is the constant i, so the mixed image's mean gives the weight ``lam`` of its own label (Mixup blends,
    CutMix pastes a box of the mirrored image; both mix with image B-1-i).
    """
    mixup_fn = build_loader(cfg, rank=0, world_size=1).mixup_fn
    images = torch.arange(BATCH, dtype=torch.float32).view(BATCH, 1, 1, 1).expand(BATCH, 3, SIDE, SIDE).clone()
    targets = LABELS
    if mixup_fn is not None:
        np.random.seed(seed)  # Mixup draws lam, the mode and the box from numpy
        images, targets = mixup_fn(images, LABELS.clone())
    own, other = torch.arange(BATCH, dtype=torch.float64), torch.arange(BATCH - 1, -1, -1, dtype=torch.float64)
    lam = (images.double().mean((1, 2, 3)) - other) / (own - other)  # (B,)
    smoothing = cfg.MODEL.LABEL_SMOOTHING

    def smoothed(labels: torch.Tensor) -> torch.Tensor:
        return (1 - smoothing) * F.one_hot(labels, NUM_CLASSES).double() + smoothing / NUM_CLASSES

    expected = lam[:, None] * smoothed(LABELS) + (1 - lam[:, None]) * smoothed(LABELS.flip(0))
    return targets, expected, lam, mixup_fn is not None


@pytest.mark.parametrize("smoothing", SMOOTHING)
@pytest.mark.parametrize("mixing", list(MIXING))
def test_training_targets_are_the_smoothed_mixed_labels(toy_root, mixing, smoothing):
    targets, expected, lam, mixed = _training_targets(_config(toy_root, mixing, smoothing))
    assert mixed == (mixing != "none")
    if not mixed:  # hard labels: the criterion smooths them (next test)
        assert torch.equal(targets, LABELS)
        return
    assert targets.shape == (BATCH, NUM_CLASSES)
    torch.testing.assert_close(targets.double(), expected, rtol=0, atol=1e-6)
    assert (lam < 0.99).any(), f"the batch was hardly mixed (lam {lam.tolist()}): a weak test"


@pytest.mark.parametrize("smoothing", SMOOTHING)
@pytest.mark.parametrize("mixing", list(MIXING))
def test_training_loss_is_cross_entropy_against_the_smoothed_mixed_labels(toy_root, mixing, smoothing):
    cfg = _config(toy_root, mixing, smoothing)
    targets, expected, _, mixed = _training_targets(cfg)
    criterion = build_criterion(cfg, mixed)
    logits = torch.randn(BATCH, NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    loss = criterion(logits, targets)
    reference = -(expected * F.log_softmax(logits.double(), dim=1)).sum(1).mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
