"""Grounded decoding: the answer grammar on hand-made token sequences, then generation with it."""
import random

import pytest
import torch

from answer_format import DEFAULT_LABEL_NAMES
from dataset import load_data

NAMES = set(DEFAULT_LABEL_NAMES.values())
SENTENCE = "我们在北京大学见到了李鑫先生。"


def check_grounded(answer, sentence, names=NAMES):
    """An independent reading of the guarantee: `没有`, or complete `实体_类型` lines naming
    substrings of the sentence and known types, no pair twice. Returns the pairs."""
    if answer == "没有":
        return []
    pairs = []
    for line in answer.split("\n"):
        entity, sep, name = line.strip().rpartition("_")
        assert sep and entity.strip() and name in names, f"bad line {line!r} in {answer!r}"
        assert entity.strip() in sentence, f"{entity!r} is not in {sentence!r}"
        pairs.append((entity.strip(), name))
    assert len(pairs) == len(set(pairs)), f"repeated pair in {answer!r}"
    return pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from model_utils import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def grammar(tokenizer):
    from grammar import SeedGrammar
    from token_bytes import vocab_for

    return SeedGrammar(vocab_for(tokenizer), SENTENCE, DEFAULT_LABEL_NAMES)


def run(grammar, *texts):
    """The state after feeding `texts` (str or bytes pieces), or None once one breaks the grammar."""
    state = grammar.start
    for text in texts:
        state = grammar.step(state, text if isinstance(text, bytes) else text.encode())
        if state is None:
            return None
    return state


def fits(grammar, *texts):
    """True when `texts` keep the answer completable (with an unlimited budget)."""
    state = run(grammar, *texts)
    return state is not None and grammar.cost(state) < float("inf")


def complete(grammar, *texts):
    state = run(grammar, *texts)
    return state is not None and grammar.cost(state) == 0


def test_token_bytes_decode_like_the_tokenizer(tokenizer):
    from token_bytes import vocab_for

    vocab = vocab_for(tokenizer)
    rng = random.Random(0)
    texts = [SENTENCE, "北京_地名\n李鑫_人名", " 鑫鑫_人名", "ab c_x\n\n没有", "鱻龘_人名"]
    byte_pieces = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        byte_pieces += sum(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
        assert b"".join(vocab.token_bytes[i] for i in ids).decode().strip() == text.strip()
    assert byte_pieces > 6  # rare characters and newlines are spelt with byte-fallback pieces
    compared = 0
    for _ in range(300):  # random ids; the grammar only ever forms valid UTF-8, so compare those
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 6))]
        try:
            joined = b"".join(vocab.token_bytes[i] for i in ids).decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert joined.removeprefix(" ") == tokenizer.decode(ids)
        compared += 1
    assert compared > 100
    assert all(vocab.token_bytes[i] is None for i in tokenizer.all_special_ids)


def test_entity_continues_only_as_a_substring(grammar):
    assert fits(grammar, "北京")
    assert fits(grammar, "北京", "大学")
    assert not fits(grammar, "北京", "上海")  # 北京上海 is not in the sentence
    assert not fits(grammar, "上海")
    assert fits(grammar, "北京", "大学", "见")
    assert not fits(grammar, "北京", "大学", "先")  # 北京大学先 is not in the sentence


def test_separator_only_after_a_non_empty_substring(grammar):
    assert not fits(grammar, "_")
    assert not fits(grammar, "北京", "\n")
    assert fits(grammar, "北京", "_")
    assert not fits(grammar, "北京", "_", "_")
    assert not fits(grammar, "北京_地名\n", "_")


def test_type_names_only_from_the_label_set(grammar):
    assert fits(grammar, "北京_", "地")
    assert complete(grammar, "北京_", "地", "名")
    assert complete(grammar, "李鑫_人名")
    assert complete(grammar, "北京大学_机构名")
    assert not fits(grammar, "北京_", "国名")
    assert not fits(grammar, "北京_", "LOC")  # codes parse, but answers use the names
    assert not fits(grammar, "北京_地名", "地")


def test_newline_and_eos_only_after_a_complete_line(grammar):
    assert not complete(grammar, "")
    assert not complete(grammar, "北京")
    assert not complete(grammar, "北京_地")
    assert run(grammar, "北京_地", "\n") is None
    assert complete(grammar, "北京_地名")
    assert fits(grammar, "北京_地名", "\n")
    assert not complete(grammar, "北京_地名", "\n")  # a newline opens a line that must be completed
    assert run(grammar, "北京_地名\n", "\n") is None  # no blank lines
    assert complete(grammar, "北京_地名\n李鑫_人名")


def test_no_repeated_pair(grammar):
    assert not fits(grammar, "北京_地名\n北京_地")  # 地名 is the only name starting with 地
    assert run(grammar, "北京_地名\n北京_地名", "\n") is None
    assert not complete(grammar, "北京_地名\n北京_地名")
    assert complete(grammar, "北京_地名\n北京_机构名")  # the same string with another type is a new pair
    assert complete(grammar, "北京_地名\n北京大学_地名")


def test_no_entity_only_as_the_whole_answer(grammar):
    assert complete(grammar, "没有")
    assert complete(grammar, " 没有")  # SentencePiece's leading space
    assert run(grammar, "没有", "\n") is None
    assert not fits(grammar, "北京_地名\n没有")
    assert not fits(grammar, "没有没有")


def test_leading_space_and_spaces_inside_lines(grammar):
    assert complete(grammar, " ", "北京_地名")
    assert run(grammar, " ", " ") is None  # one run of leading spaces: no budget spent on `▁` after `▁`
    assert run(grammar, "北京_地名\n ", " ") is None
    assert complete(grammar, " 北京_地名\n 李鑫_人名")  # parse_answer strips lines too
    assert not fits(grammar, "北京 ")  # no space in the sentence
    assert not fits(grammar, "北京_ 地名")


def test_byte_tokens_inside_an_entity(grammar, tokenizer):
    from token_bytes import vocab_for

    byte = {b: vocab_for(tokenizer).ids_of[bytes([b])] for b in "鑫".encode()}
    assert all(byte.values())  # byte fallback gives a token for each byte of 鑫
    x, y, z = (bytes([b]) for b in "鑫".encode())
    assert fits(grammar, "李", x)
    assert fits(grammar, "李", x, y)
    assert not fits(grammar, "李", x, z)  # a byte sequence that cannot become 鑫
    assert not fits(grammar, "李", x, y, "_")  # `_` never follows half a character
    assert complete(grammar, "李", x, y, z, "_人名")
    assert not fits(grammar, x, y, z, "国")


def test_a_token_can_span_entity_end_separator_and_newline(grammar):
    assert complete(grammar, "北", "京_地名")
    assert complete(grammar, "北", "京_地名\n李", "鑫_人名")
    assert not fits(grammar, "北", "京_地名\n上")


def _processor(tokenizer, sentence, max_new_tokens, greedy=True, policy="first_choice"):
    from grounding import GroundedLogitsProcessor, Grounding, answer_states

    grounding = Grounding([sentence], DEFAULT_LABEL_NAMES, policy)
    return GroundedLogitsProcessor(answer_states(tokenizer, grounding, [0], max_new_tokens, greedy=greedy))


def _best(processor, generated, prefer, vocab_size, prompt_len=5):
    """The greedy choice after the processor, when the model ranks `prefer` first (in that order)."""
    scores = torch.zeros(1, vocab_size)
    for rank, tok in enumerate(prefer):
        scores[0, tok] = 100.0 - rank
    ids = torch.tensor([[7] * prompt_len + generated])
    out = None
    # The processor sees every step, as in generate: first the bare prompt, then one token more each time.
    for n in range(len(generated) + 1):
        out = processor(ids[:, :prompt_len + n], scores if n == len(generated) else torch.zeros(1, vocab_size))
    return int(out[0].argmax())


def _own(tok, text):
    """Token ids spelling `text` inside an answer (without SentencePiece's leading `▁`)."""
    return [i for i in tok.encode(text, add_special_tokens=False) if tok.convert_ids_to_tokens(i) != "▁"]


@pytest.fixture
def explore():
    """Mid-answer, take the best allowed token (the wider scan) instead of ending the answer:
    exercises the whole grammar where first_choice would stop at the first broken choice."""
    return "best_allowed"


def test_mid_answer_a_broken_first_choice_ends_the_answer(tiny_model):
    from grammar import SeedGrammar
    from token_bytes import vocab_for
    from model_utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    n = len(tok)
    bei = _own(tok, "北")
    foreign = _own(tok, "上海")[:1]  # not in the sentence: the model is inventing a string
    jing = _own(tok, "京")
    # The model's first choice fits: it stands. It does not: the answer ends (EOS), even though
    # an allowed token (京) is ranked second.
    assert _best(_processor(tok, SENTENCE, 16), bei, jing + foreign, n) == jing[0]
    assert _best(_processor(tok, SENTENCE, 16), bei, foreign + jing, n) == tok.eos_token_id
    # What was generated up to there is cut back to complete lines.
    grammar = SeedGrammar(vocab_for(tok), SENTENCE, DEFAULT_LABEL_NAMES)
    assert grammar.finish("北京_地名\n北") == "北京_地名"
    assert grammar.finish("北") == "没有"


def test_processor_keeps_the_model_choice_when_it_fits_and_corrects_it_otherwise(tiny_model, explore):
    from model_utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    tok.add_tokens(["京_", "京_地名\n李"])  # tokens across the entity end, `_` and a newline
    n = len(tok)
    span, span_line = tok.convert_tokens_to_ids("京_"), tok.convert_tokens_to_ids("京_地名\n李")
    bei = _own(tok, "北")
    assert _best(_processor(tok, SENTENCE, 16, policy=explore), bei, [span], n) == span
    assert _best(_processor(tok, SENTENCE, 16, policy=explore), bei, [span_line], n) == span_line
    # Tokens sharing no character with anything an answer may hold: never allowed. With 40 of
    # them ranked first, the choice comes from the wider scan past the top candidates.
    usable = set(SENTENCE + "".join(NAMES) + "没有_\n ")
    foreign = [i for i in range(3, n) if not tok.convert_ids_to_tokens(i).startswith("<0x")
               and not set(tok.decode([i])) & usable and tok.decode([i])][:40]
    assert len(foreign) == 40
    assert _best(_processor(tok, SENTENCE, 16, policy=explore), bei, foreign + [span], n) == span
    # EOS is refused mid-line, accepted after a complete line.
    assert _best(_processor(tok, SENTENCE, 16, policy=explore), bei, [tok.eos_token_id, span], n) == span
    assert _best(_processor(tok, SENTENCE, 16, policy=explore), _own(tok, "北京_地名"), [tok.eos_token_id], n) == tok.eos_token_id


def test_processor_closes_the_line_when_the_budget_runs_out(tiny_model, explore):
    from model_utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    n = len(tok)
    so_far, more, underscore = _own(tok, "北京大学"), _own(tok, "见到")[:1], tok.convert_tokens_to_ids("_")
    # 北京大学见到 is in the sentence, so with room to spare the model's choice stands...
    assert _best(_processor(tok, SENTENCE, 40, policy=explore), so_far, more + [underscore], n) == more[0]
    # ...but with only the 2 tokens for `_` and a name left, the line must close now. (Closing
    # takes exactly 2 here: `_` is a token of its own and some type name is one token.)
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    assert not any("_" in p and p != "_" for p in pieces) and set(pieces) & NAMES
    choice = _best(_processor(tok, SENTENCE, len(so_far) + 2, policy=explore), so_far, more + [underscore], n)
    assert choice == underscore


@pytest.mark.parametrize("policy", ["best_allowed", "first_choice"])
@pytest.mark.parametrize("restricted", [False, True])
def test_eos_penalty_moves_only_the_end_of_the_list(tokenizer, policy, restricted):
    """After a complete line the model ranks EOS 1.0 above a newline: EOS stands until the
    penalty exceeds that margin. Mid-line the choice is the same with or without a penalty.
    Scores over the whole vocabulary or only the grammar's tokens."""
    from token_bytes import vocab_for
    from grounding import Grounding, answer_states

    vocab = vocab_for(tokenizer)
    newline = vocab.ids_of[b"\n"][0]
    bei = _own(tokenizer, "北")[0]

    def choice(generated, ranked, penalty):
        answers = answer_states(tokenizer, Grounding([SENTENCE], DEFAULT_LABEL_NAMES, policy, penalty), [0], 16)
        for tok in generated:
            answers.advance([tok])
        scores = torch.zeros(1, len(tokenizer))
        for tok, value in ranked.items():
            scores[0, tok] = value
        if restricted:
            ids = answers.token_ids("cpu")
            scores = scores[:, ids]
        before = scores.clone()
        chosen = answers.next_tokens([0], scores, restricted=restricted)[0]
        assert torch.equal(scores, before)  # the caller's scores are left as they were
        return chosen

    line = _own(tokenizer, "北京_地名")
    for penalty, expected in [(0.0, vocab.eos_id), (0.9, vocab.eos_id), (1.1, newline), (5.0, newline)]:
        assert choice(line, {vocab.eos_id: 10.0, newline: 9.0}, penalty) == expected, penalty
    # Mid-line: best_allowed continues the line, first_choice ends the answer there (its rule for a
    # first choice that breaks the grammar); the penalty changes neither.
    jing = _own(tokenizer, "京")[0]
    expected = jing if policy == "best_allowed" else vocab.eos_id
    for penalty in (0.0, 5.0, -5.0):
        assert choice([bei], {vocab.eos_id: 20.0, jing: 10.0}, penalty) == expected, penalty


def test_eos_penalty_must_be_finite():
    from grounding import Grounding

    with pytest.raises(ValueError, match="eos_penalty"):
        Grounding([SENTENCE], DEFAULT_LABEL_NAMES, eos_penalty=float("nan"))


@pytest.fixture(scope="module")
def base_model(tiny_model):
    from model_utils import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model, device="cpu")
    return model, tok


@pytest.fixture(scope="module")
def test30(msra_dir):
    return load_data(msra_dir["dir"] / "instruct_data" / "test.txt")[:30]


def _generate(base_model, records, grounded, **options):
    from generation import ner_generate

    model, tok = base_model
    return ner_generate(model, tok, {"max_seq_length": 512}, records, grounded=grounded,
                        **{"batch_size": 8, "max_new_tokens": 16, **options})[0]


def test_random_model_answers_are_grounded_by_default(base_model, test30):
    from answer_format import parse_answer

    sentences = [r["query"].removeprefix("文本：") for r in test30]
    for output, sentence in zip(_generate(base_model, test30, True), sentences):
        pairs = check_grounded(output, sentence)
        assert not parse_answer(output).bad_lines
        assert all(entity in sentence for entity, _ in pairs)


def test_random_model_answers_are_grounded(base_model, test30, explore):
    from answer_format import parse_answer

    sentences = [r["query"].removeprefix("文本：") for r in test30]
    plain = _generate(base_model, test30, False)
    bad = sum(len(parse_answer(o).bad_lines) for o in plain)
    invented = sum(e not in s for o, s in zip(plain, sentences) for e, _ in parse_answer(o).entities)
    assert bad + invented > 0  # the untrained model does break the format: the checks below mean something
    runs = {
        "batch 8, prefix cache": dict(batch_size=8, prefix_cache=True),
        "batch 8, no prefix cache": dict(batch_size=8, prefix_cache=False),
        "batch 1": dict(batch_size=1, prefix_cache=False),
    }
    results = {}
    for name, options in runs.items():
        torch.manual_seed(0)
        results[name] = _generate(base_model, test30, True, policy=explore, **options)
    torch.manual_seed(0)
    results["sampling"] = _generate(base_model, test30, True, policy=explore, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    found = 0
    for name, outputs in results.items():
        for output, sentence in zip(outputs, sentences):
            pairs = check_grounded(output, sentence)
            parsed = parse_answer(output)
            assert not parsed.bad_lines, name
            assert parsed.entities == [(e, {v: k for k, v in DEFAULT_LABEL_NAMES.items()}[n]) for e, n in pairs]
            found += len(pairs)
    assert found > 0  # not only `没有`
    # Greedy grounded outputs do not depend on batching or the cache either.
    assert results["batch 8, prefix cache"] == results["batch 8, no prefix cache"] == results["batch 1"]


def test_small_budget_never_cuts_a_line(base_model, test30, explore):
    sentences = [r["query"].removeprefix("文本：") for r in test30]
    for budget in (3, 6):
        outputs = _generate(base_model, test30, True, policy=explore, max_new_tokens=budget)
        found = sum(len(check_grounded(output, sentence)) for output, sentence in zip(outputs, sentences))
        assert found > 0  # lines were closed within the budget, not only `没有` given


def test_memorised_adapter_outputs_are_unchanged(memorised_trainer, train16, msra_dir):
    from model_utils import load_for_inference
    from generation import ner_generate

    model, tok, train_args = load_for_inference(str(memorised_trainer / "adapter_model"), device="cpu")
    records = load_data(train16) + load_data(msra_dir["dir"] / "instruct_data" / "test.txt")[:8]
    plain = ner_generate(model, tok, train_args, records, batch_size=8, max_new_tokens=48, grounded=False)[0]
    grounded = ner_generate(model, tok, train_args, records, batch_size=8, max_new_tokens=48, grounded=True)[0]
    sentences = [r["query"].removeprefix("文本：") for r in records]
    for p, g, s in zip(plain, grounded, sentences):
        try:
            check_grounded(p, s)
        except AssertionError:
            check_grounded(g, s)  # where the plain answer breaks the grammar, grounding repairs it
        else:
            assert g == p  # where it already obeys, grounding changes nothing
    memorised = [r["answer"] for r in load_data(train16)]
    assert grounded[:16] == memorised  # non-trivial: 12 of them name entities
    # A budget too small for the memorised answers: plain output is cut mid-line, grounded is not.
    short_plain = ner_generate(model, tok, train_args, records[:16], batch_size=8, max_new_tokens=6,
                              grounded=False)[0]
    short = ner_generate(model, tok, train_args, records[:16], batch_size=8, max_new_tokens=6, grounded=True)[0]
    assert any(not _parses(p, s) for p, s in zip(short_plain, sentences))
    for g, s in zip(short, sentences):
        check_grounded(g, s)


def _parses(answer, sentence):
    try:
        check_grounded(answer, sentence)
    except AssertionError:
        return False
    return True


def test_chat_grounded_flag_forms():
    from conftest import load_script

    chat = load_script("chat_ner")
    base = ["--base_model", "m", "--interactive"]
    assert chat.parse_args(base).grounded is True
    assert chat.parse_args(base + ["--grounded"]).grounded is True
    assert chat.parse_args(base + ["--grounded=False"]).grounded is False
    assert chat.parse_args(base + ["--grounded", "false"]).grounded is False
    from config_utils import ConfigError

    with pytest.raises(ConfigError, match="grounded"):
        chat.parse_args(base + ["--grounded=maybe"])
    assert chat.ner_sentence("指令文本： 北京欢迎你 ") == "北京欢迎你"
    assert chat.ner_sentence("你好") is None
