"""How today's test.py compares with an earlier commit's: both run as their own processes on one
seeded sample with the same adapter, speed and F1 side by side."""
import json
import sys
from pathlib import Path

from common import ROOT


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
