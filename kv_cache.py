"""Where do a batch's keys and values live while it generates, and how does attention read them?

Two entry points for generation.py: `prefill` reads a batch's prompts into its KV cache (in row
chunks, over a shared prompt prefix), `attending` runs the model's body on such a cache. Behind
them, two kinds of transformers dynamic cache layers (reserved room, written in place; the
shared prefix held once) and the two-part attention that reads a shared prefix held once. Only
the CPU path uses the last: `attending` switches the model to it (its attention implementation
and, through a context variable, the cache it reads) for as long as the body runs on such a
cache, and back.
"""
import contextlib
import contextvars
import copy

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Prompt tokens run through the model in one forward while a batch's prompts are read (its
# prefill): past about a thousand tokens the activations outgrow the CPU's caches and every
# elementwise op slows (BENCHMARKS.md, "Prefill chunk size"). Larger batches are read in row
# chunks of at most this many tokens, then decoded together.
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
    folded into the query length. Only attending switches a model to it, with a cache whose
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
def attending(model, cache):
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


# A prefill chunk whose rows share a cache in place may drop the padding columns all its rows
# have: it ends where taking the next (longer) row would make more than this share of its
# tokens padding, once it holds MIN_CHUNK_TOKENS (smaller matmuls run further from the peak).
TRIM_PADDING = 0.125
MIN_CHUNK_TOKENS = 256


def row_chunks(lengths, budget, trim):
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


def prefill(model, body, input_ids, attention_mask, prefix_kv, shared, room, prefill_tokens=PREFILL_TOKENS):
    """The batch's prompts through the body: (its KV cache with room for `room` more tokens a
    row, each row's last hidden state).

    `prefix_kv` holds the shared prefix's keys and values (one row): kept once for the batch
    where the model allows it (_shared_prefix_cache), else copied for every row. Rows are read
    in chunks of at most `prefill_tokens` tokens (at least one row): every row computes exactly
    what it computes in one forward (rows never attend to each other), on smaller activations.
    Where the batch's cache holds the prefix once, chunks write into it in place and each
    leaves out the padding columns all its rows have (row_chunks); otherwise each chunk has its
    own cache, as wide as the batch, and their keys and values are joined.
    """
    # Positions from the mask, as transformers' generate computes them: left padding and the
    # [shared prefix | padding | own tokens] layout of a cached batch put every token where it
    # would be alone.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows, width = input_ids.shape[0], input_ids.shape[1] - shared
    batch_cache = _shared_prefix_cache(prefix_kv, rows, width, room) if _shares_prefix(model, prefix_kv) else None
    chunks = row_chunks(attention_mask[:, shared:].sum(-1).tolist(), prefill_tokens, trim=batch_cache is not None)
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
        with attending(model, cache):
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
