"""report.html in a real headless browser, and test.py's mention-level scores against ori_data."""
import json
import re
import shutil
import subprocess
from collections import Counter


from conftest import load_script
from metrics import ERROR_CLASSES, score, score_mentions
from report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, offline: no sandbox, no background connections (they would be refused here).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

TEXT = "张三在北京开会，北京很冷，李四也在。"
GOLD = [(0, 2, "PER"), (3, 5, "LOC"), (13, 15, "PER")]
EXAMPLES = [
    # correct 张三, correct 北京 (3,5), spurious 北京 (8,10), missed 李四.
    {"text": TEXT, "gold_spans": GOLD, "pred": [("张三", "PER"), ("北京", "LOC")]},
    # 北京 ORG: wrong_type at (3,5) and spurious at (8,10); 张: wrong_boundary; 李四也: wrong_type_boundary;
    # 上海: hallucinated.
    {"text": TEXT, "gold_spans": GOLD, "pred": [("北京", "ORG"), ("张", "PER"), ("李四也", "LOC"), ("上海", "LOC")]},
    # nothing predicted, nothing there.
    {"text": "今天天气很好。", "gold_spans": [], "pred": []},
]


def chromium(tmp_path, *args, timeout=120):
    assert CHROMIUM, "headless Chromium is needed: `make test` installs Debian's chromium package"
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def report_for(examples, tmp_path):
    for ex in examples:
        ex["gold"] = sorted({(ex["text"][b:e], t) for b, e, t in ex["gold_spans"]})
    metrics = score(examples)
    metrics.update(test_path="hand-made", lora_model="none")
    metrics["mention"] = score_mentions(examples)
    return metrics, write_report(tmp_path / "report.html", metrics, examples)


def test_report_opens_offline_and_shows_every_mention(tmp_path):
    metrics, page = report_for(EXAMPLES, tmp_path)
    source = page.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=|https?://|@import|url\(", source)  # nothing to fetch
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    shown = Counter(re.findall(r'class="chip m (\w+)"', dom))
    # The chips the browser rendered are the error classes metrics.json counts, one per mention.
    assert {c: shown.get(c, 0) for c in ERROR_CLASSES} == metrics["mention"]["errors"]
    # Hand count from the comments above: every class appears.
    assert metrics["mention"]["errors"] == {"correct": 2, "wrong_type": 1, "wrong_boundary": 1,
                                            "wrong_type_boundary": 1, "spurious": 2, "hallucinated": 1, "missed": 1}
    # Errors first: the error-free sentence is rendered last.
    listing = dom.split('id="list">')[1].split("<script")[0]
    assert listing.index("今天天气很好") > listing.rindex("李四也") > 0

    shot = tmp_path / "report.png"
    chromium(tmp_path, "--window-size=1200,1400", "--virtual-time-budget=5000", f"--screenshot={shot}", page.as_uri())
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a rendered page, not a blank image


def test_report_for_a_whole_test_set_stays_small(tmp_path, msra_dir):
    lines = (msra_dir["dir"] / "ori_data" / "test.txt").read_text(encoding="utf-8").splitlines()
    examples = []
    for line in lines:
        rec = json.loads(line)
        spans = [(e["entity_index"]["begin"], e["entity_index"]["end"], e["entity_type"]) for e in rec["entity_list"]]
        # A model that finds every entity's string but calls every place an organisation.
        pred = sorted({(rec["text"][b:e], "ORG" if t == "LOC" else t) for b, e, t in spans})
        examples.append({"text": rec["text"], "gold_spans": spans, "pred": pred})
    assert len(examples) == 4631
    metrics, page = report_for(examples, tmp_path)
    assert page.stat().st_size < 3_000_000
    dom = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", page.as_uri(), timeout=300)
    assert dom.count('class="s"') == 4631
    assert dom.count('class="chip m wrong_type"') == metrics["mention"]["errors"]["wrong_type"] > 2000


def test_test_py_scores_mentions_from_ori_data(memorised_trainer, msra_dir, tmp_path):
    data = msra_dir["dir"]
    out = tmp_path / "eval"
    metrics = load_script("test").main([f"--lora_model={memorised_trainer / 'adapter_model'}",
                                        f"--test_path={data / 'instruct_data' / 'test.txt'}", "--limit=20",
                                        "--max_new_tokens=24", f"--output_dir={out}"])
    ori = [json.loads(line) for line in (data / "ori_data" / "test.txt").read_text(encoding="utf-8").splitlines()[:20]]
    support = Counter(e["entity_type"] for rec in ori for e in rec["entity_list"])
    mention = metrics["mention"]
    assert mention["gold_spans"] == "annotated spans (ori_data)"
    assert {t: m["support"] for t, m in mention["per_type"].items()} == {t: support.get(t, 0) for t in ("PER", "LOC", "ORG")}
    # metrics.json against counts made here from the two files test.py read and wrote: the
    # set level from distinct (entity, type) pairs, the mention level's correct ones from the
    # annotated spans whose string the model answered with that type.
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    tp = fp = fn = correct = 0
    for rec, row in zip(ori, rows, strict=True):
        gold = {(e["entity"], e["entity_type"]) for e in rec["entity_list"]}
        pred = {tuple(e) for e in row["entities"]}
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
        correct += sum((rec["text"][e["entity_index"]["begin"]:e["entity_index"]["end"]], e["entity_type"]) in pred
                       for e in rec["entity_list"])
    assert saved["level"] == "set" and (saved["tp"], saved["fp"], saved["fn"]) == (tp, fp, fn)
    assert saved["mention"]["errors"]["correct"] == saved["mention"]["tp"] == correct
    assert {t: m["support"] for t, m in saved["mention"]["per_type"].items()} == \
        {t: support.get(t, 0) for t in ("PER", "LOC", "ORG")}
    assert (out / "report.html").stat().st_size > 1000
