"""Entity-level NER metrics for generated answers.

The model answers with `实体_类型` lines (or `没有`), so scoring is done on sets of
(entity text, type code) pairs per sentence rather than on token tags: a prediction counts
only when both the string and the type match a gold entity of the same sentence.

`parse_answer` turns generated text back into pairs and keeps the lines it could not read
(`bad_lines`), so a model that drifts from the answer format shows up in the numbers instead
of silently losing recall. `score` computes micro/per-type/macro P/R/F1 plus a few counts
that explain the errors; `format_table` prints them.
"""
from dataclasses import dataclass, field

from dataset import DEFAULT_LABEL_NAMES, NO_ENTITY

# Text an untrimmed generation may still carry after the answer; everything from it on is
# dropped, since what follows the end-of-sequence marker is not part of the answer.
EOS_TEXTS = ("</s>",)


@dataclass
class ParsedAnswer:
    entities: list[tuple[str, str]] = field(default_factory=list)  # (entity_text, type_code), no duplicates
    bad_lines: list[str] = field(default_factory=list)  # non-blank lines that are not `实体_类型`


def _type_lookup(label_names):
    """Chinese name or code -> code. Codes are accepted too, since both forms are unambiguous."""
    lookup = {code: code for code in label_names}
    lookup.update({name: code for code, name in label_names.items()})
    return lookup


def parse_answer(text, label_names=None):
    """Generated answer text -> ParsedAnswer.

    Each line is split on its LAST "_" so entities that contain "_" survive; a line that is
    exactly NO_ENTITY means "no entity here" and is not an error.
    """
    label_names = DEFAULT_LABEL_NAMES if label_names is None else label_names
    lookup = _type_lookup(label_names)
    text = text or ""
    for eos in EOS_TEXTS:
        cut = text.find(eos)
        if cut != -1:
            text = text[:cut]
    entities, bad_lines, seen = [], [], set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line == NO_ENTITY:
            continue
        entity, sep, type_name = line.rpartition("_")
        entity, type_name = entity.strip(), type_name.strip()
        if not sep or not entity or type_name not in lookup:
            bad_lines.append(line)
            continue
        pair = (entity, lookup[type_name])
        if pair not in seen:
            seen.add(pair)
            entities.append(pair)
    return ParsedAnswer(entities=entities, bad_lines=bad_lines)


def _prf(tp, fp, fn):
    # Each ratio is 0.0 when its denominator is 0: an empty prediction set gets P=0, not a crash.
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _as_set(pairs):
    # Pairs may come back from JSON as lists; tuples make them hashable, the set removes duplicates.
    return {(str(e), str(t)) for e, t in pairs}


def score(examples, label_names=None):
    """Micro, per-type and macro entity P/R/F1 plus diagnostics over a list of examples.

    Each example: {"text": sentence, "gold": [(entity, type), ...], "pred": [...],
    optional "bad_lines": int}. Returns a JSON-serialisable dict.
    """
    label_names = DEFAULT_LABEL_NAMES if label_names is None else label_names
    counts = {code: {"tp": 0, "fp": 0, "fn": 0, "support": 0} for code in label_names}
    tp = fp = fn = 0
    exact = no_entity = no_entity_ok = bad = not_in_text = n = 0

    def bucket(etype):
        return counts.setdefault(etype, {"tp": 0, "fp": 0, "fn": 0, "support": 0})

    for ex in examples:
        n += 1
        gold, pred = _as_set(ex.get("gold", ())), _as_set(ex.get("pred", ()))
        text = ex.get("text", "") or ""
        bad += int(ex.get("bad_lines", 0) or 0)
        hits = gold & pred
        tp += len(hits)
        fp += len(pred - gold)
        fn += len(gold - pred)
        for _, t in hits:
            bucket(t)["tp"] += 1
        for _, t in pred - gold:
            bucket(t)["fp"] += 1
        for _, t in gold - pred:
            bucket(t)["fn"] += 1
        for _, t in gold:
            bucket(t)["support"] += 1
        exact += gold == pred
        if not gold:
            no_entity += 1
            no_entity_ok += not pred
        # A predicted string absent from the input is a hallucination, not just a boundary error.
        not_in_text += sum(1 for e, _ in pred if e not in text)

    precision, recall, f1 = _prf(tp, fp, fn)
    # Label-set types first in their configured order, then any stray types the model invented.
    order = list(label_names) + sorted(t for t in counts if t not in label_names)
    per_type = {}
    for t in order:
        c = counts[t]
        p, r, f = _prf(c["tp"], c["fp"], c["fn"])
        per_type[t] = {"precision": p, "recall": r, "f1": f, "support": c["support"],
                       "tp": c["tp"], "fp": c["fp"], "fn": c["fn"]}
    macro_f1 = sum(per_type[t]["f1"] for t in label_names) / len(label_names) if label_names else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "per_type": per_type,
        "macro_f1": macro_f1,
        "exact_match": exact / n if n else 0.0,
        "no_entity_sentences": no_entity,
        "no_entity_accuracy": no_entity_ok / no_entity if no_entity else 0.0,
        "unparseable_lines": bad,
        "pred_not_in_text": not_in_text,
        "num_examples": n,
    }


def format_table(metrics):
    """The dict from `score` as an aligned text table followed by the diagnostic counts."""
    head = f"{'type':<8}{'precision':>11}{'recall':>9}{'f1':>9}{'support':>9}"
    lines = [head, "-" * len(head)]
    for t, m in metrics["per_type"].items():
        lines.append(f"{t:<8}{m['precision']:>11.4f}{m['recall']:>9.4f}{m['f1']:>9.4f}{m['support']:>9d}")
    lines.append("-" * len(head))
    support = sum(m["support"] for m in metrics["per_type"].values())
    lines.append(f"{'micro':<8}{metrics['precision']:>11.4f}{metrics['recall']:>9.4f}"
                 f"{metrics['f1']:>9.4f}{support:>9d}")
    lines.append(f"{'macro':<8}{'':>11}{'':>9}{metrics['macro_f1']:>9.4f}")
    extras = [
        ("tp / fp / fn", f"{metrics['tp']} / {metrics['fp']} / {metrics['fn']}"),
        ("exact match", f"{metrics['exact_match']:.4f} ({metrics['num_examples']} sentences)"),
        ("no-entity accuracy", f"{metrics['no_entity_accuracy']:.4f} "
                               f"({metrics['no_entity_sentences']} sentences without entities)"),
        ("unparseable lines", str(metrics["unparseable_lines"])),
        ("pred not in text", str(metrics["pred_not_in_text"])),
    ]
    lines.append("")
    lines.extend(f"{name + ':':<20}{value}" for name, value in extras)
    return "\n".join(lines)
