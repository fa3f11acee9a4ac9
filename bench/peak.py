"""Print this machine's fp32 matmul peak (the demo's budget is stated at a peak) and what a time
measured at one peak becomes at this one: `python bench/peak.py [minutes] [at GFLOP/s]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peak_flops  # noqa: E402


def main(argv):
    flops, source = peak_flops("float32")
    line = f"machine peak: {flops / 1e9:.0f} GFLOP/s ({source})"
    if len(argv) == 2:
        minutes, at = float(argv[0]), float(argv[1])
        line += f"; a {minutes:g}-minute budget at {at:g} GFLOP/s is about {minutes * at / (flops / 1e9):.0f} minutes here"
    print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
