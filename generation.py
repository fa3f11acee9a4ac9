"""How do prompts become answers? The one place they do (test.py, predict.py, serve.py, chat_ner.py).

`ner_generate` builds each record's prompt exactly as training did and grounds the answers
(grounding.py); `generate` runs token-id prompts through the model in length-grouped,
left-padded batches that share the prompts' common prefix through one KV cache. Greedy
decoding of a batch reads as three steps: `prefill` (the prompts into the cache, kv_cache.py),
`decode_one_token`, `decode_until_done`; the next token of a grounded row is AnswerStates'.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch

from config_utils import ConfigError
from answer_format import copy_text
from dataset import PromptEncoder, TooLongError, encode_text, sentence_of
from grounding import CANDIDATES, DEFAULT_POLICY, GroundedLogitsProcessor, Grounding, answer_states
from infer_config import answer_format_for, label_names_for
from kv_cache import PREFILL_TOKENS, attending, prefill
from output_layer import body_and_head, head_rows, output_logits
from packed_linears import packed_linears




def ner_generate(model, tokenizer, train_args, records, batch_size=16, max_new_tokens=64, progress=None,
                 grounded=True, label_names=None, policy=None, eos_penalty=0.0, **generate_options):
    """Instruct records -> raw generated answers, prompts built exactly as in training.

    Answers are in the adapter's answer format (train_args' `answer_format`). With `grounded` (the
    default, as in every script's config), answers are constrained by the format's grammar to substrings of each record's sentence (its
    query after `文本：`) and the names of `label_names` (default: the adapter's label set),
    choosing by the greedy `policy` (default grounding.DEFAULT_POLICY), with `eos_penalty`
    subtracted from EOS's logit where an answer could end; see grounding.py. `max_new_tokens`
    is the answer budget; an inline answer (the sentence copied with its entities marked) gets
    the tokens of its copy on top.
    Returns (outputs, number of queries shortened to fit the trained max_seq_length).
    """
    collate = PromptEncoder(train_args, tokenizer)
    answer_format = answer_format_for(train_args)
    sentences = [sentence_of(rec[collate.query_column]) for rec in records]
    if answer_format == "inline":
        max_new_tokens += max((len(encode_text(tokenizer, copy_text(s))) for s in sentences), default=0)
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
        grounding = Grounding(sentences, label_names or label_names_for(train_args), policy or DEFAULT_POLICY,
                              eos_penalty, answer_format)
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


@dataclass(frozen=True)
class Loop:
    """How generate runs greedy decoding. Every choice gives the same answers: the tests check
    them against each other, bench/bench.py times them."""
    own: bool = True  # the own loop (finished rows leave the batch); False: transformers' generate, the reference
    prefill_tokens: int = PREFILL_TOKENS  # the most prompt tokens one prefill forward reads (kv_cache.py)
    packed_weights: bool = True  # on a CPU, multiply through packed_linears (packed_linears.py)


class _WindowReached(Exception):
    """A batch's rows outgrew the places its sliding window may hold while it shares the prefix."""


def decode_one_token(body, cache, tokens, attention_mask):
    """The rows' last tokens through the body: (the cache, each row's last hidden state)."""
    out = body(input_ids=torch.tensor(tokens, device=attention_mask.device)[:, None], attention_mask=attention_mask,
               position_ids=attention_mask.sum(-1, keepdim=True) - 1, cache=cache, use_cache=True)
    return out.cache, out.last_hidden_state[:, -1]


def decode_until_done(model, body, head, rows, cache, hidden, attention_mask, max_new_tokens, eos_id, answers=None,
                      max_places=None):
    """Greedy decoding from a prefilled batch: the generated ids of each row, EOS excluded.

    `rows` are the output layer's (weight, bias) rows of the tokens whose logits `answers` needs
    (AnswerStates.logit_ids), or None for every token. Rows that finish leave the batch (their
    cache rows are dropped), so the rest run on a smaller batch. With `max_places`, a step that
    would make the cache hold more places (prefix, padding and tokens) raises _WindowReached.
    """
    alive = list(range(attention_mask.shape[0]))  # batch rows still generating, in cache order
    generated = [[] for _ in alive]
    with attending(model, cache):  # the same cache object every step: switched once per batch
        for step in range(max_new_tokens):
            scores = output_logits(model, head, hidden, rows)
            tokens = (scores.argmax(-1).tolist() if answers is None
                      else answers.next_tokens(alive, scores, restricted=rows is not None))
            for r, tok in zip(alive, tokens):
                if tok != eos_id:
                    generated[r].append(tok)
            keep = [j for j, tok in enumerate(tokens) if tok != eos_id]
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=attention_mask.device)
                cache.batch_select_indices(index)
                attention_mask = attention_mask[index]
                alive = [alive[j] for j in keep]
                tokens = [tokens[j] for j in keep]
            if max_places is not None and attention_mask.shape[1] + 1 > max_places:
                raise _WindowReached
            attention_mask = torch.nn.functional.pad(attention_mask, (0, 1), value=1)
            cache, hidden = decode_one_token(body, cache, tokens, attention_mask)
    return generated


def _greedy(model, input_ids, attention_mask, prefix_kv, shared, max_new_tokens, eos_id, answers=None,
            prefill_tokens=PREFILL_TOKENS, max_places=None):
    """Greedy decoding of one left-padded batch: prefill, then decode until done.

    With grounding (`answers`) and the `best_allowed` policy only the logits of the tokens some
    row can allow are computed: the hidden state times those rows of the output matrix, a few
    thousand of a vocabulary that may hold 262,144.
    """
    body, head, by_rows = body_and_head(model)
    token_ids = answers.logit_ids(input_ids.device) if answers is not None and by_rows else None
    rows = None  # the output layer's rows for token_ids, gathered once per batch
    if token_ids is not None:
        rows = head_rows(head, token_ids)
    # Room for every answer token but the last chosen, which is never run (reserved as they come).
    room = max_new_tokens - 1 if max_places is None else min(max_new_tokens - 1, max_places - input_ids.shape[1])
    cache, hidden = prefill(model, body, input_ids, attention_mask, prefix_kv, shared, room, prefill_tokens)
    return decode_until_done(model, body, head, rows, cache, hidden, attention_mask, max_new_tokens, eos_id, answers,
                             max_places)


def _transformers_generate(model, input_ids, attention_mask, prefix_kv, gen_config, answers=None):
    """One left-padded batch through transformers' generate (sampling, and the greedy loop's
    reference): the new ids of each row, from a copy of the shared prefix's cache where given."""
    from transformers import LogitsProcessorList

    extra = {}
    if prefix_kv is not None:
        extra["cache"] = copy.deepcopy(prefix_kv)
        extra["cache"].batch_repeat_interleave(input_ids.shape[0])
    if answers is not None:
        extra["logits_processor"] = LogitsProcessorList([GroundedLogitsProcessor(answers)])
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                               **extra)
    return [generated[row, input_ids.shape[1]:].tolist() for row in range(input_ids.shape[0])]


def _batch_inputs(prompts, batch, longest, shared, pad_id, device):
    """(input ids, attention mask) of a batch, left-padded to `longest`, laid out as
    [shared prefix | left padding | own tokens] where `shared` tokens are cached once."""
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, i in enumerate(batch):
        own = prompts[i][shared:]
        start = longest - len(own)
        input_ids[row, start:] = torch.tensor(own)
        attention_mask[row, start:] = 1
        input_ids[row, :shared] = torch.tensor(prompts[i][:shared])
        attention_mask[row, :shared] = 1
    return input_ids.to(device), attention_mask.to(device)



def _generation_config(tokenizer, max_new_tokens, sampling):
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        # Explicit, so a base model's generation_config.json cannot add a repetition penalty:
        # NER answers copy words from the input on purpose.
        repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    if sampling:
        gen_config.update(**sampling)
    return gen_config


def _prefix_plan(shared, window, longest, max_new_tokens, own):
    """(tokens of the shared prefix a batch uses, the places its cache may hold or None).

    A cached row is [shared prefix | left padding | own tokens]: positions come from the mask,
    but a sliding window counts places in the cache, padding included, so keys near its edge
    would drop out early. A batch shares the prefix while its places fit the window (Gemma 3:
    512, an MSRA prompt and answer under 200), decided per batch: a long row costs its own batch
    the prefix, not every batch. The own loop checks the places as the answers grow and redoes
    the rare batch that outgrows them without the prefix; transformers' generate is held to the
    whole budget up front.
    """
    if not shared or window is None:
        return shared, None
    if own:  # the window holds window - 1 places: the prompt and a first step, to begin with
        return (shared if longest + 1 <= window - 1 else 0), window - 1
    return (shared if longest + max_new_tokens <= window else 0), None


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=8, progress=None,
             max_prompt_tokens=None, prefix_cache=True, grounding=None, loop=Loop(), **sampling):
    """Token-id prompts -> decoded continuations, in input order.

    Prompts of similar length share a batch (less padding); padding sits on the left with an
    attention mask, so every prompt's last token is next to its first generated token and the
    KV cache serves the whole batch. With `prefix_cache`, the tokens all prompts share (the
    template and instruction: ~70% of an MSRA prompt) are run through the model once; each
    batch starts from their keys and values, its rows laid out as
    [shared prefix | left padding | own tokens]. Positions come from the attention mask, so
    every token sits where it would without the cache: the outputs are the same.
    Greedy (`loop`: the own loop unless it says otherwise) unless `sampling` has do_sample=True,
    which runs transformers' generate. Generation stops at EOS; the text after it is dropped.
    `grounding` (grounding.Grounding: one sentence per prompt, None for a free row, the label
    set and the greedy policy) constrains the answers to that sentence's substrings and the
    label names. `progress(n)` is called after each batch.
    """
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_token_id
    gen_config = _generation_config(tokenizer, max_new_tokens, sampling)
    if max_prompt_tokens:
        # Keep BOS and the end of the prompt (the "### Response:" part the answer follows).
        prompts = [p if len(p) <= max_prompt_tokens else p[:1] + p[len(p) - max_prompt_tokens + 1:] for p in prompts]
    shared = shared_prefix_length(prompts) if prefix_cache else 0
    window = attention_window(model.config)
    greedy = not gen_config.do_sample
    own = loop.own and greedy
    # Sampling draws among the allowed tokens of the top candidates: at least top_k of them.
    candidates = CANDIDATES if greedy else max(CANDIDATES, gen_config.top_k or 0)
    # transformers' generate (the reference, and sampling) multiplies as the model does.
    with packed_linears(model) if own and loop.packed_weights else contextlib.nullcontext():
        prefix_kv = None  # the shared prefix's keys and values, computed for the first batch that uses them
        outputs = [None] * len(prompts)
        for batch in _length_sorted_batches([len(p) for p in prompts], batch_size):
            longest = max(len(prompts[i]) for i in batch)
            batch_shared, max_places = _prefix_plan(shared, window, longest, max_new_tokens, own)
            if batch_shared and prefix_kv is None:
                prefix = torch.tensor([prompts[0][:shared]], device=device)
                prefix_kv = body_and_head(model)[0](input_ids=prefix, use_cache=True).cache  # only K/V: no logits
            new_ids = None
            while new_ids is None:
                input_ids, attention_mask = _batch_inputs(prompts, batch, longest, batch_shared, tokenizer.pad_token_id,
                                                          device)
                answers = None if grounding is None else answer_states(tokenizer, grounding, batch, max_new_tokens,
                                                                       candidates, greedy=greedy)
                if not own:
                    new_ids = _transformers_generate(model, input_ids, attention_mask,
                                                     prefix_kv if batch_shared else None, gen_config, answers)
                    continue
                try:
                    new_ids = _greedy(model, input_ids, attention_mask, prefix_kv if batch_shared else None,
                                      batch_shared, max_new_tokens, eos_id, answers, loop.prefill_tokens,
                                      max_places if batch_shared else None)
                except _WindowReached:
                    batch_shared = 0  # an answer outgrew the window: the batch again, without the prefix
            for row, (i, new) in enumerate(zip(batch, new_ids)):
                if eos_id in new:
                    new = new[:new.index(eos_id)]
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
                if answers is not None:
                    outputs[i] = answers.finish(row, outputs[i])
            if progress is not None:
                progress(len(batch))
    return outputs
