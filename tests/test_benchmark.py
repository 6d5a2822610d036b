"""tools/benchmark.py runs end to end on a tiny configuration and reports every field (no timing assertions)."""

from __future__ import annotations

import dataclasses
import json

from tools import benchmark

TINY = '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}'
FOCAL = "focal_tiny_patch4_window7_224"
SWIN = "swin_tiny_patch4_window7_224"


def test_benchmark_writes_json_with_every_field(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        *("--models", FOCAL, "--baseline", SWIN, "--batch-size", "1", "--img-size", "64", "--threads", "2"),
        *("--mode", "infer,train", "--warmup", "0", "--iters", "1", "--no-memory", "--num-classes", "10"),
        *("--model-kwargs", TINY, "--json", str(out)),
    ]
    benchmark.main(argv)
    report = json.loads(out.read_text())
    assert report["settings"]["models"] == [FOCAL] and report["settings"]["baseline"] == [SWIN]
    assert {"torch", "timm", "threads"} <= set(report["environment"])
    assert [r["mode"] for r in report["results"]] == ["infer", "train"]
    for result in report["results"]:
        assert set(result) == set(benchmark.Result.__dataclass_fields__)
        assert result["images_per_s"] > 0 and result["baseline_images_per_s"] > 0 and result["speed_ratio"] > 0
        assert len(result["times_s"]) == len(result["baseline_times_s"]) == 1
        round_ratio = result["baseline_times_s"][0] / result["times_s"][0]
        assert result["round_ratio_quartiles"] == [round_ratio] * 3
    infer, train = report["results"]
    assert infer["mfu"] is None and train["mfu"] is None  # CPU fp32: no known peak


def test_round_ratio_quartiles_are_of_the_per_round_ratios():
    times, baseline_times = [2.0, 1.0, 4.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.5, 2.0]  # ratios 0.5, 1, 0.25, 0.75, 2
    assert benchmark.round_ratio_quartiles(times, baseline_times) == (0.5, 0.75, 1.0)


def test_training_mfu_is_model_flops_over_the_peak():
    settings = benchmark.BenchSettings(models=[FOCAL], baseline=[SWIN], img_size=[224], mode=["train"], peak_tflops=2.0)
    flops = benchmark.forward_flops_per_image(FOCAL, 224, settings)
    # The counted multiply-adds of Focal-T are the paper's 4.9G (the released analytic count 4.924G, within 1%).
    assert abs(flops / 2 / 4_924_284_672 - 1) < 0.01
    assert benchmark.training_mfu(FOCAL, 224, 100.0, settings) == 3 * flops * 100.0 / 2e12
    assert benchmark.training_mfu(FOCAL, 224, 100.0, dataclasses.replace(settings, peak_tflops=None)) is None


def test_peak_memory_is_measured_in_a_subprocess():
    settings = benchmark.BenchSettings(
        models=[FOCAL],
        baseline=[SWIN],
        img_size=[64],
        mode=["train"],
        batch_size=1,
        threads=2,
        warmup=0,
        num_classes=10,
        model_kwargs=json.loads(TINY),
    )
    peak = benchmark.measure_peak_memory(FOCAL, "train", 64, settings)
    assert peak is not None and peak > 0


def test_paper_table_preset_compares_focal_and_swin_at_three_resolutions():
    settings = benchmark.settings_from_args(benchmark.parse_args(["--preset", "paper-table"]))
    groups = benchmark.comparison_groups(settings)
    assert [baseline for _, baseline in groups] == [f"swin_{s}_patch4_window7_224" for s in ("tiny", "small", "base")]
    assert settings.img_size == [224, 448, 896] and settings.device == "cuda"
    assert [settings.batch_for(size) for size in settings.img_size] == [64, 16, 4]
