"""dataset.py: the prompt, JSONL loading, the label-masking collator and length grouping.

Expected token ids come from the tokenizer's own encoding of the pieces (prompt text written
out here by hand, answer, EOS), never from the collator itself.
"""
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from dataset import (DataError, EncodedDataset, NerCollate, build_prompt, encode_prompt,
                     length_grouped_indices, load_data)
from model_utils import load_tokenizer

INSTRUCT = ("你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，"
            "返回'实体_实体类型'，不同实体间用\\n分隔。如果没有结果，回答'没有'。")
HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n")
TAIL = "\n\n### Response: "

RECORDS = [
    {"instruct": INSTRUCT, "query": "文本：中共中央致中国致公党十一大的贺词",
     "answer": "中共中央_机构名\n中国致公党_机构名"},
    {"instruct": INSTRUCT, "query": "文本：今天天气很好。", "answer": "没有"},
    {"instruct": INSTRUCT, "query": "文本：张三在北京大学见到了来自上海的李四，两人谈了很久。",
     "answer": "张三_人名\n北京大学_机构名\n上海_地名\n李四_人名"},
]


def prompt_text(instruct, query):
    return HEAD + instruct + "\n" + query + TAIL


# =========================================================================== the prompt

def test_build_prompt_is_the_chinese_alpaca_template():
    assert build_prompt("指令", "文本：北京") == HEAD + "指令\n文本：北京" + TAIL
    assert build_prompt("你好") == HEAD + "你好" + TAIL  # free chat: the whole instruction


# =========================================================================== load_data

def write(tmp_path, text, name="data.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = json.dumps(RECORDS[0], ensure_ascii=False)


def test_load_data_reads_records_and_skips_blank_lines(tmp_path):
    extra = dict(RECORDS[1], id=7)  # extra keys are kept
    path = write(tmp_path, GOOD + "\n\n" + json.dumps(extra, ensure_ascii=False) + "\n   \n")
    assert load_data(path) == [RECORDS[0], extra]


@pytest.mark.parametrize("lines,lineno,reason", [
    ([GOOD, '{"instruct": "a", "query": "b", "answer": "c"'], 2, "JSON"),
    ([GOOD, GOOD, '{"instruct": "a", "query": "b"}'], 3, "answer"),
    (['{"instruct": "a", "query": "b", "answer": 5}'], 1, "answer"),
    (['{"instruct": "a", "query": null, "answer": "c"}'], 1, "query"),
    ([GOOD, '["a", "b"]'], 2, "object"),
])
def test_load_data_bad_line_names_path_and_line(tmp_path, lines, lineno, reason):
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_data(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{lineno}: "), msg
    assert reason in msg and "\n" not in msg


def test_load_data_non_string_value_says_string(tmp_path):
    path = write(tmp_path, '{"instruct": "a", "query": "b", "answer": ["c"]}\n')
    with pytest.raises(DataError, match="string"):
        load_data(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_load_data_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        load_data(path)
    assert str(e.value).startswith(f"{path}:1: ")
    assert load_data(path, allow_empty=True) == []


def test_load_data_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.txt")


def test_load_data_custom_columns(tmp_path):
    path = write(tmp_path, '{"q": "x", "a": "y"}\n')
    assert load_data(path, columns=("q", "a")) == [{"q": "x", "a": "y"}]
    with pytest.raises(DataError, match="'instruct'"):
        load_data(path)


# =========================================================================== the collator

@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def expected_parts(tok, rec):
    """(prompt ids, answer+EOS ids) from the tokenizer's own encoding of the pieces."""
    prompt = [tok.bos_token_id] + tok.encode(prompt_text(rec["instruct"], rec["query"]), add_special_tokens=False)
    answer = tok.encode(rec["answer"], add_special_tokens=False) + [tok.eos_token_id]
    return prompt, answer


def test_tiny_tokenizer_has_llama_special_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id is not None


def test_collate_masks_the_prompt_and_decodes_to_answer_plus_eos(tok):
    collate = NerCollate({"max_seq_length": 512}, tok)
    batch = collate.collate_fn(RECORDS)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    for row, rec in enumerate(RECORDS):
        prompt, answer = expected_parts(tok, rec)
        n = len(prompt) + len(answer)
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids[:n] == prompt + answer
        assert labels[:len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt):n] == answer
        kept = [x for x in labels if x != -100]
        assert tok.decode(kept) == rec["answer"] + tok.eos_token  # exactly answer + "</s>"
        assert kept[-1] == tok.eos_token_id == 2
    assert collate.truncated == 0


def test_prompt_part_equals_the_inference_ids(tok):
    collate = NerCollate({"max_seq_length": 512}, tok)
    batch = collate.collate_fn(RECORDS)
    for row, rec in enumerate(RECORDS):
        inference = encode_prompt(tok, rec["instruct"], rec["query"])
        assert inference[0] == tok.bos_token_id
        assert inference.count(tok.bos_token_id) == 1
        assert batch["input_ids"][row].tolist()[:len(inference)] == inference
        assert batch["labels"][row].tolist()[len(inference) - 1] == -100  # last prompt token
        assert batch["labels"][row].tolist()[len(inference)] != -100  # first answer token
        # The prompt decodes back to the template text itself.
        assert tok.decode(inference, skip_special_tokens=True) == prompt_text(rec["instruct"], rec["query"])
        ids, cut = collate.inference_ids(rec, max_new_tokens=64)
        assert ids == inference and cut is False


def test_dynamic_padding_to_the_longest_in_the_batch(tok):
    collate = NerCollate({"max_seq_length": 512}, tok)
    lengths = [sum(map(len, expected_parts(tok, r))) for r in RECORDS]
    assert len(set(lengths)) == 3 and max(lengths) < 512
    batch = collate.collate_fn(RECORDS)
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        pad = max(lengths) - n
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * pad  # right padding
        assert batch["labels"][row].tolist()[n:] == [-100] * pad
        assert batch["input_ids"][row].tolist()[n:] == [tok.pad_token_id] * pad
    # A shorter batch is padded to its own longest example, not to the first batch's.
    small = collate.collate_fn(RECORDS[1:2])
    assert small["input_ids"].shape == (1, lengths[1])
    assert small["attention_mask"].all()


def test_encoded_dataset_gives_the_same_batches(tok):
    collate = NerCollate({"max_seq_length": 512}, tok)
    ds = EncodedDataset(RECORDS, collate)
    assert len(ds) == 3
    assert ds.lengths == [sum(map(len, expected_parts(tok, r))) for r in RECORDS]
    a, b = collate.collate_fn([ds[0], ds[2]]), collate.collate_fn([RECORDS[0], RECORDS[2]])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_collate_reads_custom_columns_from_a_config_object(tok):
    from config_utils import Config

    args = Config({"max_seq_length": 512, "instruct_column": "i", "query_column": "q", "response_column": "r"})
    rec = {"i": INSTRUCT, "q": RECORDS[0]["query"], "r": RECORDS[0]["answer"]}
    batch = NerCollate(args, tok).collate_fn([rec])
    prompt, answer = expected_parts(tok, RECORDS[0])
    assert batch["input_ids"][0].tolist() == prompt + answer


LONG_QUERY = "文本：" + "新华社北京三月五日电，国务院总理在人民大会堂会见了来自上海和广州的代表团，双方进行了友好交谈。" * 4


def test_truncation_shortens_only_the_query(tok):
    long_rec = {"instruct": INSTRUCT, "query": LONG_QUERY, "answer": "新华社_机构名\n北京_地名\n人民大会堂_地名"}
    head_len = len(expected_parts(tok, {**long_rec, "query": "文本："})[0])
    _, answer = expected_parts(tok, long_rec)
    full_prompt, _ = expected_parts(tok, long_rec)
    max_len = head_len + len(answer) + 25  # room for about 25 tokens of query text
    assert len(full_prompt) + len(answer) > max_len + 50  # the query really must be cut

    collate = NerCollate({"max_seq_length": max_len}, tok)
    batch = collate.collate_fn([long_rec, RECORDS[1], dict(long_rec, answer="没有")])
    assert collate.truncated == 2  # the two long ones, not the short one
    assert batch["input_ids"].shape[1] <= max_len

    ids = batch["input_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    kept = [x for x in labels if x != -100]
    assert kept == answer  # the answer and EOS survive intact
    assert tok.decode(kept) == long_rec["answer"] + "</s>"
    prompt = ids[:labels.index(kept[0])]
    assert len(prompt) + len(answer) <= max_len
    # The kept prompt is exactly the prompt of a shorter query prefix ...
    k = next(k for k in range(len(LONG_QUERY), -1, -1)
             if encode_prompt(tok, INSTRUCT, LONG_QUERY[:k]) == prompt)
    assert 3 < k < len(LONG_QUERY)
    # ... the longest one that fits.
    assert len(encode_prompt(tok, INSTRUCT, LONG_QUERY[:k + 1])) + len(answer) > max_len
    text = tok.decode(prompt, skip_special_tokens=True)
    assert text == prompt_text(INSTRUCT, LONG_QUERY[:k])
    assert text.startswith(HEAD + INSTRUCT + "\n文本：") and text.endswith("### Response: ")
    # The short example in the same batch is untouched.
    short_prompt, short_answer = expected_parts(tok, RECORDS[1])
    n = len(short_prompt) + len(short_answer)
    assert batch["input_ids"][1].tolist()[:n] == short_prompt + short_answer


def test_inference_ids_shorten_like_training(tok):
    long_rec = {"instruct": INSTRUCT, "query": LONG_QUERY, "answer": "x"}
    max_len = len(encode_prompt(tok, INSTRUCT, "文本：")) + 64 + 20
    collate = NerCollate({"max_seq_length": max_len}, tok)
    ids, cut = collate.inference_ids(long_rec, max_new_tokens=64)
    assert cut is True and len(ids) <= max_len - 64
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).endswith("### Response: ")


def test_too_small_max_seq_length_is_a_clear_error(tok):
    head_len = len(expected_parts(tok, {**RECORDS[0], "query": ""})[0])
    collate = NerCollate({"max_seq_length": head_len - 10}, tok)
    with pytest.raises(ValueError, match="max_seq_length"):
        collate.collate_fn([RECORDS[0]])


def test_encoded_dataset_leaves_out_examples_whose_answer_cannot_fit(tok):
    head_len = len(expected_parts(tok, {**RECORDS[0], "query": ""})[0])
    long_answer = "\n".join(f"实体{i}_人名" for i in range(40))
    collate = NerCollate({"max_seq_length": head_len + 20}, tok)
    data = EncodedDataset([RECORDS[0], {**RECORDS[0], "answer": long_answer}, RECORDS[0]], collate)
    assert len(data) == 2 and data.skipped == 1
    assert all(len(f["input_ids"]) <= head_len + 20 for f in data.features)


def test_collate_needs_bos_and_eos(tok):
    class NoBos:
        bos_token_id, eos_token_id, pad_token_id = None, 2, 0

    with pytest.raises(ValueError, match="BOS"):
        NerCollate({}, NoBos())


# =========================================================================== length grouping

def waste(order, lengths, batch_size):
    """Padded positions / all positions when consecutive runs of `order` form the batches."""
    total = real = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        total += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / total


@pytest.fixture(scope="module")
def msra_lengths(msra_dir):
    """MSRA-like example lengths: a fixed prompt head plus query and answer characters."""
    with open(msra_dir["dir"] / "instruct_data" / "train.txt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    return [80 + len(r["query"]) + len(r["answer"]) for r in recs]


def test_length_grouped_indices_is_a_seeded_permutation():
    lengths = [random.Random(1).randint(5, 300) for _ in range(1003)]
    a = length_grouped_indices(lengths, 8, seed=0)
    assert sorted(a) == list(range(1003))
    assert length_grouped_indices(lengths, 8, seed=0) == a
    assert length_grouped_indices(lengths, 8, seed=1) != a
    assert length_grouped_indices(lengths, 8, seed=1, mega_factor=1) != a


def test_length_grouping_wastes_little_padding(msra_lengths):
    lengths, bs = msra_lengths, 12
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    random_waste = waste(shuffled, lengths, bs)
    grouped = length_grouped_indices(lengths, bs, seed=0)
    assert sorted(grouped) == list(range(len(lengths)))
    grouped_waste = waste(grouped, lengths, bs)
    assert random_waste > 0.2  # random batches of 12 on MSRA-like lengths: ~29% padding
    assert grouped_waste < 0.03 and grouped_waste < random_waste / 10
    # Still a shuffled stream: the batches' longest lengths are not in sorted order, and the
    # first batches are not the globally longest (or shortest) examples.
    maxima = [max(lengths[j] for j in grouped[i:i + bs]) for i in range(0, len(grouped), bs)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    assert len({m // 20 for m in maxima[:50]}) > 3


# =========================================================================== real tokenizer

def reference_dir():
    for d in (Path("/work/shared/reference"), ROOT.parent / "shared" / "reference"):
        if (d / "llama_tokenizer.model").is_file() and (d / "chinese_sp.model").is_file():
            return d
    return None


@pytest.fixture(scope="module")
def chinese_llama_tokenizer(tmp_path_factory):
    ref = reference_dir()
    if ref is None:
        pytest.skip("../shared/reference (the real LLaMA and Chinese SentencePiece models) is absent")
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from transformers import LlamaTokenizer

    llama = sp_pb2.ModelProto()
    llama.ParseFromString((ref / "llama_tokenizer.model").read_bytes())
    chinese = sp_pb2.ModelProto()
    chinese.ParseFromString((ref / "chinese_sp.model").read_bytes())
    have = {p.piece for p in llama.pieces}
    for p in chinese.pieces:
        if p.piece not in have:
            new = sp_pb2.ModelProto().SentencePiece()
            new.piece, new.score = p.piece, 0
            llama.pieces.append(new)
            have.add(p.piece)
    out = tmp_path_factory.mktemp("chinese-llama-tokenizer")
    (out / "tokenizer.model").write_bytes(llama.SerializeToString())
    return LlamaTokenizer.from_pretrained(str(out), legacy=True)


def test_prompt_identity_with_the_real_chinese_llama_tokenizer(chinese_llama_tokenizer):
    tok = chinese_llama_tokenizer
    assert len(tok) == 49953  # the reference README's size of the merged vocabulary
    collate = NerCollate({"max_seq_length": 512}, tok)  # no pad token: pads with id 0
    batch = collate.collate_fn(RECORDS)
    for row, rec in enumerate(RECORDS):
        inference = encode_prompt(tok, rec["instruct"], rec["query"])
        assert inference[0] == tok.bos_token_id == 1
        prompt, answer = expected_parts(tok, rec)
        assert inference == prompt
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert ids[:len(inference)] == inference
        assert labels[:len(inference)] == [-100] * len(inference)
        kept = [x for x in labels if x != -100]
        assert kept == answer
        assert tok.decode(kept) == rec["answer"] + "</s>"
