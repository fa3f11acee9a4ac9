"""How a benchmark run reads in BENCHMARKS.md: its tables and ratios, written over the file's
sections but bench/load.py's, which is kept as it was."""
from pathlib import Path

from common import FIGURES_MARKER, LOAD_MARKER
from train_speed import WARMUP_STEPS


def table_rows(stats, labels, cells):
    """Markdown rows `| label | cells(stats[key])... |`, a peak-memory note on GPU runs."""
    rows = []
    for key, label in labels.items():
        r = stats[key]
        memory = f" (peak {r['peak_memory_gib']:.1f} GiB)" if "peak_memory_gib" in r else ""
        rows.append(f"| {label}{memory} | " + " | ".join(cells(r)) + " |")
    return rows


def write_markdown(path, results, command):
    t, e = results["train"], results["eval"]
    lines = [
        "# Benchmarks", "",
        f"Produced by `{command}` on {results['machine']}, {results['date']}.",
        f"Model: {results['model']}. Ratios come from one run, variants side by side.", "",
        "## Training", "",
        f"{results['train_steps']} optimizer steps of {results['train_batch_size']} MSRA examples each; "
        f"the first {WARMUP_STEPS} are not timed; gradient checkpointing {results['gradient_checkpointing']}.", "",
        "| variant | examples/s | tokens/s | MFU | non-padding tokens | final loss |", "|---|---|---|---|---|---|",
    ]
    names = {"seed": "(a) the original repository's recipe: pad to 192, random batches", "ours": "(b) train_trainer.py default",
             "bare": "(c) bare PyTorch loop, batches and loss of (b)",
             "no_prefix": "(b') (b) with share_prefix=False"}
    lines += table_rows(t, names, lambda r: [
        f"{r['examples_per_second']:.2f}", f"{r['tokens_per_second']:.0f}", f"{r['mfu']:.1%}",
        f"{r['non_padding_fraction']:.1%}", f"{r['final_loss']:.3f}"])
    lines += ["", f"- train_speedup_vs_seed (b/a): **{results['train_speedup_vs_seed']:.2f}**",
              f"- train_efficiency_vs_bare (b/c): **{results['train_efficiency_vs_bare']:.2f}**",
              f"- train_speedup_prefix (b/b'): **{results['train_speedup_prefix']:.2f}** (the same batches; "
              f"the shared prompt prefix runs once per batch instead of once per example)", "",
              "## Evaluation", "",
              f"{results['eval_examples']} MSRA test sentences, {results['max_new_tokens']} new tokens each (greedy).", "",
              "| variant | examples/s | answer tokens | MFU | prompts' pass (s) | the rest: decoding (s) |",
              "|---|---|---|---|---|---|"]
    enames = {"single": "(a) one example at a time", "batched": "(b) batched generation",
              "prefix_cache": "(c) batched + shared-prefix KV cache",
              "grounded": "(d) (c) with grounded decoding",
              "unpacked": "(e) (c) without packed weights (plain row-major matmuls)"}
    lines += table_rows(e, enames, lambda r: [
        f"{r['examples_per_second']:.2f}", f"{r['answer_tokens']:.1f}" if "answer_tokens" in r else "-",
        f"{r.get('mfu', float('nan')):.1%}", f"{r.get('prompt_seconds', float('nan')):.2f}",
        f"{r['seconds'] - r.get('prompt_seconds', float('nan')):.2f}" if "seconds" in r else "-"])
    lines += ["", f"- eval_speedup_vs_single (b/a): **{results['eval_speedup_vs_single']:.2f}**",
              f"- eval_speedup_prefix_cache (c/b): **{results['eval_speedup_prefix_cache']:.2f}**",
              f"- the prompts' pass alone, (b)/(c) in seconds: **{results['eval_prompt_speedup_prefix_cache']:.2f}** "
              f"(the part the prefix cache shortens; both decode the same {results['max_new_tokens']} tokens a row)",
              f"- packed weights (c/e): **{results['eval_speedup_packed']:.2f}**",
              f"- outputs identical across (a), (b), (c), (e): **{results['eval_outputs_identical']}**",
              f"- eval_grounded_vs_plain (d/c): **{results['eval_grounded_vs_plain']:.2f}** (examples/s; "
              f"the random model's grounded answers are shorter, see the answer tokens column)", "",
              "## Model FLOPs utilisation", "",
              f"MFU = model FLOPs per second over the peak: {results['peak_flops'] / 1e12:.3g} TFLOP/s "
              f"({results['peak_source']}). Model FLOPs count useful work only: real (non-padding) tokens, "
              "2N per token forward for the N matmul weights plus attention over the context, and for LoRA "
              "training the backward pass through the frozen weights (4N in all), as nanoGPT's estimate_mfu "
              "does for full training (6N). A shared prompt prefix counts once where a variant runs it once. "
              "Padding, recomputed prefixes and Python overhead lower MFU.", ""]
    if results.get("real_model"):
        lines += real_model_markdown(results["real_model"])
    old = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else ""
    # What follows the first of the kept sections' markers (the figures measured by hand, then
    # bench/load.py's) stays as it was.
    kept = [old.index(marker) for marker in (FIGURES_MARKER, LOAD_MARKER) if marker in old]
    kept_sections = ["", old[min(kept):].rstrip("\n")] if kept else []
    Path(path).write_text("\n".join(lines + kept_sections) + "\n", encoding="utf-8")


def real_model_markdown(r):
    from kv_cache import PREFILL_TOKENS

    t, e = r["train"], r["eval"]
    lines = ["## A real model", "",
             f"{r['model']}, adapter: {r['adapter']}. Same run, same peak as above. MFU here counts the body "
             "(every matmul but the output layer, plus attention) on the tokens each example needs (its own "
             "prompt tokens, the shared prefix once per call, the answer); training adds the output layer at "
             "the trained positions, which the loss needs. Output-layer work a variant does beyond that "
             "(every logit of a 262,144-token vocabulary at each generated token) is not counted, so it shows "
             "as lower MFU.", "",
             f"Training: {r['train_steps']} LoRA steps of {r['train_batch_size']} MSRA examples (the first "
             f"{WARMUP_STEPS} not timed).", "",
             "| variant | examples/s | MFU | final loss |", "|---|---|---|---|"]
    lines += table_rows(t, {"ours": "train_trainer.py (HF Trainer)", "bare": "bare PyTorch loop, same batches and loss"},
                        lambda s: [f"{s['examples_per_second']:.2f}", f"{s['mfu']:.1%}", f"{s['final_loss']:.3f}"])
    lines += ["", f"Generation: {r['eval_examples']} seeded MSRA test sentences, grounded (eos_penalty "
                  f"{r['eos_penalty']}), batch {r['eval_batch_size']} unless the row says otherwise, up to 64 new "
                  "tokens. The own loop reads a batch's prompts in row chunks of at most "
                  f"{PREFILL_TOKENS} tokens (kv_cache.PREFILL_TOKENS).", "",
              "| variant | examples/s | answer tokens | MFU | grammar share of the time |", "|---|---|---|---|---|"]
    names = {"transformers_first_choice": "(a) transformers' generate, first_choice (every logit, as test.py before)",
             "own_first_choice": "(b) own loop, first_choice (finished rows leave the batch)",
             "own_best_allowed": "(c) own loop, best_allowed: only the allowed tokens' logits (test.py's loop)",
             "own_best_allowed_unpacked": "(c') as (c), plain row-major weights (packed_weights=False)",
             "transformers_best_allowed": "(d) transformers' generate, best_allowed (every logit)",
             "own_best_allowed_demo_batch": f"(e) as (c), batch {e['own_best_allowed_demo_batch']['batch_size']} "
                                            "(make demo's batch)",
             "merged": "(f) as (e), the adapter folded into the weights (test.py's merge_lora)",
             "merged_bf16": f"(g) as (f), bf16 weights (make demo where bf16 is native; MFU against the bf16 "
                            f"peak, {(r.get('bf16_peak_flops') or 0) / 1e9:.0f} GFLOP/s)"}
    names = {k: v for k, v in names.items() if k in e}
    lines += table_rows(e, names, lambda s: [f"{s['examples_per_second']:.2f}", f"{s['answer_tokens']:.1f}",
                                             f"{s['mfu']:.1%}", f"{s['grammar_share']:.1%}"])
    skipped = r.get("bf16_skipped")
    demo = "f" if skipped else "g"
    lines += ["", f"- own loop, allowed logits only, over transformers' generate (c/a): **{r['own_loop_speedup']:.2f}**; "
                  f"make demo's path over (a) ({demo}/a): **{r['demo_speedup']:.2f}**",
              f"- (a) and (b) give identical answers: **{r['own_loop_identical']}**; (c) and (d): "
              f"**{r['allowed_logits_identical']}**; (c) and (e): **{r['demo_batch_identical']}**",
              f"- first_choice and best_allowed differ on {r['policies_differ_on']} of {r['eval_examples']} answers; "
              f"(e) and (f) on {r['merged_differ_on']}" + ("" if skipped else f"; (f) and (g) on {r['bf16_differ_on']}"),
              f"- packed weights (c/c'): **{r['packed_speedup']:.2f}**; (c) and (c') differ on {r['packed_differ_on']} answers",
              f"- (g) skipped: {skipped}" if skipped else f"- bf16 over fp32 (g/f): **{r['bf16_speedup']:.2f}**", ""]
    h = r.get("test_py_then_and_now")
    if h:
        lines += [f"test.py itself, then and now: test.py at commit {h['commit']} (before the real-model work) and "
                  f"today's, one after the other in this run, each as its own process on the same {h['examples']} "
                  "seeded sentences with the same adapter; examples/s is the generation time each test.py measures "
                  "(loading not counted). The answers differ where the defaults differ (policy, eos_penalty), so "
                  "F1 is shown beside the speed.", "",
                  "| test.py | batch | policy | eos_penalty | dtype | examples/s | F1 |", "|---|---|---|---|---|---|---|"]
        lines += table_rows(h,
                            {"then": f"{h['commit']}, its defaults", "then_batch16": f"{h['commit']}, batch 16",
                             "now": "today's, its defaults", "now_demo": "today's, as make demo runs it"},
                            lambda s: [str(s["batch_size"]), s["policy"], str(s.get("eos_penalty", 0.0)),
                                       s.get("dtype", "auto"), f"{s['examples_per_second']:.2f}", f"{s['f1']:.3f}"])
        lines += ["", f"- test.py now / then, both with their defaults: **{h['speedup']:.2f}**; as make demo "
                      f"runs it / then: **{h['demo_speedup']:.2f}**", ""]
    return lines
