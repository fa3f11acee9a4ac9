"""serve.py under load: 1, 8 and 32 concurrent clients, side by side with one-at-a-time prediction.

    make bench-load                 # python bench/load.py (make bench runs it too, after bench.py)
    python bench/load.py --quick=True

The same MSRA test sentences are answered several ways in one run, on one machine:
  one at a time   predict.py's reading (predict.predict_records) of one sentence after another in
                  this process, the model loaded once: what serving each request as it comes costs;
  N clients       serve.py in its own process, N client threads each sending one sentence per
                  request and the next when the answer is back, until every sentence is answered.
The ways take turns in rounds over shares of the sentences (both models stay loaded), so that a
job that starts or stops elsewhere on the machine mid-run slows every row alike.
Requests/s, and p50/p99 latency (per request, as the client sees it). The server's own counters
give its batches. Every answer is checked against the one-at-a-time record of the same sentence.
The model is bench.py's random LLaMA (bench shape, with the tiny tokenizer: make bench builds it);
then Gemma 3 270M with a tuned adapter when both are there (make demo), else one line says why not.
Results go to bench/load_results.json and to BENCHMARKS.md's last section (rewritten in place).
"""
import os

# The one-at-a-time row runs in this process's main thread, the server's generation in a worker
# thread. With OpenMP's default spinning wait, a busy machine slowed the main thread's parallel
# regions many times over and the worker's not; waiting passively, both ran alike (the times:
# BENCHMARKS.md, "Figures behind code choices"). Set before torch loads, and inherited by the server.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import http.client  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # bench/'s modules, then the checkout's

from common import LOAD_MARKER as MARKER, build_random_model, machine, relative_paths  # noqa: E402  (bench/common.py)
from config_utils import parse_config, run_cli  # noqa: E402
from dataset import QUERY_PREFIX, load_data  # noqa: E402

DEFAULTS = {
    "tokenizer_dir": str(ROOT / "model_hub" / "tiny-llama"),  # the random model's tokenizer (make bench builds it)
    "shape": "bench",  # bench.py's random LLaMA: hidden 512, 4 layers (20.8M parameters)
    "seed": 0,
    "test_path": str(ROOT / "data" / "msra" / "instruct_data" / "test.txt"),
    "sentences": 200,  # MSRA test sentences, the same for every row (quick: 64)
    "clients": [1, 8, 32],  # concurrent clients, one row each
    "rounds": 2,  # the sentences are measured in this many shares, every row in turn for each share
    "max_new_tokens": 16,  # as bench.py's evaluation on the random model
    "batch_size": 32,  # serve.py's --batch_size (test.py's default)
    "batch_wait_ms": 10.0,  # serve.py's default
    "dtype": "auto",
    "quick": False,
    "startup_timeout": 900,  # seconds serve.py may take to load and warm up
    "real_model_dir": str(ROOT / "model_hub" / "gemma-3-270m"),  # make gemma
    "real_adapter": str(ROOT / "checkpoint" / "msra" / "gemma" / "adapter_model"),  # make demo
    "real_sentences": 64,  # fewer: a real model answers about 10 sentences/s on 2 cores
    "real_max_new_tokens": 64,  # test.py's default; MSRA answers are shorter
    "real_eos_penalty": 1.5,  # make demo's
    "real_grounding_policy": "first_choice",  # make demo's
    "real_dtype": "auto",
    "work_dir": str(ROOT / "bench" / "out"),
    "output": str(ROOT / "bench" / "load_results.json"),
    "markdown": str(ROOT / "BENCHMARKS.md"),
}

def percentile(values, q):
    """Nearest-rank percentile: the smallest value at least q% of the values do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(latencies, seconds):
    return {"requests": len(latencies), "seconds": seconds, "requests_per_second": len(latencies) / seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


class OneAtATime:
    """predict.py's reading of one text after another, in this process, the model loaded once."""

    def __init__(self, options):
        import predict
        from infer_config import instruct_for, label_names_for, load_from_config, recorded_args

        self.predict = predict
        self.cfg = parse_config(predict.DEFAULTS, options)
        recorded = recorded_args(self.cfg)
        self.labels, self.instruct = label_names_for(recorded), instruct_for(recorded)
        self.model, self.tokenizer, self.train_args = load_from_config(self.cfg)

    def read(self, text):
        record = {"instruct": self.instruct, "query": QUERY_PREFIX + text}
        return self.predict.predict_records(self.model, self.tokenizer, self.train_args, [record], self.cfg,
                                            self.labels)[0]

    def __call__(self, texts):
        """-> (latencies, seconds, records)"""
        records, latencies = [], []
        start = time.perf_counter()
        for text in texts:
            t = time.perf_counter()
            records.append(self.read(text))
            latencies.append(time.perf_counter() - t)
        return latencies, time.perf_counter() - start, records


class Serve:
    """serve.py on a free loopback port, its log in a file."""

    def __init__(self, options, log, timeout):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--port={self.port}",
                                      "--access_log=False", *(f"--{k}={v}" for k, v in options.items())],
                                     cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.monotonic() + timeout
        while not self._up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve.py did not start; its log: {log}")
            time.sleep(0.5)

    def _up(self):
        try:
            return self.get("/health") is not None
        except OSError:
            return False

    def get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(server, texts, clients):
    """`clients` threads, each with its own keep-alive connection, send the texts one per request
    until all are answered -> (latencies, seconds, records in text order, batches the server ran)."""
    records, latencies, failures = [None] * len(texts), [], []
    lock, next_text = threading.Lock(), iter(range(len(texts)))
    ready = threading.Barrier(clients + 1)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        ready.wait()
        while True:
            with lock:
                n = next(next_text, None)
            if n is None:
                break
            body = json.dumps({"text": texts[n]}, ensure_ascii=False).encode("utf-8")
            t = time.perf_counter()
            conn.request("POST", "/ner", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if resp.status == 200:
                    records[n] = data
                else:
                    failures.append(data)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    before = server.get("/info")["stats"]["batches"]
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, seconds, records, server.get("/info")["stats"]["batches"] - before


def run_model(name, options, texts, cfg, work):
    """Every row over the same texts, in `rounds` rounds: each round reads its share of the texts
    one at a time, then serves it to 1, 8, 32 clients. Whatever else the machine runs meanwhile
    slows every row alike, not the one that happened to run then."""
    print(f"{name}: {len(texts)} sentences, {cfg.rounds} rounds ...", flush=True)
    single = OneAtATime(options)
    server = Serve({**options, "batch_size": cfg.batch_size, "batch_wait_ms": cfg.batch_wait_ms},
                   work / f"serve-{name}.log", cfg.startup_timeout)
    rows = {"one": {"latencies": [], "seconds": 0.0, "records": [], "batches": 0}}
    rows.update({c: {"latencies": [], "seconds": 0.0, "records": [], "batches": 0} for c in cfg.clients})
    try:
        single(texts[:2])  # warm-up, as serve.py answers one text before it listens
        for clients in cfg.clients:
            load(server, texts[:2 * clients], clients)  # warm-up: connections, batch shapes
        for k in range(cfg.rounds):
            part = texts[k * len(texts) // cfg.rounds:(k + 1) * len(texts) // cfg.rounds]
            measured = {"one": (*single(part), len(part))}
            measured.update({c: load(server, part, c) for c in cfg.clients})
            for key, (latencies, seconds, records, batches) in measured.items():
                rows[key]["latencies"] += latencies
                rows[key]["seconds"] += seconds
                rows[key]["records"] += records
                rows[key]["batches"] += batches
            print(f"  round {k + 1}: " + ", ".join(f"{key}: {len(part) / m[1]:.2f}/s" for key, m in measured.items()),
                  flush=True)
    finally:
        server.stop()
    one = rows.pop("one")
    base = summary(one["latencies"], one["seconds"])
    served = []
    for clients, row in rows.items():
        stats = summary(row["latencies"], row["seconds"])
        stats.update(clients=clients, texts_per_batch=len(texts) / row["batches"],
                     speedup=stats["requests_per_second"] / base["requests_per_second"],
                     answers_identical=row["records"] == one["records"])
        served.append(stats)
        print(f"  {clients} clients: {stats['requests_per_second']:.2f} requests/s ({stats['speedup']:.2f}x), "
              f"p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, "
              f"{stats['texts_per_batch']:.1f} texts per batch", flush=True)
    print(f"  one at a time: {base['requests_per_second']:.2f} requests/s", flush=True)
    return {"sentences": len(texts), "rounds": cfg.rounds, "options": {k: str(v) for k, v in options.items()},
            "one_at_a_time": base, "served": served}


def markdown(results, command):
    lines = [MARKER, "", "## Serving under load", "",
             f"Produced by `{command}` on {results['machine']}, {results['date']}: serve.py in its own process "
             f"(--batch_size={results['batch_size']}, --batch_wait_ms={results['batch_wait_ms']:g}), N client "
             f"threads in this one, each sending one MSRA test sentence per request and the next when its answer "
             f"is back; beside it predict.py's reading of the same sentences one after another in this process "
             f"(the model loaded once). The rows take turns, in rounds over shares of the sentences, so that "
             f"other work on the machine slows them alike. Latency is per request, as the client sees it; "
             f"batches are the server's own count.", ""]
    for name, r in results["models"].items():
        if r is None:
            continue
        s = r["one_at_a_time"]
        lines += [f"{name}, {r['sentences']} sentences in {r['rounds']} rounds, up to "
                  f"{r['options']['max_new_tokens']} new tokens (grounded):", "",
                  "| how | requests/s | vs one at a time | p50 latency | p99 latency | texts per batch | "
                  "answers as one at a time |", "|---|---|---|---|---|---|---|",
                  f"| predict.py, one at a time | {s['requests_per_second']:.2f} | 1.00x | {s['p50_ms']:.0f} ms | "
                  f"{s['p99_ms']:.0f} ms | 1 | - |"]
        for row in r["served"]:
            lines.append(f"| serve.py, {row['clients']} client{'s' if row['clients'] > 1 else ''} | "
                         f"{row['requests_per_second']:.2f} | **{row['speedup']:.2f}x** | {row['p50_ms']:.0f} ms | "
                         f"{row['p99_ms']:.0f} ms | {row['texts_per_batch']:.1f} | {row['answers_identical']} |")
        lines.append("")
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def write_section(path, section):
    """BENCHMARKS.md with its load section replaced (or added): the rest of the file stays as it was."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    head = text.split(MARKER, 1)[0].rstrip("\n")
    path.write_text(head + "\n\n" + section, encoding="utf-8")


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    if cfg.quick:
        cfg.sentences = min(cfg.sentences, 64)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    texts = [r["query"].removeprefix(QUERY_PREFIX) for r in load_data(cfg.test_path)]
    model_dir = work / "random-llama"  # bench.py's, built the same way (seeded)
    n_params = build_random_model(cfg, model_dir)
    shape = (f"random LLaMA ({cfg.shape} shape, {n_params / 1e6:.1f}M parameters)")
    models = {shape: run_model("random", {"no_adapter": True, "model_dir": model_dir, "max_new_tokens": cfg.max_new_tokens,
                                          "dtype": cfg.dtype}, texts[:cfg.sentences], cfg, work)}
    notes = []
    real, adapter = Path(cfg.real_model_dir), Path(cfg.real_adapter)
    if (real / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        options = {"lora_model": adapter, "model_dir": real, "max_new_tokens": cfg.real_max_new_tokens,
                   "eos_penalty": cfg.real_eos_penalty, "grounding_policy": cfg.real_grounding_policy,
                   "dtype": cfg.real_dtype}
        models[f"Gemma 3 270M with {adapter}"] = run_model("gemma", options, texts[:cfg.real_sentences], cfg, work)
    else:
        line = (f"Gemma 3 270M skipped: no model in {real} (make gemma) or no adapter in {adapter} (make demo)")
        print(line)
        notes.append(line)
    first = next(iter(models.values()))
    results = relative_paths({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "batch_size": cfg.batch_size,
                              "batch_wait_ms": cfg.batch_wait_ms, "models": models, "notes": notes,
                              "speedup_32_clients": next((r["speedup"] for r in first["served"] if r["clients"] == 32),
                                                         None)})
    Path(cfg.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    given = list(sys.argv[1:] if argv is None else argv)
    write_section(cfg.markdown, markdown(results, " ".join(["python bench/load.py", *given])))
    print(f"wrote {cfg.output} and {cfg.markdown}")
    return results


if __name__ == "__main__":
    run_cli(main)
