"""serve.py as a user runs it: a server process on a free port, its answers against predict.py's
own run on the same texts, concurrent clients, bad input, the API key, a stop signal, and the page
in the system's headless Chromium (driven by Playwright)."""
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PYTHON, ROOT, free_port, load_script, run_cmd
from config_utils import ConfigError
from answer_format import DEFAULT_LABEL_NAMES, ner_instruct
from dataset import QUERY_PREFIX, load_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, offline: no sandbox, no background connections (they would be refused here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "test-key-7f3a91"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
STARTUP = 300  # seconds a server may take to load its model on a busy machine (not an assertion of speed)
# Limits of the fast server, small so that the tests can cross them cheaply.
LIMITS = {"max_body_bytes": 20_000, "max_text_chars": 1000, "max_texts": 16}


class Server:
    """serve.py in a subprocess on a free port; its output goes to a file (a pipe nobody reads
    would fill up and stop the server)."""

    def __init__(self, tmp_path, *options):
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        self.proc = subprocess.Popen([PYTHON, "serve.py", f"--port={self.port}", *options], cwd=ROOT,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1",
                                          "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.monotonic() + STARTUP
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass  # not listening yet: the model is loading
            assert time.monotonic() < deadline, f"serve.py did not start in {STARTUP} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def output(self):
        return self.log.read_text(encoding="utf-8", errors="replace")

    def request(self, method, path, body=None, headers=None, conn=None):
        """-> (status, parsed JSON body or the text, response headers)."""
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body, ensure_ascii=False).encode("utf-8")
            elif isinstance(body, str):
                body = body.encode("utf-8")
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("content-type", "")
            data = json.loads(raw) if ctype.startswith("application/json") else raw.decode("utf-8")
            return resp.status, data, dict(resp.getheaders())
        finally:
            if own:
                conn.close()

    def ner(self, payload, headers=AUTH):
        status, data, _ = self.request("POST", "/ner", payload, {**JSON, **headers})
        assert status == 200, data
        return data

    def info(self, headers=AUTH):
        status, data, _ = self.request("GET", "/info", headers=headers)
        assert status == 200, data
        return data

    def stop(self, sig=signal.SIGINT, timeout=120):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"serve.py did not stop within {timeout} s of {sig!r}:\n{self.output()[-3000:]}")


def predict_py(tmp_path, texts, *options, instruct=None):
    """predict.py's own run on `texts` -> its --output_file records. A text file, one text a line,
    where predict.py picks the instruction itself; with `instruct`, instruct JSONL, so that texts
    with line breaks or surrounding spaces reach it exactly as given."""
    source, out = tmp_path / "texts.txt", tmp_path / "predict.jsonl"
    if instruct is None:
        assert all(t == t.strip() and "\n" not in t for t in texts)
        source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    else:
        source.write_text("".join(json.dumps({"instruct": instruct, "query": QUERY_PREFIX + t}, ensure_ascii=False)
                                  + "\n" for t in texts), encoding="utf-8")
    run_cmd([PYTHON, "predict.py", f"--input_file={source}", f"--output_file={out}", *options], timeout=600)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def sentences(msra_dir, n, start=0):
    return [r["query"].removeprefix(QUERY_PREFIX) for r in load_data(msra_dir["dir"] / "instruct_data" / "test.txt")][
        start:start + n]


# --------------------------------------------------------------- the untrained tiny model (fast)

BASE = ("--no_adapter=True", "--max_new_tokens=16")


@pytest.fixture(scope="module")
def base_options(tiny_model):
    return (*BASE, f"--model_dir={tiny_model}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_options):
    """The untrained tiny model behind an API key, with small limits; stopped with SIGINT, which
    must end it cleanly."""
    srv = Server(tmp_path_factory.mktemp("serve"), *base_options, f"--api_key={KEY}", "--batch_size=8",
                 *(f"--{k}={v}" for k, v in LIMITS.items()))
    yield srv
    assert srv.stop(signal.SIGINT) == 0, srv.output()[-3000:]
    assert "stopped on SIGINT" in srv.output()


@pytest.fixture(scope="module")
def base_texts(msra_dir):
    """Test sentences, a text long enough to be read in windows, and texts that stress offsets:
    surrounding spaces, line breaks of several kinds, characters outside the BMP."""
    plain = sentences(msra_dir, 6)
    return plain + [
        "".join(sentences(msra_dir, 12, start=100)),
        "  " + plain[0] + " ",
        plain[1] + "\n" + plain[2],
        plain[3].replace("，", "\u2028", 1) + "\r",
        "😀" + plain[4] + "𠀀",
    ]


@pytest.fixture(scope="module")
def base_expected(tmp_path_factory, base_options, base_texts):
    # A model without train_args.json is asked with the standard instruction, as predict.py asks it.
    return predict_py(tmp_path_factory.mktemp("predict"), base_texts, *base_options,
                      instruct=ner_instruct(DEFAULT_LABEL_NAMES))


def test_answers_equal_predict_py_records(server, base_texts, base_expected):
    assert max(r["windows"] for r in base_expected) > 1  # the long text was read in windows
    assert sum(len(r["entities"]) for r in base_expected) > 5  # answers to compare, not only 没有
    assert server.ner({"texts": base_texts})["results"] == base_expected
    for text, expected in zip(base_texts, base_expected):
        assert server.ner({"text": text}) == expected
    # Offsets refer to the text as sent, spaces, line breaks and 4-byte characters included.
    for text, rec in zip(base_texts, base_expected):
        assert rec["text"] == text
        for e in rec["entities"]:
            assert e["begin"] < 0 or text[e["begin"]:e["end"]] == e["entity"]


BAD = [  # (what, headers, body, status, a fragment of the message)
    ("invalid JSON", JSON, b'{"text": "abc"', 400, "not valid JSON"),
    ("non-UTF-8 body", JSON, b'{"text": "\xff\xfe\xfa"}', 400, "not UTF-8"),
    ("JSON nested too deeply", JSON, b"[" * 10_000, 400, "nested too deeply"),
    ("not an object", JSON, b'["abc"]', 422, "not a JSON array"),
    ("text not a string", JSON, b'{"text": 5}', 422, '"text" must be a string, not a JSON number'),
    ("texts not a list", JSON, b'{"texts": "abc"}', 422, '"texts" must be a list of strings, not a JSON string'),
    ("a text in texts not a string", JSON, b'{"texts": ["abc", null]}', 422, '"texts"[1] must be a string'),
    ("empty text", JSON, b'{"text": ""}', 422, '"text" is empty'),
    ("blank text", JSON, b'{"text": " \\n\\t"}', 422, '"text" is empty'),
    ("empty texts", JSON, b'{"texts": []}', 422, '"texts" is empty'),
    ("both keys", JSON, b'{"text": "a", "texts": ["b"]}', 422, 'exactly one of "text"'),
    ("neither key", JSON, b"{}", 422, 'exactly one of "text"'),
    ("unknown key", JSON, b'{"txt": "abc"}', 422, "unknown key 'txt'"),
    ("text too long", JSON, json.dumps({"text": "中" * 1001}).encode(), 422, "1001 characters; at most 1000"),
    ("too many texts", JSON, json.dumps({"texts": ["中"] * 17}).encode(), 422, "holds 17 texts; at most 16"),
    ("body too large", JSON, json.dumps({"text": "x" * 20_001}).encode(), 413, "larger than 20000 bytes"),
    ("half a character", JSON, b'{"text": "\\ud800abc"}', 422, "unpaired surrogate"),
    ("no Content-Type", {}, b'{"text": "abc"}', 415, "Content-Type must be application/json"),
    ("a form post", {"Content-Type": "application/x-www-form-urlencoded"}, b"text=abc", 415, "not 'application/x-www"),
]


@pytest.mark.parametrize("what,headers,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_one_line(server, what, headers, body, status, message):
    got, data, response_headers = server.request("POST", "/ner", body, {**headers, **AUTH})
    assert got == status, data
    assert response_headers["content-type"] == "application/json"
    assert set(data) == {"error"} and message in data["error"] and "\n" not in data["error"]


def test_wrong_route_or_method_is_one_line_json(server):
    assert server.request("GET", "/nothing-here", headers=AUTH)[:2] == (404, {"error": "Not Found"})
    assert server.request("GET", "/ner", headers=AUTH)[:2] == (405, {"error": "Method Not Allowed"})


def test_api_key_guards_every_route_but_health(server):
    assert server.request("GET", "/health")[:2] == (200, {"status": "ok"})
    for method, path, body in (("GET", "/", None), ("GET", "/info", None), ("POST", "/ner", {"text": "张三"})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, data, response_headers = server.request(method, path, body, {**JSON, **headers})
            assert status == 401 and "API key" in data["error"], (path, headers)
            assert response_headers["www-authenticate"] == "Bearer"
        assert server.request(method, path, body, {**JSON, **AUTH})[0] == 200


def test_requests_for_another_host_name_are_refused(server):
    # A page whose own name was made to resolve to 127.0.0.1 still sends that name.
    status, data, _ = server.request("GET", "/health", headers={"Host": f"attacker.example:{server.port}"})
    assert status == 400 and "not this server's loopback address" in data["error"]
    assert server.request("GET", "/health", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_still_answers_correctly_after_1000_bad_requests(server, base_texts, base_expected):
    before = server.info()["stats"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    for n in range(1000):
        _, headers, body, status, _ = BAD[n % len(BAD)]
        if n % 7 == 0:
            headers, status = {**headers, "Authorization": "Bearer nope"}, 401
        else:
            headers = {**headers, **AUTH}
        try:
            got = server.request("POST", "/ner", body, headers, conn=conn)[0]
        except (http.client.HTTPException, OSError):
            conn.close()  # a refused body may end the connection: the next request opens another
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            got = server.request("POST", "/ner", body, headers, conn=conn)[0]
        assert got == status, (n, BAD[n % len(BAD)][0])
    conn.close()
    after = server.info()["stats"]
    assert after["texts"] == before["texts"]  # none of them reached the model
    assert sum(after["rejected"].values()) - sum(before["rejected"].values()) == 1000
    assert server.ner({"texts": base_texts})["results"] == base_expected


def test_sigterm_lets_the_request_in_flight_finish(tmp_path, base_options, base_texts, base_expected):
    # A 5 s batch wait keeps the one request waiting in the queue while the signal arrives.
    srv = Server(tmp_path, *base_options, "--batch_wait_ms=5000", "--batch_size=4")
    try:
        answer = {}
        client = threading.Thread(target=lambda: answer.update(r=srv.request("POST", "/ner", {"text": base_texts[0]},
                                                                             JSON)))
        client.start()
        deadline = time.monotonic() + 60
        while srv.info({})["stats"]["requests"] < 1:
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        client.join(120)
        assert answer["r"][:2] == (200, base_expected[0])
        assert srv.proc.wait(120) == 0
        assert "stopped on SIGTERM; 1 requests answered" in srv.output()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_refusals_before_the_model_loads(tmp_path):
    serve = load_script("serve")
    missing = str(tmp_path / "no-such-adapter")
    cases = [
        (["--host=0.0.0.0"], "can be reached from other machines and no --api_key"),
        (["--port=70000"], "is not a TCP port"),
        (["--batch_wait_ms=-1"], "must be between 0 and 10000"),
        (["--max_texts=2000"], "more than max_queue=1024"),
        (["--api_key=two words"], "printable ASCII without spaces"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            serve.main([f"--lora_model={missing}", *options])
    # Asked for explicitly, a public address without a key passes the check (and goes on to the adapter).
    with pytest.raises(Exception, match="does not exist"):
        serve.main([f"--lora_model={missing}", "--host=0.0.0.0", "--allow_no_key=True"])
    with pytest.raises(Exception, match="does not exist"):
        serve.main([f"--lora_model={missing}", "--host=0.0.0.0", "--api_key=k3y"])
    # From the command line: one line, exit 2.
    proc = run_cmd([PYTHON, "serve.py", f"--lora_model={missing}", "--host=0.0.0.0"], check=False, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: config key 'host': 0.0.0.0 can be reached from other machines")


def test_a_taken_port_is_refused_in_one_line(tmp_path, tiny_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            load_script("serve").main([*BASE, f"--model_dir={tiny_model}", f"--port={port}"])


# --------------------------------------------------------------- the batcher alone (no model)

def test_a_failing_request_does_not_fail_the_rest_of_its_batch():
    serve = load_script("serve")
    calls = []

    def run(texts):
        calls.append(list(texts))
        if "BOOM" in texts:
            raise ValueError("cannot read BOOM")
        return [t.upper() for t in texts]

    batcher = serve.Batcher(run, batch_size=8, max_wait=0, max_queue=100)
    # Queued before the thread starts: the first batch holds all three requests.
    futures = [batcher.submit(["a", "b"]), batcher.submit(["BOOM"]), batcher.submit(["c"])]
    batcher.start()
    assert futures[0].result(60) == ["A", "B"]
    assert futures[2].result(60) == ["C"]
    with pytest.raises(ValueError, match="cannot read BOOM"):
        futures[1].result(60)
    batcher.stop(60)
    assert calls == [["a", "b", "BOOM", "c"], ["a", "b"], ["BOOM"], ["c"]]
    stats = batcher.stats()
    assert (stats["batches"], stats["batches_retried_per_request"], stats["failed_requests"]) == (1, 1, 1)


def test_a_request_larger_than_a_batch_spans_several_and_the_queue_is_bounded():
    serve = load_script("serve")
    batcher = serve.Batcher(lambda texts: [t * 2 for t in texts], batch_size=2, max_wait=0, max_queue=6)
    big = batcher.submit(list("abcde"))
    with pytest.raises(serve.Busy, match="5 texts are waiting"):
        batcher.submit(["f", "g"])
    batcher.start()
    assert big.result(60) == ["aa", "bb", "cc", "dd", "ee"]
    batcher.stop(60)
    assert batcher.stats()["texts_per_batch"] == {"1": 1, "2": 2}


# --------------------------------------------------------------- the page in Chromium

@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "headless Chromium is needed: `make test` installs Debian's chromium package"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url, headers=None):
    context = browser.new_context(extra_http_headers=headers or {})
    page = context.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return context, page, requested, errors


def marks(page):
    return page.eval_on_selector_all("#marked mark", "ms => ms.map(m => [m.textContent, m.dataset.type])")


def test_page_never_runs_entity_text_or_type_names(server, browser):
    status, source, headers = server.request("GET", "/", headers=AUTH)
    assert status == 200 and "script-src 'sha256-" in headers["content-security-policy"]
    assert "http://" not in source and "https://" not in source and " src=" not in source and "@import" not in source
    context, page, requested, errors = open_page(browser, f"http://127.0.0.1:{server.port}/", AUTH)
    hostile = '<img src=x onerror="window.pwned=1">'
    text = hostile + "张三在</textarea><script>window.pwned=2</script>北京"
    record = {"text": text, "windows": 1, "output": "",
              "entities": [{"entity": hostile, "type": "PER", "begin": 0, "end": len(hostile)},
                           {"entity": "张三", "type": '<b onmouseover="window.pwned=3">X</b>',
                            "begin": len(hostile), "end": len(hostile) + 2},
                           {"entity": "</pre><script>window.pwned=4</script>", "type": "ORG", "begin": -1, "end": -1}]}
    # The answer is made up here (the tiny model would never name markup): what is tested is the page.
    page.route("**/ner", lambda route: route.fulfill(status=200, content_type="application/json",
                                                    body=json.dumps(record)))
    page.fill("#text", text)
    page.click("#go")
    page.wait_for_selector("#marked mark")
    page.hover("#chips .chip >> nth=1")
    assert page.evaluate("window.pwned") is None
    assert page.eval_on_selector_all("#marked img, #marked script, #marked b, #chips img, #chips b, #chips script, "
                                     "#json *, #legend b", "xs => xs.length") == 0
    assert page.text_content("#marked") == text
    assert marks(page) == [[hostile, "PER"], ["张三", '<b onmouseover="window.pwned=3">X</b>']]
    assert json.loads(page.text_content("#json")) == record
    assert errors == []
    assert all(url.startswith(f"http://127.0.0.1:{server.port}/") for url in requested)  # nothing else fetched
    context.close()


def test_page_shows_a_refusal_in_one_line(server, browser):
    context, page, _, _ = open_page(browser, f"http://127.0.0.1:{server.port}/", AUTH)
    page.fill("#text", "   ")
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.text_content("#error") == '"text" is empty: give the sentence to analyse'
    context.close()


# --------------------------------------------------------------- the memorised adapter (slow)

@pytest.fixture(scope="module")
def adapter(memorised_trainer):
    return memorised_trainer / "adapter_model"


ADAPTER_OPTIONS = ("--max_new_tokens=48",)


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory, adapter):
    # batch_wait_ms=200: concurrent requests from threads started together land in shared batches.
    srv = Server(tmp_path_factory.mktemp("serve-adapter"), f"--lora_model={adapter}", *ADAPTER_OPTIONS,
                 "--batch_size=8", "--batch_wait_ms=200")
    yield srv
    assert srv.stop(signal.SIGTERM) == 0, srv.output()[-3000:]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, adapter, train16, msra_dir):
    """The 16 memorised sentences, three unseen test sentences and the memorised ones joined (a
    long text), with predict.py's records for them."""
    texts = [r["query"].removeprefix(QUERY_PREFIX) for r in load_data(train16)]
    texts += sentences(msra_dir, 3) + ["".join(texts)]
    return texts, predict_py(tmp_path_factory.mktemp("predict-adapter"), texts, f"--lora_model={adapter}",
                             *ADAPTER_OPTIONS)


def test_adapter_answers_equal_predict_py_records(adapter_server, memorised):
    texts, expected = memorised
    assert expected[-1]["windows"] > 1
    assert sum(bool(r["entities"]) for r in expected) >= 10  # it memorised: most sentences have entities
    assert adapter_server.ner({"texts": texts})["results"] == expected
    for text, rec in zip(texts, expected):
        assert adapter_server.ner({"text": text}) == rec


def test_32_concurrent_requests_are_answered_in_shared_batches(adapter_server, memorised):
    texts, expected = memorised
    before = adapter_server.info({})["stats"]
    start = threading.Barrier(32)

    def client(n):
        start.wait()
        return adapter_server.request("POST", "/ner", {"text": texts[n % len(texts)]}, JSON)[:2]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(client, range(32)))
    assert answers == [(200, expected[n % len(texts)]) for n in range(32)]
    after = adapter_server.info({})["stats"]
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32  # the server's own count: requests shared batches
    assert after["largest_batch"] > 1


def test_page_highlights_the_entities_of_a_typed_sentence(adapter_server, browser, memorised):
    texts, expected = memorised
    # A memorised sentence with several entities that do not overlap: each is one highlight.
    rec = next(r for r in expected[:-1] if len(r["entities"]) >= 2 and all(e["begin"] >= 0 for e in r["entities"])
               and not any(a is not b and a["begin"] < b["end"] and b["begin"] < a["end"]
                           for a in r["entities"] for b in r["entities"]))
    context, page, _, errors = open_page(browser, f"http://127.0.0.1:{adapter_server.port}/")
    page.fill("#text", rec["text"])
    page.click("#go")
    page.wait_for_selector("#marked mark")
    in_order = sorted(rec["entities"], key=lambda e: e["begin"])
    assert marks(page) == [[e["entity"], e["type"]] for e in in_order]
    assert page.text_content("#marked") == rec["text"]
    assert json.loads(page.text_content("#json")) == rec
    legend = page.eval_on_selector_all("#legend .chip", "cs => cs.map(c => c.dataset.type)")
    assert legend == list(DEFAULT_LABEL_NAMES)  # one entry per type of the label set
    assert errors == []
    context.close()
