"""Batched generation: the one place prompts become answers (test.py, predict.py, chat_ner.py).

`ner_generate` builds each record's prompt exactly as training did and optionally grounds the
answers (grounding.py); `generate` runs token-id prompts through the model in length-grouped,
left-padded batches that share the prompts' common prefix through one KV cache.
"""
import contextlib
import contextvars
import copy

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from config_utils import ConfigError
from answer_format import copy_text
from dataset import PromptEncoder, TooLongError, encode_text, sentence_of
from infer_config import answer_format_for, label_names_for


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
        from grounding import DEFAULT_POLICY, Grounding

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


def _output_layer(model):
    """The model's body (hidden states) and output layer, under a PEFT wrapper too (its LoRA
    layers are inside them), and whether the output weights can be used row by row: a plain
    nn.Linear. Anything else (a quantised or wrapped head) is run as a module on the full vocabulary."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    return lm.model, head, type(head) is torch.nn.Linear


def _logits(model, head, hidden, rows=None):
    """Output logits of `hidden` (batch, hidden) as the model's own forward computes them (Gemma
    2's final soft-capping included): for every token, or `rows` = (weight, bias) of the output
    layer's rows for the tokens wanted."""
    logits = head(hidden) if rows is None else torch.nn.functional.linear(hidden, *rows)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


# Prompt tokens run through the model in one forward while a batch's prompts are read (its
# prefill). Past about a thousand tokens the activations ([tokens, intermediate] fp32) outgrow
# the CPU's caches and every elementwise op slows: Gemma 3 270M, 2 cores, measured per prompt
# token: 1.45 ms at 576 and 1,152 tokens, 2.1 ms at 2,304 and 4,608. Larger batches are read in
# row chunks of at most this many tokens, then decoded together (bench/bench.py: real model).
PREFILL_TOKENS = 1152


def _chunkable(cache):
    """Whether prefill chunks' caches can be joined row-wise: transformers' own dynamic layers,
    which hold nothing per row but their keys and values."""
    return type(cache) is DynamicCache and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                                               for layer in cache.layers)


# Answer tokens whose keys and values are reserved per row up front: those of a 64-token answer
# (the default max_new_tokens; its last token is never run). Past them the room doubles as the
# answers grow, up to the budget: MSRA answers take about 10 tokens, the longest ~60, so
# max_new_tokens=20000 holds what 64 does unless an answer is that long.
RESERVE_TOKENS = 64 - 1


class _ReservedKV:
    """A dynamic cache layer whose keys and values sit at the front of buffers with room for the
    tokens still to come: each decode step writes its token in place, where transformers' own
    layer copies the whole cache to append one token (torch.cat: per step as many bytes as the
    cache holds, for Gemma 3 270M at batch 64 more than its weights). `keys` and `values` are views
    of the filled part, so attention reads exactly the tensors the dynamic layer would hold.
    """

    def reserve(self, room, zeroed=False, now=None):
        """Room for `room` more tokens, of which `now` (default: all) are allocated at once; the
        rest as update needs them, doubling the buffers (zeroed: the first allocation only)."""
        filled = self.keys.shape[-2]
        self._limit = filled + room
        size = filled + (room if now is None else min(room, now))
        self._buffers = []
        for held in (self.keys, self.values):
            buffer = (held.new_zeros if zeroed else held.new_empty)((*held.shape[:-2], size, held.shape[-1]))
            buffer[..., :filled, :] = held
            self._buffers.append(buffer)
        self._show(filled)

    def _grow(self, needed):
        """Buffers of at least `needed` tokens: twice the current size, within the reserved room
        (copied once, so the steps a doubling lasts write in place again)."""
        filled, size = self.keys.shape[-2], self._buffers[0].shape[-2]
        size = max(needed, min(2 * size, self._limit))
        grown = []
        for buffer in self._buffers:
            new = buffer.new_empty((*buffer.shape[:-2], size, buffer.shape[-1]))
            new[..., :filled, :] = buffer[..., :filled, :]
            grown.append(new)
        self._buffers = grown

    def _show(self, filled):
        self.keys, self.values = (buffer[..., :filled, :] for buffer in self._buffers)

    def _fill(self, filled):
        """Show `filled` tokens, written outside update (a sliding layer counts them too)."""
        if hasattr(self, "cumulative_length"):
            self.cumulative_length += filled - self.keys.shape[-2]
        self._show(filled)

    def update(self, key_states, value_states, *args, **kwargs):
        filled, new = self.keys.shape[-2], key_states.shape[-2]
        if filled + new > self._buffers[0].shape[-2]:
            self._grow(filled + new)
        self._buffers[0][..., filled:filled + new, :] = key_states
        self._buffers[1][..., filled:filled + new, :] = value_states
        if hasattr(self, "cumulative_length"):
            self.cumulative_length += new
        self._show(filled + new)
        return self.keys, self.values

    def batch_select_indices(self, indices):
        filled = self.keys.shape[-2]
        self._buffers = [buffer[indices] for buffer in self._buffers]
        self._show(filled)

    def rows(self, part, filled):
        """A layer over rows `part` (a slice) of these buffers, `filled` tokens into them: what it
        writes lands here."""
        view = copy.copy(self)
        view._buffers = [buffer[part] for buffer in self._buffers]
        view._fill(filled)
        return view


class _ReservedLayer(_ReservedKV, DynamicLayer):
    pass


class _ReservedSlidingLayer(_ReservedKV, DynamicSlidingWindowLayer):
    pass


class _SharedPrefixKV(_ReservedKV):
    """A layer of a batch's cache that holds the shared prompt prefix's keys and values once
    (`prefix_keys`, one row) and each row's own tokens after it (`keys`, reserved room). To the
    model it is the [prefix | own tokens] cache of every row: its length and mask sizes count
    the prefix, so positions and the attention mask are those of the copied layout; only
    _shared_prefix_attention reads the two parts, so the prefix is neither copied per row nor
    read once per row at every step."""

    def get_seq_length(self):
        return self.prefix_keys.shape[-2] + self.keys.shape[-2]


class _SharedPrefixLayer(_SharedPrefixKV, DynamicLayer):
    pass


class _SharedPrefixSlidingLayer(_SharedPrefixKV, DynamicSlidingWindowLayer):
    def get_seq_length(self):
        return self.cumulative_length  # the prefix and the own tokens (update counts them)


def _holds(layer, room):
    """Whether `layer` can take `room` more tokens into reserved room: a full layer always; a
    sliding-window one while its window holds everything it will see (then it computes what a
    full layer computes)."""
    return type(layer) is not DynamicSlidingWindowLayer or layer.cumulative_length + room <= layer.sliding_window - 1


def _converted(layer, full, sliding):
    """`layer`'s state (keys, values, lengths, window) in a new layer of class `full` or `sliding`."""
    new = sliding(sliding_window=layer.sliding_window) if type(layer) is DynamicSlidingWindowLayer else full()
    vars(new).update(vars(layer))
    return new


def _shared_prefix_cache(prefix_kv, rows, width, room):
    """A batch of `rows` over the shared prefix `prefix_kv` (one row), each row with room for its
    `width` own prompt tokens and `room` answer tokens (_SharedPrefixKV); None where a layer is
    not transformers' dynamic kind or a sliding window could not hold the prefix and the room
    (there the prefix is copied)."""
    if not _chunkable(prefix_kv):
        return None
    layers = []
    for layer in prefix_kv.layers:
        if not layer.is_initialized or not _holds(layer, width + room):
            return None
        shared = _converted(layer, _SharedPrefixLayer, _SharedPrefixSlidingLayer)
        shared.prefix_keys, shared.prefix_values = layer.keys, layer.values
        shared.keys, shared.values = (t.new_empty((rows, *t.shape[1:-2], 0, t.shape[-1])) for t in (layer.keys, layer.values))
        # The prompt's room whole (prefill chunks write into it in place), the answers' as they grow;
        # left padding a trimmed chunk skips stays zero (and masked).
        shared.reserve(width + room, zeroed=True, now=width + RESERVE_TOKENS)
        layers.append(shared)
    return _with_layers(prefix_kv, layers)


def _with_layers(cache, layers):
    """A shallow copy of `cache` whose layers are `layers`."""
    view = copy.copy(cache)
    view.layers = layers
    return view


# The attention implementation the own loop switches a model to while its cache holds a shared
# prefix once (_SharedPrefixKV): sdpa's masks, the two-part attention.
SHARED_PREFIX_ATTENTION = "ner_shared_prefix_sdpa"
_ACTIVE_CACHE = contextvars.ContextVar("ner_active_cache")


def _shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of a batch's queries over [shared prefix | own tokens] in two parts merged by
    their log-sum-exp (cascade attention): the prefix part is one matmul for all rows (their
    queries side by side against the one copy of the prefix), the own part is each row's as
    usual. The softmax over both is the softmax over their union, so the result is sdpa's over
    the copied layout up to float rounding. Query heads share a key/value head (GQA) by being
    folded into the query length. Only _attending switches a model to it, with a cache whose
    every layer is a _SharedPrefixKV (_shared_prefix_cache makes all or none)."""
    layer = _ACTIVE_CACHE.get().layers[module.layer_idx]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    rows, heads, length, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[-2]
    groups = heads // kv_heads
    folded = query.reshape(rows, kv_heads, groups * length, dim)  # head kv*groups + g, then position
    prefix = layer.prefix_keys.shape[-2]
    if attention_mask is None:  # no padding anywhere: causal within the own part
        visible = torch.ones(length, own, dtype=torch.bool, device=query.device).tril(own - length)[None, None]
    else:
        visible = attention_mask[..., prefix:] if attention_mask.dtype == torch.bool else attention_mask[..., prefix:] == 0
    visible = visible.expand(rows, 1, length, own).repeat(1, 1, groups, 1)
    additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
    own_out, own_lse = flash(folded, key, value, attn_mask=additive, scale=scaling)
    own_lse = own_lse.masked_fill(~visible.any(-1).squeeze(1)[:, None], float("-inf"))  # a padding query sees none
    side_by_side = folded.transpose(0, 1).reshape(1, kv_heads, rows * groups * length, dim)
    pre_out, pre_lse = flash(side_by_side, layer.prefix_keys, layer.prefix_values, scale=scaling)
    pre_out = pre_out.reshape(kv_heads, rows, groups * length, dim).transpose(0, 1)
    pre_lse = pre_lse.reshape(kv_heads, rows, groups * length).transpose(0, 1)
    top = torch.maximum(own_lse, pre_lse)
    own_w, pre_w = (own_lse - top).exp()[..., None], (pre_lse - top).exp()[..., None]
    out = (own_out.float() * own_w + pre_out.float() * pre_w) / (own_w + pre_w)
    out = out.to(query.dtype).reshape(rows, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


def _shares_prefix(model, prefix_kv):
    """Whether the batch's cache can hold the prefix once: a CPU (the attention's kernel), sdpa
    (what the two-part attention reproduces), no attention soft-capping."""
    config = model.config
    return (prefix_kv is not None and next(model.parameters()).device.type == "cpu"
            and config._attn_implementation == "sdpa" and getattr(config, "attn_logit_softcapping", None) is None)


@contextlib.contextmanager
def _attending(model, cache):
    """Runs the body with `cache`: a cache with a shared prefix under _shared_prefix_attention."""
    if not any(isinstance(layer, _SharedPrefixKV) for layer in getattr(cache, "layers", ())):
        yield
        return
    config, saved = model.config, model.config._attn_implementation
    config._attn_implementation = SHARED_PREFIX_ATTENTION
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield
    finally:
        _ACTIVE_CACHE.reset(token)
        config._attn_implementation = saved


def _reserved_cache(cache, room):
    """`cache` (transformers' dynamic layers, see _chunkable) with room for `room` more tokens in
    every layer that can take it (_holds); the others stay as they are."""
    if not _chunkable(cache):
        return cache
    for i, layer in enumerate(cache.layers):
        if layer.is_initialized and _holds(layer, room):
            cache.layers[i] = _converted(layer, _ReservedLayer, _ReservedSlidingLayer)
            cache.layers[i].reserve(room, now=RESERVE_TOKENS)
    return cache


class _PackedLinear:
    """A linear layer's forward on its weight in oneDNN's blocked layout, reordered at the first
    call: a layer the loop never runs (the output layer under best_allowed, 262,144 x 640 in
    Gemma 3) costs neither the reorder nor the memory."""

    def __init__(self, module):
        self.module, self.packed = module, None

    def __call__(self, x):
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.module.weight.detach())
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.module.bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model):
    """While open, every plain nn.Linear of `model` held in CPU memory in float32 (or bfloat16
    where oneDNN computes it natively) multiplies with its weight reordered once into oneDNN's
    blocked layout (what torch.compile's CPU freezing does). A decode step is a small-batch
    matmul whose weights stream from memory; in the plain row-major layout MKL reaches about
    half the machine's peak there, in the blocked one nearly all of it (a 2048 x 640 weight at
    32 rows: 104 -> 180 GFLOP/s fp32 on 2 cores). The packed copies exist only while the block
    runs, so training and later weight changes never see stale ones. Yields how many layers
    multiply packed (0 on a GPU, for quantised layers, or with a torch without oneDNN)."""
    mkldnn = torch.ops.mkldnn
    usable = torch.backends.mkldnn.is_available() and all(
        hasattr(mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"))
    dtypes = {torch.float32, torch.bfloat16} if usable and mkldnn._is_mkldnn_bf16_supported() else {torch.float32}
    patched = []
    if usable:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            # An instance-level forward (accelerate's offload hooks, another wrapper) is left alone.
            if type(module) is not torch.nn.Linear or "forward" in vars(module) or hasattr(module, "_hf_hook") \
                    or weight.device.type != "cpu" or weight.dtype not in dtypes:
                continue
            module.forward = _PackedLinear(module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


# A prefill chunk whose rows share a cache in place may drop the padding columns all its rows
# have: it ends where taking the next (longer) row would make more than this share of its
# tokens padding, once it holds MIN_CHUNK_TOKENS (smaller matmuls run further from the peak).
TRIM_PADDING = 0.125
MIN_CHUNK_TOKENS = 256


def _row_chunks(lengths, budget, trim):
    """Consecutive row chunks (start, end, width) of a batch whose rows' own tokens number
    `lengths`: at most `budget` tokens each (at least one row). `width` is the chunk's longest
    row with `trim`, else the batch's: every chunk as wide as the batch, so their caches join."""
    batch_width, chunks, start = max(lengths), [], 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while end < len(lengths):
            wider = max(width, lengths[end])
            rows, tokens = end + 1 - start, sum(lengths[start:end + 1])
            if rows * (wider if trim else batch_width) > budget:
                break
            if trim and (end - start) * width >= MIN_CHUNK_TOKENS and rows * wider - tokens > TRIM_PADDING * rows * wider:
                break
            end, width = end + 1, wider
        chunks.append((start, end, width if trim else batch_width))
        start = end
    return chunks


def _prefill(model, body, input_ids, attention_mask, prefix_kv, shared, prefill_tokens, room):
    """The batch's prompts through the body: (its KV cache with room for `room` more tokens a
    row, each row's last hidden state).

    `prefix_kv` holds the shared prefix's keys and values (one row): kept once for the batch
    where the model allows it (_shared_prefix_cache), else copied for every row. Rows are read
    in chunks of at most `prefill_tokens` tokens (at least one row): every row computes exactly
    what it computes in one forward (rows never attend to each other), on smaller activations.
    Where the batch's cache holds the prefix once, chunks write into it in place and each
    leaves out the padding columns all its rows have (_row_chunks); otherwise each chunk has its
    own cache, as wide as the batch, and their keys and values are joined.
    """
    # Positions from the mask, as transformers' generate computes them: left padding and the
    # [shared prefix | padding | own tokens] layout of a cached batch put every token where it
    # would be alone.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows, width = input_ids.shape[0], input_ids.shape[1] - shared
    batch_cache = _shared_prefix_cache(prefix_kv, rows, width, room) if _shares_prefix(model, prefix_kv) else None
    chunks = _row_chunks(attention_mask[:, shared:].sum(-1).tolist(), prefill_tokens, trim=batch_cache is not None)
    if batch_cache is None and len(chunks) > 1 \
            and not _chunkable(prefix_kv if prefix_kv is not None else DynamicCache(config=model.config)):
        chunks = [(0, rows, width)]
    caches, hidden = [], []
    for start, end, chunk_width in chunks:
        part, skip = slice(start, end), width - chunk_width  # columns of padding every row of the chunk has
        if batch_cache is not None:
            cache = _with_layers(batch_cache, [layer.rows(part, skip) for layer in batch_cache.layers])
        elif prefix_kv is not None:
            cache = copy.deepcopy(prefix_kv)
            cache.batch_repeat_interleave(input_ids[part].shape[0])
        else:
            cache = None
        with _attending(model, cache):
            out = body(input_ids=input_ids[part, shared + skip:], attention_mask=attention_mask[part],
                       position_ids=positions[part, shared + skip:], cache=cache, use_cache=True)
        caches.append(out.cache)
        hidden.append(out.last_hidden_state[:, -1])
    if batch_cache is not None:
        for layer in batch_cache.layers:  # the chunks filled every row's own tokens
            layer._fill(width)
        return batch_cache, torch.cat(hidden)
    cache = caches[0]
    if len(caches) > 1:
        for i, layer in enumerate(cache.layers):
            layer.keys = torch.cat([c.layers[i].keys for c in caches])
            layer.values = torch.cat([c.layers[i].values for c in caches])
    return _reserved_cache(cache, room), torch.cat(hidden)


class _WindowReached(Exception):
    """A batch's rows outgrew the places its sliding window may hold while it shares the prefix."""


def _greedy(model, input_ids, attention_mask, prefix_kv, shared, max_new_tokens, eos_id, answers=None,
            prefill_tokens=PREFILL_TOKENS, max_places=None):
    """Greedy decoding of one left-padded batch; the generated ids of each row, EOS excluded.

    Rows that finish leave the batch (their cache rows are dropped), so the rest run on a
    smaller batch. With grounding (`answers`) and the `best_allowed` policy only the logits of
    the tokens some row can allow are computed: the hidden state times those rows of the output
    matrix, a few thousand of a vocabulary that may hold 262,144. With `max_places`, a step
    that would make the cache hold more places (prefix, padding and tokens) raises _WindowReached.
    """
    body, head, by_rows = _output_layer(model)
    restricted = answers is not None and not answers.needs_full_logits and by_rows
    token_ids = answers.token_ids(input_ids.device) if restricted else None
    rows = None  # the output layer's rows for token_ids, gathered once per batch
    if token_ids is not None:
        rows = (head.weight[token_ids], None if head.bias is None else head.bias[token_ids])
    # Room for every answer token but the last chosen, which is never run (reserved as they come).
    room = max_new_tokens - 1 if max_places is None else min(max_new_tokens - 1, max_places - input_ids.shape[1])
    cache, hidden = _prefill(model, body, input_ids, attention_mask, prefix_kv, shared, prefill_tokens, room)
    alive = list(range(input_ids.shape[0]))  # batch rows still generating, in cache order
    generated = [[] for _ in alive]
    with _attending(model, cache):  # the same cache object every step: switched once per batch
        for step in range(max_new_tokens):
            scores = _logits(model, head, hidden, rows)
            if answers is None:
                tokens = scores.argmax(-1).tolist()
            else:
                best = scores.argmax(-1).tolist() if answers.needs_full_logits else None
                # Greedy takes the lowest id among exact ties, as argmax over the masked scores would.
                tokens = [best[j] if allowed is None else min(allowed)
                          for j, allowed in enumerate(answers.choose(alive, scores, restricted=restricted))]
                by_row = [None] * len(answers.states)
                for r, tok in zip(alive, tokens):
                    by_row[r] = tok
                answers.advance(by_row)
            for r, tok in zip(alive, tokens):
                if tok != eos_id:
                    generated[r].append(tok)
            keep = [j for j, tok in enumerate(tokens) if tok != eos_id]
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=input_ids.device)
                cache.batch_select_indices(index)
                attention_mask = attention_mask[index]
                alive = [alive[j] for j in keep]
                tokens = [tokens[j] for j in keep]
            if max_places is not None and attention_mask.shape[1] + 1 > max_places:
                raise _WindowReached
            attention_mask = torch.nn.functional.pad(attention_mask, (0, 1), value=1)
            out = body(input_ids=torch.tensor(tokens, device=input_ids.device)[:, None], attention_mask=attention_mask,
                       position_ids=attention_mask.sum(-1, keepdim=True) - 1, cache=cache, use_cache=True)
            cache, hidden = out.cache, out.last_hidden_state[:, -1]
    return generated


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


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=8, progress=None,
             max_prompt_tokens=None, prefix_cache=True, grounding=None, own_loop=True,
             prefill_tokens=PREFILL_TOKENS, packed_weights=True, **sampling):
    """Token-id prompts -> decoded continuations, in input order.

    Prompts of similar length share a batch (less padding); padding sits on the left with an
    attention mask, so every prompt's last token is next to its first generated token and the
    KV cache serves the whole batch. With `prefix_cache`, the tokens all prompts share (the
    template and instruction: ~70% of an MSRA prompt) are run through the model once; each
    batch starts from a copy of their keys and values, its rows laid out as
    [shared prefix | left padding | own tokens]. Positions come from the attention mask, so
    every token sits where it would without the cache: the outputs are the same.
    Greedy (our own loop: finished rows leave the batch; `own_loop=False` runs transformers'
    generate instead, the reference it is tested against) unless `sampling` has do_sample=True. Generation stops at EOS; the text after it is dropped.
    `grounding` (grounding.Grounding: one sentence per prompt, None for a free row, the label
    set and the greedy policy) constrains the answers to that sentence's substrings and the
    label names. The own loop reads a batch's prompts in row chunks of at most `prefill_tokens`
    tokens (see PREFILL_TOKENS) and, on a CPU, with `packed_weights` multiplies through
    packed_linears. `progress(n)` is called after each batch.
    """
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
    if grounding is not None:
        import grounding as grounding_module

        # Sampling draws among the allowed tokens of the top candidates: at least top_k of them.
        candidates = max(grounding_module.CANDIDATES, gen_config.top_k or 0) if gen_config.do_sample \
            else grounding_module.CANDIDATES
    own_greedy = own_loop and not gen_config.do_sample
    # transformers' generate (the reference, and sampling) multiplies as the model does.
    with packed_linears(model) if packed_weights and own_greedy else contextlib.nullcontext():
        prefix_kv = None  # the shared prefix's keys and values, computed for the first batch that uses them
        outputs = [None] * len(prompts)
        for batch in _length_sorted_batches([len(p) for p in prompts], batch_size):
            longest = max(len(prompts[i]) for i in batch)
            # A cached row is [shared prefix | left padding | own tokens]: positions come from the
            # mask, but a sliding window counts places in the cache, padding included, so keys near
            # its edge would drop out early. A batch shares the prefix while its places fit the
            # window (Gemma 3: 512, an MSRA prompt and answer under 200), decided per batch: a long
            # row costs its own batch the prefix, not every batch. The own loop checks the places
            # as the answers grow and redoes the rare batch that outgrows them without the prefix;
            # transformers' generate is held to the whole budget up front.
            max_places, batch_shared = None, shared
            if shared and window is not None:
                if own_greedy:  # the window holds window - 1 places: the prompt and a first step, to begin with
                    max_places = window - 1
                    batch_shared = shared if longest + 1 <= max_places else 0
                else:
                    batch_shared = shared if longest + max_new_tokens <= window else 0
            if batch_shared and prefix_kv is None:
                prefix = torch.tensor([prompts[0][:shared]], device=device)
                prefix_kv = _output_layer(model)[0](input_ids=prefix, use_cache=True).cache  # only K/V: no logits
            new_ids = None
            while new_ids is None:
                input_ids, attention_mask = _batch_inputs(prompts, batch, longest, batch_shared, pad_id, device)
                answers = None
                if grounding is not None:
                    answers = grounding_module.answer_states(tokenizer, grounding, batch, max_new_tokens, candidates,
                                                             greedy=not gen_config.do_sample)
                if not own_greedy:
                    from transformers import LogitsProcessorList

                    extra = {}
                    if batch_shared:
                        extra["cache"] = copy.deepcopy(prefix_kv)
                        extra["cache"].batch_repeat_interleave(len(batch))
                    if answers is not None:
                        extra["logits_processor"] = LogitsProcessorList([grounding_module.GroundedLogitsProcessor(answers)])
                    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                               generation_config=gen_config, **extra)
                    new_ids = [generated[row, longest:].tolist() for row in range(len(batch))]
                    continue
                try:
                    new_ids = _greedy(model, input_ids, attention_mask, prefix_kv if batch_shared else None,
                                      batch_shared, max_new_tokens, tokenizer.eos_token_id, answers, prefill_tokens,
                                      max_places if batch_shared else None)
                except _WindowReached:
                    batch_shared = 0  # an answer outgrew the window: the batch again, without the prefix
            for row, (i, new) in enumerate(zip(batch, new_ids)):
                if tokenizer.eos_token_id in new:
                    new = new[:new.index(tokenizer.eos_token_id)]
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
                if answers is not None:
                    outputs[i] = answers.finish(row, outputs[i])
            if progress is not None:
                progress(len(batch))
    return outputs
