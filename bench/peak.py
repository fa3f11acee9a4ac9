"""What this machine can compute: its matmul peak (peak_flops, for every benchmark's MFU) and the
dtype the demo evaluates in (eval_dtype).

Print this machine's fp32 matmul peak (the demo's budget is stated at a peak) and what a time
measured at one peak becomes at this one: `python bench/peak.py [minutes] [at GFLOP/s]`, then the
dtype the demo evaluates in. `python bench/peak.py --eval-dtype` prints that dtype alone
(eval_dtype), read from the CPU's features: on a CPU without native bf16 it imports nothing and
measures nothing (bf16 emulated on an AVX2 CPU takes minutes for one 2048x2048 matmul)."""
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The CPU features that multiply bf16 natively: x86's AVX512-BF16 and AMX (several times fp32:
# BENCHMARKS.md, "Figures behind code choices"), aarch64's BF16 instructions. Elsewhere bf16 is
# emulated, far slower than fp32.
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def native_bf16():
    """(whether this CPU multiplies bf16 natively, the flag that says so or why not), from the
    CPU's feature flags, then oneDNN's own check (torch multiplies bf16 through it)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False, f"no {CPUINFO} to read the CPU's features from"
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    found = next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)
    if found is None:
        return False, "no avx512_bf16 or amx_bf16 flag"
    import torch

    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_is_mkldnn_bf16_supported")
            and mkldnn._is_mkldnn_bf16_supported()):
        return False, f"{found}, but this torch's oneDNN does not use it"
    return True, found


def eval_dtype():
    """'bfloat16' on a CPU that multiplies bf16 natively, else 'auto' (bf16 or fp16 on a GPU, fp32
    on other CPUs): the Gemma demo's evaluation dtype. Generation is matmul-bound there, and bf16
    answers score as fp32 ones do (docs/demo.md, "Speed on a real model")."""
    if not native_bf16()[0]:
        return "auto"
    import torch

    return "auto" if torch.cuda.is_available() else "bfloat16"


# Dense bf16 peak from the datasheets (FLOP/s), for MFU on GPUs; other devices measure a matmul.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A40": 149.7e12,
                 "A10": 125e12, "4090": 165.2e12, "V100": 125e12}


def peak_flops(dtype):
    """(FLOP/s, where the number comes from): a GPU's datasheet bf16 peak, else the best of a few
    large matmuls measured now, in this run, at the benchmark's dtype (nanoGPT's estimate_mfu idea
    with a measured peak, since CPUs have no datasheet number that holds)."""
    import torch

    from model_utils import resolve_dtype

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name} datasheet dense bf16"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = resolve_dtype(dtype, device)
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best, f"measured {n}x{n} {str(dt).replace('torch.', '')} matmul in this run"


def main(argv):
    if argv == ["--eval-dtype"]:
        print(eval_dtype())
        return
    sys.path.insert(0, str(HERE.parent))  # the checkout's modules (model_utils: the dtype)
    import torch

    flops, source = peak_flops("float32")
    line = f"machine peak: {flops / 1e9:.0f} GFLOP/s ({source})"
    if len(argv) == 2:
        minutes, at = float(argv[0]), float(argv[1])
        line += f"; a {minutes:g}-minute budget at {at:g} GFLOP/s is about {minutes * at / (flops / 1e9):.0f} minutes here"
    print(line)
    if not torch.cuda.is_available():
        native, why = native_bf16()
        if native:  # fast here: worth showing beside the fp32 peak
            bf16, _ = peak_flops("bfloat16")
            print(f"eval dtype: bfloat16 (the CPU multiplies bf16 natively, {why}: {bf16 / 1e9:.0f} GFLOP/s)")
        else:
            print(f"eval dtype: fp32 (this CPU has no native bf16, {why}: bf16 would be emulated)")


if __name__ == "__main__":
    main(sys.argv[1:])
