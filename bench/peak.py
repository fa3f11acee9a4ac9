"""Print this machine's fp32 matmul peak (the demo's budget is stated at a peak) and what a time
measured at one peak becomes at this one: `python bench/peak.py [minutes] [at GFLOP/s]`.
`python bench/peak.py --eval-dtype` prints the dtype the demo evaluates in (eval_dtype)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import eval_dtype, peak_flops  # noqa: E402

def main(argv):
    if argv == ["--eval-dtype"]:
        print(eval_dtype())
        return
    flops, source = peak_flops("float32")
    line = f"machine peak: {flops / 1e9:.0f} GFLOP/s ({source})"
    if len(argv) == 2:
        minutes, at = float(argv[0]), float(argv[1])
        line += f"; a {minutes:g}-minute budget at {at:g} GFLOP/s is about {minutes * at / (flops / 1e9):.0f} minutes here"
    print(line)
    if not torch.cuda.is_available():
        bf16, _ = peak_flops("bfloat16")
        print(f"bf16 matmul: {bf16 / 1e9:.0f} GFLOP/s: test.py and predict.py run in "
              + ("bfloat16" if eval_dtype(flops, bf16) == "bfloat16" else "fp32 (bf16 is not natively fast here)"))


if __name__ == "__main__":
    main(sys.argv[1:])
