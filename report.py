"""report.html: one self-contained page to look at a test run's errors (test.py writes it).

Summary and per-type tables at set and mention level, the mention error classes per type, a
type confusion matrix, and every sentence with its gold and predicted entities highlighted,
sentences with errors first, filterable by error class. No external scripts, fonts or styles:
it opens offline, and the sentences travel as compact JSON rendered by a few lines of script.
"""
import html
import json

from metrics import ERROR_CLASSES, classify_mentions

CLASS_HELP = {
    "correct": "same span and type as a gold entity",
    "wrong_type": "same span as a gold entity, another type",
    "wrong_boundary": "overlaps a gold entity of its type, other boundaries",
    "wrong_type_boundary": "overlaps only gold entities of other types",
    "spurious": "in the text, overlaps no gold entity",
    "hallucinated": "not in the text at all",
    "missed": "gold entity that no prediction touches",
}

STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.2em}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.s{border-bottom:1px solid #eee;padding:.4em 0}.s.hide{display:none}.t{font-size:1.15em;line-height:1.9}
.g{border-bottom:2px solid #333}.chip{display:inline-block;margin:.1em .3em .1em 0;padding:0 .4em;border-radius:.3em;font-size:.9em}
.correct{background:#c8f0c8}.wrong_type{background:#ffd59a}.wrong_boundary{background:#ffe9a8}
.wrong_type_boundary{background:#f7c6a3}.spurious{background:#f6b3b3}.hallucinated{background:#e0b3f6}
.missed{background:#fff;outline:2px dashed #d33}.n{color:#888;font-size:.85em}
"""

# Every string from the data (sentences, entities, type names, error classes) reaches the page
# through esc() or textContent: nothing the test set or a label set holds can become markup.
# Offsets are Python's, in code points; JavaScript strings count UTF-16 units, so the text is
# split into code points (Array.from) before any offset is used.
SCRIPT = """
const data = JSON.parse(document.getElementById('sentences').textContent);
const box = document.getElementById('list');
const rank = {wrong_type:0, wrong_type_boundary:1, wrong_boundary:2, spurious:3, hallucinated:4, correct:6};
function esc(s){return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
for (const [i, [text, gold, pred, hall]] of data.entries()) {
  const chars = Array.from(text);
  const part = (b, e) => chars.slice(b, e).join('');
  const cls = new Set(pred.map(p => p[3]).concat(gold.filter(g => g[3] === 'missed').map(() => 'missed'),
                                                  hall.map(() => 'hallucinated')));
  let out = '';
  for (let c = 0; c < chars.length; c++) {
    const p = pred.filter(m => m[0] <= c && c < m[1]).sort((a, b) => rank[a[3]] - rank[b[3]])[0];
    const g = gold.some(m => m[0] <= c && c < m[1]);
    const k = (p ? p[3] : '') + (g ? ' g' : '');
    out += k.trim() ? `<span class="${esc(k.trim())}">${esc(chars[c])}</span>` : esc(chars[c]);
  }
  const chip = (t, k, label) => `<span class="chip m ${esc(k)}" title="${esc(k)}">${esc(t)}·${esc(label)}</span>`;
  const chips = pred.map(m => chip(part(m[0], m[1]), m[3], m[2]))
    .concat(hall.map(h => chip(h[0], 'hallucinated', h[1])))
    .concat(gold.filter(m => m[3] === 'missed').map(m => chip(part(m[0], m[1]), 'missed', m[2])));
  const div = document.createElement('div');
  div.className = 's';
  div.dataset.classes = [...cls].join(' ');
  div.innerHTML = `<div class="t">${out}</div><div>${chips.join('')}<span class="n">#${i + 1}</span></div>`;
  box.appendChild(div);
}
document.getElementById('filter').addEventListener('change', e => {
  for (const div of box.children)
    div.classList.toggle('hide', e.target.value !== 'all' && !div.dataset.classes.split(' ').includes(e.target.value));
});
"""


def script_json(value):
    """JSON safe inside a <script> element whatever its strings hold: `<`, `>` and `&` as \\u
    escapes, so no `</script>`, `<!--` or `<script` can end or alter the element (JSON.parse
    reads the escapes back as the characters)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _level_rows(level):
    rows = [[t, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]]
            for t, m in level["per_type"].items()]
    support = sum(m["support"] for m in level["per_type"].values())
    rows.append(["micro", f"{level['precision']:.4f}", f"{level['recall']:.4f}", f"{level['f1']:.4f}", support])
    rows.append(["macro", "", "", f"{level['macro_f1']:.4f}", ""])
    return rows


def sentence_rows(examples):
    """[text, gold [[b, e, type, class]], pred [[b, e, type, class]], hallucinated [[entity, type]]]
    per sentence, errors first (most errors first), then the rest in input order."""
    rows = []
    for ex in examples:
        pred, gold, hall = classify_mentions(ex["text"], ex["gold_spans"], ex["pred"])
        rows.append([ex["text"], [list(g) for g in gold], [list(p) for p in pred], [list(h) for h in hall]])
    errors = [sum(p[3] != "correct" for p in r[2]) + sum(g[3] == "missed" for g in r[1]) + len(r[3]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (errors[i] == 0, -errors[i], i))
    return [rows[i] for i in order]


def write_report(path, metrics, examples):
    """metrics: test.py's metrics.json dict (with its `mention` level); examples: as for
    metrics.score_mentions. Writes one HTML file and returns its path."""
    from files import atomic_write_text

    atomic_write_text(path, render_report(metrics, examples))
    return path


def _sample_note(metrics):
    """What the scores stand for: a sample's are an estimate of the whole file's, with the
    bootstrap interval test.py computed (sentences resampled)."""
    parts = []
    if metrics.get("sample"):
        parts.append(f"These are a seeded random sample of {metrics['sample']} of the {metrics.get('sample_of', '?')} "
                     f"sentences (seed {metrics.get('seed')}): the scores estimate those of the whole file.")
    if metrics.get("f1_ci95"):
        low, high = metrics["f1_ci95"]
        parts.append(f"Micro F1 {metrics['f1']:.4f}, 95% bootstrap interval {low:.4f} - {high:.4f} (sentences "
                     f"resampled).")
    return f"\n<p>{html.escape(' '.join(parts))}</p>" if parts else ""


def render_report(metrics, examples):
    """The report page's text (write_report writes it; test.py commits it with its other outputs)."""
    mention = metrics["mention"]
    errors = mention["errors_per_type"]
    confusion = mention["confusion"]
    labels = list(confusion)
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}: {html.escape(CLASS_HELP[c])}</option>'
                      for c in ERROR_CLASSES)
    summary = [
        ["set (distinct entity, type per sentence)", f"{metrics['precision']:.4f}", f"{metrics['recall']:.4f}",
         f"{metrics['f1']:.4f}"],
        ["mention (character spans, as BERT-CRF papers)", f"{mention['precision']:.4f}", f"{mention['recall']:.4f}",
         f"{mention['f1']:.4f}"],
    ]
    data = script_json(sentence_rows(examples))
    corner = "gold \\ predicted"
    page = f"""<!DOCTYPE html>
<html lang="zh"><head><meta charset="utf-8"><title>NER report: {html.escape(str(metrics.get('test_path', '')))}</title>
<style>{STYLE}</style></head><body>
<h1>NER test report</h1>
<p>{metrics['num_examples']} sentences from {html.escape(str(metrics.get('test_path', '')))}; model
{html.escape(str(metrics.get('lora_model') or 'base model'))}.
Unparseable answer lines: {metrics['unparseable_lines']}; predicted strings not in their sentence:
{metrics['pred_not_in_text']}.</p>{_sample_note(metrics)}
<h2>Summary (micro)</h2>{_table(["level", "precision", "recall", "F1"], summary)}
<h2>Per type, set level</h2>{_table(["type", "precision", "recall", "F1", "support"], _level_rows(metrics))}
<h2>Per type, mention level</h2>{_table(["type", "precision", "recall", "F1", "support"], _level_rows(mention))}
<h2>Mention errors per type</h2>
{_table(["type", *ERROR_CLASSES], [[t, *(errors[t][c] for c in ERROR_CLASSES)] for t in errors]
        + [["all", *(mention['errors'][c] for c in ERROR_CLASSES)]])}
<h2>Type confusion (rows: gold, columns: predicted, same span)</h2>
{_table([corner, *labels], [[g, *(confusion[g][p] for p in labels)] for g in labels])}
<h2>Sentences</h2>
<p>Background: predicted entity by error class; underline: gold entity. Show
<select id="filter"><option value="all">all sentences</option>{options}</select></p>
<div id="list"></div>
<script type="application/json" id="sentences">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    return page
