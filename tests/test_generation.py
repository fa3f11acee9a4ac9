"""Generation's own greedy loop, checked against transformers' generate one prompt at a time.

The loop drops finished rows from the batch and, with grounding's best_allowed policy, computes
only the logits of the tokens a row can allow; neither may change an answer.
"""
import pytest
import torch

from answer_format import DEFAULT_LABEL_NAMES
from dataset import PromptEncoder, load_data
from test_architectures import ARCHS, build


def reference(model, tokenizer, prompts, max_new_tokens, processor_for=None):
    """Each prompt alone through transformers' generate (greedy), decoded as generate() decodes."""
    outputs = []
    for i, prompt in enumerate(prompts):
        extra = {}
        if processor_for is not None:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([processor_for(i)])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **extra)
        new = out[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return outputs


def prompts_of(tokenizer, records, max_new_tokens):
    encoder = PromptEncoder({"prompt_style": "alpaca"}, tokenizer)
    return [encoder.inference_ids(r, max_new_tokens, 512)[0] for r in records]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_loop_is_transformers_generate(arch, tiny_model, train16, tmp_path):
    from generation import Loop, generate
    from model_utils import load_model_and_tokenizer

    build(arch, tiny_model, tmp_path / arch)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / arch), dtype="float32", device="cpu")
    prompts = prompts_of(tokenizer, load_data(train16)[:5], 10)
    assert len(set(map(len, prompts))) > 1  # left padding is exercised
    expected = reference(model, tokenizer, prompts, 10)
    assert generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=5, prefix_cache=True) == expected
    assert generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=2, prefix_cache=False) == expected
    # A prefill of one row at a time (chunks whose caches are joined) computes the same answers,
    # with and without the shared prefix: five prompt forwards for a batch of five.
    body = model.model
    prefills = []
    hook = body.register_forward_pre_hook(
        lambda m, a, kw: prefills.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    for prefix_cache in (True, False):
        prefills.clear()
        assert generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=5, prefix_cache=prefix_cache,
                        loop=Loop(prefill_tokens=1)) == expected
        assert prefills[-5:] == [1] * 5  # after the shared prefix's own forward, where it is used
    hook.remove()


def test_finished_rows_leave_the_batch(memorised_trainer, train16, msra_dir):
    from generation import generate
    from model_utils import load_for_inference

    model, tokenizer, _ = load_for_inference(str(memorised_trainer / "adapter_model"), device="cpu")
    records = load_data(train16)[:8]
    prompts = prompts_of(tokenizer, records, 48)
    body = model.get_base_model().model
    rows = []  # batch size of every one-token decoding step
    hook = body.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=48, batch_size=8)
    hook.remove()
    assert outputs == [r["answer"] for r in records]  # the memorised answers: of different lengths
    lengths = [len(tokenizer.encode(a, add_special_tokens=False)) for a in outputs]
    assert len(set(lengths)) > 1
    # One step per token of the longest answer (its EOS is chosen from the last step's logits),
    # and each step runs only the rows whose answer is not finished yet.
    assert rows == sorted(rows, reverse=True) and rows[0] == 8 and rows[-1] < 8
    assert outputs == reference(model, tokenizer, prompts, 48)


class BruteForceSeed:
    """The seed format's grounded greedy choice computed from its definition, for one prompt
    inside transformers' generate (a logits processor that leaves only the chosen token):
    an answer is `没有` alone or lines `<entity>_<type name>`, each entity a non-empty run of
    the sentence's characters, no pair twice, spaces at a line's start dropped (one run, in the
    first token that touches the line). Every line an answer may hold is listed from the sentence
    text; a token is allowed where the answer can still be finished in the tokens left, counted
    with the fewest vocabulary tokens that spell the rest of some listed line (a plain dynamic
    programme over the tokens' bytes). `best_allowed` takes the most likely allowed token;
    `first_choice`, past the first token, the model's first choice, or the best allowed one where
    that is refused only for the budget, else the end of the answer. EOS loses `eos_penalty`."""

    NONE = "没有".encode()

    def __init__(self, token_bytes, eos_id, sentence, names, max_new_tokens, policy, eos_penalty):
        self.token_bytes, self.eos_id, self.names = token_bytes, eos_id, names
        self.left, self.policy, self.eos_penalty = max_new_tokens, policy, eos_penalty
        lines = {(sentence[i:j], name): f"{sentence[i:j]}_{name}".encode()
                 for i in range(len(sentence)) for j in range(i + 1, len(sentence) + 1) for name in names}
        self.by_prefix = {}  # bytes a line starts with -> the (pair, line) that start so
        for pair, line in [(None, self.NONE)] + list(lines.items()):
            for k in range(len(line) + 1):
                self.by_prefix.setdefault(line[:k], []).append((pair, line))
        self.spellings = {b for b in token_bytes if b}
        self.longest = max(map(len, self.spellings))
        self.costs = {}
        self.state = (b"", (), False)  # the line so far, the pairs of the complete lines, spaces given
        self.prompt = None

    def mincost(self, data):
        if data not in self.costs:
            best = [0] + [float("inf")] * len(data)
            for j in range(1, len(data) + 1):
                best[j] = min((best[i] + 1 for i in range(max(0, j - self.longest), j) if data[i:j] in self.spellings),
                              default=float("inf"))
            self.costs[data] = best[-1]
        return self.costs[data]

    def cost(self, state):
        """Fewest tokens that finish the answer from `state` (inf: it cannot be finished)."""
        if state is None:
            return float("inf")
        line, pairs, _ = state
        return min((self.mincost(full[len(line):]) for pair, full in self.by_prefix.get(line, ())
                    if (pair is None and not pairs) or (pair is not None and pair not in pairs)), default=float("inf"))

    def after(self, state, data):
        line, pairs, spaced = state
        for k, piece in enumerate(data.split(b"\n")):
            if k:
                pair = next((pair for pair, full in self.by_prefix.get(line, ()) if full == line and pair), None)
                if pair is None or pair in pairs:
                    return None
                line, pairs, spaced = b"", pairs + (pair,), False
            if not line and piece.startswith(b" "):
                if spaced:
                    return None
                piece, spaced = piece.lstrip(b" "), True
            line += piece
        return line, pairs, spaced

    def fits(self, tok, left):
        """(allowed, refused only for the budget)."""
        if tok == self.eos_id:
            return self.cost(self.state) == 0, False
        if not self.token_bytes[tok]:
            return False, False
        cost = self.cost(self.after(self.state, self.token_bytes[tok]))
        return cost <= left - 1, left - 1 < cost < float("inf")

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = input_ids.shape[1]
        else:
            self.state = self.after(self.state, self.token_bytes[int(input_ids[0, -1])])
        done = input_ids.shape[1] - self.prompt
        left = self.left - done
        values = scores[0].clone()
        values[self.eos_id] -= self.eos_penalty
        values = values.tolist()
        order = sorted(range(len(values)), key=lambda t: (-values[t], t))
        choice = None
        if self.policy == "first_choice" and done > 0:
            allowed, over_budget = self.fits(order[0], left)
            choice = order[0] if allowed else None if over_budget else self.eos_id
        if choice is None:
            choice = next((tok for tok in order if self.fits(tok, left)[0]), self.eos_id)
        out = torch.full_like(scores, float("-inf"))
        out[0, choice] = 0.0
        return out

    def finish(self, text):
        """The complete lines of `text` (`没有` where none is)."""
        if text == "没有":
            return text
        kept, state = [], (b"", (), False)
        for line in text.split("\n"):
            ended = self.after(state, line.encode())
            if ended is None or self.cost(ended) != 0:
                break
            kept.append(line)
            state = self.after(ended, b"\n")
        return "\n".join(kept).strip() or "没有"


@pytest.mark.parametrize("policy, model_kind, eos_penalty", [
    ("best_allowed", "random", 0.0), ("best_allowed", "memorised", 0.0), ("first_choice", "memorised", 0.0),
    ("best_allowed", "random", 2.0), ("first_choice", "memorised", 2.0)])
def test_grounded_greedy_is_the_grammar_chosen_by_brute_force(policy, model_kind, eos_penalty, request, tiny_model,
                                                             msra_dir):
    """The own loop's grounded answers are those a brute-force reading of the seed format's
    definition chooses (BruteForceSeed: no grammar code, every line listed from the sentence),
    each prompt alone in transformers' generate. The loop with best_allowed computes only the
    allowed tokens' logits (the output layer never runs on the whole vocabulary) where the
    output layer is a plain linear layer (the random model), and runs it whole where it is not
    (the memorised adapter trains a copy of it: PEFT's modules_to_save)."""
    from generation import ner_generate
    from dataset import sentence_of
    from model_utils import load_for_inference, load_model_and_tokenizer
    from token_bytes import vocab_for

    test = load_data(msra_dir["dir"] / "instruct_data" / "test.txt")
    if model_kind == "random":
        model, tokenizer = load_model_and_tokenizer(tiny_model, device="cpu")
        records = test[:12]
    else:
        adapter = request.getfixturevalue("memorised_trainer") / "adapter_model"
        model, tokenizer, _ = load_for_inference(str(adapter), device="cpu")
        # Memorised sentences (answers with entities) and unseen ones (where the grammar intervenes).
        records = load_data(request.getfixturevalue("train16"))[:6] + test[:6]
    token_bytes = vocab_for(tokenizer).token_bytes
    chosen = {}

    def processor_for(i):
        chosen[i] = BruteForceSeed(token_bytes, tokenizer.eos_token_id, sentence_of(records[i]["query"]),
                                   list(DEFAULT_LABEL_NAMES.values()), 16, policy, eos_penalty)
        return chosen[i]

    expected = [chosen[i].finish(text) for i, text in
                enumerate(reference(model, tokenizer, prompts_of(tokenizer, records, 16), 16, processor_for))]
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    outputs, _ = ner_generate(model, tokenizer, {"max_seq_length": 512}, records, batch_size=6, max_new_tokens=16,
                              grounded=True, policy=policy, eos_penalty=eos_penalty)
    hook.remove()
    assert outputs == expected
    assert sum(o != "没有" for o in outputs) > 3  # entities were named, not only 没有
    assert (len(calls) == 0) == (policy == "best_allowed" and model_kind == "random")


def _decode_steps(model, run, monkeypatch):
    """Run `run()` and record, per decode step of the body: its rows, the cache's shared-prefix
    shapes per layer (rows, tokens; none where the prefix is copied) and the torch.cat calls
    that join tensors along their token axis (a cache growing by copying itself)."""
    steps, inside = [], []
    cat = torch.cat

    def counting_cat(tensors, dim=0, **kwargs):
        if inside and tensors[0].dim() == 4 and dim in (2, -2) and tensors[0].shape[-2] > 1:
            steps[-1][2] += 1
        return cat(tensors, dim, **kwargs)

    def enter(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            layers = getattr(kwargs.get("cache"), "layers", ())
            steps.append([kwargs["input_ids"].shape[0],
                          {tuple(layer.prefix_keys.shape[::2]) for layer in layers if hasattr(layer, "prefix_keys")}, 0])
            inside.append(True)

    def leave(module, args, kwargs, out):
        inside.clear()

    monkeypatch.setattr(torch, "cat", counting_cat)
    hooks = [model.model.register_forward_pre_hook(enter, with_kwargs=True),
             model.model.register_forward_hook(leave, with_kwargs=True)]
    try:
        outputs = run()
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, steps


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_steps_append_without_copying_the_cache_and_hold_the_prefix_once(arch, tiny_model, train16, tmp_path,
                                                                              monkeypatch):
    """Each decode step writes its token's keys and values into room reserved after the prompt,
    where transformers' dynamic cache joins the whole cache and the new token into a copy
    (torch.cat along the token axis, every layer, every step): no decode step of the own loop
    does that (a sliding-window layer neither, when the window holds the prompt and answer:
    Gemma 3 with a 512-token window), while transformers' generate on the same prompts does.
    The shared prompt prefix is held once for the batch, not copied into every row."""
    from generation import Loop, generate, shared_prefix_length
    from model_utils import load_model_and_tokenizer

    build(arch, tiny_model, tmp_path / arch, **({"sliding_window": 512} if arch == "gemma3" else {}))
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / arch), dtype="float32", device="cpu")
    prompts = prompts_of(tokenizer, load_data(train16)[:4], 12)
    shared = shared_prefix_length(prompts)
    expected = reference(model, tokenizer, prompts, 12)
    outputs, steps = _decode_steps(model, lambda: generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4),
                                   monkeypatch)
    assert outputs == expected
    assert len(steps) >= 3 and sum(copies for _, _, copies in steps) == 0
    assert shared > 8 and all(prefix == {(1, shared)} for _, prefix, _ in steps)  # (rows, tokens) of every layer
    outputs, steps = _decode_steps(model, lambda: generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4,
                                                           loop=Loop(own=False)), monkeypatch)
    assert outputs == expected
    assert all(copies >= model.config.num_hidden_layers for _, _, copies in steps)  # the check sees a copying cache


def test_a_model_off_sdpa_copies_the_prefix_and_answers_the_same(tiny_model, train16):
    """The prefix is held once only under sdpa, which the two-part attention reproduces; a model
    on eager attention gets the copied [prefix | own tokens] rows and the same answers."""
    from generation import generate
    from model_utils import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tiny_model, dtype="float32", device="cpu")
    model.config._attn_implementation = "eager"
    prompts = prompts_of(tokenizer, load_data(train16)[:4], 8)
    kinds = set()
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: kinds.update(type(layer).__name__ for layer in kw["cache"].layers)
        if kw["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    hook.remove()
    assert outputs == reference(model, tokenizer, prompts, 8)
    assert kinds == {"_ReservedLayer"}


def test_prefill_chunks_leave_out_the_padding_their_rows_share():
    """Rows 30 tokens long fill a chunk of 300; a 60-token row would make 300 of 660 tokens
    padding (over an eighth), so the longer rows start their own chunk, 60 wide. Without
    trimming every chunk is the batch's 60 wide: 1152 // 60 = 19 rows fit one chunk."""
    from kv_cache import row_chunks

    lengths = [30] * 10 + [60] * 5
    assert row_chunks(lengths, 1152, trim=True) == [(0, 10, 30), (10, 15, 60)]
    assert row_chunks(lengths, 1152, trim=False) == [(0, 15, 60)]
    assert row_chunks(lengths, 600, trim=False) == [(0, 10, 60), (10, 15, 60)]
    # Below 256 tokens a chunk takes a longer row whatever its padding; the budget still holds.
    assert row_chunks([5, 5, 50], 1152, trim=True) == [(0, 3, 50)]
    assert row_chunks([40, 40, 40], 100, trim=True) == [(0, 2, 40), (2, 3, 40)]


def test_packed_linears_compute_the_layers_and_leave_nothing_behind(tiny_model):
    """Inside packed_linears every plain linear layer runs on its packed weight (the model's
    logits are the plain ones to float rounding); outside, the layers are the plain modules
    again and a changed weight is used as it is, not a stale packed copy."""
    from packed_linears import packed_linears
    from model_utils import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model, dtype="float32", device="cpu")
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with packed_linears(model) as packed:
            assert packed == len(linears) > 0
            assert all("forward" in vars(m) for m in linears)
            inside = model(input_ids=ids).logits
        torch.testing.assert_close(inside, plain, rtol=1e-4, atol=1e-4)
        assert not any("forward" in vars(m) for m in linears)
        head = model.get_output_embeddings()
        head.weight.mul_(2)
        torch.testing.assert_close(model(input_ids=ids).logits, plain * 2, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- a long row, a generous budget

def _recording_greedy(monkeypatch):
    """Spy on the own loop: each batch's shared-prefix length (0: the batch runs without it)."""
    import generation

    seen, greedy = [], generation._greedy

    def record(model, input_ids, attention_mask, prefix_kv, shared, *args, **kwargs):
        seen.append(shared if prefix_kv is not None else 0)
        return greedy(model, input_ids, attention_mask, prefix_kv, shared, *args, **kwargs)

    monkeypatch.setattr(generation, "_greedy", record)
    return seen


def test_a_row_longer_than_the_window_loses_the_prefix_cache_alone(tiny_model, train16, tmp_path, monkeypatch):
    """Gemma 3's sliding window counts places in the cache, padding included, so a batch whose
    rows outgrow it cannot share the prefix: only that batch runs without it."""
    from generation import generate, shared_prefix_length
    from model_utils import load_model_and_tokenizer

    build("gemma3", tiny_model, tmp_path / "gemma3", sliding_window=512)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "gemma3"), dtype="float32", device="cpu")
    records = load_data(train16)[:5]
    long = {**records[0], "query": records[0]["query"] + records[1]["query"] * 12}
    encoder = PromptEncoder({"prompt_style": "alpaca"}, tokenizer)
    prompts = [encoder.inference_ids(r, 8, 4096)[0] for r in records + [long]]
    assert len(prompts[-1]) + 8 > 512 > max(map(len, prompts[:-1])) + 8  # one row outgrows the window
    shared = shared_prefix_length(prompts)
    seen = _recording_greedy(monkeypatch)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert seen == [shared, shared, 0]  # length-sorted batches: the long row is the last batch's
    assert outputs == generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, prefix_cache=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_generous_budget_costs_what_a_short_one_does_when_answers_are_short(arch, tiny_model, train16, tmp_path,
                                                                             monkeypatch):
    """The room an answer's keys and values take is reserved as the answers grow, not for the
    whole budget up front: with answers of a few tokens, max_new_tokens=20000 holds the caches
    max_new_tokens=64 holds, keeps the shared prefix (Gemma 3's 512-token window included) and
    gives the same answers."""
    import json

    from generation import ner_generate
    from model_utils import load_model_and_tokenizer

    folder = tmp_path / arch
    build(arch, tiny_model, folder, **({"sliding_window": 512} if arch == "gemma3" else {}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))  # room for 20000
    model, tokenizer = load_model_and_tokenizer(str(folder), dtype="float32", device="cpu")
    records = load_data(train16)[:6]
    held = []  # per decode step, the positions the caches hold room for, over all layers and rows

    def record(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            held.append(sum(buf.shape[0] * buf.shape[-2] for layer in kwargs["cache"].layers
                            for buf in getattr(layer, "_buffers", [layer.keys])))
    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    seen = _recording_greedy(monkeypatch)
    runs = {}
    for budget in (64, 20000):
        held.clear()
        del seen[:]
        # An EOS bonus ends every answer at its first place an answer may end (grounding).
        outputs, _ = ner_generate(model, tokenizer, {}, records, batch_size=3, max_new_tokens=budget, grounded=True,
                                  eos_penalty=-1000.0)
        runs[budget] = (outputs, max(held), list(seen))
    hook.remove()
    assert runs[20000][0] == runs[64][0]
    assert runs[20000][1] == runs[64][1]  # the same room held
    assert runs[20000][2] == runs[64][2] and all(runs[64][2])  # the shared prefix in every batch


def test_answers_that_outgrow_the_window_redo_their_batch_without_the_prefix(tiny_model, train16, tmp_path,
                                                                             monkeypatch):
    """A batch shares the prefix while its places fit the sliding window; one whose answers grow
    past it is run again without the prefix, so the answers are those of the plain batches."""
    from generation import generate, shared_prefix_length
    from model_utils import load_model_and_tokenizer

    records = load_data(train16)[:4]
    probe, _ = load_model_and_tokenizer(str(tiny_model), device="cpu")
    del probe
    build("gemma3", tiny_model, tmp_path / "probe", sliding_window=512)
    _, tokenizer = load_model_and_tokenizer(str(tmp_path / "probe"), dtype="float32", device="cpu")
    prompts = prompts_of(tokenizer, records, 24)
    window = max(map(len, prompts)) + 12  # the prompts fit, 24 answer tokens do not
    build("gemma3", tiny_model, tmp_path / "gemma3", sliding_window=window)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "gemma3"), dtype="float32", device="cpu")
    seen = _recording_greedy(monkeypatch)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=4)
    shared = shared_prefix_length(prompts)
    assert seen == [shared, 0]  # tried with the prefix, redone without it
    assert outputs == generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=4, prefix_cache=False)
    assert max(len(tokenizer.encode(o, add_special_tokens=False)) for o in outputs) > 12  # answers did outgrow it
