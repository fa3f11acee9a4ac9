"""Entity-level NER metrics for generated answers, at set level and at mention level.

The model answers in an answer format (answer_format.py), whose parser gives back (entity
text, type code) pairs, so scoring is done on sets of pairs per sentence rather than on token
tags: a prediction counts only when both the string and the type match a gold entity of the
same sentence. The parser also keeps what it could not read (`bad_lines`), so a model that
drifts from the format shows up in the numbers instead of silently losing recall. `score`
computes micro/per-type/macro P/R/F1 plus a few counts that explain the errors;
`format_table` prints them.
"""
from answer_format import DEFAULT_LABEL_NAMES


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


def bootstrap_f1(examples, resamples=1000, seed=0, level=0.95):
    """A percentile bootstrap interval for set-level micro F1: sentences are drawn with
    replacement (the unit the sample was drawn in) and F1 recomputed from their tp/fp/fn."""
    import random

    counts = []
    for ex in examples:
        gold, pred = _as_set(ex.get("gold", ())), _as_set(ex.get("pred", ()))
        counts.append((len(gold & pred), len(pred - gold), len(gold - pred)))
    if not counts:
        return [0.0, 0.0]
    rng, n, f1s = random.Random(seed), len(counts), []
    for _ in range(resamples):
        tp = fp = fn = 0
        for i in rng.choices(range(n), k=n):
            tp, fp, fn = tp + counts[i][0], fp + counts[i][1], fn + counts[i][2]
        f1s.append(_prf(tp, fp, fn)[2])
    f1s.sort()
    cut = (1 - level) / 2
    return [f1s[int(cut * resamples)], f1s[min(resamples - 1, int((1 - cut) * resamples))]]


def format_table(metrics):
    """The dict from `score` (plus its `mention` level when present) as aligned text tables
    followed by the diagnostic counts."""
    lines = format_level_table(metrics, "set")
    if "mention" in metrics:
        lines += [""] + format_level_table(metrics["mention"], "mention")
        errors = metrics["mention"]["errors"]
        lines += ["", "mention errors: " + ", ".join(f"{cls} {errors[cls]}" for cls in ERROR_CLASSES)]
    extras = [
        ("tp / fp / fn", f"{metrics['tp']} / {metrics['fp']} / {metrics['fn']}"),
    ]
    if "f1_ci95" in metrics:
        low, high = metrics["f1_ci95"]
        extras.append(("micro F1 95% CI", f"{low:.4f} - {high:.4f} (bootstrap over sentences)"))
    extras += [
        ("exact match", f"{metrics['exact_match']:.4f} ({metrics['num_examples']} sentences)"),
        ("no-entity accuracy", f"{metrics['no_entity_accuracy']:.4f} "
                               f"({metrics['no_entity_sentences']} sentences without entities)"),
        ("unparseable lines", str(metrics["unparseable_lines"])),
        ("pred not in text", str(metrics["pred_not_in_text"])),
    ]
    lines.append("")
    lines.extend(f"{name + ':':<20}{value}" for name, value in extras)
    return "\n".join(lines)


# ------------------------------------------------------------------------ mention level
#
# The BERT-CRF literature scores MSRA on character spans: every annotated (begin, end, type)
# is one gold mention, so a name that occurs twice counts twice. An answer names strings, not
# positions, so a predicted (entity, type) stands for every occurrence of the string in the
# sentence. Both levels are reported; they differ when a string occurs more than once or is
# annotated at only some of its occurrences.

ERROR_CLASSES = ("correct", "wrong_type", "wrong_boundary", "wrong_type_boundary", "spurious",
                 "hallucinated", "missed")
NONE_TYPE = "(none)"  # the confusion matrix's row/column for "no entity at this span"


def mention_spans(text, entities):
    """[(entity, type)] -> sorted [(begin, end, type)]: every occurrence of each entity string in
    `text` (scanning on after each match, as a reader would underline them). Strings that do
    not occur give nothing here; `classify_mentions` counts them as hallucinated."""
    spans = set()
    for entity, etype in entities:
        if not entity:
            continue
        start = text.find(entity)
        while start != -1:
            spans.add((start, start + len(entity), etype))
            start = text.find(entity, start + len(entity))
    return sorted(spans)


def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


def classify_mentions(text, gold_spans, pred_entities):
    """One sentence's mentions, each with its error class.

    Predicted mentions: correct (same span and type as a gold one), wrong_type (same span, other
    type), wrong_boundary (overlaps a gold span of its type), wrong_type_boundary (overlaps only
    gold spans of other types), spurious (overlaps no gold span). A predicted string that does
    not occur in the text is hallucinated (one per string). Gold mentions: correct, or missed
    when no predicted mention overlaps them; those overlapped by a wrong prediction are
    accounted for by that prediction's class.
    Returns (pred [(b, e, type, class)], gold [(b, e, type, class)], hallucinated [(entity, type)]).
    """
    gold = sorted({(int(b), int(e), str(t)) for b, e, t in gold_spans})
    gold_exact = {(b, e): t for b, e, t in gold}
    pred_out = []
    preds = mention_spans(text, pred_entities)
    for b, e, t in preds:
        if gold_exact.get((b, e)) == t:
            cls = "correct"
        elif (b, e) in gold_exact:
            cls = "wrong_type"
        elif any(_overlap((b, e), g) and g[2] == t for g in gold):
            cls = "wrong_boundary"
        elif any(_overlap((b, e), g) for g in gold):
            cls = "wrong_type_boundary"
        else:
            cls = "spurious"
        pred_out.append((b, e, t, cls))
    pred_exact = {(b, e, t) for b, e, t in preds}
    gold_out = []
    for b, e, t in gold:
        if (b, e, t) in pred_exact:
            cls = "correct"
        elif any(_overlap((b, e), p) for p in preds):
            cls = "overlapped"  # counted through the prediction's class
        else:
            cls = "missed"
        gold_out.append((b, e, t, cls))
    hallucinated = [(ent, t) for ent, t in dict.fromkeys((str(x), str(y)) for x, y in pred_entities)
                    if ent and ent not in text]
    return pred_out, gold_out, hallucinated


def score_mentions(examples, label_names=None):
    """Mention-level micro / per-type / macro P/R/F1, error classes and a type confusion matrix.

    Each example: {"text", "gold_spans": [(begin, end, type), ...], "pred": [(entity, type), ...]}.
    TP = predicted spans equal to a gold span with its type; FP = other predicted spans plus
    hallucinated strings; FN = gold spans not predicted exactly.
    """
    label_names = DEFAULT_LABEL_NAMES if label_names is None else label_names
    types = list(label_names)
    counts, errors = {}, {}

    def bucket(table, t, keys):
        return table.setdefault(t, dict.fromkeys(keys, 0))

    confusion = {}
    for ex in examples:
        text = ex.get("text", "") or ""
        pred, gold, hallucinated = classify_mentions(text, ex.get("gold_spans", ()), ex.get("pred", ()))
        gold_by_span = {(b, e): t for b, e, t, _ in gold}
        for b, e, t, cls in pred:
            c = bucket(counts, t, ("tp", "fp", "fn", "support"))
            c["tp" if cls == "correct" else "fp"] += 1
            bucket(errors, t, ERROR_CLASSES)[cls] += 1
            row = gold_by_span.get((b, e), NONE_TYPE)
            confusion.setdefault(row, {}).setdefault(t, 0)
            confusion[row][t] += 1
        pred_spans = {(b, e) for b, e, _, _ in pred}
        for b, e, t, cls in gold:
            c = bucket(counts, t, ("tp", "fp", "fn", "support"))
            c["support"] += 1
            if cls != "correct":
                c["fn"] += 1
            if cls == "missed":
                bucket(errors, t, ERROR_CLASSES)["missed"] += 1
            if (b, e) not in pred_spans:
                confusion.setdefault(t, {}).setdefault(NONE_TYPE, 0)
                confusion[t][NONE_TYPE] += 1
        for _, t in hallucinated:
            bucket(counts, t, ("tp", "fp", "fn", "support"))["fp"] += 1
            bucket(errors, t, ERROR_CLASSES)["hallucinated"] += 1

    order = types + sorted(t for t in set(counts) | set(errors) if t not in types)
    per_type, tp, fp, fn = {}, 0, 0, 0
    for t in order:
        c = counts.get(t, {"tp": 0, "fp": 0, "fn": 0, "support": 0})
        p, r, f = _prf(c["tp"], c["fp"], c["fn"])
        per_type[t] = {"precision": p, "recall": r, "f1": f, **c}
        tp, fp, fn = tp + c["tp"], fp + c["fp"], fn + c["fn"]
    precision, recall, f1 = _prf(tp, fp, fn)
    errors_per_type = {t: errors.get(t, dict.fromkeys(ERROR_CLASSES, 0)) for t in order}
    labels = order + [NONE_TYPE]
    return {
        "level": "mention",
        "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
        "per_type": per_type,
        "macro_f1": sum(per_type[t]["f1"] for t in types) / len(types) if types else 0.0,
        "errors": {cls: sum(e[cls] for e in errors_per_type.values()) for cls in ERROR_CLASSES},
        "errors_per_type": errors_per_type,
        # confusion[gold type][predicted type] over spans; (none) = no entity on that side.
        "confusion": {g: {p: confusion.get(g, {}).get(p, 0) for p in labels} for g in labels},
    }


def format_level_table(metrics, title):
    """Per-type and micro/macro P/R/F1 of one level (set or mention) as aligned text."""
    head = f"{title:<8}{'precision':>11}{'recall':>9}{'f1':>9}{'support':>9}"
    lines = [head, "-" * len(head)]
    for t, m in metrics["per_type"].items():
        lines.append(f"{t:<8}{m['precision']:>11.4f}{m['recall']:>9.4f}{m['f1']:>9.4f}{m['support']:>9d}")
    lines.append("-" * len(head))
    support = sum(m["support"] for m in metrics["per_type"].values())
    lines.append(f"{'micro':<8}{metrics['precision']:>11.4f}{metrics['recall']:>9.4f}"
                 f"{metrics['f1']:>9.4f}{support:>9d}")
    lines.append(f"{'macro':<8}{'':>11}{'':>9}{metrics['macro_f1']:>9.4f}")
    return lines
