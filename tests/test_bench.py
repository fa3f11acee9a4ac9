"""The benchmark's model-FLOPs arithmetic, against counts done by hand."""
import json

from conftest import load_script

bench = load_script("bench/bench")


def test_model_shape_counts_matmul_weights_by_hand(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4).save_pretrained(tmp_path)
    # Per layer: q, k, v, o 64x64 each; gate, up 64x128 and down 128x64; plus lm_head 64x100.
    # The input embedding is a lookup, not a matmul: not counted.
    per_layer = 4 * 64 * 64 + 3 * 64 * 128
    assert bench.model_shape(str(tmp_path)) == (2 * per_layer + 64 * 100, 2, 64)


def test_flops_per_token_by_hand():
    shape = (1000, 2, 8)  # N, layers, hidden
    # Forward: 2N + attention 4*L*d*T = 2000 + 4*2*8*10 = 2640.
    assert bench.flops_per_token(shape, 10, training=False) == 2640
    # LoRA training: 4N + 3 * 4*L*d*T = 4000 + 1920 = 5920.
    assert bench.flops_per_token(shape, 10, training=True) == 5920


def test_measured_cpu_peak_is_positive_and_named():
    flops, source = bench.peak_flops("fp32")
    assert flops > 1e8 and "matmul" in source
    json.dumps({"peak": flops})  # recorded in results.json
