"""Tests for metrics.py against small cases whose numbers were counted by hand.

Every expected value below is written as the fraction worked out in the comment next to it,
never computed by calling the code under test.
"""
import json

import pytest
from pytest import approx

from answer_format import ParsedAnswer, format_answer, parse_answer
from metrics import classify_mentions, format_table, mention_spans, score, score_mentions


# --------------------------------------------------------------------------- parse_answer

def test_parse_basic_answer():
    got = parse_answer("郑振铎_人名\n阿英_人名\n国民党_机构名")
    assert got == ParsedAnswer(entities=[("郑振铎", "PER"), ("阿英", "PER"), ("国民党", "ORG")], bad_lines=[])


def test_parse_accepts_type_codes():
    assert parse_answer("北京_LOC\n张三_PER").entities == [("北京", "LOC"), ("张三", "PER")]


def test_parse_strips_spaces_and_skips_blank_lines():
    got = parse_answer("  郑振铎 _ 人名  \n\n   \n\t北京_地名 \r\n")
    assert got.entities == [("郑振铎", "PER"), ("北京", "LOC")]
    assert got.bad_lines == []


def test_parse_reads_special_token_text_as_text():
    # Generation stops at the EOS id, so "</s>" in decoded text is a sentence's characters: an
    # entity like any other (a sentence may hold it), never the end of the answer.
    got = parse_answer("张三_人名\n</s>_机构名\n北京</s>李四_人名\n乱码")
    assert got.entities == [("张三", "PER"), ("</s>", "ORG"), ("北京</s>李四", "PER")]
    assert got.bad_lines == ["乱码"]


@pytest.mark.parametrize("line_break", ["\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_parse_splits_lines_only_where_the_answer_format_does(line_break):
    # str.splitlines would cut at each of these; an answer line ends at "\n" only, as the
    # grammar of grounded decoding has it, so an entity holding one stays one line.
    entity = f"北{line_break}京"
    got = parse_answer(f"{entity}_地名\n张三_人名")
    assert got.entities == [(entity, "LOC"), ("张三", "PER")]
    assert got.bad_lines == []


@pytest.mark.parametrize("text", ["没有", " 没有 \n", "\n没有\n\n", ""])
def test_parse_no_entity_is_not_a_bad_line(text):
    assert parse_answer(text) == ParsedAnswer(entities=[], bad_lines=[])


def test_parse_none_is_empty():
    assert parse_answer(None) == ParsedAnswer(entities=[], bad_lines=[])


def test_parse_splits_on_last_underscore():
    assert parse_answer("A_B_地名").entities == [("A_B", "LOC")]


def test_parse_bad_lines_are_kept():
    text = "张三_时间\n张三人名\n_人名\n李四_\n王五_人名"
    got = parse_answer(text)
    # unknown type, no "_", empty entity, empty type: 4 bad lines; only 王五 parses.
    assert got.entities == [("王五", "PER")]
    assert got.bad_lines == ["张三_时间", "张三人名", "_人名", "李四_"]


def test_parse_removes_duplicates_keeping_first_order():
    got = parse_answer("张三_人名\n北京_地名\n张三_人名\n 张三 _人名\n北京_机构名")
    # Same string with another type is a different entity, so 北京/ORG stays.
    assert got.entities == [("张三", "PER"), ("北京", "LOC"), ("北京", "ORG")]


def test_parse_custom_label_names():
    names = {"PER": "人物", "LOC": "地点"}
    got = parse_answer("张三_人物\n北京_地点\n国民党_机构名\n李四_PER", label_names=names)
    assert got.entities == [("张三", "PER"), ("北京", "LOC"), ("李四", "PER")]
    assert got.bad_lines == ["国民党_机构名"]


@pytest.mark.parametrize("ents", [
    [("郑振铎", "PER"), ("国民党", "ORG"), ("郑振铎", "PER"), ("A_B", "LOC"), ("北京", "LOC")],
    [],
])
def test_round_trip_with_format_answer(ents):
    deduped = []
    for e in ents:
        if e not in deduped:
            deduped.append(e)
    assert parse_answer(format_answer(ents)) == ParsedAnswer(entities=deduped, bad_lines=[])


# --------------------------------------------------------------------------- score

def test_perfect_predictions():
    examples = [
        {"text": "张三在北京", "gold": [("张三", "PER"), ("北京", "LOC")], "pred": [("北京", "LOC"), ("张三", "PER")]},
        {"text": "新华社报道", "gold": [("新华社", "ORG")], "pred": [["新华社", "ORG"]]},
        {"text": "天气很好", "gold": [], "pred": []},
    ]
    m = score(examples)
    # tp = 3, fp = 0, fn = 0 -> P = 3/3, R = 3/3, F1 = 1; each type 1/1.
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 0)
    assert m["precision"] == approx(1.0) and m["recall"] == approx(1.0) and m["f1"] == approx(1.0)
    for t in ("PER", "LOC", "ORG"):
        assert m["per_type"][t]["f1"] == approx(1.0)
        assert m["per_type"][t]["support"] == 1
    assert m["macro_f1"] == approx(1.0)          # (1 + 1 + 1) / 3
    assert m["exact_match"] == approx(1.0)       # 3/3 sentences
    assert m["no_entity_sentences"] == 1
    assert m["no_entity_accuracy"] == approx(1.0)  # 1/1
    assert m["pred_not_in_text"] == 0
    assert m["unparseable_lines"] == 0
    assert m["num_examples"] == 3


def test_empty_predictions():
    examples = [
        {"text": "张三在北京", "gold": [("张三", "PER"), ("北京", "LOC")], "pred": []},
        {"text": "新华社报道", "gold": [("新华社", "ORG")], "pred": []},
    ]
    m = score(examples)
    # tp = 0, fp = 0, fn = 3: P = 0/0 -> 0, R = 0/3 = 0, F1 = 0.
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 3)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["macro_f1"] == 0.0
    assert m["exact_match"] == 0.0               # 0/2
    assert m["no_entity_sentences"] == 0
    assert m["no_entity_accuracy"] == 0.0        # no such sentences -> 0.0
    assert m["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1,
                                    "tp": 0, "fp": 0, "fn": 1}


def test_no_examples_does_not_crash():
    m = score([])
    assert m["num_examples"] == 0
    assert m["f1"] == 0.0 and m["exact_match"] == 0.0 and m["macro_f1"] == 0.0
    assert set(m["per_type"]) == {"PER", "LOC", "ORG"}


def test_right_spans_wrong_types():
    examples = [{"text": "张三在北京", "gold": [("张三", "PER"), ("北京", "LOC")],
                 "pred": [("张三", "LOC"), ("北京", "PER")]}]
    m = score(examples)
    # No (entity, type) pair matches: tp = 0, fp = 2, fn = 2 -> P = 0/2, R = 0/2, F1 = 0.
    assert (m["tp"], m["fp"], m["fn"]) == (0, 2, 2)
    assert m["f1"] == 0.0
    # PER: fp = 1 (北京/PER), fn = 1 (张三/PER); LOC the mirror image.
    assert (m["per_type"]["PER"]["tp"], m["per_type"]["PER"]["fp"], m["per_type"]["PER"]["fn"]) == (0, 1, 1)
    assert (m["per_type"]["LOC"]["tp"], m["per_type"]["LOC"]["fp"], m["per_type"]["LOC"]["fn"]) == (0, 1, 1)
    assert m["pred_not_in_text"] == 0
    assert m["exact_match"] == 0.0


def test_duplicates_counted_once():
    examples = [{"text": "A和B", "gold": [("A", "PER"), ("A", "PER"), ("B", "LOC")],
                 "pred": [["A", "PER"], ["A", "PER"], ["C", "ORG"], ["C", "ORG"]]}]
    m = score(examples)
    # gold set {A/PER, B/LOC}, pred set {A/PER, C/ORG}: tp = 1, fp = 1, fn = 1.
    # P = 1/2, R = 1/2, F1 = 2 * 1/4 / 1 = 1/2.
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["precision"] == approx(1 / 2) and m["recall"] == approx(1 / 2) and m["f1"] == approx(1 / 2)
    assert m["per_type"]["PER"]["support"] == 1   # A/PER twice in gold is one entity
    assert m["pred_not_in_text"] == 1             # C, counted once after dedup


def test_same_entity_in_two_sentences_counts_twice():
    # Triples carry the sentence index, so one string in two sentences is two entities.
    examples = [{"text": "张三来了", "gold": [("张三", "PER")], "pred": [("张三", "PER")]},
                {"text": "张三走了", "gold": [("张三", "PER")], "pred": []}]
    m = score(examples)
    # tp = 1, fn = 1 -> P = 1/1, R = 1/2, F1 = 2 * (1 * 1/2) / (3/2) = 2/3.
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["f1"] == approx(2 / 3)
    assert m["exact_match"] == approx(1 / 2)


MIXED = [
    # tp 张三/PER; fp 北京/LOC; fn 北京大学/ORG
    {"text": "张三在北京大学工作", "gold": [("张三", "PER"), ("北京大学", "ORG")],
     "pred": [("张三", "PER"), ("北京", "LOC")]},
    # tp 李四/PER, 上海/LOC; fp 王五/PER (not in the text)
    {"text": "李四去上海", "gold": [("李四", "PER"), ("上海", "LOC")],
     "pred": [("李四", "PER"), ("上海", "LOC"), ("王五", "PER")]},
    # no entities, none predicted
    {"text": "今天天气很好", "gold": [], "pred": []},
    # no entities, fp 明天/LOC; two answer lines could not be parsed
    {"text": "明天下雨", "gold": [], "pred": [("明天", "LOC")], "bad_lines": 2},
]


def test_mixed_micro():
    m = score(MIXED)
    # tp = 3 (张三, 李四, 上海), fp = 3 (北京, 王五, 明天), fn = 1 (北京大学)
    # P = 3/6 = 1/2, R = 3/4, F1 = 2 * (1/2 * 3/4) / (1/2 + 3/4) = (3/4) / (5/4) = 3/5
    assert (m["tp"], m["fp"], m["fn"]) == (3, 3, 1)
    assert m["precision"] == approx(1 / 2)
    assert m["recall"] == approx(3 / 4)
    assert m["f1"] == approx(3 / 5)
    assert m["num_examples"] == 4


def test_mixed_per_type_and_macro():
    m = score(MIXED)
    per = m["per_type"]
    # PER: tp 2 (张三, 李四), fp 1 (王五), fn 0, support 2 -> P = 2/3, R = 2/2, F1 = (4/3)/(5/3) = 4/5
    assert (per["PER"]["tp"], per["PER"]["fp"], per["PER"]["fn"], per["PER"]["support"]) == (2, 1, 0, 2)
    assert per["PER"]["precision"] == approx(2 / 3)
    assert per["PER"]["recall"] == approx(1.0)
    assert per["PER"]["f1"] == approx(4 / 5)
    # LOC: tp 1 (上海), fp 2 (北京, 明天), fn 0, support 1 -> P = 1/3, R = 1/1, F1 = (2/3)/(4/3) = 1/2
    assert (per["LOC"]["tp"], per["LOC"]["fp"], per["LOC"]["fn"], per["LOC"]["support"]) == (1, 2, 0, 1)
    assert per["LOC"]["precision"] == approx(1 / 3)
    assert per["LOC"]["f1"] == approx(1 / 2)
    # ORG: tp 0, fp 0, fn 1 (北京大学), support 1 -> P = 0, R = 0/1, F1 = 0
    assert (per["ORG"]["tp"], per["ORG"]["fp"], per["ORG"]["fn"], per["ORG"]["support"]) == (0, 0, 1, 1)
    assert per["ORG"]["f1"] == 0.0
    # macro = (4/5 + 1/2 + 0) / 3 = (13/10) / 3 = 13/30
    assert m["macro_f1"] == approx(13 / 30)
    assert list(per) == ["PER", "LOC", "ORG"]


def test_mixed_sentence_level_and_counts():
    m = score(MIXED)
    assert m["exact_match"] == approx(1 / 4)          # only 今天天气很好 matches exactly
    assert m["no_entity_sentences"] == 2              # 今天天气很好, 明天下雨
    assert m["no_entity_accuracy"] == approx(1 / 2)   # 1 of those 2 has an empty prediction
    assert m["unparseable_lines"] == 2                # 0 + 0 + 0 (default) + 2
    assert m["pred_not_in_text"] == 1                 # 王五; 北京 is inside 北京大学, 明天 in 明天下雨


def test_unknown_predicted_type_reported_but_not_in_macro():
    examples = [{"text": "张三明天来", "gold": [("张三", "PER")], "pred": [("张三", "PER"), ("明天", "TIME")]}]
    m = score(examples)
    # tp 1, fp 1 (明天/TIME), fn 0 -> P = 1/2, R = 1/1, F1 = 1 / (3/2) = 2/3
    assert m["f1"] == approx(2 / 3)
    assert list(m["per_type"]) == ["PER", "LOC", "ORG", "TIME"]
    assert (m["per_type"]["TIME"]["fp"], m["per_type"]["TIME"]["support"]) == (1, 0)
    # macro only over PER, LOC, ORG: (1 + 0 + 0) / 3 = 1/3. A label type absent from both
    # gold and pred has F1 0 and still counts in the mean.
    assert m["macro_f1"] == approx(1 / 3)


def test_custom_label_names_in_score():
    names = {"PER": "人名", "LOC": "地名"}
    examples = [{"text": "张三在北京", "gold": [("张三", "PER"), ("北京", "LOC")], "pred": [("张三", "PER")]}]
    m = score(examples, label_names=names)
    # PER F1 = 1, LOC: tp 0, fn 1 -> F1 0; macro over 2 types = (1 + 0) / 2 = 1/2
    assert list(m["per_type"]) == ["PER", "LOC"]
    assert m["macro_f1"] == approx(1 / 2)


def test_score_is_json_serialisable_and_parse_feeds_it():
    answer = "张三_人名\n北京_地名\n胡言乱语\n"
    parsed = parse_answer(answer)
    examples = [{"text": "张三在北京", "gold": [("张三", "PER"), ("北京", "LOC")],
                 "pred": parsed.entities, "bad_lines": len(parsed.bad_lines)}]
    m = score(examples)
    assert m["f1"] == approx(1.0)
    assert m["unparseable_lines"] == 1
    assert json.loads(json.dumps(m, ensure_ascii=False)) == m


def test_format_table_mentions_every_row():
    out = format_table(score(MIXED))
    lines = out.splitlines()
    for row in ("PER", "LOC", "ORG", "micro", "macro"):
        assert any(line.startswith(row) for line in lines), row
    assert "0.6000" in out      # micro F1 = 3/5
    assert "0.4333" in out      # macro F1 = 13/30
    assert "unparseable" in out and "not in text" in out and "exact match" in out


# --------------------------------------------------------------------------- mention level

# 张三在北京开会，北京很冷，李四也在。
# 0 1 2 3 4 5 6 7 8 9 ...: 张0 三1 在2 北3 京4 开5 会6 ，7 北8 京9 很10 冷11 ，12 李13 四14 也15 在16 。17
TWICE = "张三在北京开会，北京很冷，李四也在。"
# Gold: 张三 PER (0,2), the first 北京 LOC (3,5) only (the second is not annotated), 李四 PER (13,15).
TWICE_GOLD = [(0, 2, "PER"), (3, 5, "LOC"), (13, 15, "PER")]


def test_mention_spans_are_every_occurrence():
    assert mention_spans(TWICE, [("北京", "LOC"), ("上海", "LOC")]) == [(3, 5, "LOC"), (8, 10, "LOC")]


def test_string_twice_annotated_once_counts_once_right_once_wrong():
    # Predicted 北京 LOC and 张三 PER: spans (3,5) LOC correct, (8,10) LOC spurious, (0,2) PER correct;
    # 李四 missed. TP 2, FP 1, FN 1: P = 2/3, R = 2/3.
    m = score_mentions([{"text": TWICE, "gold_spans": TWICE_GOLD, "pred": [("北京", "LOC"), ("张三", "PER")]}])
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == approx(2 / 3) and m["recall"] == approx(2 / 3) and m["f1"] == approx(2 / 3)
    assert m["per_type"]["LOC"]["support"] == 1 and m["per_type"]["PER"]["support"] == 2
    assert m["errors"] == {"correct": 2, "wrong_type": 0, "wrong_boundary": 0, "wrong_type_boundary": 0,
                           "spurious": 1, "hallucinated": 0, "missed": 1}
    # At set level the same answer is perfect on 北京 (one distinct pair): the levels differ.
    s = score([{"text": TWICE, "gold": [("张三", "PER"), ("北京", "LOC"), ("李四", "PER")],
                "pred": [("北京", "LOC"), ("张三", "PER")]}])
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 1)


def test_every_error_class_by_hand():
    # 北京 ORG: same span as gold LOC -> wrong_type. 张 PER: inside gold 张三 PER -> wrong_boundary.
    # 李四也 LOC: overlaps only gold 李四 PER -> wrong_type_boundary. 冷 LOC: overlaps nothing -> spurious.
    # 上海 LOC: not in the text -> hallucinated. No gold span is left untouched: missed 0.
    pred = [("北京", "ORG"), ("张", "PER"), ("李四也", "LOC"), ("冷", "LOC"), ("上海", "LOC")]
    p, g, h = classify_mentions(TWICE, TWICE_GOLD, pred)
    assert sorted(p) == [(0, 1, "PER", "wrong_boundary"), (3, 5, "ORG", "wrong_type"), (8, 10, "ORG", "spurious"),
                         (11, 12, "LOC", "spurious"), (13, 16, "LOC", "wrong_type_boundary")]
    assert h == [("上海", "LOC")]
    assert [c for *_, c in g] == ["overlapped", "overlapped", "overlapped"]
    m = score_mentions([{"text": TWICE, "gold_spans": TWICE_GOLD, "pred": pred}])
    assert m["errors"] == {"correct": 0, "wrong_type": 1, "wrong_boundary": 1, "wrong_type_boundary": 1,
                           "spurious": 2, "hallucinated": 1, "missed": 0}
    assert m["errors_per_type"]["ORG"]["wrong_type"] == 1 and m["errors_per_type"]["LOC"]["spurious"] == 1
    # 5 spans + 1 hallucinated string predicted, none right; 3 gold spans, none found exactly.
    assert (m["tp"], m["fp"], m["fn"]) == (0, 6, 3)
    # Same-span confusion: gold LOC at (3,5) predicted ORG; gold PER (0,2) and (13,15) have no
    # prediction on their exact span; (0,1), (8,10), (11,12), (13,16) have no gold span.
    c = m["confusion"]
    assert c["LOC"]["ORG"] == 1 and c["PER"]["(none)"] == 2 and c["LOC"]["(none)"] == 0
    assert c["(none)"] == {"PER": 1, "LOC": 2, "ORG": 1, "(none)": 0}


def test_format_table_prints_both_levels():
    ex = [{"text": TWICE, "gold": [("张三", "PER")], "pred": [("张三", "PER")], "gold_spans": [(0, 2, "PER")]}]
    metrics = score(ex)
    metrics["mention"] = score_mentions(ex)
    out = format_table(metrics)
    assert out.splitlines()[0].startswith("set") and any(line.startswith("mention") for line in out.splitlines())
    assert "mention errors: correct 1," in out


def test_bootstrap_interval_of_micro_f1():
    from metrics import bootstrap_f1

    # Every sentence alike (1 hit, 1 spurious): every resample has F1 2/3 exactly (hand count).
    same = [{"gold": [("北京", "LOC")], "pred": [("北京", "LOC"), ("上海", "LOC")]}] * 50
    assert bootstrap_f1(same) == [pytest.approx(2 / 3), pytest.approx(2 / 3)]
    # Half right, half wrong: micro F1 of the whole sample is 0.5 (10 tp, 10 fp, 10 fn); the
    # interval brackets it and narrows as the sample grows (about 1/sqrt(n): half at 4x).
    mixed = ([{"gold": [("李鑫", "PER")], "pred": [("李鑫", "PER")]}] * 10
             + [{"gold": [("李鑫", "PER")], "pred": [("李", "PER")]}] * 10)
    low, high = bootstrap_f1(mixed, seed=1)
    assert low < 0.5 < high
    low4, high4 = bootstrap_f1(mixed * 4, seed=1)
    assert low4 < 0.5 < high4 and 0.35 < (high4 - low4) / (high - low) < 0.65
