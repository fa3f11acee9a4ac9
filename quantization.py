"""How are a model's base weights stored quantised (bitsandbytes), and can this machine do it?

The names a config may give (`check_quantization_name`), the check that bitsandbytes and the
device can run them (`check_quantization`, before any weights load), the transformers config
that loads them, and what a loaded model holds quantised. model_utils.py loads with them.
"""
import torch

from config_utils import ConfigError
from devices import resolve_device


# How the base weights are stored while LoRA trains on top (QLoRA: Dettmers et al., 2023).
QUANTIZATIONS = ("none", "4bit", "8bit")
BITSANDBYTES_REQUIREMENT = "bitsandbytes>=0.50,<0.51"  # as requirements.txt: the tested range


def check_quantization_name(quantization, where="config key 'quantization'"):
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"{where}: {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    return quantization


def quantization_config(quantization, compute_dtype):
    """transformers' BitsAndBytesConfig for a mode (None for none).

    4bit is QLoRA's recipe: NF4 codes with double quantisation (the block scales quantised
    again), computing in `compute_dtype` (bf16 on GPUs, fp32 on the CPU) with the weights
    dequantised block by block. 8bit is LLM.int8 with bitsandbytes' defaults. The output layer
    stays in `compute_dtype` (transformers leaves it out).
    """
    if check_quantization_name(quantization) == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def check_quantization(quantization, device="auto", where="config key 'quantization'"):
    """Refuse a mode this machine's bitsandbytes cannot run on `device`, in one line, before any
    weights load: a layer of the mode runs on a small tensor there (milliseconds), which is what
    the model's layers will do."""
    if check_quantization_name(quantization, where) == "none":
        return
    device = resolve_device(device)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(f"{where}: {quantization} needs bitsandbytes ({e}); "
                          f"pip install '{BITSANDBYTES_REQUIREMENT}'") from None
    import logging

    # bitsandbytes' 8-bit matmul logs a warning on every call whose input is not fp16 (it casts
    # the input itself): thousands of identical lines per run, nothing the user can act on.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            if quantization == "4bit":
                layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compress_statistics=True)
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer = layer.to(device)
            layer(torch.ones(2, 64, device=device))
    except Exception as e:  # any failure of the library on this device means the same to the user
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{where}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {quantization} "
                          f"layers on {device.type} ({why}); use quantization=none or a bitsandbytes build for "
                          f"{device.type} ('{BITSANDBYTES_REQUIREMENT}')") from None


def keep_4bit_numerics(model):
    """Keep bitsandbytes' 4-bit layers computing in eval as they did in training, on the CPU.

    On CPUs with AVX512-BF16, a Linear4bit in eval mode repacks its weight at its first forward
    and from then on multiplies in bf16, whatever compute dtype it was given: fp32 logits then
    move by ~2e-3, so test.py would score another model than the one trained (and than the
    dequantised merge). The repacking also fails on layers whose input size is not a multiple
    of the quantisation block (`shape '[128, 5]' is invalid`). The path is kept only where it
    computes in the dtype asked for and the layer's shape fits it.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = module.weight.quant_state
            fits = module.in_features % state.blocksize == 0 and module.out_features % 32 == 0
            module.support_avx512bf16_for_cpu = fits and module.compute_dtype == torch.bfloat16


def quantized_weights(model):
    """{parameter name: the weight a 4-bit layer computes with}, dequantised on demand.

    bitsandbytes' dequantize_4bit turns a layer's NF4 codes and (double-quantised) block scales
    back into the matrix its forward multiplies by: merging an adapter into these weights gives
    exactly the model the adapter was trained with.
    """
    import bitsandbytes as bnb

    def dequantize(weight):
        return lambda: bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    return {f"{name}.weight": dequantize(module.weight) for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit)}
