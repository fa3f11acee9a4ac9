"""How fast generation runs on the random model: one example at a time, batched, with the
shared-prefix KV cache, grounded, and without packed weights, on the same test sentences."""
import time

from common import Stopwatch
from flops import flops_per_token, model_shape


def run_eval(model_dir, records, cfg):
    from dataset import PromptEncoder
    from model_utils import load_model_and_tokenizer
    import generation
    from generation import Loop, ner_generate, shared_prefix_length

    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=cfg.dtype)
    args = {"max_seq_length": 512}
    variants = {"single": dict(batch_size=1, prefix_cache=False, grounded=False),
                "batched": dict(batch_size=cfg.eval_batch_size, prefix_cache=False, grounded=False),
                "prefix_cache": dict(batch_size=cfg.eval_batch_size, prefix_cache=True, grounded=False),
                "grounded": dict(batch_size=cfg.eval_batch_size, prefix_cache=True, grounded=True),
                "unpacked": dict(batch_size=cfg.eval_batch_size, prefix_cache=True, loop=Loop(packed_weights=False),
                             grounded=False)}
    ner_generate(model, tokenizer, args, records[:4], max_new_tokens=2, grounded=False)  # warm-up
    ner_generate(model, tokenizer, args, records[:4], max_new_tokens=2, grounded=True)  # and the token table
    # Useful work per example: every prompt token and every answer token (re-encoded from the
    # output), whatever a variant skips or repeats to get there.
    collate = PromptEncoder(args, tokenizer)
    prompt_ids = [collate.inference_ids(r, cfg.max_new_tokens, 2048)[0] for r in records]
    prompt_tokens = [len(p) for p in prompt_ids]
    shared = shared_prefix_length(prompt_ids)
    shape = model_shape(model_dir)
    results, outputs = {}, {}
    for name, options in variants.items():
        with Stopwatch(generation, ("prefill",)) as prompts_pass:  # the prompts through the body (own loop)
            start = time.perf_counter()
            outputs[name], _ = ner_generate(model, tokenizer, args, records, max_new_tokens=cfg.max_new_tokens,
                                            **options)
            elapsed = time.perf_counter() - start
        # Answer length in tokens (re-encoded): a random model's grounded answers end earlier,
        # which the examples/s ratio alone would hide.
        tokens = sum(len(tokenizer.encode(o, add_special_tokens=False)) for o in outputs[name])
        context = (sum(prompt_tokens) + tokens / 2) / len(records)
        # With the prefix cache the shared prompt prefix runs once per call, not once per example.
        prompts = sum(prompt_tokens) - (len(records) - 1) * shared if options["prefix_cache"] else sum(prompt_tokens)
        flops = (prompts + tokens) * flops_per_token(shape, context, training=False)
        results[name] = {"seconds": elapsed, "examples_per_second": len(records) / elapsed,
                         "prompt_seconds": prompts_pass.seconds,
                         "answer_tokens": tokens / len(records), "tokens_per_second": tokens / elapsed,
                         "model_flops_per_second": flops / elapsed}
    identical = outputs["single"] == outputs["batched"] == outputs["prefix_cache"] == outputs["unpacked"]
    return results, identical
