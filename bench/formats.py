"""Answer formats side by side on a real model (docs/demo.md, "Answer formats side by side").

    python bench/formats.py                                  # seed, typed, inline on Gemma 3 270M
    python bench/formats.py --formats=typed --steps=200      # one format, another budget

Each format is processed (process.py --answer_format), LoRA-tuned with one recipe (the same
sentences, steps, batch, learning rate and seed for every format) and scored by test.py: on
the dev split under every decoding setting asked for (`dev_policies` x `dev_eos_penalties`),
then, with the setting that scored best on dev, on a seeded sample of the test set (with its
bootstrap interval) and on the whole test set. Recipe choices are made on dev sentences only;
the test set only reports. Every stage is the scripts' own command line (printed as it runs);
a stage whose output exists is kept, so an interrupted run continues where it stopped (delete
<run_dir>/<format> to redo one). Results: bench/formats_results.json (a run over some formats
replaces their rows) and a markdown table on stdout.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config_utils import ConfigError, parse_config, run_cli  # noqa: E402
from answer_format import ANSWER_FORMATS  # noqa: E402

DEFAULTS = {
    "model_dir": "model_hub/gemma-3-270m",  # make gemma
    "formats": ["seed", "typed", "inline"],
    "run_dir": "checkpoint/fmt",  # <run_dir>/<format>/adapter_model, its scores beside it
    "steps": 100,  # the demo's recipe: 100 optimizer steps of 16, lr 1e-3, cosine
    "batch": 16,
    "lr": 1e-3,
    "no_entity_fraction": 0.5,
    "seed": 42,
    "extra_train_args": [],  # more train_trainer.py flags, the same for every format (key=value)
    "dev_policies": ["best_allowed"],  # grounding policies tried on dev
    "dev_eos_penalties": [0.0],  # eos_penalty values tried on dev
    "eval_batch": 64,
    "dtype": "auto",  # of test.py (bfloat16 where the CPU multiplies it natively)
    "test_sample": 1000,  # seeded test sentences scored with the dev-chosen setting (0: none)
    "full_test": True,  # also all test sentences
    "output": "bench/formats_results.json",  # the results (committed: docs/demo.md's "Answer formats side by side" table)
}


# An inline answer copies its sentence, so a query cut to fit max_seq_length would leave the answer
# copying text the prompt no longer holds (training leaves such examples out): 512 tokens hold
# every MSRA training example in Gemma 3's tokens (the longest is 408; 0.9% pass 256).
INLINE_LENGTH = ["--max_seq_length=512"]


def data_name(fmt):
    return "msra" if fmt == "seed" else f"msra_{fmt}"


def run(cmd, log):
    """One stage: the command line printed, its output kept in `log`."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise ConfigError(f"{cmd[1]} exited {proc.returncode}; its output: {log}")
    return time.perf_counter() - start


def score(cfg, fmt, split, name, extra):
    """test.py on a split of the format's data -> its metrics.json (kept when it exists)."""
    out = ROOT / cfg.run_dir / fmt / name
    if not (out / "metrics.json").is_file():
        run([sys.executable, "test.py", f"--lora_model={cfg.run_dir}/{fmt}/adapter_model",
             f"--test_path=data/{data_name(fmt)}/instruct_data/{split}.txt", f"--batch_size={cfg.eval_batch}",
             f"--dtype={cfg.dtype}", f"--output_dir={out}", *extra], ROOT / cfg.run_dir / fmt / f"{name}.log")
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def one_format(cfg, fmt):
    folder = ROOT / cfg.run_dir / fmt
    folder.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "data" / data_name(fmt) / "instruct_data" / "data_info.json").is_file():
        run([sys.executable, "process.py", f"--answer_format={fmt}", f"--data_name={data_name(fmt)}"],
            folder / "process.log")
    adapter = folder / "adapter_model"
    if not (adapter / "adapter_model.safetensors").is_file():
        run([sys.executable, "train_trainer.py", f"--model_dir={cfg.model_dir}", f"--save_dir={cfg.run_dir}/{fmt}",
             "--overwrite=True", f"--train_path=data/{data_name(fmt)}/instruct_data/train.txt",
             f"--dev_path=data/{data_name(fmt)}/instruct_data/dev.txt", f"--seed={cfg.seed}",
             f"--max_steps={cfg.steps}", f"--train_batch_size={cfg.batch}", f"--learning_rate={cfg.lr}",
             "--lora_dropout=0.0", "--warmup_ratio=0.03", "--lr_scheduler_type=cosine",
             f"--no_entity_fraction={cfg.no_entity_fraction}", "--eval_steps=0", "--save_steps=1000",
             "--log_steps=10", *INLINE_LENGTH * (fmt == "inline"), *[f"--{a}" for a in cfg.extra_train_args]],
            folder / "train.log")
    history = json.loads((adapter / "log_history.json").read_text(encoding="utf-8"))
    result = {"format": fmt, "train_examples_per_second": history[-1].get("train_samples_per_second"),
              "train_seconds": history[-1].get("train_runtime"), "dev": {}}
    best = None
    for policy in cfg.dev_policies:
        for eos in cfg.dev_eos_penalties:
            setting = [f"--grounding_policy={policy}", f"--eos_penalty={eos:g}"]
            m = score(cfg, fmt, "dev", f"dev_{policy}_eos{eos:g}", setting)
            result["dev"][f"{policy} eos_penalty={eos:g}"] = {k: m[k] for k in ("f1", "precision", "recall")}
            if best is None or m["f1"] > best[0]:
                best = (m["f1"], policy, eos, setting)
    result["chosen"] = {"grounding_policy": best[1], "eos_penalty": best[2], "dev_f1": best[0]}
    name = f"{best[1]}_eos{best[2]:g}"
    if cfg.test_sample:
        m = score(cfg, fmt, "test", f"test{cfg.test_sample}_{name}", [*best[3], f"--sample={cfg.test_sample}", "--seed=0"])
        result["test_sample"] = summary(m)
    if cfg.full_test:
        result["test_full"] = summary(score(cfg, fmt, "test", f"test_{name}", best[3]))
    return result


def summary(m):
    return {"f1": m["f1"], "f1_ci95": m.get("f1_ci95"), "precision": m["precision"], "recall": m["recall"],
            "mention_f1": m["mention"]["f1"], "mention_precision": m["mention"]["precision"],
            "mention_recall": m["mention"]["recall"], "examples_per_second": m["examples_per_second"],
            "num_examples": m["num_examples"], "unparseable_lines": m["unparseable_lines"],
            "pred_not_in_text": m["pred_not_in_text"]}


def markdown(results):
    rows = ["| format | dev F1 (setting) | test F1, seeded 1,000 (95% interval) | all test: set P / R / F1 | "
            "all test: mention F1 | training examples/s | generation sentences/s |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        s, f = r.get("test_sample"), r.get("test_full")
        rows.append(" | ".join([
            f"| {r['format']}", f"{r['chosen']['dev_f1']:.3f} ({r['chosen']['grounding_policy']}, "
                                f"eos_penalty {r['chosen']['eos_penalty']:g})",
            f"{s['f1']:.3f} ({s['f1_ci95'][0]:.3f}-{s['f1_ci95'][1]:.3f})" if s else "-",
            f"{f['precision']:.3f} / {f['recall']:.3f} / **{f['f1']:.3f}**" if f else "-",
            f"{f['mention_f1']:.3f}" if f else "-",
            f"{r['train_examples_per_second']:.2f}" if r.get("train_examples_per_second") else "-",
            f"{(f or s)['examples_per_second']:.1f} |" if (f or s) else "- |"]))
    return "\n".join(rows)


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    for fmt in cfg.formats:
        if fmt not in ANSWER_FORMATS:
            raise ConfigError(f"config key 'formats': {fmt!r} is not one of {', '.join(ANSWER_FORMATS)}")
    out = ROOT / cfg.output
    # A run over some formats (or with other dev settings) replaces their rows and keeps the rest.
    earlier = json.loads(out.read_text(encoding="utf-8"))["results"] if out.is_file() else []
    results = [one_format(cfg, fmt) for fmt in cfg.formats]
    for r in results:
        r["config"] = cfg.to_dict()
    results += [r for r in earlier if r["format"] not in cfg.formats]
    results.sort(key=lambda r: list(ANSWER_FORMATS).index(r["format"]))
    out.write_text(json.dumps({"results": results}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(markdown(results))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    run_cli(main)
