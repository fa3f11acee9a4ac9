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
--batch_size texts) and runs one generation batch over them (serve_batching.py). The page and its
headers are serve_page.py's; this module is the HTTP side: settings, request checks, routes.
Starlette (the ASGI toolkit FastAPI is built on) with uvicorn: routing, responses and a graceful
stop come from them; bodies are read and checked here so that every refusal is one line.
"""
import asyncio
import collections
import hmac
import ipaddress
import json
import signal
import socket
from urllib.parse import urlsplit

from config_utils import ConfigError, UserError, parse_config, run_cli
from dataset import QUERY_PREFIX
from infer_config import (INFER_DEFAULTS, answer_format_for, check_infer_config, instruct_for, label_names_for,
                          recorded_args)
from model_utils import is_full_model
from serve_batching import Batcher, Busy
from serve_page import page_headers, page_html

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
