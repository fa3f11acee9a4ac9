"""Estimated GPU memory of the base weights per quantization mode, from parameter counts (README: QLoRA).

    python bench/memory_table.py            # the README's table (markdown)

Each model is built from its config on the meta device (shapes only: no download, no memory),
and every tensor is counted as this project stores it:

  none   every weight in bf16 (2 bytes);
  8bit   the linear layers' weights (all but the output layer, which transformers leaves out) in
         int8 (1 byte) plus one fp32 scale per output row; everything else in bf16;
  4bit   those weights in NF4 (half a byte) plus, with double quantisation, one 8-bit scale per
         block of 64 weights and one fp32 scale per 256 such scales; everything else in bf16.

Training adds, for LoRA r=8 on every linear layer but the output layer (the default), the
adapter in fp32 with its gradient and AdamW's two moments (16 bytes per trainable parameter);
with a quantised base PEFT's prepare_model_for_kbit_training also keeps the unquantised
weights (embeddings, output layer, norms) in fp32. Activations, the CUDA context and allocator
slack come on top: these are estimates of the weights' share only, until a GPU run measures
(bench/gpu_check.sh prints the measured peak of each mode).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config_utils import parse_config, run_cli  # noqa: E402

GIB = 2 ** 30
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' defaults, which BitsAndBytesConfig keeps

# Shapes from the models' published config.json files.
MODELS = {
    # LLaMA-7B with the Chinese-LLaMA/Alpaca(-Plus) vocabulary (49,954 with the pad token).
    "Chinese-Alpaca-7B": ("LlamaConfig", dict(vocab_size=49954, hidden_size=4096, intermediate_size=11008,
                                              num_hidden_layers=32, num_attention_heads=32)),
    # Llama-2-7B's shape with Chinese-LLaMA-2's 55,296-token vocabulary.
    "Chinese-Alpaca-2-7B": ("LlamaConfig", dict(vocab_size=55296, hidden_size=4096, intermediate_size=11008,
                                                num_hidden_layers=32, num_attention_heads=32)),
    "Qwen2.5-7B": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       tie_word_embeddings=False)),
}
MODES = ("none", "8bit", "4bit")

DEFAULTS = {
    "lora_r": 8,  # LoRA rank of the training estimate (train_core's default)
}


def meta_model(config_class, shape):
    import transformers
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**shape))


def quantized_linears(model):
    """The nn.Linear layers a quantised load converts: all but the output layer."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def _ceil_div(a, b):
    return -(-a // b)


def quantized_bytes(linears, mode):
    """Bytes of these linear layers' weights as `mode` stores them (bitsandbytes' 256-entry code
    tables, 1 KiB per layer, left out)."""
    n = [m.weight.numel() for m in linears]
    if mode == "none":
        return 2 * sum(n)
    if mode == "8bit":
        return sum(n) + 4 * sum(m.out_features for m in linears)
    blocks = [_ceil_div(k, NF4_BLOCK) for k in n]
    return sum(_ceil_div(k, 2) for k in n) + sum(blocks) + 4 * sum(_ceil_div(b, NESTED_BLOCK) for b in blocks)


def weight_bytes(model, mode, training=False, lora_r=8):
    """Bytes of the model's weights stored as `mode` (and, with `training`, of the LoRA adapter
    and its optimizer state)."""
    linears = quantized_linears(model)
    quantized = {id(m.weight) for m in linears}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    rest_bytes = 4 if training and mode != "none" else 2  # prepare_model_for_kbit_training upcasts
    total = quantized_bytes(linears, mode) + rest_bytes * rest
    if training:
        total += 16 * sum(lora_r * (m.in_features + m.out_features) for m in linears)
    return total


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def table(lora_r=8):
    rows = ["| model | parameters | bf16 | 8-bit | 4-bit (NF4) | training, bf16 | training, 8-bit | training, 4-bit |",
            "|---|---|---|---|---|---|---|---|"]
    for name, (config_class, shape) in MODELS.items():
        model = meta_model(config_class, shape)
        cells = [f"{weight_bytes(model, m) / GIB:.1f} GiB" for m in MODES]
        cells += [f"{weight_bytes(model, m, training=True, lora_r=lora_r) / GIB:.1f} GiB" for m in MODES]
        rows.append(f"| {name} | {parameter_count(model) / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    print(table(cfg.lora_r))


if __name__ == "__main__":
    run_cli(main)
