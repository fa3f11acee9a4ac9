"""Print this machine's fp32 matmul peak (the demo's budget is stated at a peak) and what a time
measured at one peak becomes at this one: `python bench/peak.py [minutes] [at GFLOP/s]`.
`python bench/peak.py --eval-dtype` prints the dtype the demo evaluates in (eval_dtype)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import peak_flops  # noqa: E402

# bf16 matmuls that are not at least this much faster than fp32 ones are emulated (or nearly):
# natively (AVX512-BF16, AMX) they measure 4-7x here, emulated well under 1x.
BF16_GAIN = 1.5


def eval_dtype():
    """'bfloat16' on a CPU whose bf16 matmul is natively fast, else 'auto' (bf16 or fp16 on a GPU,
    fp32 on other CPUs): generation is matmul-bound, and bf16 answers score as fp32 ones
    (README, "Speed on a real model")."""
    if torch.cuda.is_available():
        return "auto"
    fp32, _ = peak_flops("float32")
    bf16, _ = peak_flops("bfloat16")
    return "bfloat16" if bf16 >= BF16_GAIN * fp32 else "auto"


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
              + ("bfloat16" if bf16 >= BF16_GAIN * flops else "fp32 (bf16 is not natively fast here)"))


if __name__ == "__main__":
    main(sys.argv[1:])
