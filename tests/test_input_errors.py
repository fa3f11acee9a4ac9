"""Bad input a user can hand the scripts (data files, command-line values, adapter and tokenizer
files, what is typed to the chat): each ends in one line naming the file, line, key or byte,
before any model loads where the input is read before it, and nothing the user had is changed.
Hints name the cause: a space character in a corpus, line ends of one kind, where a relative
path in train_args.json is read from, a report of a sample.
"""
import json
import re
import shutil
import subprocess

import pytest

from config_utils import ConfigError, UserError
from conftest import PYTHON, ROOT, as_argv, load_script
from dataset import DataError
from test_process import tags_of, write_tags
from test_reliability import no_model_load, one_error_line  # noqa: F401 (a fixture)

QUICK = {"lora_dropout": 0.0, "train_batch_size": 4, "max_steps": 1, "save_steps": 1, "eval_steps": 0,
         "log_steps": 1}


def with_surrogate(train16, path):
    """train16 with its third record's query holding a lone UTF-16 surrogate, as JSON escapes allow."""
    lines = train16.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[2])
    lines[2] = json.dumps({**record, "query": record["query"] + "\ud800"})  # ASCII JSON: "\\ud800"
    assert "\\ud800" in lines[2]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------- 7. an entity across a line break

def test_entity_holding_a_line_break_is_refused_in_process(tmp_path):
    corpus = tmp_path / "ori.jsonl"
    rows = [{"text": "我在北京。", "entity_list": [{"entity_index": {"begin": 2, "end": 4}, "entity_type": "LOC"}]},
            {"text": "他去北\n京了", "entity_list": [{"entity_index": {"begin": 2, "end": 5}, "entity_type": "LOC"}]}]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{corpus}:2: entity '北\\n京' .*line break"):
        load_script("process").main([f"--train_file={corpus}", f"--data_root={tmp_path / 'data'}"])
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------- 13. lone surrogates in JSON input

@pytest.mark.parametrize("script", ["test", "predict", "train_trainer"])
def test_lone_surrogate_in_json_input_names_the_line(script, untrained_adapter, tiny_model, train16, tmp_path,
                                                     no_model_load):
    bad = with_surrogate(train16, tmp_path / "bad.jsonl")
    argv = {"test": [f"--lora_model={untrained_adapter}", f"--test_path={bad}", f"--output_dir={tmp_path / 'e'}"],
            "predict": [f"--lora_model={untrained_adapter}", f"--input_file={bad}"],
            "train_trainer": as_argv({**QUICK, "model_dir": tiny_model, "train_path": bad, "dev_path": "",
                                      "save_dir": tmp_path / "run"})}[script]
    with pytest.raises(DataError, match="^" + re.escape(f"{bad}:3: key 'query' holds a lone UTF-16 surrogate (\\ud800)")):
        load_script(script).main(argv)


def test_lone_surrogate_in_a_corpus_writes_no_folder(tmp_path):
    corpus = tmp_path / "ori.jsonl"
    corpus.write_text('{"text": "北京\\udc00", "entity_list": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match="^" + re.escape(f"{corpus}:1: key 'text' holds a lone UTF-16 surrogate (\\udc00)")):
        load_script("process").main([f"--train_file={corpus}", f"--data_root={tmp_path / 'data'}"])
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------- 13. values refused at config time

def test_infinite_eos_penalty_is_refused_before_loading(untrained_adapter, train16, capsys, no_model_load):
    with pytest.raises(ConfigError, match=r"config key 'eos_penalty': '1e999' is not a finite number"):
        load_script("test").main([f"--lora_model={untrained_adapter}", f"--test_path={train16}", "--eos_penalty=1e999"])
    with pytest.raises(SystemExit) as stop:  # chat_ner.py: before the model loads, not after the user typed
        load_script("chat_ner").main([f"--lora_model={untrained_adapter}", "--interactive", "--eos_penalty=1e999"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: config key 'eos_penalty': '1e999' is not a finite number"


@pytest.mark.parametrize("options, expected", [
    (["--do_sample", "--temperature=0"], "config key 'temperature': 0.0 must be above 0 with --do_sample"),
    (["--top_k=-1"], "config key 'top_k': -1 must be 0 (off) or more"),
    (["--top_p=1.5"], "config key 'top_p': 1.5 must lie in (0, 1]"),
])
def test_chat_sampling_values_are_refused_before_loading(options, expected, untrained_adapter, capsys,
                                                         no_model_load):
    chat = load_script("chat_ner")
    with pytest.raises(SystemExit) as stop:
        chat.main([f"--lora_model={untrained_adapter}", "--interactive", *options])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {expected}")


def test_chat_stdin_that_is_not_utf8_is_one_line(untrained_adapter):
    proc = subprocess.run([PYTHON, "chat_ner.py", f"--lora_model={untrained_adapter}", "--with_prompt",
                           "--interactive", "--only_cpu", "--max_new_tokens=4"], cwd=ROOT, capture_output=True,
                          input=b"\xe5\x8c\x97\xff\n\n", timeout=600)  # 北 and a byte no UTF-8 text holds
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr[-2000:]
    assert "stdin: input line 1 is not UTF-8 (byte 0xff at byte 3)" in one_error_line(stderr)


# ------------------------------------------------------------------- 13. adapter and tokenizer files

def _copy(untrained_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(untrained_adapter, adapter)
    return adapter


@pytest.mark.parametrize("damage, expected", [
    ("cut", "adapter_config.json: not valid JSON"),
    ("prefix_tuning", "is a PREFIX_TUNING adapter; this project trains and loads LORA adapters"),
    ("tokenizer_latin1", "tokenizer_config.json:1: not UTF-8"),
])
def test_damaged_adapter_files_are_one_line_before_loading(damage, expected, untrained_adapter, train16, tmp_path,
                                                          no_model_load):
    adapter = _copy(untrained_adapter, tmp_path)
    config = adapter / "adapter_config.json"
    if damage == "cut":
        config.write_bytes(config.read_bytes()[:40])
    elif damage == "prefix_tuning":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "PREFIX_TUNING"}))
    else:
        path = adapter / "tokenizer_config.json"
        text = json.loads(path.read_text(encoding="utf-8"))
        path.write_bytes(json.dumps({**text, "note": "café"}, ensure_ascii=False).encode("latin-1"))
    for script, extra in (("test", [f"--test_path={train16}", f"--output_dir={tmp_path / 'eval'}"]),
                          ("predict", ["--text=北京"])):
        with pytest.raises(UserError) as e:
            load_script(script).main([f"--lora_model={adapter}", *extra])
        assert expected in str(e.value) and str(adapter) in str(e.value) and "\n" not in str(e.value)


def test_negative_dev_size_is_refused(tmp_path):
    corpus = write_tags(tmp_path / "c.tags", [("张三在北京", tags_of("张三在北京", {0: (2, "PER")}))] * 3)
    with pytest.raises(ConfigError, match=r"config key 'dev_size': -1 must be 0 or more"):
        load_script("process").main([f"--train_file={corpus}", f"--data_root={tmp_path / 'data'}", "--dev_size=-1"])


# ------------------------------------------------------------------- 14. hints that name the cause

@pytest.mark.parametrize("space", ["\u3000", "\xa0"])
def test_a_space_character_in_a_tag_corpus_is_a_character(space, tmp_path):
    text = f"张三{space}在北京"
    corpus = write_tags(tmp_path / "c.tags", [(text, tags_of(text, {0: (2, "PER"), 4: (2, "LOC")}))] * 3)
    load_script("process").main([f"--train_file={corpus}", f"--data_root={tmp_path / 'data'}", "--dev_size=0"])
    rows = [json.loads(line) for line in (tmp_path / "data" / "msra" / "ori_data" / "train.txt").open(encoding="utf-8")]
    assert rows[0]["text"] == text
    assert [(e["entity"], e["entity_index"]["begin"]) for e in rows[0]["entity_list"]] == [("张三", 0), ("北京", 4)]


def test_a_separator_that_is_not_a_space_or_tab_is_named(tmp_path):
    corpus = tmp_path / "c.tags"
    corpus.write_text("张\u3000B-PER\n三 I-PER\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{corpus}:1: expected 'character tag'.*U\+3000 IDEOGRAPHIC SPACE"):
        load_script("process").main([f"--train_file={corpus}", f"--data_root={tmp_path / 'data'}"])


def test_line_ends_of_cr_alone_are_named_not_quoted(tmp_path):
    corpus = tmp_path / "mac.tags"
    corpus.write_bytes("".join(f"{c} O\r" for c in "今天天气很好" * 200).encode("utf-8"))
    with pytest.raises(DataError) as e:
        load_script("process").main([f"--train_file={corpus}", f"--data_root={tmp_path / 'data'}"])
    message = str(e.value)
    assert message.startswith(f"{corpus}:1: ") and "carriage return" in message and len(message) < 300


def test_relative_model_dir_of_an_adapter_names_where_it_is_read_from(untrained_adapter, train16, tmp_path,
                                                                      monkeypatch, no_model_load):
    # Trained from the folder that holds models/: train_args.json records a path relative to it.
    home = tmp_path / "project"
    (home / "models").mkdir(parents=True)
    base = json.loads((untrained_adapter / "train_args.json").read_text(encoding="utf-8"))["model_dir"]
    shutil.copytree(base, home / "models" / "tiny")
    adapter = _copy(untrained_adapter, tmp_path)
    args = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    (adapter / "train_args.json").write_text(json.dumps({**args, "model_dir": "models/tiny"}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # another working directory
    with pytest.raises(UserError) as e:
        load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", f"--output_dir={tmp_path / 'e'}"])
    message = str(e.value)
    assert f"{adapter / 'train_args.json'} records model_dir 'models/tiny', a path relative to the folder training " \
           "ran in" in message and "--model_dir=" in message and "README" not in message


def test_report_of_a_sample_says_so_and_shows_the_interval(tiny_model, train16, tmp_path):
    out = tmp_path / "eval"
    metrics = load_script("test").main(["--no_adapter=True", f"--model_dir={tiny_model}", f"--test_path={train16}",
                                        "--max_new_tokens=4", "--sample=5", "--seed=3", f"--output_dir={out}"])
    page = (out / "report.html").read_text(encoding="utf-8")
    low, high = metrics["f1_ci95"]
    assert "a seeded random sample of 5 of the 16 sentences (seed 3)" in page
    assert f"95% bootstrap interval {low:.4f} - {high:.4f}" in page
