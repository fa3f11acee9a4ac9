"""What a newcomer meets first: the scripts print no warnings nobody can act on, and a second
`make demo` redoes only the stages whose inputs or settings changed, and says so.
"""
import os
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, as_argv, run_cmd

NOISE = ("Setting accelerator to CPU", "is_gradient_checkpointing")


def test_training_and_scoring_print_no_noise(untrained_adapter, tiny_model, train16, tmp_path):
    trained = run_cmd([PYTHON, "train_trainer.py", *as_argv({
        "model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": tmp_path / "run", "max_steps": 1,
        "train_batch_size": 2, "save_steps": 1, "eval_steps": 0, "log_steps": 1})], timeout=600)
    scored = run_cmd([PYTHON, "test.py", f"--lora_model={untrained_adapter}", f"--test_path={train16}", "--limit=1",
                      "--max_new_tokens=2", f"--output_dir={tmp_path / 'eval'}"], timeout=600)
    for proc in (trained, scored):
        for noise in NOISE:
            assert noise not in proc.stdout + proc.stderr


# ------------------------------------------------------------------- a second make demo

def make(*args, **variables):
    """`make -n` (print, run nothing) with the demo's folders in a test folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "--no-print-directory", "-n", *args, *(f"{k}={v}" for k, v in variables.items())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def finished_demo(tmp_path):
    """The folders a finished `make demo` leaves, in a test folder: what each stage writes last
    (README, "The demo"), newer than what came before it, and the requirements installed."""
    paths = {"DEMO_DATA_ROOT": tmp_path / "data", "GEMMA_DIR": tmp_path / "gemma", "GEMMA_RUN": tmp_path / "run",
             "STAMP": tmp_path / "venv.stamp", "GEMMA_STAMP": tmp_path / "gemma.stamp", "GEMMA_EVAL_DTYPE": "auto"}
    installed = max((ROOT / name).stat().st_mtime for name in ("requirements.txt", "requirements-gemma.txt")) + 1
    for stamp in (paths["STAMP"], paths["GEMMA_STAMP"]):
        stamp.write_text("")
        os.utime(stamp, (installed, installed))
    first = make("demo", **paths)  # a first demo: every stage to do, its settings recorded
    assert first.returncode == 0 and "train_trainer.py" in first.stdout, first.stderr
    for recorded in paths["GEMMA_RUN"].iterdir():  # recorded before the stages ran
        os.utime(recorded, (installed, installed))
    stages = [paths["DEMO_DATA_ROOT"] / "msra_inline" / "instruct_data" / "data_info.json", paths["GEMMA_DIR"] / "config.json",
              paths["GEMMA_RUN"] / "adapter_model" / "adapter_config.json",
              paths["GEMMA_RUN"] / "eval_sample" / "metrics.json", paths["GEMMA_RUN"] / "predict.jsonl"]
    now = time.time()
    for i, path in enumerate(stages):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        os.utime(path, (now - len(stages) + i, now - len(stages) + i))  # in stage order, as they were written
    return paths


def test_second_demo_reuses_what_has_not_changed(finished_demo):
    again = make("demo", **finished_demo)
    assert again.returncode == 0, again.stderr
    for stage in ("process MSRA", "prepare Gemma", "LoRA-tune", "score", "predict"):
        assert any(f"[demo] {stage}" in line and "up to date" in line for line in again.stdout.splitlines()), (
            stage, again.stdout)
    for script in ("process.py", "convert_gguf_to_hf.py", "train_trainer.py", "test.py", "predict.py"):
        assert f"{script} " not in again.stdout, again.stdout


def test_a_changed_training_setting_redoes_training_and_what_reads_the_adapter(finished_demo):
    again = make("demo", **{**finished_demo, "GEMMA_STEPS": 7})
    assert again.returncode == 0, again.stderr
    assert "process.py" not in again.stdout and "--max_steps=7" in again.stdout
    assert "test.py " in again.stdout and "predict.py " in again.stdout  # they read the new adapter


def test_a_changed_scoring_setting_redoes_the_scoring_alone(finished_demo):
    again = make("demo", **{**finished_demo, "GEMMA_SAMPLE": 50})
    assert again.returncode == 0, again.stderr
    assert "train_trainer.py" not in again.stdout and "--sample=50" in again.stdout
    assert "predict.py " not in again.stdout
