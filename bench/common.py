"""What the benchmark scripts share: the random LLaMA they time, the machine they ran on, results
written with checkout-relative paths (they are committed), and a stopwatch around functions."""
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# BENCHMARKS.md from this line to its end is bench/load.py's section: kept when bench.py rewrites the rest.
LOAD_MARKER = "<!-- bench/load.py: the section below is rewritten by make bench-load -->"
# BENCHMARKS.md from this line to the load section holds figures measured by hand, which code
# comments point to: kept as they are when bench.py rewrites its own sections.
FIGURES_MARKER = "<!-- measured by hand: the section below is kept when bench.py rewrites the rest -->"


SHAPES = {
    "bench": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=49954),
}


def build_random_model(cfg, out_dir):
    """A random LLaMA of `cfg.shape` with the tiny tokenizer, saved like any model dir.

    For the 7B shape the tokenizer is padded with unused tokens up to Chinese-Alpaca's 49,954
    pieces, so embedding and output layer cost what they cost in the real model. The weights
    are created in bf16 directly on the GPU when there is one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_utils import load_tokenizer

    shape = dict(SHAPES[cfg.shape])
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    vocab = shape.pop("vocab_size", len(tokenizer))
    if vocab > len(tokenizer):
        tokenizer.add_tokens([f"<unused_{i}>" for i in range(vocab - len(tokenizer))])
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=vocab, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        **shape,
    )
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def relative_paths(results):
    """`results` with every path inside this checkout written relative to it (recursively):
    results.json and BENCHMARKS.md are committed, and a checkout's place is no result."""
    if isinstance(results, dict):
        return {k: relative_paths(v) for k, v in results.items()}
    if isinstance(results, list):
        return [relative_paths(v) for v in results]
    if isinstance(results, str) and str(ROOT) in results:
        return results.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    return results


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


class Stopwatch:
    """Time spent inside some functions (wrapped in place for one run, restored after)."""

    def __init__(self, owner, names):
        self.owner, self.names, self.seconds, self.saved = owner, names, 0.0, {}

    def __enter__(self):
        for name in self.names:
            fn = self.saved[name] = getattr(self.owner, name)

            def timed(*args, _fn=fn, **kwargs):
                start = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            setattr(self.owner, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.owner, name, fn)
