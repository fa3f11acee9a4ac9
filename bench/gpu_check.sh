#!/usr/bin/env bash
# The prepared GPU check: LoRA training at LLaMA-7B's shape (vocabulary 49,954) in bf16 on MSRA,
# 100 optimizer steps at the default batch size, with and without gradient checkpointing
# (tokens/s and peak GPU memory), plus the evaluation benchmark at that size. Random weights cost
# the same compute as real ones. Each run prints its ratios and every variant's model FLOPs
# utilisation (MFU against the GPU's datasheet bf16 peak). Then the same training with the base
# weights in 8-bit and in 4-bit (QLoRA), 20 steps each, for the peak GPU memory of each mode
# (peak_memory_gib in results_gpu_8bit.json / results_gpu_4bit.json, beside the bf16 run's), to
# set against the README's estimates (bench/memory_table.py). The bf16 part is expected to take
# under 8 minutes on one H100; run after `make venv`. Not yet run on a GPU.
#   bash bench/gpu_check.sh            results in bench/out/{results_gpu*.json,BENCHMARKS_gpu*.md}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/out}
WORK=${WORK:-/tmp/bench-7b}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
test -f data/msra/instruct_data/test.txt || $PY process.py
test -f model_hub/tiny-llama/tokenizer.json || $PY model_hub/build_tiny_llama.py
$PY bench/bench.py --shape=7b --dtype=bf16 --train_steps=100 --work_dir="$WORK" \
    --output="$OUT/results_gpu.json" --markdown="$OUT/BENCHMARKS_gpu.md"
$PY bench/bench.py --model_dir="$WORK/random-llama" --dtype=bf16 --train_steps=100 \
    --gradient_checkpointing=True --skip_eval=True --work_dir="$WORK" \
    --output="$OUT/results_gpu_gc.json" --markdown="$OUT/BENCHMARKS_gpu_gc.md"
for q in 8bit 4bit; do
    $PY bench/bench.py --model_dir="$WORK/random-llama" --dtype=bf16 --train_steps=20 --quantization=$q \
        --skip_eval=True --work_dir="$WORK" --output="$OUT/results_gpu_$q.json" --markdown="$OUT/BENCHMARKS_gpu_$q.md"
done
# Peak GPU memory of our training path (variant "ours") per mode, then the estimate beside it.
$PY - "$OUT" <<'EOF'
import json, sys
for name in ("results_gpu.json", "results_gpu_8bit.json", "results_gpu_4bit.json"):
    r = json.load(open(f"{sys.argv[1]}/{name}"))
    print(f"quantization={r.get('quantization', 'none')}: peak {r['train']['ours']['peak_memory_gib']:.1f} GiB")
EOF
$PY bench/memory_table.py
