"""load_official_weights and timm's pretrained=True: released-layout and own checkpoints load; every mismatch is an
error that names it; a checkpoint whose pickle would run code is refused."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from golden import FIXTURES, fixture_paths, load_fixture
from yacs.config import CfgNode

from models import CheckpointMismatchError, FocalTransformer, load_official_weights
from models.checkpoint_loading import key_problems, released_derived_buffers
from utils.checkpoint import UnsafeCheckpointError

V1_FIXTURES = fixture_paths("golden")
DEFAULT = FIXTURES / "golden" / "p01_default_fc_224.pt"  # 224 px, ring, fc pooling, shrunk last stage
SHIFTED = FIXTURES / "golden" / "p05_pool_mean_shift_even_112.pt"  # stores attn_mask buffers


@pytest.fixture(scope="module")
def default() -> dict:
    return load_fixture(DEFAULT)


@pytest.fixture(scope="module")
def shifted() -> dict:
    return load_fixture(SHIFTED)


def _model(kwargs: dict, **overrides) -> FocalTransformer:
    torch.manual_seed(0)
    return FocalTransformer(**dict(kwargs, **overrides))


def _mismatch(model: torch.nn.Module, state_dict: dict) -> str:
    with pytest.raises(CheckpointMismatchError) as error:
        load_official_weights(model, state_dict)
    return str(error.value)


@pytest.mark.parametrize("path", V1_FIXTURES, ids=lambda p: p.stem)
def test_released_state_dict_with_derived_buffers_loads(path):
    fixture = load_fixture(path)
    model = _model(fixture["kwargs"])
    assert load_official_weights(model, fixture["state_dict"]) is model
    ours = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, fixture["state_dict"][key]), key
    derived = set(fixture["state_dict"]) - set(ours)
    assert derived == set(released_derived_buffers(model))  # every other released key is a derived buffer


def test_checkpoint_wrapped_in_model_key_loads(default):
    model = _model(default["kwargs"])
    load_official_weights(model, {"model": default["state_dict"], "epoch": 300, "optimizer": {}})
    assert torch.equal(model.head.weight, default["state_dict"]["head.weight"])


def test_own_state_dict_without_derived_buffers_loads(default):
    source = _model(default["kwargs"])
    load_official_weights(source, default["state_dict"])
    own = source.state_dict()
    assert not set(own) & set(released_derived_buffers(source))
    target = _model(default["kwargs"])
    load_official_weights(target, own)
    x = default["input"]
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source.eval()(x))


def test_missing_parameter_is_named(default):
    state_dict = dict(default["state_dict"])
    del state_dict["layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors"]
    message = _mismatch(_model(default["kwargs"]), state_dict)
    assert "missing keys: layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors" in message


def test_unexpected_key_is_named(default):
    state_dict = dict(default["state_dict"], **{"layers.0.blocks.0.attn.extra_table": torch.zeros(3)})
    message = _mismatch(_model(default["kwargs"]), state_dict)
    assert "unexpected keys: layers.0.blocks.0.attn.extra_table" in message


def test_failed_load_leaves_the_model_unchanged(default):
    model = _model(default["kwargs"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict = dict(default["state_dict"])
    del state_dict["head.bias"]
    _mismatch(model, state_dict)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_of_a_wider_model_names_shape_mismatches(default):
    message = _mismatch(_model(default["kwargs"], embed_dim=16), default["state_dict"])
    assert "shape mismatches: patch_embed.proj.weight (8, 3, 4, 4) vs model (16, 3, 4, 4)" in message


def test_state_dict_of_another_architecture_names_every_kind_of_mismatch(default):
    """Focal level 2 with window 7 into focal level 1 with window 5: extra pooled tables, other table shapes."""
    model = _model(default["kwargs"], window_size=5, focal_levels=(1, 1, 1, 1), expand_sizes=(2, 2, 2, 2))
    message = _mismatch(model, default["state_dict"])
    assert re.search(
        r"unexpected keys: [^;]*layers\.0\.blocks\.0\.attn\.relative_position_bias_table_to_windows\.0", message
    )
    assert "layers.0.blocks.0.attn.relative_position_bias_table (169, 1) vs model (81, 1)" in message
    assert "layers.0.blocks.0.attn.relative_position_index_0" in message  # a derived buffer the model does not have


def test_state_dict_of_a_deeper_model_names_missing_blocks(default):
    kwargs = default["kwargs"]
    deeper = list(kwargs["depths"])
    deeper[2] += 1
    message = _mismatch(_model(kwargs, depths=deeper), default["state_dict"])
    assert f"missing keys: layers.2.blocks.{deeper[2] - 1}." in message


@pytest.mark.parametrize(
    "fixture_name, key",
    [
        ("p01_default_fc_224", "layers.0.blocks.0.attn.valid_ind_rolled"),
        ("p01_default_fc_224", "layers.2.blocks.1.attn.relative_position_index"),
        ("p01_default_fc_224", "layers.1.blocks.0.attn.relative_position_index_0"),
        ("p03_levels3_fc_168", "layers.0.blocks.0.attn.valid_ind_unfold_1"),
    ],
)
def test_tampered_index_buffer_is_named(fixture_name, key):
    fixture = load_fixture(FIXTURES / "golden" / f"{fixture_name}.pt")
    state_dict = dict(fixture["state_dict"])
    tampered = state_dict[key].clone()
    tampered.view(-1)[[0, 1]] = tampered.view(-1)[[1, 0]]
    assert not torch.equal(tampered, state_dict[key])
    state_dict[key] = tampered
    message = _mismatch(_model(fixture["kwargs"]), state_dict)
    assert f"derived buffers differ from this configuration: {key}" in message


def test_tampered_shift_mask_is_named(shifted):
    key = "layers.0.blocks.1.attn_mask"
    state_dict = dict(shifted["state_dict"])
    assert key in state_dict
    tampered = state_dict[key].clone()
    tampered[0, 0, 1] = -100.0 - tampered[0, 0, 1]  # 0 <-> -100
    state_dict[key] = tampered
    message = _mismatch(_model(shifted["kwargs"]), state_dict)
    assert f"derived buffers differ from this configuration: {key}" in message


def test_derived_buffer_of_another_shape_is_named(default):
    key = "layers.0.blocks.0.attn.valid_ind_rolled"
    state_dict = dict(default["state_dict"], **{key: default["state_dict"][key][:-1]})
    message = _mismatch(_model(default["kwargs"]), state_dict)
    assert f"{key} (131,) (model computes (132,))" in message


def test_shift_mask_into_unshifted_model_is_unexpected(shifted):
    message = _mismatch(_model(shifted["kwargs"], use_shift=False), shifted["state_dict"])
    assert re.search(r"unexpected keys: [^;]*layers\.0\.blocks\.1\.attn_mask", message)


def test_key_problems_name_at_most_limit_keys_each():
    keys = [f"k{i}" for i in range(10)]
    assert key_problems(keys, []) == ["missing keys: k0, k1, k2, k3, k4, k5, k6, k7, ... (10 in all)"]
    assert key_problems(keys[:2], keys, limit=None) == ["missing keys: k0, k1", "unexpected keys: " + ", ".join(keys)]
    assert key_problems([], []) == []


# ---- released checkpoints through timm: pretrained=True, pretrained_cfg_overlay=dict(file=...) ---------------------

V2_DEFAULT = FIXTURES / "golden_v2" / "p01_released_like_conv_embed_top128_224.pt"
# A registered variant of each generation: its arguments are overridden by the fixture's kwargs.
VARIANT_OF = {"golden": "focal_tiny_patch4_window7_224", "golden_v2": "focalv2_tiny_useconv_patch4_window7_224"}


def released_file(fixture: dict, folder, layout: str) -> str:
    """The fixture's released state dict as a file: 'released' ({'model', 'config': CfgNode, ...} .pth, as the
    released files are), 'bare' (state dict .pth) or 'safetensors'."""
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = folder / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in fixture["state_dict"].items()}, str(path))
        return str(path)
    path = folder / f"{layout}.pth"
    config = CfgNode({"MODEL": CfgNode({"TYPE": "focal", "NAME": "focal_tiny"})})
    checkpoint = fixture["state_dict"] if layout == "bare" else {"model": fixture["state_dict"], "config": config}
    torch.save(checkpoint, path)
    return str(path)


def through_timm(path: str, fixture: dict, folder_name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model of the fixture's architecture with the checkpoint file, in float64, in eval mode."""
    model_kwargs = {**fixture["kwargs"], **kwargs}
    overlay = dict(file=path, num_classes=fixture["kwargs"]["num_classes"])  # the checkpoint's class count
    model = timm.create_model(
        VARIANT_OF[folder_name], pretrained=True, pretrained_cfg_overlay=overlay, dtype=torch.float64, **model_kwargs
    )
    return model.eval()


@pytest.mark.parametrize("layout", ["released", "bare", "safetensors"])
@pytest.mark.parametrize("path", [DEFAULT, V2_DEFAULT], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_released_checkpoint_through_timm_gives_the_fixture_logits(path, layout, tmp_path):
    fixture = load_fixture(path)
    model = through_timm(released_file(fixture, tmp_path, layout), fixture, path.parent.name)
    with torch.no_grad():
        logits = model(fixture["input"].double())
    assert (logits - fixture["logits_fp64"]).abs().max().item() < 1e-8


def test_features_only_model_loads_the_checkpoint_before_pruning(default, tmp_path):
    path = released_file(default, tmp_path, "released")
    features = through_timm(path, default, "golden", features_only=True)
    reference = _model(default["kwargs"]).double()
    load_official_weights(reference, default["state_dict"])
    with torch.no_grad():
        expected = reference.eval().forward_intermediates(default["input"].double(), intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(features(default["input"].double()), expected)] == [True] * 4


def test_another_num_classes_reinitialises_only_the_head(default, tmp_path):
    path = released_file(default, tmp_path, "released")
    model = through_timm(path, default, "golden", num_classes=7)
    assert model.head.weight.shape == (7, default["kwargs"]["embed_dim"] * 8)
    assert torch.equal(model.head.bias, torch.zeros(7, dtype=torch.float64))  # fresh init: zero bias
    loaded = model.state_dict()
    body = [key for key in loaded if not key.startswith("head.")]
    assert [key for key in body if not torch.equal(loaded[key], default["state_dict"][key])] == []


def test_mismatching_checkpoint_through_timm_names_the_keys(default, tmp_path):
    state_dict = dict(default["state_dict"])
    del state_dict["layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors"]
    key = "layers.0.blocks.0.attn.valid_ind_rolled"
    state_dict[key] = state_dict[key].flip(0)
    path = tmp_path / "broken.pth"
    torch.save({"model": state_dict}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        through_timm(str(path), default, "golden")
    assert "missing keys: layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors" in str(error.value)
    assert f"derived buffers differ from this configuration: {key}" in str(error.value)


def test_in_memory_state_dict_through_timm_is_checked_as_strictly(default):
    kwargs = dict(default["kwargs"])
    overlay = dict(state_dict=dict(default["state_dict"]), num_classes=kwargs["num_classes"])
    model = timm.create_model(VARIANT_OF["golden"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    assert torch.equal(model.head.weight, default["state_dict"]["head.weight"].float())
    del overlay["state_dict"]["head.bias"]
    with pytest.raises(CheckpointMismatchError, match="missing keys: head.bias"):
        timm.create_model(VARIANT_OF["golden"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


class _CreatesAFile:
    """Unpickling this would create a file: a checkpoint that runs code when loaded."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_checkpoint_whose_pickle_would_run_code_is_refused_through_timm(default, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.pth"
    torch.save({"model": default["state_dict"], "payload": _CreatesAFile(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="its pickle needs io.open"):
        through_timm(str(path), default, "golden")
    assert not marker.exists()


def test_pretrained_without_a_file_is_one_clear_error_and_downloads_nothing(monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("download_cached_file", "load_state_dict_from_url", "load_state_dict_from_hf", "load_custom_from_hf"):
        monkeypatch.setattr(builder, name, no_network)
    for variant in VARIANT_OF.values():
        with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file='focal-tiny-is.pth'\)"):
            timm.create_model(variant, pretrained=True)
