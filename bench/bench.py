"""Training and evaluation throughput, measured side by side in one run.

    make bench            # python bench/bench.py
    make bench QUICK=1    # fewer steps, under 5 minutes on 2 CPU cores
    python bench/bench.py --model_dir=model_hub/chinese-alpaca-7b --dtype=bf16   # on a GPU

Training, same model, same examples, same number of optimizer steps:
  (a) the original repository's recipe: every example padded to 192 tokens, random batches (HF Trainer);
  (b) our default train_trainer.py path: length-grouped batches, dynamic padding, the shared
      prompt prefix computed once per batch;
  (b') (b) with share_prefix=False;
  (c) a bare PyTorch loop over the same batches and loss function as (b): the practical limit.
Evaluation on the same test sentences:
  (a) one example at a time; (b) our batched generation; (c) (b) plus the shared-prefix KV cache;
  (d) (c) with grounded decoding (test.py's default), against (c) without it; (e) (c) with plain
  row-major weights instead of packed ones. Each variant's prompts' pass is timed apart.
Results go to bench/results.json and BENCHMARKS.md. By default the model is a randomly
initialised LLaMA (hidden 512, 4 layers, 20.8M parameters with the tiny tokenizer's 8,000
pieces) so that model compute, not Python overhead, dominates a training step; random weights
cost the same compute as trained ones. `--shape=7b` builds LLaMA-7B's shape instead
(bench/gpu_check.sh, for a GPU).
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from config_utils import parse_config, run_cli  # noqa: E402
from dataset import load_data  # noqa: E402
from answer_format import DEFAULT_ANSWER_FORMAT  # noqa: E402
from infer_config import answer_format_for  # noqa: E402
from model_utils import meta_model, resolve_dtype  # noqa: E402
from peak import eval_dtype, native_bf16  # noqa: E402

DEFAULTS = {
    "model_dir": "",  # "" = a random LLaMA of `shape`, built with tokenizer_dir's tokenizer
    "shape": "bench",  # bench: hidden 512, 4 layers (CPU); 7b: LLaMA-7B with Chinese-Alpaca's 49,954 vocabulary
    "tokenizer_dir": str(ROOT / "model_hub" / "tiny-llama"),  # tokenizer of the random model (make demo builds it)
    "gradient_checkpointing": False,
    "quantization": "none",  # base weights of the training variants: none, 4bit (QLoRA) or 8bit (gpu_check.sh: peak memory per mode)
    "skip_eval": False,  # training variants only
    "train_path": str(ROOT / "data" / "msra" / "instruct_data" / "train.txt"),
    "test_path": str(ROOT / "data" / "msra" / "instruct_data" / "test.txt"),
    "train_examples": 2000,  # training examples the samplers draw from
    "train_steps": 100,  # optimizer steps per training variant (quick: 40)
    "train_batch_size": 12,  # the original repository's batch size
    "seed_max_length": 192,  # the original repository's fixed padding length
    "eval_examples": 200,  # MSRA test sentences each generation variant answers
    "eval_batch_size": 32,  # test.py's default batch_size
    "max_new_tokens": 16,  # a random model never stops early: every example generates this many
    "dtype": "auto",
    "quick": False,  # fewer training steps (README: make bench QUICK=1)
    "output": str(ROOT / "bench" / "results.json"),  # every number of the run, as JSON
    "markdown": str(ROOT / "BENCHMARKS.md"),  # the same as tables
    "work_dir": str(ROOT / "bench" / "out"),  # the random model and throwaway checkpoints
    "seed": 0,
    # The real-model section (skipped with one line when the folder is absent; `make gemma` makes it).
    "real_model_dir": str(ROOT / "model_hub" / "gemma-3-270m"),
    "real_adapter": str(ROOT / "checkpoint" / "msra" / "gemma" / "adapter_model"),  # a tuned adapter (make demo); absent: an untrained LoRA
    "real_train_steps": 10,  # optimizer steps per real-model training variant (the first 2 not timed)
    "real_train_batch_size": 8,
    "real_eval_examples": 256,  # seeded sample of MSRA test sentences for the real-model generation variants
    "real_eval_batch_size": 32,  # test.py's default batch_size: variants (a) to (d)
    "real_demo_batch_size": 64,  # make demo's test.py batch (GEMMA_EVAL_BATCH): variant (e)
    # The seed-format demo's settings (eos_penalty 1.5, first_choice), kept so the committed figures
    # stay comparable; an inline adapter (today's make demo) has no early end for the penalty to weigh.
    "real_eos_penalty": 1.5,  # in every variant
    "real_demo_policy": "first_choice",  # test.py then-and-now, variant (e)
    # test.py as it stood before the real-model work (transformers' generate, every logit), run from
    # this repository's history beside today's on the same sample; "" skips it.
    "real_baseline_commit": "2ed8dbe",
}


# BENCHMARKS.md from this line to its end is bench/load.py's section: kept when this script rewrites the rest.
LOAD_MARKER = "<!-- bench/load.py: the section below is rewritten by make bench-load -->"

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


class CountingCollate:
    """Wraps a collator: records real vs padded tokens; `pad_to` fixes the length (the original recipe)."""

    def __init__(self, collate, pad_to=None):
        self.collate, self.pad_to = collate, pad_to
        self.real = self.total = 0
        self.batches = []

    def __call__(self, batch):
        out = self.collate(batch)
        if self.pad_to and out["input_ids"].shape[1] < self.pad_to:
            extra = self.pad_to - out["input_ids"].shape[1]
            pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
            out = {"input_ids": pad(out["input_ids"], self.collate.pad_id),
                   "attention_mask": pad(out["attention_mask"], 0), "labels": pad(out["labels"], -100)}
        self.real += int(out["attention_mask"].sum())
        self.total += out["attention_mask"].numel()
        self.batches.append(out)
        return out


def train_config(cfg, model_dir, save_dir, group_by_length, max_seq_length, share_prefix=True):
    from train_trainer import DEFAULTS as TRAINER_DEFAULTS

    return parse_config(TRAINER_DEFAULTS, {
        "model_dir": model_dir, "train_path": cfg.train_path, "dev_path": "", "save_dir": save_dir,
        "train_limit": cfg.train_examples, "max_steps": cfg.steps, "train_batch_size": cfg.train_batch_size,
        "group_by_length": group_by_length, "max_seq_length": max_seq_length, "lora_dropout": 0.0,
        "log_steps": max(cfg.steps // 4, 1), "eval_steps": 0, "save_steps": 10 ** 6, "overwrite": True,
        "dtype": cfg.dtype, "seed": cfg.seed, "gradient_checkpointing": cfg.gradient_checkpointing,
        "share_prefix": share_prefix, "quantization": cfg.quantization,
    })


WARMUP_STEPS = 2  # steps excluded from every timing (first-step allocation and thread start-up)


def _warmup(steps):
    """The steps a training run leaves out of its timing: WARMUP_STEPS, fewer when the run is too
    short to keep one timed step after them (a one-step run is timed whole)."""
    return max(min(WARMUP_STEPS, steps - 1), 0)


def _rate(tcfg, elapsed, warmup):
    return (tcfg.max_steps - warmup) * tcfg.train_batch_size / elapsed


def run_trainer(tcfg, pad_to=None):
    """One Trainer run through the project's own builders; returns (stats, counting collator)."""
    from transformers import TrainerCallback

    warmup = _warmup(tcfg.max_steps)

    class StepClock(TrainerCallback):
        start = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            if warmup == 0:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    from build import build_datasets, build_model, load_datasets_checked
    from train_core import validate_train_config
    from train_trainer import make_trainer, training_arguments

    validate_train_config(tcfg)
    train_records, _ = load_datasets_checked(tcfg)
    model, tokenizer = build_model(tcfg)
    train_set, _, collate = build_datasets(tcfg, tokenizer, train_records, [])
    counting = CountingCollate(collate, pad_to)
    args = training_arguments(tcfg)
    args.save_strategy = "no"
    args.report_to = []
    args.disable_tqdm = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    trainer = make_trainer(tcfg, model=model, args=args, train_dataset=train_set, data_collator=counting,
                           callbacks=[clock])
    trainer.train()
    elapsed = clock.end - clock.start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed = counting.batches[warmup:tcfg.max_steps]
    stats = {"seconds": elapsed, "examples_per_second": _rate(tcfg, elapsed, warmup),
             "tokens_per_second": sum(int(b["attention_mask"].sum()) for b in timed) / elapsed,
             "non_padding_fraction": counting.real / counting.total, "final_loss": losses[-1]}
    if torch.cuda.is_available():
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del trainer, model
    return stats, counting


def run_bare(tcfg, batches):
    """The same optimizer steps over the same batches with no Trainer: forward, backward, clip, step."""
    from build import build_model, lr_schedule, training_dtype
    from loss import batch_loss

    model, _ = build_model(tcfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    if tcfg.gradient_checkpointing:
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    # The Trainer's default optimizer (adamw_torch_fused), so only the Trainer around it differs.
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  eps=tcfg.adam_epsilon, weight_decay=tcfg.weight_decay, fused=True)
    scheduler = lr_schedule(tcfg, len(batches))(optimizer)
    _, mixed = training_dtype(tcfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed == "bf16")
    losses = []
    warmup = _warmup(tcfg.max_steps)
    start = time.perf_counter()  # restarted after the warm-up steps, if the run has any
    for step, batch in enumerate(batches, 1):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = batch_loss(model, batch, tcfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == warmup:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    window = losses[-tcfg.log_steps:]  # what the Trainer's last logged loss averages
    timed = batches[warmup:]
    return {"seconds": elapsed, "examples_per_second": _rate(tcfg, elapsed, warmup),
            "tokens_per_second": sum(int(b["attention_mask"].sum()) for b in timed) / elapsed,
            "non_padding_fraction": real / total, "final_loss": sum(window) / len(window)}


def run_eval(model_dir, records, cfg):
    from dataset import PromptEncoder
    from model_utils import load_model_and_tokenizer
    import generation
    from generation import Loop, ner_generate, shared_prefix_length

    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.dtype)
    args = {"max_seq_length": 512}
    variants = {"single": dict(batch_size=1, prefix_cache=False, grounded=False),
                "batched": dict(batch_size=cfg.eval_batch_size, prefix_cache=False, grounded=False),
                "prefix_cache": dict(batch_size=cfg.eval_batch_size, prefix_cache=True, grounded=False),
                "grounded": dict(batch_size=cfg.eval_batch_size, prefix_cache=True, grounded=True),
                "unpacked": dict(batch_size=cfg.eval_batch_size, prefix_cache=True, loop=Loop(packed_weights=False),
                             grounded=False)}
    ner_generate(model, tokenizer, args, records[:4], max_new_tokens=2, grounded=False)  # warm-up
    ner_generate(model, tokenizer, args, records[:4], max_new_tokens=2, grounded=True)  # and the token table
    # Useful work per example: every prompt token and every answer token (re-encoded from the
    # output), whatever a variant skips or repeats to get there.
    collate = PromptEncoder(args, tokenizer)
    prompt_ids = [collate.inference_ids(r, cfg.max_new_tokens, 2048)[0] for r in records]
    prompt_tokens = [len(p) for p in prompt_ids]
    shared = shared_prefix_length(prompt_ids)
    shape = model_shape(model_dir)
    results, outputs = {}, {}
    for name, options in variants.items():
        with Stopwatch(generation, ("prefill",)) as prompts_pass:  # the prompts through the body (own loop)
            start = time.perf_counter()
            outputs[name], _ = ner_generate(model, tokenizer, args, records, max_new_tokens=cfg.max_new_tokens,
                                            **options)
            elapsed = time.perf_counter() - start
        # Answer length in tokens (re-encoded): a random model's grounded answers end earlier,
        # which the examples/s ratio alone would hide.
        tokens = sum(len(tokenizer.encode(o, add_special_tokens=False)) for o in outputs[name])
        context = (sum(prompt_tokens) + tokens / 2) / len(records)
        # With the prefix cache the shared prompt prefix runs once per call, not once per example.
        prompts = sum(prompt_tokens) - (len(records) - 1) * shared if options["prefix_cache"] else sum(prompt_tokens)
        flops = (prompts + tokens) * flops_per_token(shape, context, training=False)
        results[name] = {"seconds": elapsed, "examples_per_second": len(records) / elapsed,
                         "prompt_seconds": prompts_pass.seconds,
                         "answer_tokens": tokens / len(records), "tokens_per_second": tokens / elapsed,
                         "model_flops_per_second": flops / elapsed}
    identical = outputs["single"] == outputs["batched"] == outputs["prefix_cache"] == outputs["unpacked"]
    return results, identical


# Dense bf16 peak from the datasheets (FLOP/s), for MFU on GPUs; other devices measure a matmul.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A40": 149.7e12,
                 "A10": 125e12, "4090": 165.2e12, "V100": 125e12}


def peak_flops(dtype):
    """(FLOP/s, where the number comes from): a GPU's datasheet bf16 peak, else the best of a few
    large matmuls measured now, in this run, at the benchmark's dtype (nanoGPT's estimate_mfu idea
    with a measured peak, since CPUs have no datasheet number that holds)."""
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


def model_shape(model_dir):
    """(matmul weights N, layers L, hidden d), from the config on the meta device (no weights)."""
    model = meta_model(model_dir)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return n, model.config.num_hidden_layers, model.config.hidden_size


def flops_per_token(shape, context, training):
    """Model FLOPs per real token. Forward: 2N for the matmuls plus 4*L*d*T for attention over a
    T-token context. LoRA training adds the backward pass through the frozen weights (2N, input
    gradients only; LoRA's own weights are negligible) and twice the attention forward."""
    n, layers, hidden = shape
    attention = 4 * layers * hidden * context
    return (4 * n + 3 * attention) if training else (2 * n + attention)


def run_tokens(batch, share_prefix):
    """Tokens a training step runs through the model: the real ones, the shared prefix once."""
    from loss import loss_free_prefix_length

    real = int(batch["attention_mask"].sum())
    return real - (len(batch["input_ids"]) - 1) * loss_free_prefix_length(batch) if share_prefix else real


def body_shape(model_dir):
    """(matmul weights of the body N, layers, hidden, vocabulary): the output layer apart, since
    training computes it only where a target is trained and grounded generation only for the
    tokens a row can allow."""
    model = meta_model(model_dir)
    head = model.get_output_embeddings()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return n, model.config.num_hidden_layers, model.config.hidden_size, head.weight.shape[0]


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


def run_real_model(cfg, peak):
    """Gemma 3 270M (or any real model folder): LoRA training through the Trainer against the bare
    loop, and grounded generation as test.py ran it before (transformers' generate, first_choice)
    against the own loop with either policy. None when the folder is absent."""
    import random

    from generation import Loop, ner_generate
    from grounding import AnswerStates
    from model_utils import load_for_inference, load_model_and_tokenizer

    model_dir = cfg.real_model_dir
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        print(f"real-model section skipped: no model in '{model_dir}' (make gemma prepares Gemma 3 270M)")
        return None
    n_body, layers, hidden, vocab = body_shape(model_dir)
    work = Path(cfg.work_dir)
    steps = cfg.real_train_steps
    tcfg = train_config(cfg, model_dir, str(work / "real-ours"), True, 256)
    tcfg.max_steps, tcfg.train_batch_size, tcfg.log_steps = steps, cfg.real_train_batch_size, 1
    train = {}
    train["ours"], counting = run_trainer(tcfg)
    train["bare"] = run_bare(tcfg, counting.batches[:steps])
    timed = counting.batches[_warmup(steps):steps]  # the steps run_trainer timed
    tokens = sum(run_tokens(b, True) for b in timed)
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed)  # positions whose logits the loss needs
    context = sum(int(b["attention_mask"].sum()) for b in timed) / sum(len(b["input_ids"]) for b in timed)
    flops = tokens * (4 * n_body + 3 * 4 * layers * hidden * context) + trained * 4 * vocab * hidden
    for stats in train.values():
        stats["mfu"] = flops / stats["seconds"] / peak

    adapter = cfg.real_adapter if cfg.real_adapter and (Path(cfg.real_adapter) / "adapter_config.json").is_file() else None
    if adapter:
        model, tokenizer, train_args = load_for_inference(adapter, model_dir=model_dir, dtype=cfg.dtype)
    else:
        from peft import LoraConfig, get_peft_model

        model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.dtype)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
        train_args = {"max_seq_length": 256}
    test_path = test_path_for(cfg, train_args)
    records = load_data(test_path)
    records = [records[i] for i in sorted(random.Random(cfg.seed).sample(range(len(records)), cfg.real_eval_examples))]
    variants = {"transformers_first_choice": dict(loop=Loop(own=False), policy="first_choice"),
                "own_first_choice": dict(policy="first_choice"),
                "own_best_allowed": dict(policy="best_allowed"),
                "own_best_allowed_unpacked": dict(policy="best_allowed", loop=Loop(packed_weights=False)),
                "transformers_best_allowed": dict(loop=Loop(own=False), policy="best_allowed"),
                "own_best_allowed_demo_batch": dict(policy="best_allowed", batch_size=cfg.real_demo_batch_size),
                "merged": dict(policy="best_allowed", batch_size=cfg.real_demo_batch_size),
                "merged_bf16": dict(policy="best_allowed", batch_size=cfg.real_demo_batch_size)}
    bf16_skipped = None
    if torch.cuda.is_available():
        bf16_peak = peak
    elif native_bf16()[0]:
        bf16_peak = peak_flops("bfloat16")[0]
    else:
        # Emulated bf16 runs for hours here and is what make demo never does on such a CPU.
        bf16_skipped = f"this CPU has no native bf16 ({native_bf16()[1]}): it would be emulated"
        print(f"bf16 variant (g) skipped: {bf16_skipped}", flush=True)
        del variants["merged_bf16"]
        bf16_peak = None
    ner_generate(model, tokenizer, train_args, records[:2], max_new_tokens=4, grounded=True)  # warm-up, token table
    from dataset import PromptEncoder
    from generation import shared_prefix_length

    encoder = PromptEncoder(train_args, tokenizer)
    prompt_ids = [encoder.inference_ids(r, 64, 2048)[0] for r in records]
    own_prompt = sum(map(len, prompt_ids)) - (len(records) - 1) * shared_prefix_length(prompt_ids)
    avg_context = sum(map(len, prompt_ids)) / len(records)
    evals, outputs = {}, {}
    for name, options in variants.items():
        # The last two change the model in place: the adapter folded into the weights (what
        # test.py loads, merge_lora), then those weights in bf16 (make demo where bf16 is native).
        if name == "merged" and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if name == "merged_bf16":
            model = model.to(torch.bfloat16)
            ner_generate(model, tokenizer, train_args, records[:2], max_new_tokens=4, grounded=True)
        run_peak = bf16_peak if name == "merged_bf16" else peak
        with Stopwatch(AnswerStates, ("next_tokens", "mask", "advance")) as grammar:
            start = time.perf_counter()
            options = {"batch_size": cfg.real_eval_batch_size, **options}
            outputs[name], _ = ner_generate(model, tokenizer, train_args, records, max_new_tokens=64, grounded=True,
                                            eos_penalty=cfg.real_eos_penalty, **options)
            elapsed = time.perf_counter() - start
        answer = sum(len(tokenizer.encode(o, add_special_tokens=False)) + 1 for o in outputs[name])  # + EOS
        body_flops = (own_prompt + answer) * (2 * n_body + 4 * layers * hidden * avg_context)
        evals[name] = {"seconds": elapsed, "batch_size": options["batch_size"], "examples_per_second": len(records) / elapsed,
                       "answer_tokens": answer / len(records), "mfu": body_flops / elapsed / run_peak,
                       "grammar_share": grammar.seconds / elapsed}
    def differ_on(a, b):
        return sum(x != y for x, y in zip(outputs[a], outputs[b]))
    bf16 = {} if bf16_skipped else {
        "bf16_differ_on": differ_on("merged", "merged_bf16"),
        "bf16_speedup": evals["merged_bf16"]["examples_per_second"] / evals["merged"]["examples_per_second"]}
    demo = "merged" if bf16_skipped else "merged_bf16"  # what make demo runs on this machine
    return {
        "model": model_dir, "adapter": adapter or "untrained LoRA r=8 (all-linear)",
        "train_steps": steps, "train_batch_size": cfg.real_train_batch_size, "train": train,
        "eval_examples": len(records), "eval_batch_size": cfg.real_eval_batch_size, "eval": evals,
        "own_loop_identical": outputs["transformers_first_choice"] == outputs["own_first_choice"],
        "allowed_logits_identical": outputs["transformers_best_allowed"] == outputs["own_best_allowed"],
        "demo_batch_identical": outputs["own_best_allowed_demo_batch"] == outputs["own_best_allowed"],
        "packed_differ_on": differ_on("own_best_allowed", "own_best_allowed_unpacked"),
        "packed_speedup": evals["own_best_allowed"]["examples_per_second"]
        / evals["own_best_allowed_unpacked"]["examples_per_second"],
        "eos_penalty": cfg.real_eos_penalty,
        "policies_differ_on": differ_on("own_first_choice", "own_best_allowed"),
        "merged_differ_on": differ_on("own_best_allowed_demo_batch", "merged"),
        "bf16_peak_flops": bf16_peak, "bf16_skipped": bf16_skipped, **bf16,
        "own_loop_speedup": evals["own_best_allowed"]["examples_per_second"]
        / evals["transformers_first_choice"]["examples_per_second"],
        "demo_speedup": evals[demo]["examples_per_second"] / evals["transformers_first_choice"]["examples_per_second"],
        "test_py_then_and_now": (run_test_py_then_and_now(cfg, adapter, model_dir, eval_dtype())
                                 if answer_format_for(train_args) == DEFAULT_ANSWER_FORMAT else
                                 print("test.py then-and-now skipped: the adapter answers in the "
                                       f"{answer_format_for(train_args)} format, which the earlier test.py cannot read")),
    }


def test_path_for(cfg, train_args):
    """The test sentences in the adapter's answer format: cfg.test_path for the seed format, else
    test.txt beside the adapter's training data (make demo: data/msra_inline/instruct_data)."""
    if answer_format_for(train_args) == DEFAULT_ANSWER_FORMAT or not train_args.get("train_path"):
        return cfg.test_path
    return str(Path(train_args["train_path"]).parent / "test.txt")


def run_test_py_then_and_now(cfg, adapter, model_dir, dtype="auto"):
    """test.py at real_baseline_commit (extracted with git archive) and today's test.py, as
    subprocesses on one sample file of real_eval_examples seeded test sentences: examples/s (the
    generation time each test.py measures itself, loading not counted) and F1 from each run's
    metrics.json; the demo's run evaluates in `dtype`. None, with one line, when there is no
    adapter or git cannot read the commit."""
    import io
    import random
    import shutil
    import subprocess
    import tarfile

    from dataset import read_text

    commit = cfg.real_baseline_commit
    if not commit or not adapter:
        print("test.py then-and-now skipped: " + ("no real_baseline_commit" if not commit else "no tuned adapter (make demo)"))
        return None
    work = Path(cfg.work_dir) / "then-and-now"
    shutil.rmtree(work, ignore_errors=True)
    then_tree = work / "then"
    then_tree.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace").strip() if getattr(e, "stderr", None) else str(e)
        print(f"test.py then-and-now skipped: git cannot read commit {commit} here ({detail.splitlines()[-1]})")
        return None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(then_tree, filter="data")
    lines = [line for line in read_text(cfg.test_path).split("\n") if line.strip()]
    keep = sorted(random.Random(cfg.seed).sample(range(len(lines)), min(cfg.real_eval_examples, len(lines))))
    sample = work / "test.txt"
    sample.write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    runs = {"then": (then_tree, {"batch_size": cfg.real_eval_batch_size}),
            "then_batch16": (then_tree, {"batch_size": 16}),
            "now": (ROOT, {"batch_size": cfg.real_eval_batch_size}),
            "now_demo": (ROOT, {"batch_size": cfg.real_demo_batch_size, "eos_penalty": cfg.real_eos_penalty,
                                "dtype": dtype, "grounding_policy": cfg.real_demo_policy})}
    results = {"commit": commit, "examples": len(keep)}
    for name, (tree, flags) in runs.items():
        out = work / name
        argv = [sys.executable, str(tree / "test.py"), f"--lora_model={adapter}", f"--model_dir={model_dir}",
                f"--test_path={sample}", f"--output_dir={out}", *(f"--{k}={v}" for k, v in flags.items())]
        done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=1800)  # 256 sentences: ~1 min
        if done.returncode:
            raise RuntimeError(f"test.py ({name}) failed: {done.stderr.strip().splitlines()[-1:]}")
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        results[name] = {**flags, "examples_per_second": metrics["examples_per_second"], "f1": metrics["f1"],
                         "policy": metrics.get("grounding_policy", "first_choice")}
    results["speedup"] = results["now"]["examples_per_second"] / results["then"]["examples_per_second"]
    results["demo_speedup"] = results["now_demo"]["examples_per_second"] / results["then"]["examples_per_second"]
    return results


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


def table_rows(stats, labels, cells):
    """Markdown rows `| label | cells(stats[key])... |`, a peak-memory note on GPU runs."""
    rows = []
    for key, label in labels.items():
        r = stats[key]
        memory = f" (peak {r['peak_memory_gib']:.1f} GiB)" if "peak_memory_gib" in r else ""
        rows.append(f"| {label}{memory} | " + " | ".join(cells(r)) + " |")
    return rows


def write_markdown(path, results, command):
    t, e = results["train"], results["eval"]
    lines = [
        "# Benchmarks", "",
        f"Produced by `{command}` on {results['machine']}, {results['date']}.",
        f"Model: {results['model']}. Ratios come from one run, variants side by side.", "",
        "## Training", "",
        f"{results['train_steps']} optimizer steps of {results['train_batch_size']} MSRA examples each; "
        f"the first {WARMUP_STEPS} are not timed; gradient checkpointing {results['gradient_checkpointing']}.", "",
        "| variant | examples/s | tokens/s | MFU | non-padding tokens | final loss |", "|---|---|---|---|---|---|",
    ]
    names = {"seed": "(a) the original repository's recipe: pad to 192, random batches", "ours": "(b) train_trainer.py default",
             "bare": "(c) bare PyTorch loop, batches and loss of (b)",
             "no_prefix": "(b') (b) with share_prefix=False"}
    lines += table_rows(t, names, lambda r: [
        f"{r['examples_per_second']:.2f}", f"{r['tokens_per_second']:.0f}", f"{r['mfu']:.1%}",
        f"{r['non_padding_fraction']:.1%}", f"{r['final_loss']:.3f}"])
    lines += ["", f"- train_speedup_vs_seed (b/a): **{results['train_speedup_vs_seed']:.2f}**",
              f"- train_efficiency_vs_bare (b/c): **{results['train_efficiency_vs_bare']:.2f}**",
              f"- train_speedup_prefix (b/b'): **{results['train_speedup_prefix']:.2f}** (the same batches; "
              f"the shared prompt prefix runs once per batch instead of once per example)", "",
              "## Evaluation", "",
              f"{results['eval_examples']} MSRA test sentences, {results['max_new_tokens']} new tokens each (greedy).", "",
              "| variant | examples/s | answer tokens | MFU | prompts' pass (s) | the rest: decoding (s) |",
              "|---|---|---|---|---|---|"]
    enames = {"single": "(a) one example at a time", "batched": "(b) batched generation",
              "prefix_cache": "(c) batched + shared-prefix KV cache",
              "grounded": "(d) (c) with grounded decoding",
              "unpacked": "(e) (c) without packed weights (plain row-major matmuls)"}
    lines += table_rows(e, enames, lambda r: [
        f"{r['examples_per_second']:.2f}", f"{r['answer_tokens']:.1f}" if "answer_tokens" in r else "-",
        f"{r.get('mfu', float('nan')):.1%}", f"{r.get('prompt_seconds', float('nan')):.2f}",
        f"{r['seconds'] - r.get('prompt_seconds', float('nan')):.2f}" if "seconds" in r else "-"])
    lines += ["", f"- eval_speedup_vs_single (b/a): **{results['eval_speedup_vs_single']:.2f}**",
              f"- eval_speedup_prefix_cache (c/b): **{results['eval_speedup_prefix_cache']:.2f}**",
              f"- the prompts' pass alone, (b)/(c) in seconds: **{results['eval_prompt_speedup_prefix_cache']:.2f}** "
              f"(the part the prefix cache shortens; both decode the same {results['max_new_tokens']} tokens a row)",
              f"- packed weights (c/e): **{results['eval_speedup_packed']:.2f}**",
              f"- outputs identical across (a), (b), (c), (e): **{results['eval_outputs_identical']}**",
              f"- eval_grounded_vs_plain (d/c): **{results['eval_grounded_vs_plain']:.2f}** (examples/s; "
              f"the random model's grounded answers are shorter, see the answer tokens column)", "",
              "## Model FLOPs utilisation", "",
              f"MFU = model FLOPs per second over the peak: {results['peak_flops'] / 1e12:.3g} TFLOP/s "
              f"({results['peak_source']}). Model FLOPs count useful work only: real (non-padding) tokens, "
              "2N per token forward for the N matmul weights plus attention over the context, and for LoRA "
              "training the backward pass through the frozen weights (4N in all), as nanoGPT's estimate_mfu "
              "does for full training (6N). A shared prompt prefix counts once where a variant runs it once. "
              "Padding, recomputed prefixes and Python overhead lower MFU.", ""]
    if results.get("real_model"):
        lines += real_model_markdown(results["real_model"])
    old = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else ""
    load_section = ["", LOAD_MARKER + old.split(LOAD_MARKER, 1)[1].rstrip("\n")] if LOAD_MARKER in old else []
    Path(path).write_text("\n".join(lines + load_section) + "\n", encoding="utf-8")


def real_model_markdown(r):
    from kv_cache import PREFILL_TOKENS

    t, e = r["train"], r["eval"]
    lines = ["## A real model", "",
             f"{r['model']}, adapter: {r['adapter']}. Same run, same peak as above. MFU here counts the body "
             "(every matmul but the output layer, plus attention) on the tokens each example needs (its own "
             "prompt tokens, the shared prefix once per call, the answer); training adds the output layer at "
             "the trained positions, which the loss needs. Output-layer work a variant does beyond that "
             "(every logit of a 262,144-token vocabulary at each generated token) is not counted, so it shows "
             "as lower MFU.", "",
             f"Training: {r['train_steps']} LoRA steps of {r['train_batch_size']} MSRA examples (the first "
             f"{WARMUP_STEPS} not timed).", "",
             "| variant | examples/s | MFU | final loss |", "|---|---|---|---|"]
    lines += table_rows(t, {"ours": "train_trainer.py (HF Trainer)", "bare": "bare PyTorch loop, same batches and loss"},
                        lambda s: [f"{s['examples_per_second']:.2f}", f"{s['mfu']:.1%}", f"{s['final_loss']:.3f}"])
    lines += ["", f"Generation: {r['eval_examples']} seeded MSRA test sentences, grounded (eos_penalty "
                  f"{r['eos_penalty']}), batch {r['eval_batch_size']} unless the row says otherwise, up to 64 new "
                  "tokens. The own loop reads a batch's prompts in row chunks of at most "
                  f"{PREFILL_TOKENS} tokens (kv_cache.PREFILL_TOKENS).", "",
              "| variant | examples/s | answer tokens | MFU | grammar share of the time |", "|---|---|---|---|---|"]
    names = {"transformers_first_choice": "(a) transformers' generate, first_choice (every logit, as test.py before)",
             "own_first_choice": "(b) own loop, first_choice (finished rows leave the batch)",
             "own_best_allowed": "(c) own loop, best_allowed: only the allowed tokens' logits (test.py's loop)",
             "own_best_allowed_unpacked": "(c') as (c), plain row-major weights (packed_weights=False)",
             "transformers_best_allowed": "(d) transformers' generate, best_allowed (every logit)",
             "own_best_allowed_demo_batch": f"(e) as (c), batch {e['own_best_allowed_demo_batch']['batch_size']} "
                                            "(make demo's batch)",
             "merged": "(f) as (e), the adapter folded into the weights (test.py's merge_lora)",
             "merged_bf16": f"(g) as (f), bf16 weights (make demo where bf16 is native; MFU against the bf16 "
                            f"peak, {(r.get('bf16_peak_flops') or 0) / 1e9:.0f} GFLOP/s)"}
    names = {k: v for k, v in names.items() if k in e}
    lines += table_rows(e, names, lambda s: [f"{s['examples_per_second']:.2f}", f"{s['answer_tokens']:.1f}",
                                             f"{s['mfu']:.1%}", f"{s['grammar_share']:.1%}"])
    skipped = r.get("bf16_skipped")
    demo = "f" if skipped else "g"
    lines += ["", f"- own loop, allowed logits only, over transformers' generate (c/a): **{r['own_loop_speedup']:.2f}**; "
                  f"make demo's path over (a) ({demo}/a): **{r['demo_speedup']:.2f}**",
              f"- (a) and (b) give identical answers: **{r['own_loop_identical']}**; (c) and (d): "
              f"**{r['allowed_logits_identical']}**; (c) and (e): **{r['demo_batch_identical']}**",
              f"- first_choice and best_allowed differ on {r['policies_differ_on']} of {r['eval_examples']} answers; "
              f"(e) and (f) on {r['merged_differ_on']}" + ("" if skipped else f"; (f) and (g) on {r['bf16_differ_on']}"),
              f"- packed weights (c/c'): **{r['packed_speedup']:.2f}**; (c) and (c') differ on {r['packed_differ_on']} answers",
              f"- (g) skipped: {skipped}" if skipped else f"- bf16 over fp32 (g/f): **{r['bf16_speedup']:.2f}**", ""]
    h = r.get("test_py_then_and_now")
    if h:
        lines += [f"test.py itself, then and now: test.py at commit {h['commit']} (before the real-model work) and "
                  f"today's, one after the other in this run, each as its own process on the same {h['examples']} "
                  "seeded sentences with the same adapter; examples/s is the generation time each test.py measures "
                  "(loading not counted). The answers differ where the defaults differ (policy, eos_penalty), so "
                  "F1 is shown beside the speed.", "",
                  "| test.py | batch | policy | eos_penalty | dtype | examples/s | F1 |", "|---|---|---|---|---|---|---|"]
        lines += table_rows(h,
                            {"then": f"{h['commit']}, its defaults", "then_batch16": f"{h['commit']}, batch 16",
                             "now": "today's, its defaults", "now_demo": "today's, as make demo runs it"},
                            lambda s: [str(s["batch_size"]), s["policy"], str(s.get("eos_penalty", 0.0)),
                                       s.get("dtype", "auto"), f"{s['examples_per_second']:.2f}", f"{s['f1']:.3f}"])
        lines += ["", f"- test.py now / then, both with their defaults: **{h['speedup']:.2f}**; as make demo "
                      f"runs it / then: **{h['demo_speedup']:.2f}**", ""]
    return lines


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    cfg.steps = 40 if cfg.quick else cfg.train_steps
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = cfg.model_dir
    if not model_dir:
        model_dir = str(work / "random-llama")
        n_params = build_random_model(cfg, model_dir)
        shape = SHAPES[cfg.shape]
        model_desc = (f"random LLaMA ({cfg.shape} shape: hidden {shape['hidden_size']}, "
                      f"{shape['num_hidden_layers']} layers, {n_params / 1e6:.1f}M parameters), dtype {cfg.dtype}")
    else:
        model_desc = f"{model_dir} ({cfg.dtype})"

    train = {}
    # Ours runs first, so any one-time start-up cost counts against it, not against the original recipe.
    ours_cfg = train_config(cfg, model_dir, str(work / "ours"), True, 256)
    train["ours"], counting = run_trainer(ours_cfg)
    seed_cfg = train_config(cfg, model_dir, str(work / "seed"), False, cfg.seed_max_length, share_prefix=False)
    train["seed"], seed_counting = run_trainer(seed_cfg, pad_to=cfg.seed_max_length)
    plain_cfg = train_config(cfg, model_dir, str(work / "plain"), True, 256, share_prefix=False)
    train["no_prefix"], plain_counting = run_trainer(plain_cfg)
    train["bare"] = run_bare(ours_cfg, counting.batches[:cfg.steps])

    peak, peak_source = peak_flops(cfg.dtype)
    shape = model_shape(model_dir)
    # Model FLOPs of the tokens each variant must run: every real token, except that a shared
    # prompt prefix counts once per batch where the variant computes it once (that saving is
    # the algorithm's, not extra utilisation).
    batches = {"ours": (counting.batches, True), "bare": (counting.batches, True),
               "seed": (seed_counting.batches, False), "no_prefix": (plain_counting.batches, False)}
    for name, stats in train.items():
        timed, shared = batches[name][0][WARMUP_STEPS:cfg.steps], batches[name][1]
        tokens = sum(run_tokens(b, shared) for b in timed)
        context = sum(int(b["attention_mask"].sum()) for b in timed) / sum(len(b["input_ids"]) for b in timed)
        stats["mfu"] = tokens * flops_per_token(shape, context, training=True) / stats["seconds"] / peak

    records = load_data(cfg.test_path)[:cfg.eval_examples]
    if cfg.skip_eval:
        evals, identical = {k: {"examples_per_second": float("nan")}
                            for k in ("single", "batched", "prefix_cache", "grounded", "unpacked")}, None
    else:
        evals, identical = run_eval(model_dir, records, cfg)
        for stats in evals.values():
            stats["mfu"] = stats["model_flops_per_second"] / peak

    real = run_real_model(cfg, peak)
    results = {
        "real_model": real,
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": model_desc,
        "train_steps": cfg.steps, "train_batch_size": cfg.train_batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing, "quantization": cfg.quantization,
        "eval_examples": len(records), "max_new_tokens": cfg.max_new_tokens, "quick": cfg.quick,
        "train": train, "eval": evals,
        "train_speedup_vs_seed": train["ours"]["examples_per_second"] / train["seed"]["examples_per_second"],
        "train_efficiency_vs_bare": train["ours"]["examples_per_second"] / train["bare"]["examples_per_second"],
        "train_speedup_prefix": train["ours"]["examples_per_second"] / train["no_prefix"]["examples_per_second"],
        "eval_speedup_vs_single": evals["batched"]["examples_per_second"] / evals["single"]["examples_per_second"],
        "eval_speedup_prefix_cache": evals["prefix_cache"]["examples_per_second"] / evals["batched"]["examples_per_second"],
        # The same two variants' time in the prompts' pass alone (the part the prefix cache shortens;
        # decoding costs both the same).
        "eval_prompt_speedup_prefix_cache": evals["batched"].get("prompt_seconds", float("nan"))
        / evals["prefix_cache"].get("prompt_seconds", float("nan")),
        "eval_speedup_packed": evals["prefix_cache"]["examples_per_second"] / evals["unpacked"]["examples_per_second"],
        "eval_outputs_identical": identical,
        "eval_grounded_vs_plain": evals["grounded"]["examples_per_second"] / evals["prefix_cache"]["examples_per_second"],
        "peak_flops": peak, "peak_source": peak_source,
        "mfu": {**{f"train_{k}": v["mfu"] for k, v in train.items()},
                **{f"eval_{k}": v.get("mfu") for k, v in evals.items()}},
    }
    results = relative_paths(results)
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    given = list(sys.argv[1:] if argv is None else argv)
    command = relative_paths(" ".join(["python bench/bench.py", *given]))
    write_markdown(cfg.markdown, results, command)
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("train_s", "train_e", "eval_", "mfu", "peak"))},
                     indent=2))
    print(f"wrote {cfg.output} and {cfg.markdown}")
    return results


if __name__ == "__main__":
    run_cli(main)
