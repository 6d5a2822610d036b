#!/usr/bin/env bash
# Every GPU check and measurement of the performance section in one go (one lease of a GPU machine):
# the exactness and graph-break tests on CUDA, Focal-T/S vs Swin-T/S in bf16 at batch 128 (eager, then
# Focal-T compiled), and the released throughput table's shape. Usage: bash tools/gpu_report.sh [output dir]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-output/gpu_report}"
mkdir -p "$out"
bench="python tools/benchmark.py --device cuda --dtype bf16"
tiny_small=(--models focal_tiny_patch4_window7_224,focal_small_patch4_window7_224
    --baseline swin_tiny_patch4_window7_224,swin_small_patch4_window7_224)

python -m pytest -q -p no:warnings tests/test_fused_attention.py tests/test_compile.py tests/test_golden.py tests/test_golden_v2.py \
    2>&1 | tee "$out/tests.log" | tail -3
$bench "${tiny_small[@]}" --batch-size 128 --iters 10 --json "$out/eager.json" 2>&1 | tee "$out/eager.log" | tail -5
$bench --models focal_tiny_patch4_window7_224 --baseline swin_tiny_patch4_window7_224 --batch-size 128 \
    --iters 10 --compile --no-memory --json "$out/compiled.json" 2>&1 | tee "$out/compiled.log" | tail -3
$bench --preset paper-table --no-memory --json "$out/paper_table.json" 2>&1 | tee "$out/paper_table.log" | tail -11
