"""How fast a real model (Gemma 3 270M, make demo's) trains and generates: the Trainer against the
bare loop, and test.py's grounded generation as it ran before (transformers' generate) against the
own loop, each policy, the demo's batch, the merged adapter and bf16 weights."""
import time
from pathlib import Path

import torch

from answer_format import DEFAULT_ANSWER_FORMAT
from common import Stopwatch
from dataset import load_data
from flops import body_shape, flops_per_token, run_tokens
from infer_config import answer_format_for
from peak import eval_dtype, native_bf16, peak_flops
from then_and_now import run_test_py_then_and_now
from train_speed import run_bare, run_trainer, train_config, warmup_steps


def run_real_model(cfg, peak):
    """Gemma 3 270M (or any real model folder): LoRA training through the Trainer against the bare
    loop, and grounded generation as test.py ran it before (transformers' generate, first_choice)
    against the own loop with either policy. None when the folder is absent."""
    import random

    from generation import Loop, ner_generate
    from grounding import AnswerStates
    from model_utils import load_for_inference, load_model_and_tokenizer

    model_dir = cfg.real_model_dir
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        print(f"real-model section skipped: no model in '{model_dir}' (make gemma prepares Gemma 3 270M)")
        return None
    n_body, layers, hidden, vocab = body_shape(model_dir)
    body = (n_body, layers, hidden)  # flops_per_token's shape: the body without the output layer
    work = Path(cfg.work_dir)
    steps = cfg.real_train_steps
    tcfg = train_config(cfg, model_dir, str(work / "real-ours"), True, 256)
    tcfg.max_steps, tcfg.train_batch_size, tcfg.log_steps = steps, cfg.real_train_batch_size, 1
    train = {}
    train["ours"], counting = run_trainer(tcfg)
    train["bare"] = run_bare(tcfg, counting.batches[:steps])
    timed = counting.batches[warmup_steps(steps):steps]  # the steps run_trainer timed
    tokens = sum(run_tokens(b, True) for b in timed)
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed)  # positions whose logits the loss needs
    context = sum(int(b["attention_mask"].sum()) for b in timed) / sum(len(b["input_ids"]) for b in timed)
    # The body on every token run; the output layer (forward and input gradient) where the loss needs it.
    flops = tokens * flops_per_token(body, context, training=True) + trained * 4 * vocab * hidden
    for stats in train.values():
        stats["mfu"] = flops / stats["seconds"] / peak

    adapter = cfg.real_adapter if cfg.real_adapter and (Path(cfg.real_adapter) / "adapter_config.json").is_file() else None
    if adapter:
        model, tokenizer, train_args = load_for_inference(adapter, model_dir=model_dir, dtype=cfg.dtype)
    else:
        from peft import LoraConfig, get_peft_model

        model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.dtype)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
        train_args = {"max_seq_length": 256}
    test_path = test_path_for(cfg, train_args)
    records = load_data(test_path)
    records = [records[i] for i in sorted(random.Random(cfg.seed).sample(range(len(records)), cfg.real_eval_examples))]
    variants = {"transformers_first_choice": dict(loop=Loop(own=False), policy="first_choice"),
                "own_first_choice": dict(policy="first_choice"),
                "own_best_allowed": dict(policy="best_allowed"),
                "own_best_allowed_unpacked": dict(policy="best_allowed", loop=Loop(packed_weights=False)),
                "transformers_best_allowed": dict(loop=Loop(own=False), policy="best_allowed"),
                "own_best_allowed_demo_batch": dict(policy="best_allowed", batch_size=cfg.real_demo_batch_size),
                "merged": dict(policy="best_allowed", batch_size=cfg.real_demo_batch_size),
                "merged_bf16": dict(policy="best_allowed", batch_size=cfg.real_demo_batch_size)}
    bf16_skipped = None
    if torch.cuda.is_available():
        bf16_peak = peak
    elif native_bf16()[0]:
        bf16_peak = peak_flops("bfloat16")[0]
    else:
        # Emulated bf16 runs for hours here and is what make demo never does on such a CPU.
        bf16_skipped = f"this CPU has no native bf16 ({native_bf16()[1]}): it would be emulated"
        print(f"bf16 variant (g) skipped: {bf16_skipped}", flush=True)
        del variants["merged_bf16"]
        bf16_peak = None
    ner_generate(model, tokenizer, train_args, records[:2], max_new_tokens=4, grounded=True)  # warm-up, token table
    from dataset import PromptEncoder
    from generation import shared_prefix_length

    encoder = PromptEncoder(train_args, tokenizer)
    prompt_ids = [encoder.inference_ids(r, 64, 2048)[0] for r in records]
    own_prompt = sum(map(len, prompt_ids)) - (len(records) - 1) * shared_prefix_length(prompt_ids)
    avg_context = sum(map(len, prompt_ids)) / len(records)
    evals, outputs = {}, {}
    for name, options in variants.items():
        # The last two change the model in place: the adapter folded into the weights (what
        # test.py loads, merge_lora), then those weights in bf16 (make demo where bf16 is native).
        if name == "merged" and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if name == "merged_bf16":
            model = model.to(torch.bfloat16)
            ner_generate(model, tokenizer, train_args, records[:2], max_new_tokens=4, grounded=True)
        run_peak = bf16_peak if name == "merged_bf16" else peak
        with Stopwatch(AnswerStates, ("next_tokens", "mask", "advance")) as grammar:
            start = time.perf_counter()
            options = {"batch_size": cfg.real_eval_batch_size, **options}
            outputs[name], _ = ner_generate(model, tokenizer, train_args, records, max_new_tokens=64, grounded=True,
                                            eos_penalty=cfg.real_eos_penalty, **options)
            elapsed = time.perf_counter() - start
        answer = sum(len(tokenizer.encode(o, add_special_tokens=False)) + 1 for o in outputs[name])  # + EOS
        body_flops = (own_prompt + answer) * flops_per_token(body, avg_context, training=False)
        evals[name] = {"seconds": elapsed, "batch_size": options["batch_size"], "examples_per_second": len(records) / elapsed,
                       "answer_tokens": answer / len(records), "mfu": body_flops / elapsed / run_peak,
                       "grammar_share": grammar.seconds / elapsed}
    def differ_on(a, b):
        return sum(x != y for x, y in zip(outputs[a], outputs[b]))
    bf16 = {} if bf16_skipped else {
        "bf16_differ_on": differ_on("merged", "merged_bf16"),
        "bf16_speedup": evals["merged_bf16"]["examples_per_second"] / evals["merged"]["examples_per_second"]}
    demo = "merged" if bf16_skipped else "merged_bf16"  # what make demo runs on this machine
    return {
        "model": model_dir, "adapter": adapter or "untrained LoRA r=8 (all-linear)",
        "train_steps": steps, "train_batch_size": cfg.real_train_batch_size, "train": train,
        "eval_examples": len(records), "eval_batch_size": cfg.real_eval_batch_size, "eval": evals,
        "own_loop_identical": outputs["transformers_first_choice"] == outputs["own_first_choice"],
        "allowed_logits_identical": outputs["transformers_best_allowed"] == outputs["own_best_allowed"],
        "demo_batch_identical": outputs["own_best_allowed_demo_batch"] == outputs["own_best_allowed"],
        "packed_differ_on": differ_on("own_best_allowed", "own_best_allowed_unpacked"),
        "packed_speedup": evals["own_best_allowed"]["examples_per_second"]
        / evals["own_best_allowed_unpacked"]["examples_per_second"],
        "eos_penalty": cfg.real_eos_penalty,
        "policies_differ_on": differ_on("own_first_choice", "own_best_allowed"),
        "merged_differ_on": differ_on("own_best_allowed_demo_batch", "merged"),
        "bf16_peak_flops": bf16_peak, "bf16_skipped": bf16_skipped, **bf16,
        "own_loop_speedup": evals["own_best_allowed"]["examples_per_second"]
        / evals["transformers_first_choice"]["examples_per_second"],
        "demo_speedup": evals[demo]["examples_per_second"] / evals["transformers_first_choice"]["examples_per_second"],
        "test_py_then_and_now": (run_test_py_then_and_now(cfg, adapter, model_dir, eval_dtype())
                                 if answer_format_for(train_args) == DEFAULT_ANSWER_FORMAT else
                                 print("test.py then-and-now skipped: the adapter answers in the "
                                       f"{answer_format_for(train_args)} format, which the earlier test.py cannot read")),
    }


def test_path_for(cfg, train_args):
    """The test sentences in the adapter's answer format: cfg.test_path for the seed format, else
    test.txt beside the adapter's training data (make demo: data/msra_inline/instruct_data)."""
    if answer_format_for(train_args) == DEFAULT_ANSWER_FORMAT or not train_args.get("train_path"):
        return cfg.test_path
    return str(Path(train_args["train_path"]).parent / "test.txt")
