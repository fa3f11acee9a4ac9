"""Faults a user can hit: each ends in one clear line, and nothing the user had is lost.

The tests follow the rows of the reliability checklist in the README's Troubleshooting section:
chat on plain text, label sets that travel with the data, one training per save_dir, safe
checkpoint loading, free ports, too-long examples, long predict inputs, BOMs, blank input,
path-like values, interrupted exports, damaged files and bad values, label-name typos and a
base model other than the adapter's.
"""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess

import pytest
import torch

from conftest import MEMORISE, PYTHON, ROOT, as_argv, free_port, load_script, run_cmd
from answer_format import DEFAULT_INSTRUCT
from dataset import QUERY_PREFIX, load_data, sentence_of

# A short training run on the 16 memorisation examples: seconds, not minutes.
QUICK = {"lora_dropout": 0.0, "train_batch_size": 4, "max_steps": 2, "save_steps": 2, "eval_steps": 0,
         "log_steps": 1}


@pytest.fixture(scope="module")
def adapter(memorised_trainer):
    return memorised_trainer / "adapter_model"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if anything loads model weights: proves an error came before the load."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def alpaca_prompt(instruction):
    """Chinese-Alpaca's prompt text, written out: a change to the template dataset.py builds must fail here."""
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response: ")


def one_error_line(stderr):
    """The single `error:` line of a failed command (progress bars may share stderr)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------- 1. chat on plain text

def test_chat_with_prompt_answers_plain_text(adapter, tmp_path):
    from chat_ner import prompt_ids
    from model_utils import load_tokenizer

    tokenizer = load_tokenizer(adapter)
    # Plain text is the whole Alpaca instruction.
    expected = [tokenizer.bos_token_id] + tokenizer.encode(alpaca_prompt("你好"), add_special_tokens=False)
    assert prompt_ids(tokenizer, "你好", with_prompt=True) == expected

    proc = run_cmd([PYTHON, "chat_ner.py", "--lora_model", str(adapter), "--with_prompt", "--interactive",
                    "--only_cpu", "--max_new_tokens", "8"], input="你好\n\n", timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("Response:") == 1, proc.stderr[-2000:]
    inputs = tmp_path / "in.txt"
    inputs.write_text("你好\n介绍一下北京\n", encoding="utf-8")
    out = tmp_path / "out.json"
    run_cmd([PYTHON, "chat_ner.py", "--lora_model", str(adapter), "--with_prompt", "--data_file", str(inputs),
             "--predictions_file", str(out), "--only_cpu", "--max_new_tokens", "8"], timeout=300)
    assert [r["input"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["你好", "介绍一下北京"]


# -------------------------------------------------- 2. the label set travels with the data

GPE_LABELS = "PER:人名,LOC:地名,ORG:机构名,GPE:政治实体"
# (sentence, [(begin, length, type)]): 7 GPE mentions in 4 sentences, counted by hand.
GPE_SENTENCES = [
    ("美国和中国今天会谈", [(0, 2, "GPE"), (3, 2, "GPE")]),
    ("张三去了日本和韩国", [(0, 2, "PER"), (4, 2, "GPE"), (7, 2, "GPE")]),
    ("法国总统访问德国", [(0, 2, "GPE"), (6, 2, "GPE")]),
    ("英国在北京设立办事处", [(0, 2, "GPE"), (3, 2, "LOC")]),
]


def write_bmes(path, sentences):
    lines = []
    for text, spans in sentences:
        tags = ["O"] * len(text)
        for begin, length, etype in spans:
            for i in range(begin, begin + length):
                tags[i] = ("S-" if length == 1 else "B-" if i == begin else "E-" if i == begin + length - 1
                           else "M-") + etype
        lines += [f"{c} {t}" for c, t in zip(text, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_custom_label_set_is_scored_with_every_type(tmp_path, tiny_model, adapter, no_model_load):
    corpus = tmp_path / "gpe.txt"
    write_bmes(corpus, GPE_SENTENCES * 10)
    load_script("process").main([f"--train_file={corpus}", f"--test_file={corpus}", f"--label_names={GPE_LABELS}",
                                 f"--data_root={tmp_path}", "--data_name=gpe"])
    data = tmp_path / "gpe" / "instruct_data"
    info = json.loads((data / "data_info.json").read_text(encoding="utf-8"))
    assert info["label_names"]["GPE"] == "政治实体" and "政治实体" in info["instruct"]

    # An adapter trained on MSRA's three types cannot read 政治实体: one line, not a smaller gold set.
    test = load_script("test")
    with pytest.raises(Exception, match=r"test.txt:1: answer line '美国_政治实体'.*人名, 地名, 机构名"):
        test.main([f"--lora_model={adapter}", f"--test_path={data / 'test.txt'}"])


@pytest.mark.slow
def test_training_records_the_label_set_and_test_scores_it(tmp_path, tiny_model):
    corpus = tmp_path / "gpe.txt"
    write_bmes(corpus, GPE_SENTENCES * 10)
    load_script("process").main([f"--train_file={corpus}", f"--test_file={corpus}", f"--label_names={GPE_LABELS}",
                                 f"--data_root={tmp_path}", "--data_name=gpe"])
    data = tmp_path / "gpe" / "instruct_data"
    save_dir = tmp_path / "run"
    load_script("train_trainer").main(as_argv({**QUICK, "model_dir": tiny_model, "train_path": data / "train.txt",
                                               "dev_path": "", "save_dir": save_dir}))
    args = json.loads((save_dir / "adapter_model" / "train_args.json").read_text(encoding="utf-8"))
    assert args["label_names"] == {"PER": "人名", "LOC": "地名", "ORG": "机构名", "GPE": "政治实体"}
    metrics = load_script("test").main([f"--lora_model={save_dir / 'adapter_model'}", f"--test_path={data / 'test.txt'}",
                                        "--limit=4", "--max_new_tokens=4", f"--output_dir={tmp_path / 'eval'}"])
    # The first 4 test sentences are GPE_SENTENCES (hand count: 7 GPE, 1 PER, 1 LOC, 0 ORG).
    support = {t: m["support"] for t, m in metrics["per_type"].items()}
    assert support == {"PER": 1, "LOC": 1, "ORG": 0, "GPE": 7}


def test_model_answer_with_unknown_type_is_unparseable_not_dropped():
    from answer_format import parse_answer

    names = {"PER": "人名", "GPE": "政治实体"}
    parsed = parse_answer("张三_人名\n美国_政治实体\n北京_地名", names)
    assert parsed.entities == [("张三", "PER"), ("美国", "GPE")] and parsed.bad_lines == ["北京_地名"]


# ------------------------------------------------------------ 3. one training per save_dir

LOCK_HOLDER = """
import time
from run_folder import save_dir_lock
with save_dir_lock({save_dir!r}):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_second_training_into_the_same_save_dir_is_refused(tmp_path, tiny_model, train16):
    save_dir = tmp_path / "run"
    # `python -c` in the project root imports its modules.
    holder = subprocess.Popen([PYTHON, "-c", LOCK_HOLDER.format(save_dir=str(save_dir))], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": save_dir}
        proc = run_cmd([PYTHON, "train_trainer.py", *as_argv(options)], check=False, timeout=300)
        assert proc.returncode == 2
        line = one_error_line(proc.stderr)
        assert f"is in use by training process {holder.pid}" in line
        assert sorted(p.name for p in save_dir.iterdir()) == [".train.lock"]  # nothing written beside it
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # The holder is gone (as after kill -9): its lock is stale and the next run takes the folder.
    load_script("train_trainer").main(as_argv(options))
    assert (save_dir / "adapter_model" / "adapter_config.json").is_file()


# ------------------------------------------ 4 + 5. crafted DeepSpeed checkpoint, free port

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_crafted_deepspeed_checkpoint_is_refused_on_a_taken_default_port(tmp_path, tiny_model, train16):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "global_step2"
    ckpt.mkdir(parents=True)
    torch.save({"module": {}, "payload": _Payload(marker)}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt.parent / "latest").write_text("global_step2")
    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "",
               "save_dir": tmp_path / "run", "resume": ckpt}
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    with socket.socket() as taken:
        try:  # DeepSpeed's default port, as another training on this machine would hold it
            taken.bind(("127.0.0.1", 29500))
            taken.listen()
        except OSError:
            pass  # already held by someone else: taken either way
        proc = subprocess.run([PYTHON, "train_deepspeed.py", *as_argv(options)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "mp_rank_00_model_states.pt holds more than training state" in line and "GLOBAL posix.system" in line
    assert not marker.exists()


def test_trainer_under_deepspeed_checks_checkpoint_files_before_resuming(tmp_path):
    from config_utils import UserError
    from run_folder import verify_deepspeed_checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "global_step4").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, ckpt / "global_step4" / "mp_rank_00_model_states.pt")
    verify_deepspeed_checkpoint(ckpt)  # tensors only: accepted
    torch.save({"payload": _Payload(marker)}, ckpt / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="optim_states.pt holds more than training state"):
        verify_deepspeed_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.slow
def test_train_deepspeed_honours_master_port(tmp_path, tiny_model, train16):
    port = free_port()
    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": tmp_path / "run"}
    proc = run_cmd([PYTHON, "train_deepspeed.py", *as_argv(options)], env_extra={"MASTER_PORT": str(port)},
                   timeout=600)
    assert proc.stdout.split("rendezvous at ")[1].split()[0].endswith(f":{port}")


# ------------------------------------------------------------- 6. nothing fits max_seq_length

@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
def test_no_example_fits_max_seq_length_before_the_model_loads(tmp_path, tiny_model, train16, script,
                                                               no_model_load):
    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "",
               "save_dir": tmp_path / "run", "max_seq_length": 32}
    with pytest.raises(Exception, match=r"train16.txt: none of its 16 examples fits max_seq_length=32"):
        load_script(script).main(as_argv(options))


# ------------------------------------------------------------------- 7. long predict inputs

def test_split_windows_covers_every_character_at_sentence_ends():
    from predict import split_windows

    text = "一二。三四五。六七八九十一二。甲，乙丙丁戊己庚辛壬癸子丑。末"
    windows = split_windows(text, lambda piece: len(piece) <= 8)
    # By hand: sentences of 3, 4, 8, 14 (too long: cut at its comma, then into 8-character
    # pieces, the last of which the final 1-character sentence joins) characters, packed greedily.
    assert [w for _, w in windows] == ["一二。三四五。", "六七八九十一二。", "甲，", "乙丙丁戊己庚辛壬", "癸子丑。末"]
    assert "".join(w for _, w in windows) == text
    assert [s for s, _ in windows] == [0, 7, 15, 17, 25]


def test_predict_reads_a_long_text_in_windows(adapter, tmp_path):
    trained_on = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))["train_path"]
    record = load_data(trained_on)[0]
    sentence = sentence_of(record["query"])
    text = sentence * 40  # far past the 256 tokens the adapter was trained with
    out = tmp_path / "long.jsonl"
    proc = run_cmd([PYTHON, "predict.py", f"--lora_model={adapter}", f"--text={text}", f"--output_file={out}",
                    "--max_new_tokens=32"], timeout=600)
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row["text"] == text and row["windows"] > 1
    assert f"read in {row['windows']} windows" in proc.stdout
    # Entities from later windows point into the whole text, past the first window.
    spans = [e for e in row["entities"] if e["begin"] >= 0]
    assert spans and all(text[e["begin"]:e["end"]] == e["entity"] for e in spans)
    assert max(e["begin"] for e in spans) > len(text) // 2


# ---------------------------------------------------------------------------------- 8. BOM

def test_bom_is_not_part_of_any_input(adapter, train16, tmp_path):
    from chat_ner import prompt_ids
    from model_utils import load_tokenizer

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + train16.read_bytes())
    proc = run_cmd([PYTHON, "predict.py", f"--lora_model={adapter}", f"--input_file={bom}", "--limit=1",
                    "--max_new_tokens=8"], timeout=300)
    assert "真实 >>>" in proc.stdout  # read as instruct JSONL, not as raw text lines

    tokenizer = load_tokenizer(adapter)
    sentence = QUERY_PREFIX + "我们在北京。"
    assert prompt_ids(tokenizer, "\ufeff" + sentence, True) == prompt_ids(tokenizer, sentence, True) == \
        [tokenizer.bos_token_id] + tokenizer.encode(alpaca_prompt(DEFAULT_INSTRUCT + "\n" + sentence),
                                                    add_special_tokens=False)

    from dataset import read_text
    assert read_text(bom) == train16.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- 9. blank text

def test_blank_text_is_refused_before_loading_and_keeps_the_output_file(adapter, tmp_path, no_model_load):
    out = tmp_path / "pred.jsonl"
    out.write_text("earlier results\n", encoding="utf-8")
    with pytest.raises(Exception, match="the text is blank"):
        load_script("predict").main([f"--lora_model={adapter}", "--text=   ", f"--output_file={out}"])
    assert out.read_text(encoding="utf-8") == "earlier results\n"


# ---------------------------------------------------------------- 10. path-like values stay text

def test_numeric_output_dir_is_a_folder_name(adapter, train16, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", "--limit=2",
                                        "--max_new_tokens=8", "--output_dir=2024"])
    saved = json.loads((tmp_path / "2024" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["f1"] == metrics["f1"] and (tmp_path / "2024" / "predictions.jsonl").is_file()


def test_output_dir_that_is_a_file_fails_before_loading(adapter, train16, tmp_path, no_model_load):
    taken = tmp_path / "results"
    taken.write_text("x")
    with pytest.raises(Exception, match="output_dir': .*results is a file"):
        load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", f"--output_dir={taken}"])


def test_numeric_tokenizer_path_is_a_path(adapter, train16):
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={adapter}", "--tokenizer_path=123", f"--test_path={train16}"],
                   check=False)
    assert proc.returncode == 2
    assert "no tokenizer (tokenizer.model or tokenizer.json) in '123'" in one_error_line(proc.stderr)


# ------------------------------------------------------------- 12. damaged files, bad values

def _copy_run(memorised_trainer, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(memorised_trainer, run, ignore=shutil.ignore_patterns(".train.lock"))
    args = json.loads((run / "train_args.json").read_text())
    return run, args


def test_damaged_checkpoint_names_the_file_and_an_earlier_checkpoint(memorised_trainer, tmp_path, no_model_load):
    run, args = _copy_run(memorised_trainer, tmp_path)
    latest = run / "checkpoint-150" / "optimizer.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # killed while writing, or the disk filled up
    options = {**MEMORISE, "model_dir": args["model_dir"], "train_path": args["train_path"],
               "dev_path": args["dev_path"], "save_dir": run, "resume": True}
    with pytest.raises(Exception) as e:
        load_script("train_trainer").main(as_argv(options))
    message = str(e.value)
    assert "checkpoint-150/optimizer.pt is damaged" in message
    assert f"--resume={run / 'checkpoint-100'}" in message


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line(tmp_path, tiny_model, train16):
    def limit_file_size():  # every file this process writes stops at 100 kB, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    options = {**QUICK, "model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": tmp_path / "run"}
    proc = subprocess.run([PYTHON, "train_trainer.py", *as_argv(options)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_file_size)
    assert proc.returncode == 2
    assert "disk is full or a size limit was reached" in one_error_line(proc.stderr)
    assert not (tmp_path / "run" / "adapter_model").exists()


def test_adapter_for_another_shape_is_one_line(adapter, train16, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["r"] = 16
    (edited / "adapter_config.json").write_text(json.dumps(config))
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={edited}", f"--test_path={train16}"], check=False)
    assert proc.returncode == 2
    assert "does not fit this base model (size mismatch" in one_error_line(proc.stderr)


def test_truncated_adapter_weights_are_one_line(adapter, train16, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(adapter, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={cut}", f"--test_path={train16}"], check=False)
    assert proc.returncode == 2
    assert "weights file cannot be read" in one_error_line(proc.stderr)


@pytest.mark.parametrize("option,expected", [
    ("--train_batch_size=0", "'train_batch_size': 0 must be positive"),
    ("--lr_scheduler_type=cosin", "'cosin' is not one of linear, cosine,"),
    ("--no_entity_fraction=1.5", "'no_entity_fraction': 1.5 must lie in [0, 1]"),
    ("--loss_vocabulary=sentence", "'loss_vocabulary': 'sentence' is not one of all, batch"),
    ("--lora_target_modules=qproj", "qproj matches no linear layer of this model; its linear layers are "
                                    "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
])
def test_bad_training_values_are_one_line(tmp_path, tiny_model, train16, option, expected):
    proc = run_cmd([PYTHON, "train_trainer.py", f"--model_dir={tiny_model}", f"--train_path={train16}",
                    "--dev_path=", f"--save_dir={tmp_path / 'run'}", option], check=False)
    assert proc.returncode == 2
    assert expected in one_error_line(proc.stderr)


@pytest.mark.parametrize("script", ["test", "predict"])
@pytest.mark.parametrize("option, expected", [("--max_new_tokens=0", "'max_new_tokens': 0 must be at least 1"),
                                              ("--batch_size=0", "'batch_size': 0 must be at least 1"),
                                              ("--eos_penalty=nan", "'eos_penalty': 'nan' is not a float")])
def test_bad_inference_values_fail_before_loading(adapter, train16, script, option, expected, no_model_load):
    with pytest.raises(Exception, match=expected):
        load_script(script).main([f"--lora_model={adapter}", f"--test_path={train16}" if script == "test"
                                  else "--text=北京", option])


# ----------------------------------------------------------------- 13. label-name mistakes

@pytest.mark.parametrize("names,expected", [
    ("PER:,LOC:地名", "'PER:' is not TYPE:名称"),
    ("LOC:人名,PER:人名", "name '人名' is used for two types"),
    ("PER:人名,PER:名字", "type 'PER' is given twice"),
])
def test_empty_or_duplicate_label_names_are_refused(tmp_path, names, expected):
    proc = run_cmd([PYTHON, "process.py", f"--label_names={names}", f"--data_root={tmp_path}"], check=False,
                   timeout=300)
    assert proc.returncode == 2
    assert expected in one_error_line(proc.stderr)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------- 14. another base model than trained

def test_other_base_model_is_named_in_a_warning(adapter, train16, tiny_model, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={adapter}", f"--test_path={train16}", "--limit=1",
                    "--max_new_tokens=4", f"--model_dir={other}", f"--output_dir={tmp_path / 'eval'}"])
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: --model_dir")]
    assert len(warning) == 1 and str(other) in warning[0] and str(tiny_model) in warning[0]
