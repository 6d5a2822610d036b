"""Config system: YAML files with BASE inheritance, --opts, flags, checks, and the released recipes."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

import config
from config import ConfigError, get_config
from main import build_parser

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))

# The released configs/focalv2_tiny_useconv_patch4_window7_224.yaml: its key set and value spelling.
RELEASED_FOCALV2_TINY = """\
MODEL:
  TYPE: focalv2
  NAME: focalv2_tiny_patch4_window7_224
  DROP_PATH_RATE: 0.2
  FOCAL:
    USE_CONV_EMBED: True
    EMBED_DIM: 96
    DEPTHS: [2, 2, 6, 2]
    NUM_HEADS: [3, 6, 12, 24]
    WINDOW_SIZE: 7
    FOCAL_POOL: "fc"
    FOCAL_STAGES: [0, 1, 2, 3]
    FOCAL_LEVELS: [2, 2, 2, 2]
    FOCAL_WINDOWS: [7, 5, 3, 1]
    EXPAND_SIZES: [3, 3, 3, 3]
    FOCAL_TOPK: 128
"""

# variant -> (DROP_PATH_RATE, EMBED_DIM, DEPTHS, NUM_HEADS), from the paper and the released files.
RELEASED_ARCH = {
    "tiny": (0.2, 96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "small": (0.3, 96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "base": (0.5, 128, [2, 2, 18, 2], [4, 8, 16, 32]),
}


def make_args(cfg: str | os.PathLike | None = None, opts: list[str] | None = None, **flags) -> argparse.Namespace:
    """The Namespace main.py's parser produces: every flag update_config reads, unset unless given."""
    args = argparse.Namespace(
        cfg=str(cfg) if cfg is not None else None,
        opts=opts,
        batch_size=None,
        data_path=None,
        cache_mode=None,
        pretrained=None,
        resume=None,
        accumulation_steps=None,
        amp_dtype=None,
        amp_opt_level=None,
        output=None,
        tag=None,
        seed=None,
        zip=False,
        use_checkpoint=False,
        eval=False,
        throughput=False,
    )
    for name, value in flags.items():
        assert hasattr(args, name), f"unknown flag {name}"
        setattr(args, name, value)
    return args


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(name: str):
    return get_config(make_args(CONFIG_DIR / f"{name}.yaml"))


# ----------------------------------------------------------------------------------------------
# Files and inheritance
# ----------------------------------------------------------------------------------------------


def test_config_folder_holds_the_released_recipes_and_the_demo():
    """The files the parametrized tests below run over include every released recipe (so none runs on nothing)."""
    released = {f"{kind}_{variant}" for kind in ("focal", "focalv2") for variant in RELEASED_ARCH}
    released |= {f"focal_{variant}_useconv" for variant in RELEASED_ARCH}
    assert released | {"demo"} <= {path.stem for path in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_merges_into_the_defaults(path):
    cfg = get_config(make_args(path))
    assert cfg.is_frozen()


def test_released_yaml_merges_unchanged(tmp_path):
    cfg = get_config(make_args(write(tmp_path / "released.yaml", RELEASED_FOCALV2_TINY)))
    assert cfg.MODEL.TYPE == "focalv2"
    assert cfg.MODEL.FOCAL.WINDOW_SIZE == 7
    assert cfg.MODEL.FOCAL.FOCAL_LEVELS == [2, 2, 2, 2]


def test_child_file_overrides_its_base_relative_to_the_child(tmp_path):
    write(tmp_path / "bases" / "root.yaml", "DATA:\n  BATCH_SIZE: 32\nTRAIN:\n  EPOCHS: 10\n")
    write(tmp_path / "bases" / "mid.yaml", "BASE: ['root.yaml']\nTRAIN:\n  WARMUP_EPOCHS: 1\n")
    child = write(tmp_path / "runs" / "child.yaml", "BASE: ['../bases/mid.yaml']\nDATA:\n  BATCH_SIZE: 16\n")
    cfg = get_config(make_args(child))
    assert cfg.DATA.BATCH_SIZE == 16  # the child wins
    assert cfg.TRAIN.EPOCHS == 10  # from the base of the base
    assert cfg.TRAIN.WARMUP_EPOCHS == 1  # from the base
    assert cfg.DATA.IMG_SIZE == config.get_default_config().DATA.IMG_SIZE  # untouched default


def test_later_base_overrides_earlier_base(tmp_path):
    write(tmp_path / "a.yaml", "TRAIN:\n  EPOCHS: 10\n")
    write(tmp_path / "b.yaml", "TRAIN:\n  EPOCHS: 20\n")
    child = write(tmp_path / "child.yaml", "BASE: ['a.yaml', 'b.yaml']\n")
    assert get_config(make_args(child)).TRAIN.EPOCHS == 20


def test_missing_config_file_raises_naming_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        get_config(make_args(missing))


# ----------------------------------------------------------------------------------------------
# --opts and flags
# ----------------------------------------------------------------------------------------------


def test_opts_merge_nested_keys_and_lists():
    opts = ["DATA.BATCH_SIZE", "32", "MODEL.FOCAL.DEPTHS", "[1, 1, 2, 1]", "TRAIN.LR_SCHEDULER.NAME", "step"]
    cfg = get_config(make_args(opts=opts))
    assert cfg.DATA.BATCH_SIZE == 32
    assert cfg.MODEL.FOCAL.DEPTHS == [1, 1, 2, 1]
    assert cfg.TRAIN.LR_SCHEDULER.NAME == "step"


def test_opts_override_the_config_file(tmp_path):
    path = write(tmp_path / "c.yaml", "TRAIN:\n  EPOCHS: 10\n")
    assert get_config(make_args(path, opts=["TRAIN.EPOCHS", "3"])).TRAIN.EPOCHS == 3


def test_tuple_default_stays_a_tuple():
    cfg = get_config(make_args(opts=["TRAIN.OPTIMIZER.BETAS", "[0.9, 0.95]"]))
    assert cfg.TRAIN.OPTIMIZER.BETAS == (0.9, 0.95)


def test_flags_override_file_and_opts(tmp_path):
    path = write(tmp_path / "c.yaml", "DATA:\n  BATCH_SIZE: 16\n")
    args = make_args(path, opts=["DATA.BATCH_SIZE", "32"], batch_size=8, eval=True, resume="ckpt.pth", zip=True)
    cfg = get_config(args)
    assert cfg.DATA.BATCH_SIZE == 8
    assert cfg.EVAL_MODE and cfg.DATA.ZIP_MODE and cfg.MODEL.RESUME == "ckpt.pth"


def test_eval_without_a_checkpoint_is_refused():
    """--eval with no --resume would score a randomly initialised model."""
    with pytest.raises(ConfigError, match="--eval evaluates the checkpoint given by --resume"):
        get_config(make_args(eval=True))


def test_amp_opt_level_o0_turns_mixed_precision_off():
    cfg = get_config(make_args(amp_opt_level="O0"))
    assert cfg.AMP_OPT_LEVEL == "O0"
    assert cfg.AMP_DTYPE == "none"


def test_odd_number_of_opts_raises():
    with pytest.raises(ConfigError, match="KEY VALUE"):
        get_config(make_args(opts=["DATA.BATCH_SIZE"]))


# ----------------------------------------------------------------------------------------------
# Errors name the key
# ----------------------------------------------------------------------------------------------

# The suggestion may be the leaf ('BATCH_SIZE') or the full key ('DATA.BATCH_SIZE').
SUGGESTS_BATCH_SIZE = r"DATA\.BATCH_SZIE.*did you mean '(DATA\.)?BATCH_SIZE'"


def test_unknown_key_in_file_raises_with_suggestion(tmp_path):
    path = write(tmp_path / "typo.yaml", "DATA:\n  BATCH_SZIE: 32\n")
    with pytest.raises(ConfigError, match=SUGGESTS_BATCH_SIZE):
        get_config(make_args(path))


def test_unknown_key_in_opts_raises_with_suggestion():
    with pytest.raises(ConfigError, match=SUGGESTS_BATCH_SIZE):
        get_config(make_args(opts=["DATA.BATCH_SZIE", "32"]))


def test_unknown_section_in_opts_raises_with_suggestion():
    with pytest.raises(ConfigError, match=r"DTA\.BATCH_SIZE.*did you mean 'DATA'"):
        get_config(make_args(opts=["DTA.BATCH_SIZE", "32"]))


def test_unknown_key_in_base_file_raises(tmp_path):
    write(tmp_path / "base.yaml", "MODEL:\n  FOCAL:\n    FOCAL_LEVEL: [2, 2, 2, 2]\n")
    child = write(tmp_path / "child.yaml", "BASE: ['base.yaml']\n")
    with pytest.raises(ConfigError, match=r"MODEL\.FOCAL\.FOCAL_LEVEL\b.*FOCAL_LEVELS"):
        get_config(make_args(child))


def test_wrong_type_in_file_raises_naming_the_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "TRAIN:\n  EPOCHS: many\n")
    with pytest.raises(ConfigError, match=r"TRAIN\.EPOCHS"):
        get_config(make_args(path))


def test_wrong_type_in_opts_raises_naming_the_key():
    with pytest.raises(ConfigError, match=r"MODEL\.FOCAL\.DEPTHS"):
        get_config(make_args(opts=["MODEL.FOCAL.DEPTHS", "2"]))


def test_value_for_a_section_raises_naming_it(tmp_path):
    path = write(tmp_path / "bad.yaml", "MODEL:\n  FOCAL: 3\n")
    with pytest.raises(ConfigError, match=r"MODEL\.FOCAL"):
        get_config(make_args(path))


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def test_exponent_floats_without_dot_are_accepted(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-4 as the string '5e-4'.
    path = write(tmp_path / "lr.yaml", "TRAIN:\n  BASE_LR: 5e-4\n  MIN_LR: 1.0e-5\n")
    cfg = get_config(make_args(path, opts=["TRAIN.WARMUP_LR", "5e-7"]))
    assert cfg.TRAIN.BASE_LR == pytest.approx(5e-4)
    assert cfg.TRAIN.MIN_LR == pytest.approx(1e-5)
    assert cfg.TRAIN.WARMUP_LR == pytest.approx(5e-7)
    assert isinstance(cfg.TRAIN.BASE_LR, float)


def test_optional_keys_take_their_type_when_set(tmp_path):
    """Keys whose default is None still check what they are given: QK_SCALE a number (the released False means
    unset), CUTMIX_MINMAX a pair of numbers."""
    assert get_config(make_args(opts=["MODEL.FOCAL.QK_SCALE", "1e-1"])).MODEL.FOCAL.QK_SCALE == pytest.approx(0.1)
    released = write(tmp_path / "released.yaml", "MODEL:\n  FOCAL:\n    QK_SCALE: False\n")
    assert get_config(make_args(released)).MODEL.FOCAL.QK_SCALE is False
    assert get_config(make_args(opts=["AUG.CUTMIX_MINMAX", "[0.2, 0.8]"])).AUG.CUTMIX_MINMAX == [0.2, 0.8]
    with pytest.raises(ConfigError, match=r"MODEL\.FOCAL\.QK_SCALE expects float, got str 'abc'"):
        get_config(make_args(opts=["MODEL.FOCAL.QK_SCALE", "abc"]))
    with pytest.raises(ConfigError, match=r"AUG\.CUTMIX_MINMAX expects list"):
        get_config(make_args(opts=["AUG.CUTMIX_MINMAX", "foo"]))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DATA.INTERPOLATION", "foo", r"DATA\.INTERPOLATION must be one of"),
        ("AUG.REMODE", "foo", r"AUG\.REMODE must be one of"),
        ("AUG.MIXUP_MODE", "foo", r"AUG\.MIXUP_MODE must be one of"),
        ("AUG.AUTO_AUGMENT", "rnd-m9", r"AUG\.AUTO_AUGMENT 'rnd-m9' is not a timm policy"),
        ("AUG.AUTO_AUGMENT", "rand-foo", r"AUG\.AUTO_AUGMENT 'rand-foo' is not a timm policy"),
        ("AUG.CUTMIX_MINMAX", "[0.5]", r"AUG\.CUTMIX_MINMAX must be None or \[min, max\]"),
        ("TRAIN.ACCUMULATION_STEPS", "-1", r"TRAIN\.ACCUMULATION_STEPS must be >= 0"),
    ],
)
def test_values_that_mean_nothing_are_refused(key, value, message):
    """Each of these used to fail deep in timm with a bare assertion, or to be ignored."""
    with pytest.raises(ConfigError, match=message):
        get_config(make_args(opts=[key, value]))


@pytest.mark.parametrize("policy", ["", "none", "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original-mstd0.5", "v0"])
def test_timm_auto_augment_policies_are_accepted(policy):
    assert get_config(make_args(opts=["AUG.AUTO_AUGMENT", policy])).AUG.AUTO_AUGMENT == policy


def test_released_dataset_flag_sets_the_dataset():
    args = build_parser().parse_args(["--cfg", str(CONFIG_DIR / "demo.yaml"), "--dataset", "imagenet"])
    assert get_config(args).DATA.DATASET == "imagenet"


def test_repeated_opts_flags_all_apply():
    args = build_parser().parse_args(["--cfg", "c.yaml", "--opts", "TRAIN.EPOCHS", "1", "--opts", "SEED", "3"])
    assert args.opts == ["TRAIN.EPOCHS", "1", "SEED", "3"]


def test_int_is_accepted_for_a_float_key():
    cfg = get_config(make_args(opts=["TRAIN.CLIP_GRAD", "1"]))
    assert cfg.TRAIN.CLIP_GRAD == 1.0 and isinstance(cfg.TRAIN.CLIP_GRAD, float)


def test_get_config_returns_a_clone():
    cfg = get_config(make_args())
    cfg.defrost()
    cfg.DATA.BATCH_SIZE = 1
    cfg.MODEL.FOCAL.DEPTHS.append(9)
    fresh = get_config()
    assert fresh.DATA.BATCH_SIZE == 128
    assert fresh.MODEL.FOCAL.DEPTHS == [2, 2, 6, 2]
    assert config.get_default_config().MODEL.FOCAL.DEPTHS == [2, 2, 6, 2]


def test_output_folder_is_output_name_tag(tmp_path):
    cfg = get_config(make_args(CONFIG_DIR / "focal_small.yaml", output=str(tmp_path), tag="run1"))
    assert cfg.OUTPUT == os.path.join(str(tmp_path), "focal_small_patch4_window7_224", "run1")


def test_output_folder_defaults_to_output():
    cfg = get_config(make_args())
    assert cfg.OUTPUT == os.path.join("output", cfg.MODEL.NAME, "default")


def test_merged_config_dumps_and_reloads(tmp_path):
    cfg = load("focal_tiny")
    dumped = write(tmp_path / "config.yaml", cfg.dump())
    again = get_config(make_args(dumped, opts=["OUTPUT", "output"]))
    assert again.MODEL == cfg.MODEL
    assert again.TRAIN == cfg.TRAIN


# ----------------------------------------------------------------------------------------------
# The released recipes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(RELEASED_ARCH))
@pytest.mark.parametrize("suffix", ["", "_useconv", "v2"])
def test_released_recipe_holds_the_paper_values(variant, suffix):
    name = f"focalv2_{variant}" if suffix == "v2" else f"focal_{variant}{suffix}"
    cfg = load(name)
    drop_path, embed_dim, depths, num_heads = RELEASED_ARCH[variant]
    focal = cfg.MODEL.FOCAL
    assert cfg.MODEL.DROP_PATH_RATE == drop_path
    assert (focal.EMBED_DIM, focal.DEPTHS, focal.NUM_HEADS) == (embed_dim, depths, num_heads)
    assert (focal.PATCH_SIZE, focal.WINDOW_SIZE) == (4, 7)
    assert focal.FOCAL_POOL == "fc"
    assert focal.FOCAL_STAGES == [0, 1, 2, 3]
    assert focal.FOCAL_LEVELS == [2, 2, 2, 2]
    assert focal.FOCAL_WINDOWS == [7, 5, 3, 1]
    assert focal.EXPAND_SIZES == [3, 3, 3, 3]
    assert focal.EXPAND_LAYER == "all"
    assert focal.USE_SHIFT is False
    assert focal.USE_CONV_EMBED is (suffix != "")
    assert (cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.MODEL.NUM_CLASSES) == (224, 128, 1000)
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS) == (300, 20)
    assert cfg.TRAIN.BASE_LR == pytest.approx(5e-4)
    assert cfg.TRAIN.WARMUP_LR == pytest.approx(5e-7)
    assert cfg.TRAIN.MIN_LR == pytest.approx(5e-6)
    assert cfg.TRAIN.WEIGHT_DECAY == pytest.approx(0.05)
    assert cfg.TRAIN.CLIP_GRAD == pytest.approx(5.0)
    assert cfg.AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1"
    assert (cfg.AUG.MIXUP, cfg.AUG.CUTMIX, cfg.AUG.REPROB) == (0.8, 1.0, 0.25)
    assert cfg.MODEL.LABEL_SMOOTHING == pytest.approx(0.1)


@pytest.mark.parametrize("variant", sorted(RELEASED_ARCH))
def test_model_names_and_types(variant):
    assert load(f"focal_{variant}").MODEL.NAME == f"focal_{variant}_patch4_window7_224"
    assert load(f"focal_{variant}_useconv").MODEL.NAME == f"focal_{variant}_useconv_patch4_window7_224"
    v2 = load(f"focalv2_{variant}")
    assert v2.MODEL.NAME == f"focalv2_{variant}_useconv_patch4_window7_224"
    assert v2.MODEL.TYPE == "focalv2"
    assert v2.MODEL.FOCAL.FOCAL_TOPK == 128
    assert load(f"focal_{variant}").MODEL.TYPE == "focal"


def test_demo_stage_resolutions_fit_the_window():
    cfg = load("demo")
    focal = cfg.MODEL.FOCAL
    assert cfg.DATA.DATASET == "toy"
    assert cfg.DATA.IMG_SIZE % focal.PATCH_SIZE == 0
    n_stages = len(focal.DEPTHS)
    assert len(focal.NUM_HEADS) == len(focal.FOCAL_LEVELS) == len(focal.FOCAL_WINDOWS) == n_stages
    for stage in range(n_stages):
        res = cfg.DATA.IMG_SIZE // focal.PATCH_SIZE // 2**stage
        assert res >= 1
        # A map no larger than the window shrinks the window to the map; a larger one must tile it.
        assert res <= focal.WINDOW_SIZE or res % focal.WINDOW_SIZE == 0, (stage, res)
        assert (focal.EMBED_DIM * 2**stage) % focal.NUM_HEADS[stage] == 0


# ----------------------------------------------------------------------------------------------
# config.py itself
# ----------------------------------------------------------------------------------------------


def test_every_default_key_has_a_comment():
    lines = Path(config.__file__).read_text(encoding="utf-8").splitlines()
    key_lines = [i for i, line in enumerate(lines) if re.match(r"_C(\.[A-Z0-9_]+)+ = ", line)]
    assert key_lines
    uncommented = [lines[i] for i in key_lines if i == 0 or not lines[i - 1].lstrip().startswith("#")]
    assert not uncommented, f"keys without a comment line above them: {uncommented}"
