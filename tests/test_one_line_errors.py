"""Faults found by probing the scripts as a new user would: each ends in one line before the
long work starts, and nothing the user had is overwritten or lost.

Rows 6-13 of the README's Troubleshooting checklist for the scripts' inputs and outputs.
"""
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess

import pytest
import torch

from config_utils import ConfigError, UserError, parse_config, run_cli
from conftest import PYTHON, ROOT, as_argv, load_script, run_cmd
from dataset import DataError, PromptEncoder
from test_process import tags_of, write_tags
from test_reliability import no_model_load, one_error_line  # noqa: F401 (a fixture)

QUICK = {"lora_dropout": 0.0, "train_batch_size": 4, "max_steps": 2, "save_steps": 2, "eval_steps": 0,
         "log_steps": 1}


@pytest.fixture(scope="module")
def adapter(memorised_trainer):
    return memorised_trainer / "adapter_model"


# ------------------------------------------------------------------- 6. predict windows

def test_predict_budget_that_leaves_no_window_is_one_line(adapter, monkeypatch):
    from model_utils import load_tokenizer

    predict = load_script("predict")
    train_args = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    encoder = PromptEncoder(train_args, load_tokenizer(adapter))
    sentence = "我们在北京大学见到了李鑫先生。"
    empty = len(encoder.prompt_ids(train_args["instruct"], "文本："))
    # Room for about 3 characters of text per window (one token each at most, counted from the
    # prompt without any text): far below a window that can hold an entity.
    budget = train_args["max_seq_length"] - empty - 3
    with pytest.raises(ConfigError, match="max_new_tokens=.* leaves fewer than 16 characters .* max_seq_length="):
        predict.main([f"--lora_model={adapter}", f"--text={sentence}", f"--max_new_tokens={budget}"])


# ------------------------------------------------------------------- 7. input format by a stated rule

def _inputs(path, **options):
    predict = load_script("predict")
    cfg = parse_config(predict.DEFAULTS, {"input_file": str(path), **options})
    return predict.read_inputs(cfg, "抽取实体")


def test_plain_text_that_starts_with_a_brace_is_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("{注意} 张三在北京。\n\n李四来了。\n", encoding="utf-8")
    assert [r["query"] for r in _inputs(path)] == ["文本：{注意} 张三在北京。", "文本：李四来了。"]
    with pytest.raises(DataError, match=rf"{path}:1: not valid JSON"):
        _inputs(path, input_format="jsonl")
    jsonl = tmp_path / "inputs.txt"
    jsonl.write_text(json.dumps({"instruct": "抽取", "query": "文本：王五"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _inputs(jsonl) == [{"instruct": "抽取", "query": "文本：王五"}]
    # --input_format=text reads every line as a text, JSON or not.
    assert [r["query"] for r in _inputs(jsonl, input_format="text")] == ["文本：" + jsonl.read_text(encoding="utf-8").strip()]
    with pytest.raises(ConfigError, match="config key 'input_format'"):
        _inputs(jsonl, input_format="csv")


# ------------------------------------------------------------------- 8. mention-level gold disagrees

def test_ori_data_line_that_disagrees_is_named(tmp_path):
    test = load_script("test")
    (tmp_path / "ori_data").mkdir()
    (tmp_path / "instruct_data").mkdir()
    ori = tmp_path / "ori_data" / "test.txt"
    rows = [{"text": "张三来了", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, "entity_type": "PER"}]},
            {"text": "李四走了", "entity_list": []}]
    ori.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    instruct = tmp_path / "instruct_data" / "test.txt"
    assert test.gold_spans(instruct, [1, 2], ["张三来了", "李四走了"]) == [[(0, 2, "PER")], []]
    with pytest.raises(DataError, match=rf"{ori}:2: its text differs from {instruct}:2"):
        test.gold_spans(instruct, [1, 2], ["张三来了", "王五走了"])
    with pytest.raises(DataError, match=rf"{ori}:3: missing"):
        test.gold_spans(instruct, [1, 2, 3], ["张三来了", "李四走了", "多一行"])


# ------------------------------------------------------------------- 9. stale data beside a new label set

def test_process_refuses_to_leave_stale_splits(tmp_path):
    process = load_script("process")
    corpus = tmp_path / "train.tags"
    write_tags(corpus, [("张三在北京", tags_of("张三在北京", {0: (2, "PER"), 3: (2, "LOC")})),
                        ("李四来了", tags_of("李四来了", {0: (2, "PER")}))] * 3)
    base = {"data_root": str(tmp_path / "data"), "data_name": "mine", "train_file": str(corpus), "dev_size": 1}
    process.main(as_argv({**base, "test_file": str(corpus)}))
    out = tmp_path / "data" / "mine"
    test_file = out / "instruct_data" / "test.txt"
    before = test_file.read_bytes()
    with pytest.raises(ConfigError, match="already holds the test split this run does not make"):
        process.main(as_argv(base))
    with pytest.raises(ConfigError, match="another label set"):
        process.main(as_argv({**base, "test_file": str(corpus), "label_names": "PER:人物,LOC:地点"}))
    assert test_file.read_bytes() == before  # refused: nothing was rewritten
    process.main(as_argv({**base, "overwrite": True}))
    assert not test_file.exists() and not (out / "ori_data" / "test.txt").exists()
    assert sorted(p.name for p in (out / "instruct_data").iterdir()) == ["data_info.json", "dev.txt", "train.txt"]


# ------------------------------------------------------------------- 10. a linked export folder

def test_linked_adapter_folder_is_refused(tiny_model, train16, tmp_path, no_model_load):
    save_dir, target = tmp_path / "run", tmp_path / "elsewhere"
    save_dir.mkdir()
    target.mkdir()
    (target / "adapter_config.json").write_text("{}", encoding="utf-8")
    (save_dir / "adapter_model").symlink_to(target)
    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": save_dir,
               "overwrite": True}
    with pytest.raises(UserError, match="adapter_model is a symbolic link"):
        load_script("train_trainer").main(as_argv(options))
    assert (save_dir / "adapter_model").is_symlink() and os.listdir(target) == ["adapter_config.json"]
    assert sorted(p.name for p in save_dir.iterdir()) == [".train.lock", "adapter_model"]  # nothing else left


# ------------------------------------------------------------------- 11. exports readable by others

def test_every_written_file_follows_the_umask(memorised_trainer, tiny_model):
    # The umask of this process (pytest's), read without changing it for long.
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    written = [*memorised_trainer.rglob("*.safetensors"), *tiny_model.rglob("*.safetensors"),
               *memorised_trainer.rglob("*.json")]
    assert any("checkpoint-" in str(p) for p in written) and any("adapter_model" in str(p) for p in written)
    modes = {str(p.relative_to(p.parents[1])): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(expected)}, modes


# ------------------------------------------------------------------- 12. a resume in another mode

def test_lora_resume_of_a_full_fine_tune_is_refused_before_anything(tiny_model, train16, tmp_path, no_model_load):
    save_dir = tmp_path / "full-run"
    (save_dir / "checkpoint-2").mkdir(parents=True)
    recorded = json.dumps({"model_dir": str(tiny_model), "finetuning": "full", "max_steps": 2})
    (save_dir / "train_args.json").write_text(recorded, encoding="utf-8")
    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": save_dir,
               "finetuning": "lora", "resume": True, "max_steps": 9}
    with pytest.raises(UserError, match="holds a finetuning=full run.*--finetuning=full"):
        load_script("train_trainer").main(as_argv(options))
    assert (save_dir / "train_args.json").read_text(encoding="utf-8") == recorded


# ------------------------------------------------------------------- 13. one line where a traceback was

@pytest.mark.parametrize("options,key", [
    ({"output_dir": "/proc/ner-out"}, "output_dir"),
    ({"batch_size": None}, "batch_size"),
    ({"output_dir": True}, "output_dir"),
    ({"lora_model": None}, "lora_model"),
    ({"device": "gpu"}, "device"),
    ({"device": "cuda"}, "device"),
])
def test_test_py_bad_values_fail_before_loading(adapter, msra_dir, options, key, no_model_load):
    if options.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device=cuda is valid here")
    argv = as_argv({"lora_model": adapter, "test_path": msra_dir["dir"] / "instruct_data" / "test.txt", **options})
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_script("test").main(argv)


def test_output_file_that_is_a_folder_fails_before_loading(adapter, tmp_path, no_model_load):
    with pytest.raises(ConfigError, match="config key 'output_file': .* is a folder"):
        load_script("predict").main([f"--lora_model={adapter}", "--text=张三来了", f"--output_file={tmp_path}"])
    chat = load_script("chat_ner")
    inputs = tmp_path / "in.txt"
    inputs.write_text("张三来了\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="config key 'predictions_file': .* is a folder"):
        chat.run(chat.parse_args([f"--lora_model={adapter}", f"--data_file={inputs}",
                                  f"--predictions_file={tmp_path}"]))


@pytest.mark.parametrize("save_dir,message", [("/proc/ner-run", "config key 'save_dir': cannot write"),
                                              ("None", "config key 'save_dir' needs a str value, not None")])
def test_unwritable_save_dir_fails_before_loading(tiny_model, train16, save_dir, message, no_model_load):
    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": ""}
    with pytest.raises(ConfigError, match=message):
        load_script("train_trainer").main(as_argv(options) + [f"--save_dir={save_dir}"])


def test_process_bad_inputs_are_one_line(tmp_path):
    process = load_script("process")
    root_file = tmp_path / "a-file"
    root_file.write_text("", encoding="utf-8")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": ["张", "三"], "entity_list": []}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{corpus}:1: 'text' must be a string"):
        process.main(as_argv({"train_file": corpus, "format": "jsonl", "data_root": tmp_path / "d"}))
    tags = tmp_path / "t.tags"
    write_tags(tags, [("张三来了", tags_of("张三来了", {0: (2, "PER")}))] * 3)
    with pytest.raises(ConfigError, match="config keys 'data_root'/'data_name': cannot create"):
        process.main(as_argv({"train_file": tags, "data_root": root_file, "dev_size": 1}))


def test_label_name_with_separator_in_data_info_fails_before_loading(adapter, msra_dir, tmp_path, no_model_load):
    data = tmp_path / "instruct_data"
    data.mkdir()
    shutil.copy(msra_dir["dir"] / "instruct_data" / "test.txt", data / "test.txt")
    (data / "data_info.json").write_text(json.dumps({"label_names": {"PER": "人_名", "LOC": "地名"}}), encoding="utf-8")
    plain = tmp_path / "plain-adapter"
    shutil.copytree(adapter, plain)
    args = json.loads((plain / "train_args.json").read_text(encoding="utf-8"))
    args.pop("label_names", None)  # so the data's label set is the one read
    (plain / "train_args.json").write_text(json.dumps(args, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"data_info.json:1: label name '人_名' \(type 'PER'\) cannot be used: .*'_'"):
        load_script("test").main([f"--lora_model={plain}", f"--test_path={data / 'test.txt'}"])


class Crafted:
    """Any object other than tensors and plain containers: what a crafted file would carry."""


def test_pickled_adapter_weights_are_refused_by_name(adapter, tmp_path):
    from model_utils import ModelLoadError, load_model_and_tokenizer

    crafted = tmp_path / "crafted-adapter"
    shutil.copytree(adapter, crafted)
    (crafted / "adapter_model.safetensors").unlink()
    with open(crafted / "adapter_model.bin", "wb") as f:
        pickle.dump({"weights": Crafted()}, f)
    base = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))["model_dir"]
    with pytest.raises(ModelLoadError, match="adapter_model.bin holds pickled objects other than tensors"):
        load_model_and_tokenizer(base, lora_model=crafted, device="cpu")


def test_crafted_rng_state_is_refused_by_name(memorised_trainer, tmp_path):
    from run_folder import TRAINER_CHECKPOINTS, check_checkpoint_files

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(sorted(memorised_trainer.glob("checkpoint-*"))[-1], ckpt)
    check_checkpoint_files(ckpt, TRAINER_CHECKPOINTS)  # the Trainer's own RNG file (numpy state) passes
    torch.save({"python": Crafted()}, ckpt / "rng_state.pth")
    with pytest.raises(UserError, match=rf"checkpoint file {ckpt / 'rng_state.pth'} holds more than training state"):
        check_checkpoint_files(ckpt, TRAINER_CHECKPOINTS)


def test_merge_of_a_truncated_adapter_is_one_line(adapter, tmp_path):
    cut = tmp_path / "cut-adapter"
    shutil.copytree(adapter, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    base = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))["model_dir"]
    proc = run_cmd([PYTHON, "model_hub/merge_llama_with_chinese_lora.py", f"--base_model={base}",
                    f"--lora_model={cut}", f"--output_dir={tmp_path / 'merged'}"], check=False)
    assert proc.returncode == 2
    assert "adapter" in one_error_line(proc.stderr) and str(weights) in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_ctrl_c_is_one_line(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line] == [
        "interrupted: no output of this run was written (files from before are as they were)"]


def test_ctrl_c_in_test_py_leaves_the_outputs(adapter, msra_dir, tmp_path):
    # A real SIGINT while test.py generates: one line, exit 130, the earlier metrics.json intact.
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"earlier": true}\n', encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PYTHON, "test.py", f"--lora_model={adapter}", f"--output_dir={out}",
                             f"--test_path={msra_dir['dir'] / 'instruct_data' / 'test.txt'}", "--batch_size=1",
                             "--limit=500"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # A suite started in the background (`make test &`) ignores SIGINT, and so
                            # would the child: give it the default disposition, as a terminal would.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "test:" not in seen:  # the progress bar: generation has started
        ch = proc.stderr.read(1)
        assert ch, f"test.py ended before generating: {seen[-2000:]}"
        seen += ch
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted:" in err
    assert (out / "metrics.json").read_text(encoding="utf-8") == '{"earlier": true}\n'
