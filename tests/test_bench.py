"""The benchmark's model-FLOPs arithmetic and the load bench's statistics, against counts done by hand
or by torch's own FLOP counter; the demo's settings as make and the benchmark read them."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT, load_script

bench = load_script("bench/bench")  # puts bench/ on the path: its modules import as below
import common  # noqa: E402
import demo_settings  # noqa: E402
import flops  # noqa: E402
import real_model  # noqa: E402
import results_md  # noqa: E402
import then_and_now  # noqa: E402
import train_speed  # noqa: E402


def test_model_shape_counts_matmul_weights_by_hand(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4).save_pretrained(tmp_path)
    # Per layer: q, k, v, o 64x64 each; gate, up 64x128 and down 128x64; plus lm_head 64x100.
    # The input embedding is a lookup, not a matmul: not counted.
    per_layer = 4 * 64 * 64 + 3 * 64 * 128
    assert flops.model_shape(str(tmp_path)) == (2 * per_layer + 64 * 100, 2, 64)
    # The real-model section counts the body apart from the output layer (vocabulary 100).
    assert flops.body_shape(str(tmp_path)) == (2 * per_layer, 2, 64, 100)


def test_real_model_section_is_skipped_in_one_line_without_the_model(tmp_path, capsys):
    cfg = bench.parse_config(bench.DEFAULTS, {"real_model_dir": str(tmp_path / "absent")})
    assert real_model.run_real_model(cfg, 1e9) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("real-model section skipped: no model in")


@pytest.mark.parametrize("tokens", [1, 10, 33])
def test_flops_per_token_matches_torchs_flop_counter(tmp_path, tokens):
    """The model FLOPs of one T-token sequence, as torch counts them on a real forward (and, for
    LoRA training, a backward through frozen weights: input gradients only), against
    T * flops_per_token(shape, T). Eager attention, so the counter sees its two matmuls."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager")
    config.save_pretrained(tmp_path)
    shape = flops.model_shape(str(tmp_path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 100, (1, tokens))
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(ids)
    assert forward.get_total_flops() == tokens * flops.flops_per_token(shape, tokens, training=False)

    model.requires_grad_(False)  # frozen base weights; LoRA's own are negligible and left out
    model.enable_input_require_grads()  # what LoRA training does: gradients flow to the inputs
    with FlopCounterMode(display=False) as step:
        model(ids, labels=ids).loss.backward()
    assert step.get_total_flops() == tokens * flops.flops_per_token(shape, tokens, training=True)


def test_measured_cpu_peak_is_matmul_flops_over_the_best_time(peak, monkeypatch):
    """On a clock that advances 0.25 s per reading, every matmul takes 0.25 s: the peak is the
    FLOPs torch's own counter gives a 2048x2048 matmul, divided by 0.25."""
    from torch.utils.flop_counter import FlopCounterMode

    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(peak.time, "perf_counter", lambda: 0.25 * next(ticks))
    measured, source = peak.peak_flops("fp32")
    with FlopCounterMode(display=False) as counter:
        a = torch.empty(2048, 2048, device="meta")
        torch.mm(a, a)
    assert counter.get_total_flops() == 2 * 2048 ** 3  # one multiply and one add per inner-product term
    assert measured == counter.get_total_flops() / 0.25
    assert source == "measured 2048x2048 float32 matmul in this run"


@pytest.mark.parametrize("steps", [1, 2])
def test_training_timings_of_runs_no_longer_than_the_warmup(tiny_model, train16, tmp_path, steps):
    """A run of 1 or 2 steps keeps one timed step (the last): 4 examples over its seconds."""
    cfg = bench.parse_config(bench.DEFAULTS, {"train_path": str(train16), "train_examples": 16,
                                              "train_batch_size": 4, "dtype": "fp32"})
    cfg.steps = steps
    tcfg = train_speed.train_config(cfg, str(tiny_model), str(tmp_path / "run"), True, 256)
    trainer_stats, counting = train_speed.run_trainer(tcfg)
    bare_stats = train_speed.run_bare(tcfg, counting.batches[:steps])
    for stats in (trainer_stats, bare_stats):
        assert stats["seconds"] > 0
        assert stats["examples_per_second"] == pytest.approx(4 / stats["seconds"])
        last = counting.batches[steps - 1]
        assert stats["tokens_per_second"] == pytest.approx(int(last["attention_mask"].sum()) / stats["seconds"])


# ------------------------------------------------------ the README's memory estimate (bench/memory_table.py)

memory = load_script("bench/memory_table")


def test_memory_table_parameter_counts_by_hand():
    d, ffn, layers = 4096, 11008, 32
    llama_layer = 4 * d * d + 3 * d * ffn + 2 * d  # q, k, v, o; gate, up, down; two norms
    for name, vocab in [("Chinese-Alpaca-7B", 49954), ("Chinese-Alpaca-2-7B", 55296)]:
        model = memory.meta_model(*memory.MODELS[name])
        assert memory.parameter_count(model) == 2 * vocab * d + layers * llama_layer + d  # untied head, final norm
    # Qwen2.5-7B: 4 key/value heads of 128 dimensions, biases on q, k and v.
    d, ffn, layers, kv = 3584, 18944, 28, 4 * 128
    qwen_layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * ffn + 2 * d
    model = memory.meta_model(*memory.MODELS["Qwen2.5-7B"])
    assert memory.parameter_count(model) == 2 * 152064 * d + layers * qwen_layer + d


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_memory_table_counts_what_bitsandbytes_stores(tiny_model, mode):
    """The estimate's bytes for the quantised layers against the tensors a real quantised load holds."""
    import bitsandbytes as bnb

    from model_utils import load_model_and_tokenizer, meta_model

    model, _ = load_model_and_tokenizer(str(tiny_model), device="cpu", quantization=mode)
    stored, layers = 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state  # NF4 codes, 8-bit block scales, fp32 scales of those
            stored += m.weight.data.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes
        elif isinstance(m, bnb.nn.Linear8bitLt):
            stored += m.weight.data.nbytes + m.weight.SCB.nbytes  # int8 weights, one fp32 scale per row
        else:
            continue
        layers += 1
    linears = memory.quantized_linears(meta_model(str(tiny_model)))
    assert layers == len(linears) == 14  # 7 projections x 2 layers; the output layer stays unquantised
    assert stored == memory.quantized_bytes(linears, mode)


def _repository_with_a_changed_commit(tmp_path, path, old, new):
    """A git repository of this checkout's files (tracked and new, as they are now) whose one commit
    holds a deliberately changed copy (`old` replaced by `new` in `path`) and whose working tree is
    today's code again: (the repository, the commit)."""
    repo = tmp_path / "repo"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    today = (repo / path).read_text(encoding="utf-8")
    assert today.count(old) == 1
    (repo / path).write_text(today.replace(old, new), encoding="utf-8")
    git = ["git", "-C", str(repo), "-c", "user.name=bench test", "-c", "user.email=bench@test", "-c",
           "commit.gpgsign=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "a changed copy"]):
        subprocess.run(git + args, check=True, env=env)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True, env=env).stdout.strip()
    (repo / path).write_text(today, encoding="utf-8")
    return repo, commit


def test_test_py_then_and_now_runs_the_commits_test_py_and_todays(tmp_path, tiny_model, memorised_trainer,
                                                                 train16, capsys, monkeypatch):
    """The baseline commit is a changed copy of today's code (answers cut at 2 new tokens by
    default): its run must show the cut answers and a lower F1, today's run the whole answers,
    both on the sentences of the seeded sample drawn here independently."""
    import json
    import random

    from dataset import sentence_of

    repo, commit = _repository_with_a_changed_commit(
        tmp_path, "infer_config.py", '"max_new_tokens": 64,', '"max_new_tokens": 2,')
    monkeypatch.setattr(then_and_now, "ROOT", repo)
    options = {"real_eval_examples": 8, "real_eval_batch_size": 4, "real_demo_batch_size": 8,
               "test_path": str(train16), "work_dir": str(tmp_path / "work"), "real_baseline_commit": commit}
    cfg = bench.parse_config(bench.DEFAULTS, options)
    adapter = str(memorised_trainer / "adapter_model")
    result = then_and_now.run_test_py_then_and_now(cfg, adapter, str(tiny_model))
    lines = train16.read_text(encoding="utf-8").splitlines()
    expected = [json.loads(lines[i]) for i in sorted(random.Random(0).sample(range(16), 8))]

    def answers(name):
        rows = [json.loads(line) for line in (tmp_path / "work" / "then-and-now" / name / "predictions.jsonl").open()]
        assert [r["text"] for r in rows] == [sentence_of(e["query"]) for e in expected]
        return [r["output"] for r in rows]

    # Today's test.py gives the memorised answers; the commit's stops after 2 tokens.
    assert answers("now") == [e["answer"] for e in expected]
    assert answers("then") != answers("now") and answers("then") == answers("then_batch16")
    assert result["then"]["f1"] < result["now"]["f1"] == 1.0
    answers("now_demo")
    assert result["examples"] == 8
    assert result["now_demo"]["batch_size"] == 8 and result["now_demo"]["eos_penalty"] == cfg.real_eos_penalty
    assert result["speedup"] == result["now"]["examples_per_second"] / result["then"]["examples_per_second"]

    cfg = bench.parse_config(bench.DEFAULTS, {**options, "real_baseline_commit": "0" * 40})
    assert then_and_now.run_test_py_then_and_now(cfg, adapter, str(tiny_model)) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"test.py then-and-now skipped: git cannot read commit {'0' * 40}")


# ------------------------------------------------------ bf16 where the CPU has it, decided without measuring

class NoLargeBf16Matmul(torch.utils._python_dispatch.TorchDispatchMode):
    """Refuses any bf16 matrix product on operands past 128x128: where bf16 is emulated (AVX2),
    one 2048x2048 takes minutes; deciding the eval dtype may afford milliseconds."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.matmul.default, torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.numel() > 128 * 128
                                         for a in args):
            raise AssertionError(f"a large bf16 matmul ({func}) decides the dtype")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def peak(monkeypatch):
    """bench/peak.py as the demo runs it (its folder first on the path, as for a script)."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(bench.ROOT / "bench"))
    monkeypatch.delitem(sys.modules, "peak", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return importlib.import_module("peak")


@pytest.mark.parametrize("native", [True, False])
def test_eval_dtype_is_decided_without_a_large_bf16_matmul(peak, monkeypatch, capsys, native):
    monkeypatch.setattr(peak, "native_bf16", lambda: (native, "avx512_bf16" if native else "no bf16 flags"),
                        raising=False)
    with NoLargeBf16Matmul():
        peak.main(["--eval-dtype"])
    assert capsys.readouterr().out.strip() == ("bfloat16" if native else "auto")


def test_demo_peak_line_measures_fp32_and_no_emulated_bf16(peak, monkeypatch, capsys):
    monkeypatch.setattr(peak, "native_bf16", lambda: (False, "no avx512_bf16 or amx_bf16 flag"), raising=False)
    with NoLargeBf16Matmul():
        peak.main(["15", "185"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("machine peak: ") and "GFLOP/s (measured 2048x2048 float32 matmul" in lines[0]
    assert lines[1] == ("eval dtype: fp32 (this CPU has no native bf16, no avx512_bf16 or amx_bf16 flag: bf16 "
                        "would be emulated)")


def test_native_bf16_reads_the_cpu_flags(peak, monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(peak, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert peak.native_bf16()[0] is False and peak.eval_dtype() == "auto"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert peak.native_bf16() == (True, "avx512_bf16") and peak.eval_dtype() == "bfloat16"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # aarch64
    assert peak.native_bf16() == (True, "bf16")


def test_real_model_section_skips_emulated_bf16_and_writes_relative_paths(tiny_model, msra_dir, tmp_path, capsys,
                                                                           monkeypatch):
    data = msra_dir["dir"] / "instruct_data"
    cfg = bench.parse_config(bench.DEFAULTS, {
        "real_model_dir": str(tiny_model), "real_adapter": "", "train_path": str(data / "train.txt"),
        "test_path": str(data / "test.txt"), "train_examples": 16, "real_train_steps": 1, "real_train_batch_size": 2,
        "real_eval_examples": 4, "real_eval_batch_size": 4, "real_demo_batch_size": 4, "real_baseline_commit": "",
        "work_dir": str(tmp_path / "work"), "dtype": "fp32"})
    cfg.steps = 1  # as main sets it
    monkeypatch.setattr(real_model, "native_bf16", lambda: (False, "no avx512_bf16 or amx_bf16 flag"))
    # Which variants run is the question here, not their answers: generation is stood in for.
    monkeypatch.setattr("generation.ner_generate", lambda model, tokenizer, args, records, **kw: (
        ["没有"] * len(records), 0))
    with NoLargeBf16Matmul():
        real = real_model.run_real_model(cfg, 1e11)
    assert "merged_bf16" not in real["eval"] and "bf16_speedup" not in real
    assert "bf16 variant (g) skipped: this CPU has no native bf16" in capsys.readouterr().out
    page = "\n".join(results_md.real_model_markdown(real))
    assert "(g) skipped: this CPU has no native bf16" in page
    # Paths inside the checkout are written relative to it: the files are committed.
    inside = {**real, "model": str(bench.ROOT / "model_hub" / "gemma-3-270m"),
              "adapter": str(bench.ROOT / "checkpoint" / "msra" / "gemma" / "adapter_model")}
    page = "\n".join(results_md.real_model_markdown(common.relative_paths(inside)))
    assert str(bench.ROOT) not in page and "model_hub/gemma-3-270m, adapter: checkpoint/msra/gemma/adapter_model" in page


def test_committed_results_hold_no_path_of_a_checkout():
    for name in ("BENCHMARKS.md", "bench/results.json", "bench/results_real_model.json", "bench/load_results.json"):
        text = (bench.ROOT / name).read_text(encoding="utf-8")
        assert "/work/" not in text and "/home/" not in text and str(bench.ROOT) not in text, name


def test_load_percentiles_by_hand():
    load = load_script("bench/load")
    values = [v / 1000 for v in range(200, 0, -1)]  # 0.001 .. 0.200 s, in no particular order
    assert load.percentile(values, 50) == 0.100 and load.percentile(values, 99) == 0.198
    assert load.percentile([0.5], 99) == 0.5
    stats = load.summary([0.1, 0.3, 0.2, 0.4], seconds=2.0)
    assert (stats["requests_per_second"], stats["p50_ms"], stats["p99_ms"]) == (2.0, 200.0, 400.0)


def test_load_section_replaces_itself_and_survives_bench_rewriting_the_rest(tmp_path):
    load = load_script("bench/load")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nthe training table\n", encoding="utf-8")
    load.write_section(md, load.MARKER + "\n\n## Serving under load\n\nfirst run\n")
    load.write_section(md, load.MARKER + "\n\n## Serving under load\n\nsecond run\n")
    text = md.read_text(encoding="utf-8")
    assert text.count(load.MARKER) == 1 and "first run" not in text
    assert text.startswith("# Benchmarks\n\nthe training table\n") and text.endswith("second run\n")
    # bench.py writes its own sections and keeps the load section as it was.
    results = json.loads((ROOT / "bench" / "results.json").read_text(encoding="utf-8"))
    results_md.write_markdown(md, results, "python bench/bench.py")
    text = md.read_text(encoding="utf-8")
    assert "the training table" not in text and "## Training" in text
    assert text.count(load.MARKER) == 1 and text.endswith("## Serving under load\n\nsecond run\n")
    # The figures measured by hand, between bench.py's sections and the load section, survive both.
    figures = common.FIGURES_MARKER + "\n\n## Figures behind code choices\n\n- a figure\n\n"
    md.write_text(text.replace(load.MARKER, figures + load.MARKER), encoding="utf-8")
    results_md.write_markdown(md, results, "python bench/bench.py")
    load.write_section(md, load.MARKER + "\n\n## Serving under load\n\nthird run\n")
    text = md.read_text(encoding="utf-8")
    assert text.count(figures) == 1 and text.index(figures) < text.index(load.MARKER)
    assert text.count("## Training") == 1 and text.endswith("third run\n")


def test_committed_benchmarks_keep_the_figures_section_before_the_load_section():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert common.FIGURES_MARKER in text and text.index(common.FIGURES_MARKER) < text.index(common.LOAD_MARKER)


# ------------------------------------------------------ make demo's settings: one file, read by make and the bench

def test_demo_settings_are_what_make_reads(monkeypatch):
    """Every setting demo.mk holds, as make itself expands it (no variable set in the environment),
    equals what bench/demo_settings.py reads; the real-model section's defaults come from them."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    settings = demo_settings.read_demo_settings()
    assert {"GEMMA_DIR", "GEMMA_RUN", "GEMMA_EVAL_BATCH", "SEED_FORMAT_EOS_PENALTY", "SEED_FORMAT_POLICY"} <= set(settings)
    env = {k: v for k, v in os.environ.items() if k not in settings and not k.startswith("MAKE")}
    shown = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "_show-%: ; @echo '$*=$($*)'",
                            *(f"_show-{name}" for name in settings)],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert dict(line.split("=", 1) for line in shown.splitlines()) == settings
    assert bench.DEFAULTS["real_model_dir"] == str(ROOT / settings["GEMMA_DIR"])
    assert bench.DEFAULTS["real_adapter"] == str(ROOT / settings["GEMMA_RUN"] / "adapter_model")
    assert bench.DEFAULTS["real_demo_batch_size"] == int(settings["GEMMA_EVAL_BATCH"])
    assert bench.DEFAULTS["real_eos_penalty"] == float(settings["SEED_FORMAT_EOS_PENALTY"])
    assert bench.DEFAULTS["real_demo_policy"] == settings["SEED_FORMAT_POLICY"]


@pytest.mark.parametrize("line", ["GEMMA_STEPS ?= 100  # a why after the value", "GEMMA_RUN ?= $(HOME)/run",
                                  "ifdef GEMMA_STEPS", "GEMMA_STEPS 100"])
def test_demo_settings_refuse_what_make_would_read_otherwise(tmp_path, line):
    path = tmp_path / "demo.mk"
    path.write_text(f"# why\nGEMMA_BATCH ?= 16\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"demo\.mk:4: not a plain `NAME \?= value` line"):
        demo_settings.read_demo_settings(path)
    path.write_text("# why\nGEMMA_BATCH ?= 16\nGEMMA_LR = 1e-3\n", encoding="utf-8")
    assert demo_settings.read_demo_settings(path) == {"GEMMA_BATCH": "16", "GEMMA_LR": "1e-3"}


def test_loss_vocabulary_bench_times_both_losses_on_the_same_batches(tiny_model, train16, capsys):
    """bench/loss_vocabulary.py: both settings run the same batches; the table names each, and
    the batch's distinct tokens are far fewer than the vocabulary."""
    import loss_vocabulary

    best = loss_vocabulary.main([f"--model_dir={tiny_model}", f"--train_path={train16}", "--batch_size=4",
                                 "--batches=1", "--rounds=1", "--max_seq_length=256"])
    assert set(best) == {"all", "batch"} and min(best.values()) > 0
    out = capsys.readouterr().out
    assert "| all | " in out and "| batch | " in out
    distinct = int(out.split("tokens in each: ")[1].split(" of ")[0])
    vocabulary = int(out.split(" of ")[1].split()[0].replace(",", ""))
    assert 0 < distinct < vocabulary // 4
