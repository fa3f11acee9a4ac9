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

This script is the command line and the run's order; what each part measures lives beside it:
train_speed.py (training), eval_speed.py (generation on the random model), real_model.py and
then_and_now.py (Gemma, make demo's path, with demo.mk's settings), flops.py and peak.py (MFU),
results_md.py (BENCHMARKS.md), common.py (what the bench scripts share).
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import SHAPES, build_random_model, machine, relative_paths  # noqa: E402
from config_utils import parse_config, run_cli  # noqa: E402
from dataset import load_data  # noqa: E402
from demo_settings import read_demo_settings  # noqa: E402
from eval_speed import run_eval  # noqa: E402
from flops import flops_per_token, model_shape, run_tokens  # noqa: E402
from peak import peak_flops  # noqa: E402
from real_model import run_real_model  # noqa: E402
from results_md import write_markdown  # noqa: E402
from train_speed import WARMUP_STEPS, run_bare, run_trainer, train_config  # noqa: E402

DEMO = read_demo_settings()  # make demo's settings (demo.mk), which the real-model section times

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
    # The real-model section (skipped with one line when the folder is absent; `make gemma` makes it),
    # with make demo's settings as demo.mk holds them.
    "real_model_dir": str(ROOT / DEMO["GEMMA_DIR"]),
    "real_adapter": str(ROOT / DEMO["GEMMA_RUN"] / "adapter_model"),  # a tuned adapter (make demo); absent: an untrained LoRA
    "real_train_steps": 10,  # optimizer steps per real-model training variant (the first 2 not timed)
    "real_train_batch_size": 8,
    "real_eval_examples": 256,  # seeded sample of MSRA test sentences for the real-model generation variants
    "real_eval_batch_size": 32,  # test.py's default batch_size: variants (a) to (d)
    "real_demo_batch_size": int(DEMO["GEMMA_EVAL_BATCH"]),  # make demo's test.py batch: variant (e)
    # The seed-format demo's settings (demo.mk: eos_penalty 1.5, first_choice), kept so the committed
    # figures stay comparable; an inline adapter (today's make demo) has no early end for the penalty to weigh.
    "real_eos_penalty": float(DEMO["SEED_FORMAT_EOS_PENALTY"]),  # in every variant
    "real_demo_policy": DEMO["SEED_FORMAT_POLICY"],  # test.py then-and-now, variant (e)
    # test.py as it stood before the real-model work (transformers' generate, every logit), run from
    # this repository's history beside today's on the same sample; "" skips it.
    "real_baseline_commit": "2ed8dbe",
}


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

