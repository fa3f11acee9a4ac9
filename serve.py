"""NER over HTTP: a JSON API and a web page, one model shared by every request.

    python serve.py --lora_model=checkpoint/msra/train_trainer/adapter_model
    curl -s http://127.0.0.1:8000/ner -H 'Content-Type: application/json' -d '{"text": "张三在北京开会。"}'
    # the page: open http://127.0.0.1:8000/ in a browser

POST /ner takes {"text": "..."} (answers with one record) or {"texts": [...]} (answers with
{"results": [records]}); a record is exactly what predict.py writes to --output_file for that text
with the same settings (text, entities with character offsets into the text as given, windows,
output), because both come from predict.predict_records. GET / is the page, GET /info the model
and answer settings with the server's counters, GET /health says it is up (never needs a key).

Requests that arrive together are answered together: every text waits in one queue, and one
thread, the only one that touches the model, takes what arrived within --batch_wait_ms (up to
--batch_size texts) and runs one generation batch over them.
Starlette (the ASGI toolkit FastAPI is built on) with uvicorn: routing, responses and a graceful
stop come from them; bodies are read and checked here so that every refusal is one line.
"""
import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import html
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
import traceback
from base64 import b64encode
from pathlib import Path
from urllib.parse import urlsplit

from config_utils import ConfigError, UserError, parse_config, run_cli
from dataset import QUERY_PREFIX
from infer_config import (INFER_DEFAULTS, answer_format_for, check_infer_config, instruct_for, label_names_for,
                          recorded_args)
from model_utils import is_full_model

DEFAULTS = {
    **INFER_DEFAULTS,
    "instruct": "",  # as predict.py: "" = the instruction the adapter was trained with
    "host": "127.0.0.1",  # address to listen on; one reachable from other machines needs --api_key
    "port": 8000,  # TCP port (0: any free one, printed at start)
    "api_key": "",  # "" = none; else every route but /health needs `Authorization: Bearer <key>`
    "allow_no_key": False,  # True: listen on a non-loopback host without --api_key (anyone who reaches it may use it)
    "batch_wait_ms": 10.0,  # after a batch's first text arrives, how long it waits for more (at most --batch_size)
    "max_queue": 1024,  # texts waiting at most; past it a request gets 503 at once instead of a growing wait
    "max_body_bytes": 1_000_000,  # request body limit in bytes (413 past it)
    "max_text_chars": 10_000,  # characters per text (422 past it); a long text is read in windows as predict.py does
    "max_texts": 256,  # texts per request (422 past it)
    "graceful_timeout": 60.0,  # seconds the requests in flight get to finish after SIGINT/SIGTERM
    "access_log": True,  # one log line per request: method, path, status (never the text)
}

JSON_TYPE = "application/json"


class BadRequest(Exception):
    """A request refused before it reaches the model: an HTTP status and one line."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Busy(Exception):
    pass


# --------------------------------------------------------------------------- config

def _addresses(host):
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"config key 'host': {host!r} is not an address of this machine ({e})") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def is_loopback(host):
    """Only this machine can reach it: every address the name resolves to is a loopback one."""
    return all(address.is_loopback for address in _addresses(host))


def check_config(cfg):
    """Every key that can be wrong without the model: checked before anything loads."""
    check_infer_config(cfg)
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"config key 'port': {cfg.port} is not a TCP port (0-65535)")
    for key in ("max_queue", "max_body_bytes", "max_text_chars", "max_texts"):
        if cfg[key] < 1:
            raise ConfigError(f"config key '{key}': {cfg[key]} must be at least 1")
    if cfg.max_texts > cfg.max_queue:
        raise ConfigError(f"config key 'max_texts': {cfg.max_texts} is more than max_queue={cfg.max_queue} "
                          f"texts can wait; such a request could never be answered")
    if not 0 <= cfg.batch_wait_ms <= 10_000:
        raise ConfigError(f"config key 'batch_wait_ms': {cfg.batch_wait_ms} must be between 0 and 10000")
    if cfg.graceful_timeout <= 0:
        raise ConfigError(f"config key 'graceful_timeout': {cfg.graceful_timeout} must be more than 0")
    if cfg.api_key and not all("!" <= ch <= "~" for ch in cfg.api_key):
        raise ConfigError("config key 'api_key': use printable ASCII without spaces (it travels in an HTTP header)")
    if not cfg.api_key and not cfg.allow_no_key and not is_loopback(cfg.host):
        raise ConfigError(f"config key 'host': {cfg.host} can be reached from other machines and no --api_key is "
                          f"set; give --api_key=<secret>, or --allow_no_key=True to serve anyone who reaches it")


def bind(host, port):
    """The listening socket, bound before the model loads so that a taken port is a one-line error at
    once, not after minutes of loading. Connections are refused until the server listens on it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"config keys 'host'/'port': cannot listen on {host}:{port} ({e.strerror or e}); "
                          f"choose another --port") from None
    return sock


# --------------------------------------------------------------------------- requests

def read_request(body, max_text_chars, max_texts):
    """A /ner body (bytes) -> (texts, single). Refusals are BadRequest with one line: 400 for a body
    that is not UTF-8 JSON, 422 for JSON that is not {"text": str} or {"texts": [str, ...]} within
    the limits. Texts are kept exactly as given: entity offsets refer to them."""
    try:
        data = json.loads(body.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"the body is not UTF-8 (byte {e.start}); send JSON encoded as UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BadRequest(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f'the body must be a JSON object {{"text": "..."}} or {{"texts": [...]}}, '
                              f'not a JSON {_json_type(data)}')
    unknown = sorted(set(data) - {"text", "texts"})
    if unknown:
        raise BadRequest(422, f"unknown key {unknown[0]!r}: give \"text\" (a string) or \"texts\" (a list of strings)")
    if ("text" in data) == ("texts" in data):
        raise BadRequest(422, 'give exactly one of "text" (a string) or "texts" (a list of strings)')
    single = "text" in data
    texts = [data["text"]] if single else data["texts"]
    if not single:
        if not isinstance(texts, list):
            raise BadRequest(422, f'"texts" must be a list of strings, not a JSON {_json_type(texts)}')
        if not texts:
            raise BadRequest(422, '"texts" is empty: give at least one text')
        if len(texts) > max_texts:
            raise BadRequest(422, f'"texts" holds {len(texts)} texts; at most {max_texts} per request')
    for n, text in enumerate(texts):
        where = '"text"' if single else f'"texts"[{n}]'
        if not isinstance(text, str):
            raise BadRequest(422, f"{where} must be a string, not a JSON {_json_type(text)}")
        if not text.strip():
            raise BadRequest(422, f"{where} is empty: give the sentence to analyse")
        if len(text) > max_text_chars:
            raise BadRequest(422, f"{where} has {len(text)} characters; at most {max_text_chars} per text")
        if any("\ud800" <= ch <= "\udfff" for ch in text):
            # JSON's \\ud800 escapes can name half a character, which no tokenizer or UTF-8 answer can hold.
            raise BadRequest(422, f"{where} holds an unpaired surrogate (\\ud800-\\udfff escape); send whole characters")
    return texts, single


def _json_type(value):
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# --------------------------------------------------------------------------- batching

class _Job:
    """One request's texts and where their results go."""

    def __init__(self, texts):
        self.texts = texts
        self.results = [None] * len(texts)
        self.left = len(texts)
        self.future = concurrent.futures.Future()

    def done(self):
        return self.future.done()

    def finish(self):
        self._settle(self.future.set_result, self.results)

    def fail(self, error):
        self._settle(self.future.set_exception, error)

    def _settle(self, setter, value):
        # The request may have been cancelled (its client went away) at any moment: nothing to answer then.
        try:
            setter(value)
        except concurrent.futures.InvalidStateError:
            pass


class Batcher:
    """A queue of texts and the one thread that runs the model over them.

    `run(texts)` -> one result per text (it owns the model: nothing else calls it). The thread
    takes the first waiting text, waits up to `max_wait` seconds for more while fewer than
    `batch_size` wait, and runs them as one batch; a request with more texts than a batch holds
    spans several. When a batch raises, each request in it is run again on its own, so only
    the request that fails gets the error.
    """

    def __init__(self, run, batch_size, max_wait, max_queue):
        self.run, self.batch_size, self.max_wait, self.max_queue = run, batch_size, max_wait, max_queue
        self.queue = collections.deque()  # (job, index of the text in the job)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = None
        self.counts = {"requests": 0, "texts": 0, "batches": 0, "largest_batch": 0, "failed_requests": 0,
                       "batches_retried_per_request": 0}
        self.batch_sizes = collections.Counter()  # texts per batch -> batches

    def start(self):
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()
        return self

    def submit(self, texts):
        """Queue a request's texts -> a concurrent.futures.Future of their results (in order)."""
        job = _Job(list(texts))
        with self.cond:
            if self.stopping:
                raise Busy("the server is stopping")
            if len(self.queue) + len(job.texts) > self.max_queue:
                raise Busy(f"{len(self.queue)} texts are waiting (at most {self.max_queue}); try again shortly")
            self.queue.extend((job, i) for i in range(len(job.texts)))
            self.counts["requests"] += 1
            self.counts["texts"] += len(job.texts)
            self.cond.notify()
        return job.future

    def stats(self):
        with self.cond:
            return {**self.counts, "queued": len(self.queue),
                    "texts_per_batch": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    def stop(self, timeout=None):
        """Finish the batch in hand; requests still waiting are failed (the server no longer answers)."""
        with self.cond:
            self.stopping = True
            left, self.queue = list(self.queue), collections.deque()
            self.cond.notify_all()
        for job, _ in left:
            job.fail(Busy("the server stopped before this request was answered"))
        if self.thread is not None:
            self.thread.join(timeout)

    def _take(self):
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self.queue) < self.batch_size and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch = []
            while self.queue and len(batch) < self.batch_size:
                job, i = self.queue.popleft()
                if not job.done():  # a request that failed already or whose client went away
                    batch.append((job, i))
            return batch

    def _loop(self):
        while not self.stopping:
            batch = self._take()
            if batch:
                self._answer(batch)

    def _answer(self, batch):
        with self.cond:
            self.counts["batches"] += 1
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(batch))
            self.batch_sizes[len(batch)] += 1
        by_job = collections.defaultdict(list)
        for job, i in batch:
            by_job[job].append((job, i))
        try:
            self._deliver(batch, self.run([job.texts[i] for job, i in batch]))
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others: retried apart below
            if len(by_job) == 1:
                self._fail(batch[0][0], e)
                return
        with self.cond:
            self.counts["batches_retried_per_request"] += 1
        for job, items in by_job.items():
            try:
                self._deliver(items, self.run([job.texts[i] for _, i in items]))
            except Exception as e:  # noqa: BLE001 - this request's own failure, reported to it alone
                self._fail(job, e)

    def _deliver(self, items, results):
        for (job, i), result in zip(items, results, strict=True):
            job.results[i] = result
            job.left -= 1
            if job.left == 0:
                job.finish()

    def _fail(self, job, error):
        if not isinstance(error, UserError):
            traceback.print_exception(error, file=sys.stderr)
        with self.cond:
            self.counts["failed_requests"] += 1
        job.fail(error)


# --------------------------------------------------------------------------- the page

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


# --------------------------------------------------------------------------- the app

def error(status, message, headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(cfg, batcher, info):
    """The Starlette app over a started Batcher; `info` is /info's fixed part."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    loopback = is_loopback(cfg.host)
    expected = f"Bearer {cfg.api_key}".encode()
    page = page_html(info)
    headers = page_headers(page)
    rejected = collections.Counter()  # status -> requests refused before the model

    def guarded(handler, needs_key=True):
        async def endpoint(request):
            # A server on loopback answers only requests addressed to loopback: a web page whose own
            # name was made to resolve to 127.0.0.1 (DNS rebinding) sends its own name as Host.
            host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
            if loopback and host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("127."):
                rejected[400] += 1
                return error(400, f"Host {host!r} is not this server's loopback address")
            if needs_key and cfg.api_key:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    rejected[401] += 1
                    return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 {"WWW-Authenticate": "Bearer"})
            return await handler(request)
        return endpoint

    async def ner(request):
        try:
            texts, single = await _read_ner(request, cfg)
        except BadRequest as e:
            rejected[e.status] += 1
            return error(e.status, str(e))
        try:
            future = batcher.submit(texts)
        except Busy as e:
            rejected[503] += 1
            return error(503, str(e), {"Retry-After": "1"})
        try:
            results = await asyncio.wrap_future(future)
        except UserError as e:
            return error(422, str(e).splitlines()[0])
        except Busy as e:
            return error(503, str(e))
        except Exception as e:  # noqa: BLE001 - the failure of this request alone (logged by the batcher)
            return error(500, f"prediction failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return JSONResponse(results[0] if single else {"results": results})

    async def index(request):
        return HTMLResponse(page, headers=headers)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def info_route(request):
        stats = batcher.stats()
        stats["rejected"] = {str(k): v for k, v in sorted(rejected.items())}
        return JSONResponse({**info, "stats": stats})

    async def http_error(request, exc):
        return error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    async def server_error(request, exc):
        return error(500, f"internal error: {type(exc).__name__}")

    routes = [Route("/", guarded(index), methods=["GET"]), Route("/ner", guarded(ner), methods=["POST"]),
              Route("/info", guarded(info_route), methods=["GET"]),
              Route("/health", guarded(health, needs_key=False), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


async def _read_ner(request, cfg):
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON_TYPE:
        # Also what keeps other web sites out: a browser sends a JSON POST elsewhere only after
        # asking this server (CORS preflight), which it never allows.
        raise BadRequest(415, f"Content-Type must be {JSON_TYPE}, not {content_type or 'missing'!r}")
    declared = request.headers.get("content-length")
    too_big = f"the body is larger than {cfg.max_body_bytes} bytes (max_body_bytes)"
    if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
        raise BadRequest(413 if declared.isdigit() else 400, too_big if declared.isdigit() else "bad Content-Length")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cfg.max_body_bytes:
            raise BadRequest(413, too_big)
    return read_request(bytes(body), cfg.max_text_chars, cfg.max_texts)


# --------------------------------------------------------------------------- main

def model_info(cfg, recorded, label_names, instruct):
    full = not cfg.no_adapter and is_full_model(cfg.lora_model)
    return {
        "base_model": str(cfg.lora_model if full else (cfg.model_dir or recorded.get("model_dir"))),
        "adapter": None if cfg.no_adapter or full else str(cfg.lora_model),
        "fully_fine_tuned": full,
        "label_names": label_names,
        "instruct": instruct,
        "answer_format": answer_format_for(recorded),
        "answer": {key: cfg[key] for key in ("grounded", "grounding_policy", "eos_penalty", "max_new_tokens",
                                             "dtype", "merge_lora", "quantization")},
        "batching": {"batch_size": cfg.batch_size, "batch_wait_ms": cfg.batch_wait_ms, "max_queue": cfg.max_queue},
        "limits": {key: cfg[key] for key in ("max_body_bytes", "max_text_chars", "max_texts")},
    }


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    check_config(cfg)
    recorded = recorded_args(cfg)
    label_names = label_names_for(recorded)
    instruct = cfg.instruct or instruct_for(recorded)
    sock = bind(cfg.host, cfg.port)

    import uvicorn

    from infer_config import load_from_config
    from predict import predict_records

    model, tokenizer, train_args = load_from_config(cfg)

    def run(texts):
        records = [{"instruct": instruct, "query": QUERY_PREFIX + text} for text in texts]
        return predict_records(model, tokenizer, train_args, records, cfg, label_names)

    # One answer before listening: a --max_new_tokens that leaves no room for text fails here, in
    # one line, and the first request does not pay for the one-time set-up.
    run(["张三在北京。"])
    batcher = Batcher(run, cfg.batch_size, cfg.batch_wait_ms / 1000, cfg.max_queue).start()
    app = build_app(cfg, batcher, model_info(cfg, recorded, label_names, instruct))
    server = uvicorn.Server(uvicorn.Config(app, access_log=cfg.access_log, timeout_graceful_shutdown=cfg.graceful_timeout,
                                           server_header=False, log_level="info"))
    # uvicorn answers SIGINT/SIGTERM by letting the requests in flight finish, then raises the signal
    # again for the handler that was there before: this one, so the stop ends the script normally.
    stopped_by = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: stopped_by.append(signal.Signals(number).name))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving NER on http://{shown}:{port}/ (the page), POST /ner, GET /info, GET /health"
          f"{'; every route but /health needs the API key' if cfg.api_key else ''}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        batcher.stop(timeout=cfg.graceful_timeout)
    stats = batcher.stats()
    print(f"stopped{' on ' + stopped_by[0] if stopped_by else ''}; {stats['requests']} requests answered "
          f"({stats['texts']} texts in {stats['batches']} batches)", flush=True)
    return stats


if __name__ == "__main__":
    run_cli(main)
