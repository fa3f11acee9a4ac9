"""Generation, test.py, predict.py and chat_ner.py on the adapter the training tests memorised."""
import json
import os
import pty
import select
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, load_script, run_cmd
from answer_format import DEFAULT_LABEL_NAMES
from dataset import NerCollate, load_data

NAME_TO_TYPE = {name: code for code, name in DEFAULT_LABEL_NAMES.items()}


def hand_parse(answer):
    """An independent reading of `实体_类型` lines, for recomputing scores in the tests."""
    if answer.strip() == "没有":
        return set()
    pairs = set()
    for line in answer.splitlines():
        entity, _, name = line.strip().rpartition("_")
        if entity and name in NAME_TO_TYPE:
            pairs.add((entity, NAME_TO_TYPE[name]))
    return pairs


@pytest.fixture(scope="module")
def adapter(memorised_trainer):
    return memorised_trainer / "adapter_model"


@pytest.fixture(scope="module")
def loaded(adapter):
    from model_utils import load_for_inference

    return load_for_inference(str(adapter), device="cpu")


@pytest.fixture(scope="module")
def mixed_records(train16, msra_dir):
    """12 records of mixed prompt lengths: memorised ones and unseen test sentences."""
    test = load_data(msra_dir["dir"] / "instruct_data" / "test.txt")[:40]
    unseen = sorted(test, key=lambda r: len(r["query"]))
    return load_data(train16)[:6] + [unseen[0], unseen[1], unseen[20], unseen[21], unseen[-2], unseen[-1]]


def test_greedy_outputs_do_not_depend_on_batch_size(loaded, mixed_records):
    from generation import ner_generate

    model, tokenizer, train_args = loaded
    results = [ner_generate(model, tokenizer, train_args, mixed_records, batch_size=b, max_new_tokens=24,
                            grounded=False)[0]
               for b in (1, 5, 12)]
    assert results[0] == results[1] == results[2]
    assert len(set(results[0])) > 3  # different prompts, different answers: not a degenerate check


def test_shared_prefix_cache_gives_the_same_outputs(loaded, mixed_records):
    from dataset import NerCollate
    from generation import ner_generate, shared_prefix_length

    model, tokenizer, train_args = loaded
    prompts = [NerCollate(train_args, tokenizer).inference_ids(r, 24)[0] for r in mixed_records]
    assert shared_prefix_length(prompts) > 30  # template + instruction are really shared and cached
    plain = ner_generate(model, tokenizer, train_args, mixed_records, batch_size=5, max_new_tokens=24, grounded=False,
                         prefix_cache=False)[0]
    cached = ner_generate(model, tokenizer, train_args, mixed_records, batch_size=5, max_new_tokens=24, grounded=False,
                          prefix_cache=True)[0]
    assert cached == plain


def test_greedy_ignores_the_models_generation_defaults(loaded, mixed_records):
    from generation import ner_generate

    model, tokenizer, train_args = loaded
    before = ner_generate(model, tokenizer, train_args, mixed_records, max_new_tokens=24, grounded=False)[0]
    config = model.generation_config
    saved = (config.repetition_penalty, config.no_repeat_ngram_size)
    # As a base model's generation_config.json may ask; answers copy input words on purpose.
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 2
    try:
        after = ner_generate(model, tokenizer, train_args, mixed_records, max_new_tokens=24, grounded=False)[0]
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = saved
    assert after == before


def test_too_many_new_tokens_for_the_context_is_a_clear_error(loaded, mixed_records):
    from config_utils import ConfigError
    from generation import ner_generate

    model, tokenizer, train_args = loaded
    with pytest.raises(ConfigError, match="max_new_tokens=1000 leaves no room"):
        ner_generate(model, tokenizer, train_args, mixed_records[:1], max_new_tokens=1000)


def test_predict_non_utf8_input_is_one_line(adapter, tmp_path):
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("北京".encode("gbk") + b"\n")
    proc = run_cmd([PYTHON, "predict.py", f"--lora_model={adapter}", f"--input_file={bad}"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {bad}:1: not UTF-8")  # path:line, as every input error


def test_inference_prompt_is_the_training_prompt(loaded, mixed_records, monkeypatch):
    import generation

    model, tokenizer, train_args = loaded
    seen = {}

    def capture(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        return [""] * len(prompts)

    monkeypatch.setattr(generation, "generate", capture)
    generation.ner_generate(model, tokenizer, train_args, mixed_records, max_new_tokens=8)
    collate = NerCollate(train_args, tokenizer)
    for rec, prompt in zip(mixed_records, seen["prompts"]):
        features = collate.encode(rec)
        n_prompt = sum(1 for label in features["labels"] if label == -100)
        assert prompt == features["input_ids"][:n_prompt]
        assert prompt[0] == tokenizer.bos_token_id


def test_test_py_reports_f1_that_predictions_reproduce(adapter, train16, tmp_path):
    test = load_script("test")
    metrics = test.main([f"--lora_model={adapter}", f"--test_path={train16}", f"--output_dir={tmp_path}",
                         "--batch_size=5", "--max_new_tokens=48"])
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 16 and set(rows[0]) >= {"text", "answer", "output", "entities"}
    tp = fp = fn = 0
    for row in rows:
        gold = hand_parse(row["answer"])
        pred = {tuple(e) for e in row["entities"]}
        assert pred == hand_parse(row["output"])
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert saved["precision"] == pytest.approx(precision)
    assert saved["recall"] == pytest.approx(recall)
    assert saved["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert saved["f1"] >= 0.95 and metrics["f1"] == saved["f1"]
    assert set(saved["per_type"]) >= {"PER", "LOC", "ORG"}


def test_test_py_limit_base_model_and_bad_input(adapter, train16, tiny_model, tmp_path):
    proc = run_cmd([PYTHON, "test.py", "--no_adapter=True", f"--model_dir={tiny_model}", f"--test_path={train16}",
                    "--limit=3", "--max_new_tokens=4", f"--output_dir={tmp_path / 'base'}"])
    assert "examples/s" in proc.stdout
    assert len((tmp_path / "base" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 3

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={adapter}", f"--test_path={empty}"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {empty}:1: file holds no examples"]

    broken = tmp_path / "broken.txt"
    broken.write_text(train16.read_text(encoding="utf-8").splitlines()[0] + "\n{not json\n", encoding="utf-8")
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={adapter}", f"--test_path={broken}"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {broken}:2: not valid JSON")

    proc = run_cmd([PYTHON, "test.py", f"--lora_model={tmp_path / 'nope'}", f"--test_path={train16}"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "does not exist" in proc.stderr

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / f).write_bytes((adapter / f).read_bytes())
    proc = run_cmd([PYTHON, "test.py", f"--lora_model={bare}", f"--test_path={train16}"], check=False)
    assert proc.returncode == 2 and "no train_args.json; pass --model_dir" in proc.stderr


def test_predict_prints_and_writes_offsets(adapter, train16, tmp_path):
    out = tmp_path / "pred.jsonl"
    proc = run_cmd([PYTHON, "predict.py", f"--lora_model={adapter}", f"--input_file={train16}", "--limit=3",
                    f"--output_file={out}"])
    records = load_data(train16)[:3]
    for rec in records:
        assert f"文本 >>>  {rec['query'].removeprefix('文本：')}" in proc.stdout
        assert f"真实 >>>  {rec['answer']}" in proc.stdout
    assert proc.stdout.count("预测 >>>") == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3
    found = 0
    for row in rows:
        for ent in row["entities"]:
            if ent["begin"] >= 0:
                assert row["text"][ent["begin"]:ent["end"]] == ent["entity"]
                found += 1
    assert found > 0

    text = records[0]["query"].removeprefix("文本：")
    plain = tmp_path / "plain.txt"
    plain.write_text(text + "\n\n", encoding="utf-8")
    proc = run_cmd([PYTHON, "predict.py", f"--lora_model={adapter}", f"--input_file={plain}"])
    predicted = proc.stdout.split("预测 >>>  ")[1].split("\n=")[0].strip()
    assert hand_parse(predicted) == hand_parse(records[0]["answer"])
    assert "真实 >>>" not in proc.stdout


def _read_until(fd, needle, timeout=180):
    buf, deadline = b"", time.time() + timeout
    while needle.encode() not in buf and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf.decode("utf-8", errors="replace")


def test_chat_interactive_through_a_terminal(adapter, train16):
    record = load_data(train16)[0]
    master, slave = pty.openpty()
    proc = subprocess.Popen([PYTHON, "chat_ner.py", "--lora_model", str(adapter), "--with_prompt", "--interactive",
                             "--only_cpu"], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        assert "Input:" in _read_until(master, "Input:")
        # The user types instruction and sentence on one line, as in the original repository's README.
        os.write(master, (record["instruct"] + record["query"] + "\n").encode())
        screen = _read_until(master, "Input:")
        response = screen.split("Response:")[1].split("Input:")[0].strip()
        assert hand_parse(response.replace("\r", "")) == hand_parse(record["answer"])
        os.write(master, b"\n")  # an empty line ends the session
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_chat_file_mode_and_end_of_input(adapter, train16, tmp_path):
    records = load_data(train16)[:2]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(r["instruct"] + r["query"] + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "chat.json"
    run_cmd([PYTHON, "chat_ner.py", "--lora_model", str(adapter), "--with_prompt", "--data_file", str(inputs),
             "--predictions_file", str(out), "--only_cpu"])
    results = json.loads(out.read_text(encoding="utf-8"))
    assert [r["id"] for r in results] == [0, 1]
    for r, rec in zip(results, records):
        assert hand_parse(r["output"]) == hand_parse(rec["answer"])
    # End of input (Ctrl-D) ends the interactive loop cleanly too.
    proc = run_cmd([PYTHON, "chat_ner.py", "--lora_model", str(adapter), "--interactive", "--only_cpu"],
                   input="")
    assert proc.returncode == 0


def test_chat_truncates_overlong_input_and_goes_on(adapter, tiny_model):
    text = "中" * 1500  # longer than the tiny model's 1,024-position context
    proc = run_cmd([PYTHON, "chat_ner.py", "--lora_model", str(adapter), "--interactive", "--only_cpu",
                    "--max_new_tokens", "4"], input=text + "\n你好\n\n")
    assert proc.returncode == 0
    assert "warning: input is" in proc.stderr and proc.stdout.count("Response:") == 2


def test_test_py_scores_a_seeded_sample(train16, tiny_model, tmp_path):
    texts = [r["query"].removeprefix("文本：") for r in load_data(train16)]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_cmd([PYTHON, "test.py", "--no_adapter=True", f"--model_dir={tiny_model}", f"--test_path={train16}",
                 "--sample=5", f"--seed={seed}", "--max_new_tokens=4", f"--output_dir={tmp_path / name}"])
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        runs[name] = [r["text"] for r in rows]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["sample"] == 5 and metrics["num_examples"] == 5
        low, high = metrics["f1_ci95"]
        assert 0 <= low <= metrics["f1"] <= high <= 1
    # Five distinct sentences of the file, in file order; the same seed draws the same ones.
    assert len(set(runs["a"])) == 5 and runs["a"] == [t for t in texts if t in runs["a"]]
    assert runs["a"] == runs["b"] != runs["c"]


def test_merged_adapter_is_the_same_model_and_test_py_answers_alike(adapter, loaded, mixed_records, train16, tmp_path):
    """merge_lora folds the adapter into the base weights: no LoRA layer is left, the logits are
    PEFT's own (unmerged) ones to fp32 rounding, and test.py answers the same either way."""
    import torch

    from model_utils import load_for_inference

    peft_model, tokenizer, _ = loaded
    merged, _, _ = load_for_inference(str(adapter), device="cpu", merge_lora=True)
    assert any("lora_" in name for name, _ in peft_model.named_parameters())
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    ids = tokenizer([r["query"] for r in mixed_records[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, peft_model(**ids).logits, atol=1e-4, rtol=1e-4)

    test = load_script("test")
    answers = {}
    for merge in (True, False):
        out = tmp_path / f"merge-{merge}"
        test.main([f"--lora_model={adapter}", f"--test_path={train16}", "--batch_size=8", "--max_new_tokens=48",
                   f"--merge_lora={merge}", f"--output_dir={out}"])
        answers[merge] = [json.loads(line)["output"] for line in (out / "predictions.jsonl").open(encoding="utf-8")]
    assert answers[True] == answers[False] and len(set(answers[True])) > 3
