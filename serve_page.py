"""serve.py's web page: its HTML, style and script, and the headers that let it run its own
script and nothing else (a content security policy of hashes).
"""
import hashlib
import html
from base64 import b64encode
from pathlib import Path

PAGE_STYLE = """
h1{margin:.2em 0}.cols{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}.main{flex:1 1 30em}
.side{flex:1 1 22em;min-width:0}textarea{width:100%;box-sizing:border-box;font-size:1.1em;padding:.4em}
button{font-size:1em;padding:.3em 1.2em;margin:.4em .6em .4em 0}pre{background:#f6f6f6;border:1px solid #ddd;
padding:.6em;margin:0;overflow:auto;max-height:70vh;white-space:pre-wrap;word-break:break-all}
mark{padding:0 .1em;border-radius:.2em;color:inherit}.err{color:#b00}#marked{margin:.6em 0;white-space:pre-wrap}
.chip .k{font-size:.8em;color:#555;margin-left:.3em}
"""

# Every string from an answer or the label set reaches the page through textContent, data-*
# attributes or createTextNode, never innerHTML: nothing a text, an entity or a type name holds
# can become markup or script. Offsets are Python's, in code points; JavaScript strings count
# UTF-16 units, so the text is split into code points (Array.from) before any offset is used.
PAGE_SCRIPT = """
const labels = JSON.parse(document.getElementById('labels').textContent);
const codes = Object.keys(labels);
const PALETTE = ['#c8f0c8', '#ffd59a', '#b8d8f8', '#f6b3b3', '#e0b3f6', '#fff0a0', '#b3efe6', '#f7c6a3'];
const colour = t => codes.includes(t) ? PALETTE[codes.indexOf(t) % PALETTE.length] : '#ddd';
const $ = id => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function chip(text, type, note) {
  const c = el('span', 'chip', text);
  c.style.background = colour(type);
  c.dataset.type = type;
  c.append(el('span', 'k', note));
  return c;
}
function legend(counts) {
  const box = $('legend');
  box.replaceChildren();
  for (const t of new Set([...codes, ...Object.keys(counts)]))
    box.append(chip(labels[t] || t, t, t + (t in counts ? ' ×' + counts[t] : '')));
}
function show(rec) {
  const chars = Array.from(rec.text);
  const cover = new Array(chars.length).fill(null);
  // Longer entities first: a name inside a longer one does not split it.
  const spans = rec.entities.filter(e => e.begin >= 0)
    .sort((a, b) => (b.end - b.begin) - (a.end - a.begin) || a.begin - b.begin);
  for (const s of spans) for (let c = s.begin; c < s.end; c++) if (cover[c] === null) cover[c] = s;
  const box = $('marked');
  box.replaceChildren();
  for (let c = 0; c < chars.length;) {
    let d = c + 1;
    while (d < chars.length && cover[d] === cover[c]) d++;
    const piece = chars.slice(c, d).join(''), s = cover[c];
    if (s) {
      const m = el('mark', '', piece);
      m.style.background = colour(s.type);
      m.dataset.type = s.type;
      m.title = labels[s.type] || s.type;
      box.append(m);
    } else box.append(document.createTextNode(piece));
    c = d;
  }
  const counts = {}, seen = new Set(), chips = $('chips');
  chips.replaceChildren();
  for (const e of rec.entities) {
    counts[e.type] = (counts[e.type] || 0) + 1;
    const key = JSON.stringify([e.entity, e.type]);
    if (seen.has(key)) continue;
    seen.add(key);
    chips.append(chip(e.entity, e.type, (labels[e.type] || e.type) + (e.begin < 0 ? ' · not in the text' : '')));
  }
  legend(counts);
  const n = rec.entities.length;
  $('status').textContent = (n === 1 ? '1 entity' : n + ' entities') + (rec.windows > 1 ? ', read in ' + rec.windows + ' windows' : '');
}
async function run() {
  const text = $('text').value;
  $('error').textContent = '';
  $('status').textContent = '…';
  $('go').disabled = true;
  try {
    const r = await fetch('ner', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                  body: JSON.stringify({text})});
    const body = await r.json();
    $('json').textContent = JSON.stringify(body, null, 2);
    if (!r.ok) throw new Error(body.error || r.statusText);
    show(body);
  } catch (e) {
    $('status').textContent = '';
    $('error').textContent = String(e.message || e);
  } finally {
    $('go').disabled = false;
  }
}
$('go').addEventListener('click', run);
$('text').addEventListener('keydown', e => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) run(); });
legend({});
"""


def page_html(info):
    from report import STYLE, script_json

    model = info["adapter"] or info["base_model"]
    body = f"""<!DOCTYPE html>
<html lang="zh"><head><meta charset="utf-8"><title>NER: {html.escape(Path(str(model)).name)}</title>
<style>{STYLE}{PAGE_STYLE}</style></head><body>
<h1>NER</h1>
<p class="n">base model {html.escape(str(info["base_model"]))}; adapter {html.escape(str(info["adapter"] or "none"))};
answers {"grounded (" + html.escape(info["answer"]["grounding_policy"]) + ")" if info["answer"]["grounded"] else "not grounded"},
at most {info["answer"]["max_new_tokens"]} tokens per window.</p>
<div class="cols"><div class="main">
<textarea id="text" rows="6" placeholder="输入一段中文文本 / type a Chinese text">去年，我们又被评为“北京市首届家庭藏书状元明星户”。</textarea>
<div><button id="go">识别 / Find entities</button><span id="status" class="n"></span> <span id="error" class="err"></span></div>
<div id="legend"></div>
<div id="marked" class="t"></div>
<div id="chips"></div>
</div><div class="side"><pre id="json"></pre></div></div>
<script type="application/json" id="labels">{script_json(info["label_names"])}</script>
<script>{PAGE_SCRIPT}</script>
</body></html>
"""
    return body


def _csp_hash(text):
    return "'sha256-" + b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def page_headers(page):
    """The page runs its own script and style and nothing else: no other script, no inline handler,
    no request but to this server (so it works offline and an injected tag could not run)."""
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    csp = (f"default-src 'none'; script-src {_csp_hash(PAGE_SCRIPT)}; style-src {_csp_hash(style)}; "
           f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
