"""Shared fixtures: MSRA processed once, a tiny LLaMA built once, one memorised adapter per session.

This file also puts the project root on sys.path (the only place that does) and defines the
`slow` and `distributed` markers: `make test-fast` runs everything else in about a minute.

Everything is built in pytest's temporary folders, so tests never touch the user's data/,
model_hub/ or checkpoint/ folders.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
# A test that needs a trained adapter or model (a 150-step training in a fixture) is slow.
SLOW_FIXTURES = {"memorised_trainer", "memorised_qlora", "full_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model or needs the trained adapter (make test-fast leaves it out)")
    config.addinivalue_line("markers", "distributed: starts several training processes (deepspeed, mpirun)")


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
    """A TCP port free right now, for a launcher's --master_port: two test runs on one machine
    must not both take DeepSpeed's default 29500."""
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
    return build_test_model(tmp_path_factory, msra_dir, "tiny-llama", vocab_size=4000)[0]


def build_test_model(tmp_path_factory, msra_dir, name, **options):
    """build_tiny_llama on the first 3,000 MSRA training sentences -> (folder, those sentences)."""
    from model_hub import build_tiny_llama

    out = tmp_path_factory.mktemp(name)
    with open(msra_dir["dir"] / "ori_data" / "train.txt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(3000), f)]
    build_tiny_llama.build(texts, out, **options)
    return out, texts


@pytest.fixture(scope="session")
def train16(tmp_path_factory, msra_dir):
    """16 MSRA training examples, 12 with entities and 4 without, as instruct JSONL."""
    recs = [json.loads(line) for line in open(msra_dir["dir"] / "instruct_data" / "train.txt", encoding="utf-8")]
    chosen = [r for r in recs if r["answer"] != "没有"][:12] + [r for r in recs if r["answer"] == "没有"][:4]
    path = tmp_path_factory.mktemp("train16") / "train16.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen), encoding="utf-8")
    return path


def memorise(tmp_path_factory, tiny_model, train16, name, **extra):
    """train_trainer.py run in-process until the tiny model memorises train16; returns the save_dir."""
    save_dir = tmp_path_factory.mktemp(name)
    options = {**MEMORISE, "model_dir": tiny_model, "train_path": train16, "dev_path": train16,
               "save_dir": save_dir, "overwrite": True, **extra}
    load_script("train_trainer").main(as_argv(options))
    return save_dir


@pytest.fixture(scope="session")
def memorised_trainer(tmp_path_factory, tiny_model, train16):
    return memorise(tmp_path_factory, tiny_model, train16, "trainer-run")


@pytest.fixture(scope="session")
def memorised_qlora(tmp_path_factory, tiny_model, train16):
    """The same run on a 4-bit (NF4) base: QLoRA."""
    return memorise(tmp_path_factory, tiny_model, train16, "qlora-run", quantization="4bit")


def score_adapter(adapter, test_path, batch_size=8):
    """test.py on a saved adapter folder: (its metrics, the generated answers in file order)."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="score-"))
    metrics = load_script("test").main([f"--lora_model={adapter}", f"--test_path={test_path}",
                                        f"--batch_size={batch_size}", "--max_new_tokens=48", f"--output_dir={out}"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return metrics, [row["output"] for row in rows]


@pytest.fixture(scope="session")
def untrained_adapter(tmp_path_factory, tiny_model, train16):
    """A LoRA adapter on the tiny model, exported as training exports one but without a step of
    training (seconds, not a 150-step run): for what the scripts do around an adapter."""
    from build import build_model, load_training_tokenizer
    from config_utils import parse_config
    from train_core import TRAIN_DEFAULTS, export_trained

    save_dir = tmp_path_factory.mktemp("untrained-run")
    cfg = parse_config(TRAIN_DEFAULTS, {"model_dir": str(tiny_model), "train_path": str(train16), "dev_path": "",
                                        "save_dir": str(save_dir)})
    model, tokenizer = build_model(cfg, load_training_tokenizer(cfg))
    return export_trained(model, tokenizer, cfg)
