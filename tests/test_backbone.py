"""FocalBackbone: multi-scale features at any input size, and a torchvision detector trained on top of it."""

from __future__ import annotations

import math

import pytest
import torch
from golden import FIXTURES, load_fixture
from tiny_models import TINY_FOCAL, tiny_focal
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from models import CheckpointMismatchError, FocalTransformer, FocalTransformerV2, load_official_weights
from models import focal_transformer as focal_transformer_module
from models.backbone import FocalBackbone, FocalBackboneWithFPN, create_backbone
from models.checkpoint_loading import released_derived_buffers

# Backbones: no classifier head, no stochastic depth.
TINY = dict(TINY_FOCAL, num_classes=0, drop_path_rate=0.0)
VARIANTS = {
    "fc": {},
    "conv_embed_ape_conv_pool": dict(use_conv_embed=True, ape=True, focal_pool="conv"),
    "shift_layerscale_prenorm": dict(use_shift=True, use_layerscale=True, use_pre_norm=True, focal_pool="mean"),
}


def tiny_model(**overrides) -> FocalTransformer:
    return tiny_focal(**{**TINY, **overrides})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("size", [(97, 130), (64, 64), (33, 40)])
def test_feature_shapes_and_strides_at_any_size(variant, size):
    backbone = FocalBackbone(tiny_model(**VARIANTS[variant])).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, *size))
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.out_channels == [16, 32, 64, 128]
    assert [info["reduction"] for info in backbone.feature_info] == backbone.strides
    assert [info["num_chs"] for info in backbone.feature_info] == backbone.out_channels
    for feature, channels, stride in zip(features, backbone.out_channels, backbone.strides):
        assert feature.shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(feature).all()


def test_subset_of_stages_drops_later_stages_and_freezes_unused_downsample():
    backbone = FocalBackbone(tiny_model(), out_indices=(1, 2))
    assert len(backbone.layers) == 3
    assert backbone.strides == [8, 16] and backbone.out_channels == [32, 64]
    assert sorted(k for k in backbone.state_dict() if k.startswith("norm")) == [
        "norm1.bias",
        "norm1.weight",
        "norm2.bias",
        "norm2.weight",
    ]
    features = backbone(torch.randn(1, 3, 50, 70))
    sum(f.sum() for f in features).backward()
    unused = backbone.layers[2].downsample.parameters()
    assert all(not p.requires_grad and p.grad is None for p in unused)
    trained = [p for n, p in backbone.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)


def test_invalid_out_indices_raise():
    with pytest.raises(ValueError, match="beyond"):
        FocalBackbone(tiny_model(), out_indices=(1, 4))
    with pytest.raises(ValueError, match="increasing"):
        FocalBackbone(tiny_model(), out_indices=(2, 1))


def test_v2_models_are_refused():
    model = FocalTransformerV2(**dict(TINY, focal_windows=(3, 3, 1, 1), img_size=64), focal_topK=8)
    with pytest.raises(TypeError, match="v1 focal blocks"):
        FocalBackbone(model)


def test_last_stage_at_constructed_size_matches_forward_features():
    model = tiny_model().eval()
    backbone = FocalBackbone(model).eval()
    backbone.norm3.load_state_dict(model.norm.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_features(images).permute(0, 3, 1, 2)
        assert torch.equal(backbone(images)[-1], expected)


def test_gradients_reach_every_parameter():
    backbone = FocalBackbone(tiny_model(ape=True))
    features = backbone(torch.randn(2, 3, 97, 130))
    sum((f**2).mean() for f in features).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_grad_checkpointing_runs_and_gives_the_same_gradients(monkeypatch):
    calls = []
    real_checkpoint = focal_transformer_module.checkpoint
    monkeypatch.setattr(
        focal_transformer_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    images = torch.randn(1, 3, 40, 56)
    grads = []
    for enable in (False, True):
        backbone = FocalBackbone(tiny_model())
        backbone.set_grad_checkpointing(enable)
        sum(f.sum() for f in backbone(images)).backward()
        grads.append(backbone.patch_embed.proj.weight.grad)
    assert len(calls) == sum(TINY["depths"])  # every block of the checkpointed run, none of the other
    torch.testing.assert_close(grads[0], grads[1])


def test_features_are_the_normalised_stage_outputs_of_forward_intermediates():
    model = tiny_model().eval()
    backbone = FocalBackbone(model, out_indices=(0, 2)).eval()
    images = torch.randn(2, 3, 64, 64)  # a multiple of the deepest stride: no padding, no cropping
    with torch.no_grad():
        taps = model.forward_intermediates(images, indices=(0, 2), output_fmt="NHWC", intermediates_only=True)
        expected = [backbone.norm0(taps[0]), backbone.norm2(taps[1])]
        assert [torch.equal(f, e.permute(0, 3, 1, 2)) for f, e in zip(backbone(images), expected)] == [True, True]


def released_detection_state_dict(fixture: dict) -> dict:
    """A released detection backbone's state dict built from a classification fixture: the stem and stages with the
    released derived buffers, a LayerNorm ``norm{i}`` per stage, no final norm and no head."""
    state_dict = {k: v for k, v in fixture["state_dict"].items() if not k.startswith(("norm.", "head."))}
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        channels = fixture["kwargs"]["embed_dim"] * 2**i
        state_dict[f"norm{i}.weight"] = 1 + 0.1 * torch.randn(channels, generator=generator, dtype=torch.float64)
        state_dict[f"norm{i}.bias"] = 0.1 * torch.randn(channels, generator=generator, dtype=torch.float64)
    return state_dict


def test_released_detection_backbone_layout_loads_strictly():
    fixture = load_fixture(FIXTURES / "golden" / "p01_default_fc_224.pt")
    state_dict = released_detection_state_dict(fixture)
    backbone = FocalBackbone(FocalTransformer(**fixture["kwargs"]))
    load_official_weights(backbone, state_dict)
    assert set(backbone.state_dict()) == set(state_dict) - set(released_derived_buffers(backbone))
    loaded = backbone.state_dict()
    assert [k for k, v in loaded.items() if not torch.equal(v, state_dict[k].float())] == []
    del state_dict["norm2.bias"]
    with pytest.raises(CheckpointMismatchError, match="missing keys: norm2.bias"):
        load_official_weights(FocalBackbone(FocalTransformer(**fixture["kwargs"])), state_dict)


def test_create_backbone_starts_from_a_classification_checkpoint(tmp_path):
    fixture = load_fixture(FIXTURES / "golden" / "p01_default_fc_224.pt")
    path = tmp_path / "classifier.pth"
    torch.save({"model": fixture["state_dict"]}, path)
    overlay = dict(file=str(path), num_classes=fixture["kwargs"]["num_classes"])
    backbone = create_backbone(
        "focal_tiny_patch4_window7_224", pretrained=True, pretrained_cfg_overlay=overlay, **fixture["kwargs"]
    )
    weight = "layers.2.blocks.1.attn.qkv.weight"
    assert torch.equal(backbone.state_dict()[weight], fixture["state_dict"][weight].float())


def test_create_backbone_from_registered_name_and_from_model():
    backbone = create_backbone("focal_tiny_patch4_window7_224", out_indices=(2, 3), depths=(1, 1, 1, 1))
    assert backbone.out_channels == [384, 768] and backbone.strides == [16, 32]
    assert create_backbone(tiny_model(), out_indices=(0,)).out_channels == [16]
    with pytest.raises(ValueError, match="unknown"):
        create_backbone("resnet50")
    with pytest.raises(TypeError):
        create_backbone(tiny_model(), depths=(1, 1, 1, 1))


def synthetic_detection_set(num_images: int = 4, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """COCO-style samples: 96-128 px noise images with 1-3 bright boxes, labels 1..2 (brightness per label)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(num_images):
        h, w = (int(v) for v in torch.randint(96, 129, (2,), generator=generator))
        image = 0.1 * torch.rand(3, h, w, generator=generator)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            bw, bh = (int(v) for v in torch.randint(16, 48, (2,), generator=generator))
            x0 = int(torch.randint(0, w - bw, (1,), generator=generator))
            y0 = int(torch.randint(0, h - bh, (1,), generator=generator))
            label = int(torch.randint(1, 3, (1,), generator=generator))
            image[label - 1, y0 : y0 + bh, x0 : x0 + bw] = 1.0
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(label)
        images.append(image)
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels)))
    return images, targets


def train_steps(detector: torch.nn.Module, steps: int) -> list[float]:
    images, targets = synthetic_detection_set()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    detector.train()
    losses = []
    for _ in range(steps):
        loss_dict = detector(images, targets)
        loss = sum(loss_dict.values())
        assert all(torch.isfinite(v) for v in loss_dict.values()), loss_dict
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_detections(detector: torch.nn.Module, with_masks: bool = False) -> None:
    images, _ = synthetic_detection_set(num_images=2, seed=1)
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert torch.isfinite(det["boxes"]).all() and torch.isfinite(det["scores"]).all()
        if with_masks:
            assert det["masks"].shape == (n, 1, *image.shape[-2:])


def test_retinanet_with_focal_fpn_trains_and_detects():
    torch.manual_seed(0)
    body = FocalBackbone(tiny_model(), out_indices=(1, 2, 3))
    backbone = FocalBackboneWithFPN(body, out_channels=32, extra_blocks=LastLevelP6P7(32, 32))
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    detector = RetinaNet(backbone, num_classes=3, min_size=112, max_size=128, anchor_generator=anchors)
    losses = train_steps(detector, steps=3)
    assert losses[-1] < losses[0], losses
    assert_detections(detector)


def test_mask_rcnn_with_focal_fpn_trains_and_detects():
    torch.manual_seed(0)
    width = 32
    backbone = FocalBackboneWithFPN(FocalBackbone(tiny_model()), out_channels=width)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    detector = MaskRCNN(  # small heads and proposal counts keep this a few seconds on 2 CPU cores
        backbone,
        num_classes=None,
        min_size=112,
        max_size=128,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        box_detections_per_img=20,
        box_head=TwoMLPHead(width * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, 3),
        mask_head=MaskRCNNHeads(width, [width, width], 1),
        mask_predictor=MaskRCNNPredictor(width, width, 3),
    )
    images, targets = synthetic_detection_set()
    for image, target in zip(images, targets):
        masks = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, target["boxes"].long().tolist()):
            mask[y0:y1, x0:x1] = 1
        target["masks"] = masks
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    detector.train()
    for _ in range(3):
        loss_dict = detector(images, targets)
        assert all(torch.isfinite(v) for v in loss_dict.values()), loss_dict
        optimizer.zero_grad()
        sum(loss_dict.values()).backward()
        optimizer.step()
    assert_detections(detector, with_masks=True)
