"""Training and evaluation throughput, measured side by side in one run.

    make bench            # python bench/bench.py
    make bench QUICK=1    # fewer steps, under 5 minutes on 2 CPU cores
    python bench/bench.py --model_dir=model_hub/chinese-alpaca-7b --dtype=bf16   # on a GPU

Training, same model, same examples, same number of optimizer steps:
  (a) the seed's recipe: every example padded to 192 tokens, random batches (HF Trainer);
  (b) our default train_trainer.py path: length-grouped batches, dynamic padding;
  (c) a bare PyTorch loop over the same batches as (b): the practical limit.
Evaluation on the same test sentences:
  (a) one example at a time; (b) our batched generation; (c) (b) plus the shared-prefix KV cache.
Results go to bench/results.json and BENCHMARKS.md. By default the model is a randomly
initialised LLaMA (hidden 512, 4 layers, ~14M parameters with the tiny tokenizer's 8,000
pieces) so that model compute, not Python overhead, dominates a step; random weights cost the
same compute as trained ones.
"""
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config_utils import parse_config, run_cli  # noqa: E402
from dataset import load_data  # noqa: E402

DEFAULTS = {
    "model_dir": "",  # "" = a random LLaMA of the size below, built with tokenizer_dir's tokenizer
    "tokenizer_dir": str(ROOT / "model_hub" / "tiny-llama"),
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "train_path": str(ROOT / "data" / "msra" / "instruct_data" / "train.txt"),
    "test_path": str(ROOT / "data" / "msra" / "instruct_data" / "test.txt"),
    "train_examples": 2000,  # training examples the samplers draw from
    "train_steps": 40,  # optimizer steps per training variant
    "train_batch_size": 12,  # the seed's batch size
    "seed_max_length": 192,  # the seed's fixed padding length
    "eval_examples": 200,
    "eval_batch_size": 32,  # test.py's default batch_size
    "max_new_tokens": 16,  # a random model never stops early: every example generates this many
    "dtype": "auto",
    "quick": False,  # fewer training steps (README: make bench QUICK=1)
    "output": str(ROOT / "bench" / "results.json"),
    "markdown": str(ROOT / "BENCHMARKS.md"),
    "work_dir": str(ROOT / "bench" / "out"),
    "seed": 0,
}


def build_random_model(cfg, out_dir):
    """A random LLaMA of the configured size with the tiny tokenizer, saved like any model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_utils import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


class CountingCollate:
    """Wraps a collator: records real vs padded tokens; `pad_to` fixes the length (the seed's recipe)."""

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


def train_config(cfg, model_dir, save_dir, group_by_length, max_seq_length):
    from train_trainer import DEFAULTS as TRAINER_DEFAULTS

    return parse_config(TRAINER_DEFAULTS, {
        "model_dir": model_dir, "train_path": cfg.train_path, "dev_path": "", "save_dir": save_dir,
        "train_limit": cfg.train_examples, "max_steps": cfg.steps, "train_batch_size": cfg.train_batch_size,
        "group_by_length": group_by_length, "max_seq_length": max_seq_length, "lora_dropout": 0.0,
        "log_steps": max(cfg.steps // 4, 1), "eval_steps": 0, "save_steps": 10 ** 6, "overwrite": True,
        "dtype": cfg.dtype, "seed": cfg.seed,
    })


WARMUP_STEPS = 2  # steps excluded from every timing (first-step allocation and thread start-up)


def _rate(tcfg, elapsed):
    return (tcfg.max_steps - WARMUP_STEPS) * tcfg.train_batch_size / elapsed


def run_trainer(tcfg, pad_to=None):
    """One Trainer run through the project's own builders; returns (stats, counting collator)."""
    from transformers import Trainer, TrainerCallback

    class StepClock(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    from train_core import build_datasets, build_model, load_datasets_checked
    from train_trainer import training_arguments

    train_records, _ = load_datasets_checked(tcfg)
    model, tokenizer = build_model(tcfg)
    train_set, _, collate = build_datasets(tcfg, tokenizer, train_records, [])
    counting = CountingCollate(collate, pad_to)
    args = training_arguments(tcfg)
    args.save_strategy = "no"
    args.report_to = []
    args.disable_tqdm = True
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=counting, callbacks=[clock])
    trainer.train()
    elapsed = clock.end - clock.start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"seconds": elapsed, "examples_per_second": _rate(tcfg, elapsed),
            "non_padding_fraction": counting.real / counting.total, "final_loss": losses[-1]}, counting


def run_bare(tcfg, batches):
    """The same optimizer steps over the same batches with no Trainer: forward, backward, clip, step."""
    from train_core import build_model, lr_lambda_schedule

    model, _ = build_model(tcfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  eps=tcfg.adam_epsilon, weight_decay=tcfg.weight_decay)
    scheduler = lr_lambda_schedule(tcfg, len(batches))[0](optimizer)
    _, mixed = __import__("train_core").training_dtype(tcfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed == "bf16")
    losses = []
    for step, batch in enumerate(batches, 1):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == WARMUP_STEPS:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    window = losses[-max(len(losses) // 4, 1):]
    return {"seconds": elapsed, "examples_per_second": _rate(tcfg, elapsed),
            "non_padding_fraction": real / total, "final_loss": sum(window) / len(window)}


def run_eval(model_dir, records, cfg):
    from model_utils import load_model_and_tokenizer, ner_generate

    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.dtype)
    args = {"max_seq_length": 512}
    variants = {"single": dict(batch_size=1, prefix_cache=False),
                "batched": dict(batch_size=cfg.eval_batch_size, prefix_cache=False),
                "prefix_cache": dict(batch_size=cfg.eval_batch_size, prefix_cache=True)}
    ner_generate(model, tokenizer, args, records[:4], max_new_tokens=2)  # warm-up
    results, outputs = {}, {}
    for name, options in variants.items():
        start = time.perf_counter()
        outputs[name], _ = ner_generate(model, tokenizer, args, records, max_new_tokens=cfg.max_new_tokens, **options)
        elapsed = time.perf_counter() - start
        results[name] = {"seconds": elapsed, "examples_per_second": len(records) / elapsed}
    identical = outputs["single"] == outputs["batched"] == outputs["prefix_cache"]
    return results, identical


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


def write_markdown(path, results, command):
    t, e = results["train"], results["eval"]
    lines = [
        "# Benchmarks", "",
        f"Produced by `{command}` on {results['machine']}, {results['date']}.",
        f"Model: {results['model']}. Ratios come from one run, variants side by side.", "",
        "## Training", "",
        f"{results['train_steps']} optimizer steps of {results['train_batch_size']} MSRA examples each; "
        f"the first {WARMUP_STEPS} are not timed.", "",
        "| variant | examples/s | non-padding tokens | final loss |", "|---|---|---|---|",
    ]
    names = {"seed": "(a) seed recipe: pad to 192, random batches", "ours": "(b) train_trainer.py default",
             "bare": "(c) bare PyTorch loop, batches of (b)"}
    for key, label in names.items():
        r = t[key]
        lines.append(f"| {label} | {r['examples_per_second']:.2f} | {r['non_padding_fraction']:.1%} | {r['final_loss']:.3f} |")
    lines += ["", f"- train_speedup_vs_seed (b/a): **{results['train_speedup_vs_seed']:.2f}**",
              f"- train_efficiency_vs_bare (b/c): **{results['train_efficiency_vs_bare']:.2f}**", "",
              "## Evaluation", "",
              f"{results['eval_examples']} MSRA test sentences, {results['max_new_tokens']} new tokens each (greedy).", "",
              "| variant | examples/s |", "|---|---|"]
    enames = {"single": "(a) one example at a time", "batched": "(b) batched generation",
              "prefix_cache": "(c) batched + shared-prefix KV cache"}
    for key, label in enames.items():
        lines.append(f"| {label} | {e[key]['examples_per_second']:.2f} |")
    lines += ["", f"- eval_speedup_vs_single (b/a): **{results['eval_speedup_vs_single']:.2f}**",
              f"- eval_speedup_prefix_cache (c/b): **{results['eval_speedup_prefix_cache']:.2f}**",
              f"- outputs identical across the three: **{results['eval_outputs_identical']}**", ""]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    cfg.steps = 24 if cfg.quick else cfg.train_steps
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = cfg.model_dir
    if not model_dir:
        model_dir = str(work / "random-llama")
        n_params = build_random_model(cfg, model_dir)
        model_desc = (f"random LLaMA, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                      f"{n_params / 1e6:.1f}M parameters, fp32")
    else:
        model_desc = f"{model_dir} ({cfg.dtype})"

    train = {}
    # Ours runs first, so any one-time start-up cost counts against it, not against the seed.
    ours_cfg = train_config(cfg, model_dir, str(work / "ours"), True, 256)
    train["ours"], counting = run_trainer(ours_cfg)
    seed_cfg = train_config(cfg, model_dir, str(work / "seed"), False, cfg.seed_max_length)
    train["seed"], _ = run_trainer(seed_cfg, pad_to=cfg.seed_max_length)
    train["bare"] = run_bare(ours_cfg, counting.batches[:cfg.steps])

    records = load_data(cfg.test_path)[:cfg.eval_examples]
    evals, identical = run_eval(model_dir, records, cfg)

    results = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": model_desc,
        "train_steps": cfg.steps, "train_batch_size": cfg.train_batch_size,
        "eval_examples": len(records), "max_new_tokens": cfg.max_new_tokens, "quick": cfg.quick,
        "train": train, "eval": evals,
        "train_speedup_vs_seed": train["ours"]["examples_per_second"] / train["seed"]["examples_per_second"],
        "train_efficiency_vs_bare": train["ours"]["examples_per_second"] / train["bare"]["examples_per_second"],
        "eval_speedup_vs_single": evals["batched"]["examples_per_second"] / evals["single"]["examples_per_second"],
        "eval_speedup_prefix_cache": evals["prefix_cache"]["examples_per_second"] / evals["batched"]["examples_per_second"],
        "eval_outputs_identical": identical,
    }
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    command = "make bench QUICK=1" if cfg.quick else "make bench"
    write_markdown(cfg.markdown, results, command)
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("train_s", "train_e", "eval_"))}, indent=2))
    print(f"wrote {cfg.output} and {cfg.markdown}")
    return results


if __name__ == "__main__":
    run_cli(main)
