"""Answer formats (answer_format.py, grammar.py): each format's writer, parser and grammar agree,
and a model trained on each format trains, scores and predicts through every script."""
import json
import random

import pytest

from answer_format import (ANSWER_FORMATS, DEFAULT_LABEL_NAMES, entity_problem, label_name_problem, parse,
                           write_answer)
from conftest import MEMORISE, PYTHON, as_argv, load_script, run_cmd, score_adapter

NAMES = DEFAULT_LABEL_NAMES
# 李0 鑫1 在2 北3 京4 见5 到6 了7 张8 三9 和10 新11 华12 社13 记14 者15 。16
SENTENCE = "李鑫在北京见到了张三和新华社记者。"
SPANS = [(0, 2, "PER"), (3, 5, "LOC"), (8, 10, "PER"), (11, 14, "ORG")]
WRITTEN = {  # the answers to SENTENCE, written out by hand
    "seed": "李鑫_人名\n北京_地名\n张三_人名\n新华社_机构名",
    "typed": "人名：李鑫；张三\n地名：北京\n机构名：新华社",
    "inline": "[李鑫|人名]在[北京|地名]见到了[张三|人名]和[新华社|机构名]记者。",
}
EMPTY = {"seed": "没有", "typed": "人名：没有\n地名：没有\n机构名：没有", "inline": SENTENCE}


def corpus(msra_dir, split):
    """[(text, [(begin, end, type)])] of an ori_data split."""
    rows = [json.loads(line) for line in (msra_dir["dir"] / "ori_data" / f"{split}.txt").read_text("utf-8").splitlines()]
    return [(r["text"], [(e["entity_index"]["begin"], e["entity_index"]["end"], e["entity_type"])
                         for e in r["entity_list"]]) for r in rows]


def pairs(text, spans):
    return {(text[b:e], t) for b, e, t in spans}


# ---------------------------------------------------------------------------- writers and parsers

@pytest.mark.parametrize("fmt", ANSWER_FORMATS)
def test_answers_are_written_as_the_format_says(fmt):
    assert write_answer(fmt, SENTENCE, SPANS, NAMES) == WRITTEN[fmt]
    assert write_answer(fmt, SENTENCE, [], NAMES) == EMPTY[fmt]
    assert parse(fmt, WRITTEN[fmt], SENTENCE, NAMES).entities == \
        sorted(pairs(SENTENCE, SPANS), key=lambda p: WRITTEN[fmt].index(p[0]))  # in the order written
    assert parse(fmt, EMPTY[fmt], SENTENCE, NAMES).entities == []


@pytest.mark.parametrize("fmt", ANSWER_FORMATS)
def test_every_format_reads_back_every_test_sentence(msra_dir, fmt):
    """The 4,631 MSRA test sentences: the answer written in the format reads back as the corpus's
    entity list (a format changes how entities are written, never what counts)."""
    sentences = corpus(msra_dir, "test")
    assert len(sentences) == 4631
    for text, spans in sentences:
        assert entity_problem(fmt, text, spans) is None
        got = parse(fmt, write_answer(fmt, text, spans, NAMES), text, NAMES)
        assert not got.bad_lines
        assert set(got.entities) == pairs(text, spans) and len(got.entities) == len(pairs(text, spans))


def test_inline_copy_writes_mark_characters_of_the_sentence_full_width():
    text = "见[北京]站|口"  # an entity that holds the inline marks themselves
    answer = write_answer("inline", text, [(1, 5, "LOC")], NAMES)
    assert answer == "见[［北京］|地名]站｜口"
    assert len(answer) == len(text) + len("[|地名]")
    assert parse("inline", answer, text, NAMES).entities == [("[北京]", "LOC")]


def test_parsers_report_what_they_cannot_read():
    typed = parse("typed", "人名：张三\n国名：中国\n地名：北京；上海\n乱码", "张三在北京和上海", NAMES)
    assert typed.entities == [("张三", "PER"), ("北京", "LOC"), ("上海", "LOC")]
    assert typed.bad_lines == ["国名：中国", "乱码"]
    inline = parse("inline", "[张三|人名]在[北京|国名]和[上海", "张三在北京和上海", NAMES)
    assert inline.entities == [("张三", "PER")]
    assert len(inline.bad_lines) == 2
    # A copy that drifts from the sentence (an ungrounded answer): entities as written.
    drift = parse("inline", "[张山|人名]在北京", "张三在北京", NAMES)
    assert drift.entities == [("张山", "PER")]


@pytest.mark.parametrize("fmt,spans,problem", [
    ("seed", [(0, 3, "LOC")], "line break"),
    ("typed", [(0, 3, "LOC")], "line break"),
    ("inline", [(0, 3, "LOC")], "line break"),
    ("typed", [(4, 7, "ORG")], "；"),
    ("inline", [(4, 7, "ORG"), (5, 8, "LOC")], "overlap"),
])
def test_entities_a_format_cannot_write_are_named(fmt, spans, problem):
    text = "北\n京；新；华社在"
    assert problem in entity_problem(fmt, text, spans)
    assert entity_problem("seed", text, [(4, 7, "ORG")]) is None  # `；` is only the typed format's mark


def test_type_names_are_checked_against_the_formats_marks():
    assert label_name_problem("地_名", "seed") and label_name_problem("地_名", "typed") is None
    assert label_name_problem("地名；", "typed") and label_name_problem("地名；", "seed") is None
    assert label_name_problem("地|名", "inline") and label_name_problem("地|名", "typed") is None
    assert label_name_problem("地名", "inline") is None


def test_process_refuses_an_entity_the_format_cannot_write(tmp_path):
    corpus_file = tmp_path / "ori.txt"
    rows = [{"text": "张三在北京。", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, "entity_type": "PER"}]},
            {"text": "新；华社在北京。", "entity_list": [{"entity_index": {"begin": 0, "end": 4}, "entity_type": "ORG"}]}]
    corpus_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    process = load_script("process")
    with pytest.raises(Exception) as err:
        process.main([f"--train_file={corpus_file}", f"--data_root={tmp_path}", "--answer_format=typed"])
    assert str(err.value).startswith(f"{corpus_file}:2: entity '新；华社'")
    assert not (tmp_path / "msra").exists()  # nothing written
    process.main([f"--train_file={corpus_file}", f"--data_root={tmp_path}", "--answer_format=seed", "--dev_size=0"])
    info = json.loads((tmp_path / "msra" / "instruct_data" / "data_info.json").read_text("utf-8"))
    assert info["answer_format"] == "seed"


# ---------------------------------------------------------------------------------- grammars

@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from model_utils import load_tokenizer

    return load_tokenizer(tiny_model)


def grammar_of(tokenizer, fmt, sentence=SENTENCE):
    from grammar import make_grammar
    from token_bytes import vocab_for

    return make_grammar(fmt, vocab_for(tokenizer), sentence, NAMES)


def state_after(grammar, *texts):
    state = grammar.start
    for text in texts:
        state = grammar.step(state, text.encode())
        if state is None:
            return None
    return state


def fits(grammar, *texts):
    state = state_after(grammar, *texts)
    return state is not None and grammar.cost(state) < float("inf")


def complete(grammar, *texts):
    state = state_after(grammar, *texts)
    return state is not None and grammar.cost(state) == 0


@pytest.mark.parametrize("fmt", ANSWER_FORMATS)
def test_grammar_accepts_the_training_answers_token_by_token(tokenizer, msra_dir, fmt):
    from dataset import encode_text
    from token_bytes import vocab_for

    vocab = vocab_for(tokenizer)
    for text, spans in corpus(msra_dir, "dev")[:200]:
        grammar = grammar_of(tokenizer, fmt, text)
        state = grammar.start
        for tok in encode_text(tokenizer, write_answer(fmt, text, spans, NAMES)):
            state = grammar.step(state, vocab.token_bytes[tok])
            assert state is not None and grammar.cost(state) < float("inf"), (fmt, text)
        assert grammar.cost(state) == 0


def test_typed_grammar_keeps_the_type_order_and_ends_after_the_last_type(tokenizer):
    g = grammar_of(tokenizer, "typed")
    assert complete(g, WRITTEN["typed"])
    assert complete(g, EMPTY["typed"])
    assert not complete(g, "人名：李鑫")  # no EOS before the last type
    assert not complete(g, "人名：李鑫\n地名：北京")
    assert state_after(g, "地名：") is None  # types in the label set's order
    assert state_after(g, "人名：李鑫\n机构名") is None
    assert not fits(g, "人名：上海")  # not in the sentence
    assert state_after(g, "人名：李鑫；李鑫；") is None  # no entity twice in a line
    assert state_after(g, "人名：没有；") is None  # `没有` only alone
    assert state_after(g, "人名：李鑫\n地名：北京\n机构名：新华社\n") is None  # no line after the last type
    assert complete(g, " 人名：李鑫\n 地名：北京\n 机构名：新华社")  # SentencePiece's leading spaces


def test_inline_grammar_copies_exactly_and_marks_on_character_boundaries(tokenizer):
    g = grammar_of(tokenizer, "inline")
    assert complete(g, WRITTEN["inline"])
    assert complete(g, SENTENCE)
    assert not complete(g, SENTENCE[:-1])  # no EOS before the whole copy
    assert state_after(g, "李鑫在北京见了") is None  # the copy skips nothing
    assert state_after(g, "李鑫在上海") is None
    assert state_after(g, "[|") is None  # no empty entity
    assert state_after(g, "[[") is None
    assert state_after(g, "[李鑫|国名") is None  # a type of the label set
    assert fits(g, "[李鑫|人", "名]")
    assert state_after(g, "[李鑫]") is None
    half = "李".encode()[:1]
    assert g.step(g.step(g.start, half), b"[") is None  # a mark never splits a character
    assert state_after(g, "李鑫[在北京见到了张三和新华社记者。|地名]") is not None  # any run may be marked


@pytest.mark.parametrize("fmt", ANSWER_FORMATS)
def test_every_answer_the_grammar_allows_parses_into_grounded_entities(tokenizer, msra_dir, fmt):
    """Random walks through each grammar (random allowed tokens, EOS taken now and then, a tight
    budget): every answer ends complete, and the parser reads it without a bad part into
    distinct pairs of the sentence's substrings and the label set's types."""
    from token_bytes import vocab_for

    vocab, rng = vocab_for(tokenizer), random.Random(0)
    walks = 0
    for text, _ in corpus(msra_dir, "dev")[:40]:
        for _ in range(3):
            g = grammar_of(tokenizer, fmt, text)
            budget = g.cost(g.start) + rng.randint(2, 12)
            state, ids = g.start, []
            for left in range(budget, 0, -1):
                order = g.relevant_ids(state, "cpu").tolist()  # what the wide scan searches: a superset
                rng.shuffle(order)
                allowed, _ = g.allowed(state, order, dict.fromkeys(order, 0.0), left, greedy=False)
                assert allowed, (fmt, text, tokenizer.decode(ids))  # the budget rule never leaves a row stuck
                tok = vocab.eos_id if vocab.eos_id in allowed and rng.random() < 0.3 else rng.choice(allowed)
                if tok == vocab.eos_id:
                    break
                ids.append(tok)
                state = g.step(state, vocab.token_bytes[tok])
            assert g.cost(state) == 0, (fmt, text, tokenizer.decode(ids))
            answer = g.finish(tokenizer.decode(ids, skip_special_tokens=True).strip())
            parsed = parse(fmt, answer, text, NAMES)
            assert not parsed.bad_lines, (fmt, answer)
            assert all(e in text and t in NAMES for e, t in parsed.entities), (fmt, answer)
            assert len(set(parsed.entities)) == len(parsed.entities)
            walks += 1
    assert walks == 120


# --------------------------------------------------------------------- inference reads the format

def test_test_py_refuses_data_of_another_format_before_loading(tmp_path):
    adapter = tmp_path / "adapter"  # a seed-format adapter's record; no weights: nothing may load
    adapter.mkdir()
    (adapter / "train_args.json").write_text(json.dumps({"model_dir": str(tmp_path / "none"), "label_names": NAMES}),
                                             encoding="utf-8")
    data = tmp_path / "typed" / "instruct_data"
    data.mkdir(parents=True)
    (data / "test.txt").write_text(json.dumps({"instruct": "x", "query": "文本：北京", "answer": "人名：没有\n地名：北京\n机构名：没有"},
                                              ensure_ascii=False) + "\n", encoding="utf-8")
    (data / "data_info.json").write_text(json.dumps({"label_names": NAMES, "instruct": "x", "answer_format": "typed"}),
                                         encoding="utf-8")
    with pytest.raises(Exception) as err:
        load_script("test").main([f"--lora_model={adapter}", f"--test_path={data / 'test.txt'}",
                                  f"--output_dir={tmp_path / 'out'}"])
    assert "typed answer format" in str(err.value) and "trained on seed" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_adapters_without_a_recorded_format_read_as_seed(tmp_path):
    from infer_config import answer_format_for
    from model_utils import read_train_args

    (tmp_path / "train_args.json").write_text(json.dumps({"model_dir": "x", "label_names": NAMES}), encoding="utf-8")
    assert answer_format_for(read_train_args(tmp_path)) == "seed"
    (tmp_path / "train_args.json").write_text(json.dumps({"model_dir": "x", "answer_format": "table"}), encoding="utf-8")
    with pytest.raises(Exception) as err:
        read_train_args(tmp_path)
    assert "answer_format" in str(err.value) and "table" in str(err.value)


# ------------------------------------------------------------------ a model trained on each format

@pytest.fixture(scope="session")
def format_data(tmp_path_factory, train16, msra_dir):
    """The 16 memorisation sentences processed by process.py in each format: {fmt: instruct_data}."""
    texts = [json.loads(line)["query"].removeprefix("文本：") for line in train16.read_text("utf-8").splitlines()]
    ori = {r["text"]: r for r in map(json.loads, (msra_dir["dir"] / "ori_data" / "train.txt").read_text("utf-8").splitlines())}
    root = tmp_path_factory.mktemp("formats")
    corpus_file = root / "ori16.txt"
    corpus_file.write_text("".join(json.dumps(ori[t], ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    out = {}
    for fmt in ("typed", "inline"):
        load_script("process").main([f"--train_file={corpus_file}", f"--test_file={corpus_file}",
                                     f"--data_root={root}", f"--data_name={fmt}", f"--answer_format={fmt}"])
        out[fmt] = root / fmt / "instruct_data"
    out["ori"] = [ori[t] for t in texts]
    return out


# A copy with marks is a longer answer than a list: twice the seed format's memorisation steps, and
# room for the longest of the 16 (322 tokens in the tiny tokenizer: an inline example is never cut).
FORMAT_STEPS = 2 * MEMORISE["max_steps"]


def memorise_format(tmp_path_factory, tiny_model, format_data, fmt, script):
    save_dir = tmp_path_factory.mktemp(f"{fmt}-{script}")
    options = {**MEMORISE, "model_dir": tiny_model, "train_path": format_data[fmt] / "test.txt",
               "dev_path": "", "save_dir": save_dir, "overwrite": True, "max_seq_length": 400,
               "max_steps": FORMAT_STEPS}
    if script == "train_trainer":
        load_script("train_trainer").main(as_argv(options))
    else:
        run_cmd([PYTHON, "train_deepspeed.py", *as_argv(options)])
    return save_dir / "adapter_model"


class _Memorised(dict):
    """(format, trainer) -> adapter folder, trained on first use (a -k selection trains only what it needs)."""

    def __init__(self, *args):
        super().__init__()
        self.args = args

    def __missing__(self, key):
        self[key] = memorise_format(*self.args, *key)
        return self[key]


@pytest.fixture(scope="session")
def memorised_formats(tmp_path_factory, tiny_model, format_data):
    return _Memorised(tmp_path_factory, tiny_model, format_data)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["typed", "inline"])
@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
def test_each_format_is_memorised_through_both_trainers(memorised_formats, format_data, fmt, script):
    adapter = memorised_formats[fmt, script]
    assert json.loads((adapter / "train_args.json").read_text("utf-8"))["answer_format"] == fmt
    metrics, _ = score_adapter(adapter, format_data[fmt] / "test.txt")
    gold = sum(len({(r["text"][e["entity_index"]["begin"]:e["entity_index"]["end"]], e["entity_type"])
                    for e in r["entity_list"]}) for r in format_data["ori"])
    assert metrics["tp"] + metrics["fn"] == gold  # the gold is the corpus's, counted here
    assert metrics["answer_format"] == fmt
    assert metrics["f1"] >= 0.95, metrics
    assert metrics["unparseable_lines"] == 0 and metrics["pred_not_in_text"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["typed", "inline"])
def test_each_format_reloads_in_plain_peft_and_predicts_offsets(memorised_formats, format_data, tiny_model, fmt, tmp_path):
    """The adapter is an ordinary PEFT adapter: transformers' generate on PEFT's model, read with
    the format's parser, names the corpus's entities; predict.py gives their character offsets."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dataset import encode_prompt, load_data
    from model_utils import load_tokenizer

    adapter = memorised_formats[fmt, "train_trainer"]
    tok = load_tokenizer(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    records = load_data(format_data[fmt] / "test.txt")
    right = total = 0
    for rec, ori in zip(records, format_data["ori"]):
        ids = torch.tensor([encode_prompt(tok, rec["instruct"], rec["query"])])
        with torch.no_grad():
            # An inline answer copies its sentence: up to 140 tokens of the tiny tokenizer here.
            out = model.generate(ids, max_new_tokens=160, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        gold = {(ori["text"][e["entity_index"]["begin"]:e["entity_index"]["end"]], e["entity_type"])
                for e in ori["entity_list"]}
        got = set(parse(fmt, answer, ori["text"], NAMES).entities)
        right += len(got & gold)
        total += len(gold | got)
    assert right >= 0.95 * total

    results = load_script("predict").main([f"--lora_model={adapter}", f"--input_file={format_data[fmt] / 'test.txt'}",
                                           f"--output_file={tmp_path / 'pred.jsonl'}", "--max_new_tokens=48"])
    spans = predicted = 0
    for result, ori in zip(results, format_data["ori"]):
        gold = {(e["entity_index"]["begin"], e["entity_index"]["end"], e["entity_type"]) for e in ori["entity_list"]}
        got = {(s["begin"], s["end"], s["type"]) for s in result["entities"]}
        for b, e, t in got:  # every offset points at its entity's text
            assert ori["text"][b:e] == next(s["entity"] for s in result["entities"] if (s["begin"], s["end"]) == (b, e))
        spans += len(gold & got)
        predicted += len(gold)
    assert spans >= 0.95 * predicted
