"""What test.py leaves behind: its three outputs are one run's or the previous run's, they live
where a later training does not replace them, and metrics.json says what was scored and how.

Everything runs on the tiny model (or an adapter exported without training): seconds each.
"""
import json
import os
import shutil
import signal

import pytest

from config_utils import parse_config, run_cli
from conftest import load_script
from test_reliability import no_model_load  # noqa: F401 (a fixture)

OUTPUT_NAMES = ("predictions.jsonl", "metrics.json", "report.html")


def outputs_of(folder):
    return {name: (folder / name).read_bytes() if (folder / name).exists() else None for name in OUTPUT_NAMES}


def base_model_run(tiny_model, train16, out, *extra):
    return ["--no_adapter=True", f"--model_dir={tiny_model}", f"--test_path={train16}", "--max_new_tokens=4",
            f"--output_dir={out}", *extra]


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal (a suite started in the
    background ignores it); returns a function that presses Ctrl-C now."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda: os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------- 1. one run's outputs, never a mix

def test_ctrl_c_after_generation_leaves_the_earlier_run_whole(tiny_model, train16, tmp_path, monkeypatch, capsys,
                                                              ctrl_c):
    test = load_script("test")
    out = tmp_path / "eval"
    test.main(base_model_run(tiny_model, train16, out, "--limit=2"))
    earlier = outputs_of(out)
    assert all(earlier.values())
    capsys.readouterr()

    scored = test.score_mentions

    def interrupted(*args, **kwargs):  # Ctrl-C once the answers exist, while they are scored
        ctrl_c()
        return scored(*args, **kwargs)

    monkeypatch.setattr(test, "score_mentions", interrupted)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: test.main(base_model_run(tiny_model, train16, out, "--limit=5")))
    assert stop.value.code == 130
    assert outputs_of(out) == earlier
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == "interrupted: no output of this run was written (files from before are as they were)"


def test_ctrl_c_while_the_outputs_are_renamed_waits_for_all_three(tiny_model, train16, tmp_path, monkeypatch,
                                                                   capsys, ctrl_c):
    test = load_script("test")
    out = tmp_path / "eval"
    test.main(base_model_run(tiny_model, train16, out, "--limit=2"))
    capsys.readouterr()
    replace = os.replace
    pressed = []

    def replace_with_ctrl_c(src, dst):
        if not pressed and os.path.dirname(dst) == str(out):
            pressed.append(dst)
            ctrl_c()  # between the files of one output
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_with_ctrl_c)
    with pytest.raises(SystemExit):
        run_cli(lambda: test.main(base_model_run(tiny_model, train16, out, "--limit=5")))
    monkeypatch.setattr(os, "replace", replace)
    assert pressed
    rows = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    report = (out / "report.html").read_text(encoding="utf-8")
    # All three are the run's that was interrupted (5 sentences), and the message says so.
    assert len(rows) == metrics["num_examples"] == 5 and "<p>5 sentences from" in report
    err = capsys.readouterr().err
    assert "interrupted: this run had written" in err and "metrics.json" in err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staged file left behind


# ------------------------------------------------------------- 2. evaluations outlive the next export

def _export_again(adapter):
    """What the end of a resumed (or repeated) training does: a new export replaces adapter_model/."""
    from build import build_model, load_training_tokenizer
    from train_core import TRAIN_DEFAULTS, export_trained

    recorded = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    cfg = parse_config(TRAIN_DEFAULTS, {k: recorded[k] for k in ("model_dir", "train_path", "dev_path", "save_dir")})
    model, tokenizer = build_model(cfg, load_training_tokenizer(cfg))
    return export_trained(model, tokenizer, cfg)


def test_default_output_dir_is_beside_the_adapter_not_in_it(untrained_adapter, train16, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(untrained_adapter.parent, run)
    adapter = run / "adapter_model"
    recorded = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    (adapter / "train_args.json").write_text(json.dumps({**recorded, "save_dir": str(run)}), encoding="utf-8")
    load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", "--limit=2", "--max_new_tokens=4"])
    found = [p.parent for p in run.rglob("metrics.json")]
    assert len(found) == 1 and found[0].parent == run and found[0] != adapter  # <save_dir>/<evaluation>/
    written = outputs_of(found[0])
    assert _export_again(adapter) == adapter
    assert outputs_of(found[0]) == written  # the new adapter replaced adapter_model/, the evaluation stayed


def test_export_moves_evaluations_out_of_the_folder_it_replaces(untrained_adapter, train16, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(untrained_adapter.parent, run)
    adapter = run / "adapter_model"
    recorded = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    (adapter / "train_args.json").write_text(json.dumps({**recorded, "save_dir": str(run)}), encoding="utf-8")
    # An evaluation written into the adapter folder itself (as test.py's earlier default did).
    load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", "--limit=2", "--max_new_tokens=4",
                              f"--output_dir={adapter}"])
    written = outputs_of(adapter)
    capsys.readouterr()
    _export_again(adapter)
    assert outputs_of(adapter) == dict.fromkeys(OUTPUT_NAMES)  # the new adapter folder holds no old evaluation
    moved = [p.parent for p in run.rglob("metrics.json")]
    assert len(moved) == 1 and outputs_of(moved[0]) == written
    assert f"moved to {moved[0]}" in capsys.readouterr().out


# ------------------------------------------------------------- 8. prompts cut to fit, said beside F1

def test_prompts_cut_to_fit_are_counted_beside_the_f1(tiny_model, train16, tmp_path, capsys):
    from dataset import PromptEncoder, load_data
    from model_utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    records = load_data(train16)[:6]
    encoder = PromptEncoder({}, tokenizer)
    lengths = [len(encoder.prompt_ids(r["instruct"], r["query"])) for r in records]
    # The tiny model with a context that holds the three shortest prompts and 24 new tokens.
    model = tmp_path / "short-context"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    context = config["max_position_embeddings"] = sorted(lengths)[2] + 24
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    cut = sum(n > context - 24 for n in lengths)
    assert 0 < cut < len(records)
    metrics = load_script("test").main(base_model_run(model, train16, tmp_path / "eval", "--limit=6",
                                                      "--max_new_tokens=24"))
    assert metrics["queries_shortened"] == cut
    printed = capsys.readouterr().out.splitlines()
    tables_end = max(i for i, line in enumerate(printed) if line.startswith(("micro", "pred not in text")))
    note = [i for i, line in enumerate(printed) if f"{cut} of 6 prompts were cut" in line]
    assert note == [tables_end + 1], printed  # right under the F1 it affects


# ------------------------------------------------------------- 9. what was scored, as applied

def test_metrics_record_the_model_as_loaded(untrained_adapter, tiny_model, train16, tmp_path):
    test = load_script("test")
    runs = {"merged": [], "apart": ["--merge_lora=False"], "4bit": ["--quantization=4bit"]}
    recorded = {}
    for name, extra in runs.items():
        out = tmp_path / name
        test.main([f"--lora_model={untrained_adapter}", f"--test_path={train16}", "--limit=2", "--max_new_tokens=4",
                   "--eos_penalty=1.5", "--grounding_policy=first_choice", f"--output_dir={out}", *extra])
        recorded[name] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for metrics in recorded.values():
        assert metrics["base_model"] == str(tiny_model) and metrics["lora_model"] == str(untrained_adapter)
        assert (metrics["grounding_policy"], metrics["eos_penalty"]) == ("first_choice", 1.5)
    assert [recorded[n]["merge_lora"] for n in runs] == [True, False, False]  # a 4-bit base keeps the adapter apart
    assert [recorded[n]["quantization"] for n in runs] == ["none", "none", "4bit"]
    assert recorded["merged"]["dtype"] == "float32"


def test_sample_is_recorded_as_applied(tiny_model, train16, tmp_path):
    test = load_script("test")
    whole = test.main(base_model_run(tiny_model, train16, tmp_path / "all", "--sample=1000000"))
    assert whole["num_examples"] == 16 and whole["sample"] is None  # more than the file holds: all of it
    part = test.main(base_model_run(tiny_model, train16, tmp_path / "part", "--sample=5"))
    assert part["num_examples"] == 5 and part["sample"] == 5 and part["sample_of"] == 16


@pytest.mark.parametrize("option", ["--sample=-5", "--limit=-1"])
def test_negative_sample_or_limit_is_refused_before_loading(tiny_model, train16, tmp_path, option, no_model_load):
    from config_utils import ConfigError

    key = option[2:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': -\d+ must be 0 \(all\) or more"):
        load_script("test").main(base_model_run(tiny_model, train16, tmp_path / "eval", option))
