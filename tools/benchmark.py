"""Throughput and peak memory of registered models against a timm baseline, measured side by side.

Models of one comparison live in one process and their timed iterations are interleaved (model A, baseline,
model A, baseline, ... with the order alternating every round), so a noisy machine slows all of them alike
and the ratio stays meaningful; the reported time is the median of ``--iters`` iterations after
``--warmup``. Training rows also give the model FLOPs utilisation (MFU) where the device peak is known.
Peak memory is measured in a fresh subprocess per (model, mode): the most tensor bytes alive at once
(``torch.cuda.max_memory_allocated`` on CUDA, the profiler's record of the CPU allocator on CPU), parameters,
gradients, optimizer state and activations included.

Examples::

    python tools/benchmark.py --models focal_tiny_patch4_window7_224 --baseline swin_tiny_patch4_window7_224 \
        --batch-size 8 --img-size 224 --threads 2 --mode infer,train --json out.json
    python tools/benchmark.py --preset paper-table --json paper_table.json   # GPU: Focal-T/S/B vs Swin-T/S/B
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402,F401  (registers the Focal variants in timm's registry)
from utils.runtime import configure_runtime  # noqa: E402

logger = logging.getLogger("benchmark")

MODES = ("infer", "train")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16/fp16 tensor-core peaks (TFLOP/s, SXM parts) by GPU name, the denominator of MFU; --peak-tflops
# gives it for any other device or dtype.
PEAK_TFLOPS_16BIT = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

# The released throughput table: Focal-T/S/B against Swin-T/S/B at three resolutions, inference on one GPU.
PAPER_TABLE = dict(
    models=[f"focal_{size}_patch4_window7_224" for size in ("tiny", "small", "base")],
    baseline=[f"swin_{size}_patch4_window7_224" for size in ("tiny", "small", "base")],
    img_size=[224, 448, 896],
    device="cuda",
    mode=["infer"],
    batch_size=64,
    scale_batch=True,
)


@dataclass
class BenchSettings:
    """What is measured and how; ``batch_size`` is at 224 when ``scale_batch`` (scaled by 224^2 / img^2)."""

    models: list[str]
    baseline: list[str]
    img_size: list[int]
    mode: list[str]
    batch_size: int = 8
    scale_batch: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool = False
    threads: int | None = None
    warmup: int = 3
    iters: int = 7
    memory: bool = True
    num_classes: int = 1000
    peak_tflops: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def batch_for(self, img_size: int) -> int:
        if not self.scale_batch:
            return self.batch_size
        return max(1, round(self.batch_size * (224 / img_size) ** 2))


@dataclass
class Result:
    """One model in one mode at one resolution, with its baseline measured alongside."""

    model: str
    baseline: str
    mode: str
    img_size: int
    batch_size: int
    images_per_s: float
    baseline_images_per_s: float
    speed_ratio: float
    round_ratio_quartiles: tuple[float, float, float]
    peak_memory_mb: float | None
    baseline_peak_memory_mb: float | None
    memory_ratio: float | None
    times_s: list[float]
    baseline_times_s: list[float]
    mfu: float | None = None
    baseline_mfu: float | None = None


# ---- building and stepping ----------------------------------------------------------------------------------


def create_model(name: str, img_size: int, settings: BenchSettings) -> nn.Module:
    """A registered model (timm or Focal) at ``img_size`` on the benchmark device, compiled if asked."""
    model = timm.create_model(name, img_size=img_size, num_classes=settings.num_classes, **settings.model_kwargs)
    model = model.to(settings.device)
    return torch.compile(model) if settings.compile else model


def _autocast(settings: BenchSettings) -> contextlib.AbstractContextManager:
    dtype = DTYPES[settings.dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(settings.device).type, dtype=dtype)


def make_step(
    model: nn.Module, mode: str, batch_size: int, img_size: int, settings: BenchSettings
) -> Callable[[], None]:
    """A closure running one inference forward, or one training step (forward, backward, AdamW step)."""
    device = settings.device
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), _autocast(settings):
                model(images)

        return infer
    model.train()
    targets = torch.randint(0, settings.num_classes, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(settings):
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()

    return train


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable[[], None]], settings: BenchSettings) -> dict[str, list[float]]:
    """Seconds of each timed iteration of every step, iterations of the steps interleaved."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(settings.warmup + settings.iters):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            _synchronize(settings.device)
            start = time.perf_counter()
            steps[name]()
            _synchronize(settings.device)
            if i >= settings.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def round_ratio_quartiles(times: list[float], baseline_times: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile of the speed ratio within each interleaved round (baseline time
    over model time): how far the noise moves the ratio, which the ratio of medians does not show."""
    ratios = [base / own for own, base in zip(times, baseline_times)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, median, q3


# ---- model FLOPs utilisation ----------------------------------------------------------------------------------


def forward_flops_per_image(name: str, img_size: int, settings: BenchSettings) -> float:
    """FLOPs (2 per multiply-add) of one image's forward, as counted by ``FlopCounterMode`` on a CPU copy."""
    model = timm.create_model(name, img_size=img_size, num_classes=settings.num_classes, **settings.model_kwargs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, img_size, img_size))
    return float(counter.get_total_flops())


def peak_flops(settings: BenchSettings) -> float | None:
    """The device's peak FLOP/s for the benchmark dtype: --peak-tflops, else the table for 16-bit on known GPUs."""
    if settings.peak_tflops:
        return settings.peak_tflops * 1e12
    if torch.device(settings.device).type != "cuda" or settings.dtype == "fp32":
        return None
    gpu = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS_16BIT.items() if key in gpu), None)


def training_mfu(name: str, img_size: int, images_per_s: float, settings: BenchSettings) -> float | None:
    """Model FLOPs utilisation of training: 3 forward passes' FLOPs per image (forward, and backward counted as
    twice the forward) times images/s, over the peak; None where the peak is unknown."""
    peak = peak_flops(settings)
    if peak is None:
        return None
    return 3 * forward_flops_per_image(name, img_size, settings) * images_per_s / peak


# ---- peak memory (fresh subprocess per model and mode) ------------------------------------------------------


def _peak_allocated_bytes(prof: torch.profiler.profile) -> int:
    """Peak of the CPU allocator's live bytes over a profile (the CPU analogue of max_memory_allocated)."""
    from torch._C._profiler import _EventType

    stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
    return peak


def measure_peak_memory_here(name: str, mode: str, img_size: int, settings: BenchSettings) -> float:
    """Peak bytes of tensors alive at once while building ``name`` and running 3 steps of ``mode`` here.

    Counts parameters, gradients, optimizer state, inputs and activations. On CUDA this is
    ``max_memory_allocated``; on CPU the allocator's running total recorded by the profiler, which does not
    depend on how the C library caches freed pages (the resident set size does, by tens of percent).
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)

    def build_and_run() -> None:
        model = create_model(name, img_size, settings)
        step = make_step(model, mode, settings.batch_for(img_size), img_size, settings)
        for _ in range(3):  # the first training step creates the optimizer state
            step()
        _synchronize(settings.device)

    if torch.device(settings.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        build_and_run()
        return float(torch.cuda.max_memory_allocated() - before)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        build_and_run()
    return float(_peak_allocated_bytes(prof))


def measure_peak_memory(name: str, mode: str, img_size: int, settings: BenchSettings) -> float | None:
    """``measure_peak_memory_here`` in a fresh Python process, so models and modes do not share a peak."""
    payload = json.dumps({"name": name, "mode": mode, "img_size": img_size, "settings": asdict(settings)})
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", payload]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        logger.warning("memory measurement of %s (%s) failed:\n%s", name, mode, proc.stderr[-2000:])
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def _memory_worker(payload: str) -> None:
    request = json.loads(payload)
    settings = BenchSettings(**request["settings"])
    peak = measure_peak_memory_here(request["name"], request["mode"], request["img_size"], settings)
    sys.stdout.write(f"{peak}\n")


# ---- the comparison --------------------------------------------------------------------------------------------


def comparison_groups(settings: BenchSettings) -> list[tuple[list[str], str]]:
    """(models, baseline) groups: one baseline for every model, or one per model, pairwise."""
    if len(settings.baseline) == 1:
        return [(settings.models, settings.baseline[0])]
    if len(settings.baseline) != len(settings.models):
        raise ValueError("--baseline takes one model name, or one per --models entry")
    return [([model], baseline) for model, baseline in zip(settings.models, settings.baseline)]


def run_benchmark(settings: BenchSettings) -> list[Result]:
    """Every model against its baseline, at every resolution, in every mode."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = []
    for img_size in settings.img_size:
        batch_size = settings.batch_for(img_size)
        for group, baseline in comparison_groups(settings):
            names = [*group, baseline]
            built = {name: create_model(name, img_size, settings) for name in names}
            for mode in settings.mode:
                logger.info("timing %s at %d, batch %d, %s", " vs ".join(names), img_size, batch_size, mode)
                steps = {name: make_step(built[name], mode, batch_size, img_size, settings) for name in names}
                times = time_interleaved(steps, settings)
                del steps
                memory = {}
                if settings.memory:
                    memory = {name: measure_peak_memory(name, mode, img_size, settings) for name in names}
                base_ips = batch_size / statistics.median(times[baseline])
                base_mfu = training_mfu(baseline, img_size, base_ips, settings) if mode == "train" else None
                for name in group:
                    ips = batch_size / statistics.median(times[name])
                    peak, base_peak = memory.get(name), memory.get(baseline)
                    results.append(
                        Result(
                            model=name,
                            baseline=baseline,
                            mode=mode,
                            img_size=img_size,
                            batch_size=batch_size,
                            images_per_s=ips,
                            baseline_images_per_s=base_ips,
                            speed_ratio=ips / base_ips,
                            round_ratio_quartiles=round_ratio_quartiles(times[name], times[baseline]),
                            peak_memory_mb=None if peak is None else peak / 2**20,
                            baseline_peak_memory_mb=None if base_peak is None else base_peak / 2**20,
                            memory_ratio=None if peak is None or not base_peak else peak / base_peak,
                            times_s=times[name],
                            baseline_times_s=times[baseline],
                            mfu=training_mfu(name, img_size, ips, settings) if mode == "train" else None,
                            baseline_mfu=base_mfu,
                        )
                    )
            del built
    return results


def markdown_table(results: list[Result]) -> str:
    """One row per result: throughput, ratio to the baseline, peak memory and its ratio."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "| model | baseline | res | batch | mode | img/s | baseline img/s | speed ratio | per round (q1-q3) "
        "| peak MB | baseline MB | memory ratio | MFU | baseline MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q1, _, q3 = r.round_ratio_quartiles
        lines.append(
            f"| {r.model} | {r.baseline} | {r.img_size} | {r.batch_size} | {r.mode} | {r.images_per_s:.2f} "
            f"| {r.baseline_images_per_s:.2f} | {r.speed_ratio:.3f} | {q1:.3f}-{q3:.3f} "
            f"| {num(r.peak_memory_mb, '.0f')} "
            f"| {num(r.baseline_peak_memory_mb, '.0f')} | {num(r.memory_ratio, '.3f')} "
            f"| {num(r.mfu, '.1%')} | {num(r.baseline_mfu, '.1%')} |"
        )
    return "\n".join(lines)


def environment(settings: BenchSettings) -> dict[str, Any]:
    """Versions and hardware the numbers were taken on."""
    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.device(settings.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ---- command line ----------------------------------------------------------------------------------------------


def _csv(cast: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [cast(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_csv(str), help="comma-separated registered model names")
    parser.add_argument(
        "--baseline",
        type=_csv(str),
        default=["swin_tiny_patch4_window7_224"],
        help="one timm model for all --models, or one per model (comma-separated)",
    )
    parser.add_argument("--preset", choices=["paper-table"], help="the released throughput table (GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, cuda for --preset)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp32, or autocast to bf16/fp16")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (64 at 224 for --preset)")
    parser.add_argument("--img-size", type=_csv(int), default=None, help="comma-separated resolutions (default 224)")
    parser.add_argument("--mode", type=_csv(str), default=None, help="infer,train (default both)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=7, help="timed iterations per model (median reported)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory subprocesses")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs in bf16/fp16)"
    )
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON constructor overrides for every model, e.g. '{\"depths\": [1, 1, 1, 1]}'",
    )
    parser.add_argument("--json", type=Path, default=None, help="write settings, environment and results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    preset = dict(PAPER_TABLE) if args.preset == "paper-table" else {}
    if not preset and not args.models:
        raise SystemExit("--models is required without --preset")
    explicit = {
        "models": args.models,
        "baseline": args.baseline if args.models else None,
        "img_size": args.img_size,
        "mode": args.mode,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    values = dict(preset, **{key: value for key, value in explicit.items() if value is not None})
    values.setdefault("img_size", [224])
    values.setdefault("mode", list(MODES))
    unknown = set(values["mode"]) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown --mode {sorted(unknown)}; choose from {MODES}")
    return BenchSettings(
        **values,
        dtype=args.dtype,
        compile=args.compile,
        threads=args.threads,
        warmup=args.warmup,
        iters=args.iters,
        memory=args.memory,
        num_classes=args.num_classes,
        peak_tflops=args.peak_tflops,
        model_kwargs=args.model_kwargs,
    )


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    configure_runtime()  # as main.py: the same process-wide settings
    if args.memory_worker is not None:
        _memory_worker(args.memory_worker)
        return []
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = settings_from_args(args)
    results = run_benchmark(settings)
    sys.stdout.write(markdown_table(results) + "\n")
    if args.json is not None:
        report = {
            "settings": asdict(settings),
            "environment": environment(settings),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return results


if __name__ == "__main__":
    main()
