"""Batched generation: the one place prompts become answers (test.py, predict.py, chat_ner.py).

`ner_generate` builds each record's prompt exactly as training did and optionally grounds the
answers (grounding.py); `generate` runs token-id prompts through the model in length-grouped,
left-padded batches that share the prompts' common prefix through one KV cache.
"""
import torch

from config_utils import ConfigError
from dataset import PromptEncoder, TooLongError
from model_utils import label_names_for

def ner_generate(model, tokenizer, train_args, records, batch_size=16, max_new_tokens=64, progress=None,
                 grounded=False, label_names=None, **generate_options):
    """Instruct records -> raw generated answers, prompts built exactly as in training.

    With `grounded`, answers are constrained to substrings of each record's sentence (its query
    after `文本：`) and the names of `label_names` (default: the adapter's label set); see grounding.py.
    Returns (outputs, number of queries shortened to fit the trained max_seq_length).
    """
    collate = PromptEncoder(train_args, tokenizer)
    context = model.config.max_position_embeddings
    prompts, shortened = [], 0
    for rec in records:
        try:
            ids, cut = collate.inference_ids(rec, max_new_tokens, context)
        except TooLongError:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                f"{context}-token context; lower max_new_tokens"
            ) from None
        prompts.append(ids)
        shortened += cut
    grounding = None
    if grounded:
        from grounding import Grounding, sentence_of

        grounding = Grounding([sentence_of(rec[collate.query_column]) for rec in records],
                              label_names or label_names_for(train_args))
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress, grounding=grounding, **generate_options)
    return outputs, shortened



def _length_sorted_batches(lengths, batch_size):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


MIN_SHARED_PREFIX = 8  # tokens; below this a separate prefix pass is not worth its overhead


def attention_window(config):
    """The model's sliding attention window in tokens, or None when every layer attends to the
    whole context (Qwen2 sets sliding_window to None itself unless use_sliding_window)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def shared_prefix_length(prompts):
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first, n = prompts[0], 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=8, progress=None,
             max_prompt_tokens=None, prefix_cache=True, grounding=None, **sampling):
    """Token-id prompts -> decoded continuations, in input order.

    Prompts of similar length share a batch (less padding); padding sits on the left with an
    attention mask, so every prompt's last token is next to its first generated token and the
    KV cache serves the whole batch. With `prefix_cache`, the tokens all prompts share (the
    template and instruction: ~70% of an MSRA prompt) are run through the model once; each
    batch starts from a copy of their keys and values, its rows laid out as
    [shared prefix | left padding | own tokens]. Positions come from the attention mask, so
    every token sits where it would without the cache: the outputs are the same.
    Greedy unless `sampling` has do_sample=True. Generation stops at EOS; the text after it is
    dropped. `grounding` (grounding.Grounding: one sentence per prompt, None for a free row, and
    the label set) constrains the answers to that sentence's substrings and the label names.
    `progress(n)` is called after each batch.
    """
    import copy

    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        # Explicit, so a base model's generation_config.json cannot add a repetition penalty:
        # NER answers copy words from the input on purpose.
        repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
    )
    if sampling:
        gen_config.update(**sampling)
    if max_prompt_tokens:
        # Keep BOS and the end of the prompt (the "### Response:" part the answer follows).
        prompts = [p if len(p) <= max_prompt_tokens else p[:1] + p[len(p) - max_prompt_tokens + 1:] for p in prompts]
    shared = shared_prefix_length(prompts) if prefix_cache else 0
    window = attention_window(model.config)
    if shared and window is not None and max(len(p) for p in prompts) + max_new_tokens > window:
        # A cached row is [shared prefix | left padding | own tokens]: positions come from the mask,
        # but a sliding window counts places in the cache, padding included, so keys near its edge
        # would drop out early. Where every row fits inside the window (Gemma 3: 512 tokens, an
        # MSRA prompt and answer under 200) nothing can drop out and the cache stays exact.
        shared = 0
    if grounding is not None:
        from transformers import LogitsProcessorList

        import grounding as grounding_module

        # Sampling draws among the allowed tokens of the top candidates: at least top_k of them.
        candidates = max(grounding_module.CANDIDATES, gen_config.top_k or 0) if gen_config.do_sample \
            else grounding_module.CANDIDATES
    prefix_kv = None
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], device=device)
        prefix_kv = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache  # only K/V are needed
    outputs = [None] * len(prompts)
    for batch in _length_sorted_batches([len(p) for p in prompts], batch_size):
        longest = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, i in enumerate(batch):
            own = prompts[i][shared:]
            start = longest - len(own)
            input_ids[row, start:] = torch.tensor(own)
            attention_mask[row, start:] = 1
            input_ids[row, :shared] = torch.tensor(prompts[i][:shared])
            attention_mask[row, :shared] = 1
        extra = {}
        if prefix_kv is not None:
            cache = copy.deepcopy(prefix_kv)
            cache.batch_repeat_interleave(len(batch))
            extra["cache"] = cache
        processor = None
        if grounding is not None:
            processor = grounding_module.make_processor(tokenizer, grounding, batch, max_new_tokens, candidates,
                                                        greedy=not gen_config.do_sample)
            extra["logits_processor"] = LogitsProcessorList([processor])
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=gen_config, **extra,
        )
        for row, i in enumerate(batch):
            new = generated[row, longest:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            if processor is not None and processor.grammars[row] is not None:
                outputs[i] = processor.grammars[row].finish(outputs[i])
        if progress is not None:
            progress(len(batch))
    return outputs
