"""Shared fixtures: MSRA processed once, a tiny LLaMA built once, one memorised adapter per trainer.

Everything is built in pytest's temporary folders, so tests never touch the user's data/,
model_hub/ or checkpoint/ folders.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
# Settings under which the tiny model memorises 16 examples (LoRA plus trainable embeddings
# and head, since a random tiny model has no useful ones).
MEMORISE = {
    "lora_modules_to_save": "embed_tokens,lm_head", "lora_dropout": 0.0, "learning_rate": 5e-3,
    "train_batch_size": 4, "max_steps": 150, "warmup_ratio": 0.0, "log_steps": 10, "eval_steps": 50,
    "save_steps": 50,
}


def load_script(name):
    """Import a top-level script as a module (test.py would otherwise clash with the stdlib `test`)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_argv(options):
    return [f"--{k}={v}" for k, v in options.items()]


def free_port():
    """A TCP port nobody listens on now (the OS picks it), for a launcher's --master_port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(args, timeout=900, check=True, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def msra_dir(tmp_path_factory):
    """process.py's full MSRA output (data_root in a temporary folder)."""
    process = load_script("process")
    root = tmp_path_factory.mktemp("data")
    summary = process.main([f"--data_root={root}"])
    return {"dir": root / "msra", "summary": summary}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, msra_dir):
    """A tiny LLaMA whose tokenizer was trained on 3,000 MSRA training sentences."""
    sys.path.insert(0, str(ROOT / "model_hub"))
    import build_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    with open(msra_dir["dir"] / "ori_data" / "train.txt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(3000), f)]
    build_tiny_llama.build(texts, out, vocab_size=4000)
    return out


@pytest.fixture(scope="session")
def train16(tmp_path_factory, msra_dir):
    """16 MSRA training examples, 12 with entities and 4 without, as instruct JSONL."""
    recs = [json.loads(line) for line in open(msra_dir["dir"] / "instruct_data" / "train.txt", encoding="utf-8")]
    chosen = [r for r in recs if r["answer"] != "没有"][:12] + [r for r in recs if r["answer"] == "没有"][:4]
    path = tmp_path_factory.mktemp("train16") / "train16.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def memorised_trainer(tmp_path_factory, tiny_model, train16):
    """train_trainer.py run in-process until the tiny model memorises train16; returns the save_dir."""
    save_dir = tmp_path_factory.mktemp("trainer-run")
    options = {**MEMORISE, "model_dir": tiny_model, "train_path": train16, "dev_path": train16,
               "save_dir": save_dir, "overwrite": True}
    load_script("train_trainer").main(as_argv(options))
    return save_dir


def score_adapter(adapter, records, batch_size=8):
    """Greedy answers from a saved adapter folder -> entity metrics against the records' answers."""
    from metrics import parse_answer, score
    from model_utils import load_for_inference, ner_generate

    model, tokenizer, train_args = load_for_inference(str(adapter), device="cpu")
    outputs, _ = ner_generate(model, tokenizer, train_args, records, batch_size=batch_size, max_new_tokens=48)
    examples = [{"text": r["query"], "gold": parse_answer(r["answer"]).entities,
                 "pred": parse_answer(o).entities} for r, o in zip(records, outputs)]
    return score(examples), outputs
