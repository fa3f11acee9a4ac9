"""Grounded decoding: NER answers that can only name substrings of their sentence.

A grounded answer is `没有` alone, or lines `<entity>_<type name>` where `<entity>` is a
non-empty substring of the row's sentence, `<type name>` one of the label set's names, no
(entity, type) pair repeats, and EOS comes only after a complete answer. `GroundedLogitsProcessor`
enforces this inside transformers' `generate` (it is passed as a `logits_processor`), one
grammar state per batch row.

How it works:
- The constraint is on decoded text, in UTF-8 bytes: every vocabulary token's bytes are
  computed once per tokenizer (`▁` is a space, SentencePiece byte-fallback pieces like
  `<0xE5>` are that one byte). A token may span the end of an entity, `_`, a type name and a
  newline; its bytes are run through the grammar as they come. Byte tokens follow the same rule
  as any other: inside an entity, an incomplete UTF-8 sequence is allowed while the entity's
  bytes are still a substring of the sentence's bytes (so it can only complete to a character
  of the sentence), and `_` only follows an entity that ends on a character boundary.
- Spaces at the start of a line are ignored (SentencePiece's first answer piece is `▁`;
  parse_answer strips lines too); elsewhere a space is only allowed inside an entity that
  contains one.
- The grammar knows its budget: a token is allowed only if the answer can still be completed
  (entity closed with `_` and a type name, or `没有` finished) in the tokens left, counted with
  the fewest tokens that spell what is missing. Answers are never cut mid-line.
- Cheap and exact where the model already obeys: only the model's top `candidates` tokens (by
  logit) are checked, most likely first; greedy decoding stops at the first allowed one, so an
  answer that obeys the grammar is generated unchanged. When none of them is allowed, the
  tokens the row can allow at all (`Grammar.relevant_ids`) are scanned in logit order.
- An answer list's end can be biased (`eos_penalty`, a logit subtracted from EOS wherever the
  answer could end; 0 by default): a lightly tuned model's choice after a complete line, another
  line or EOS, is close to even, and greedy decoding then stops after one entity too often.
- Two greedy policies (POLICIES). `best_allowed`: every step takes the most likely allowed
  token; it only ever looks at the tokens a row can allow (a few hundred of a 262,144-token
  vocabulary), so generation computes only those logits. `first_choice`: past the first
  token, the model's first choice over the whole vocabulary or the end of the answer there
  (the unfinished line is dropped): a model that breaks the grammar mid-answer is inventing a
  string or repeating a pair; it needs every logit. With sampling, the draw is among the
  allowed tokens of the top `candidates` (as top_k would do).
"""
import math
import re
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import LogitsProcessor

from dataset import ENTITY_END, LINE_BREAK, NO_ENTITY, label_name_problem

INF = float("inf")
CANDIDATES = 24  # top tokens (by logit) checked first; the wider scan only runs when none fits
# Greedy decoding's choice past the first token (README: "Grounded decoding" has both measurements).
# On LoRA-tuned Gemma 3 270M both score the same (set-level F1 0.5305 best_allowed, 0.5324
# first_choice, 300 seeded test sentences) and best_allowed runs 1.65x faster: it is the default.
# On the from-scratch demo model first_choice is better (F1 0.400 against 0.363: that model often
# breaks the grammar mid-answer, and a forced second choice swaps in other types and strings).
POLICIES = ("first_choice", "best_allowed")
DEFAULT_POLICY = "best_allowed"
_NO_ENTITY = NO_ENTITY.encode()
_BREAK, _END = LINE_BREAK.encode(), ENTITY_END.encode()  # the answer's line break and entity end, as bytes
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_VOCABS = weakref.WeakKeyDictionary()  # tokenizer -> _Vocab


@dataclass
class Grounding:
    """What generate needs to ground its answers: one sentence per prompt (None: that row is not
    constrained), the label set ({type code: name}; answers use the names), the greedy policy and
    the logit subtracted from EOS where an answer could end (0: none)."""
    sentences: list
    label_names: dict
    policy: str = DEFAULT_POLICY
    eos_penalty: float = 0.0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"grounding policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if not math.isfinite(self.eos_penalty):
            raise ValueError(f"eos_penalty {self.eos_penalty!r}: expected a finite number")


class State(NamedTuple):
    """Where an answer stands: the current line's bytes, the lines completed, the (entity, name)
    pairs they hold, and whether this line's leading spaces were given (one run of them per
    line, so a model that keeps producing `▁` cannot spend its budget on spaces)."""
    line: bytes
    lines: int
    seen: frozenset
    spaced: bool


def _byte_decoder():
    # GPT-2's byte <-> printable character map, used by byte-level BPE vocabularies.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _Vocab:
    """Each token's decoded bytes (None for special tokens) and the fewest tokens spelling a string."""

    def __init__(self, tokenizer):
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        decoder = str(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", ""))
        byte_level = "ByteLevel" in decoder
        byte_map = _byte_decoder() if byte_level else None
        self.token_bytes = []
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                self.token_bytes.append(None)
            elif byte_level:
                self.token_bytes.append(bytes(byte_map[c] for c in piece) if all(c in byte_map for c in piece) else piece.encode())
            else:
                m = _BYTE_PIECE.match(piece)
                self.token_bytes.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode())
        self.ids_of = {}  # bytes -> the token ids that spell them
        for i, data in enumerate(self.token_bytes):
            if data:
                self.ids_of.setdefault(data, []).append(i)
        self.spellings = self.ids_of.keys()
        self.longest = max((len(b) for b in self.spellings), default=1)
        self.prefixes = {data[:k] for data in self.spellings for k in range(1, len(data) + 1)}
        # Tokens that may carry a line break, a separator or only spaces: candidates in any row.
        self.structural = [i for i, data in enumerate(self.token_bytes)
                           if data and (_END in data or _BREAK in data or not data.strip(b" "))]
        self.eos_id = tokenizer.eos_token_id
        self._cost, self._fixed = {}, {}

    def spelling_ids(self, text):
        """Ids of the tokens whose bytes are a substring of `text`, alone or after spaces."""
        found, prefixes, ids_of = set(), self.prefixes, self.ids_of
        for i in range(len(text)):
            for lead in (b"", b" "):
                for j in range(i + 1, min(len(text), i + self.longest) + 1):
                    piece = lead + text[i:j]
                    if piece not in prefixes:
                        break  # no token starts with it, so none with anything longer either
                    found.update(ids_of.get(piece, ()))
        return found

    def fixed_ids(self, fixed):
        """Ids of the tokens that may appear in any answer of a label set (`fixed`: its names and
        `没有`): parts of those, tokens with `_`, a newline or only spaces, and EOS."""
        ids = self._fixed.get(fixed)
        if ids is None:
            ids = self._fixed[fixed] = self.spelling_ids(fixed) | set(self.structural) | {self.eos_id}
        return ids

    def mincost(self, text):
        """Fewest tokens whose bytes concatenate to exactly `text` (inf if none)."""
        cached = self._cost.get(text)
        if cached is not None:
            return cached
        n = len(text)
        best = [0] + [INF] * n
        for i in range(n):
            if best[i] == INF:
                continue
            for j in range(i + 1, min(n, i + self.longest) + 1):
                if best[i] + 1 < best[j] and text[i:j] in self.spellings:
                    best[j] = best[i] + 1
        self._cost[text] = best[n]
        return best[n]


def vocab_for(tokenizer):
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = _Vocab(tokenizer)
    return vocab


def _char_end_missing(data):
    """Bytes still missing from the last UTF-8 character of `data` (0 when it ends on a boundary)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return 0 if back == 1 else -1
        if b >= 0xC0:
            size = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return size - back if size >= back else -1
    return -1  # only continuation bytes: not a character


class Grammar:
    """The answer grammar for one sentence; its states are `State`s."""

    def __init__(self, vocab, sentence, label_names):
        self.vocab = vocab
        self.sentence = sentence.encode()
        self.names = [(name, name.encode()) for name in label_names.values()]
        for name, _ in self.names:
            problem = label_name_problem(name)
            if problem:
                raise ValueError(f"label name {name!r} cannot be generated unambiguously: {problem}")
        self.close_cost = {name: vocab.mincost(_END + raw) for name, raw in self.names}
        cheapest_close = min(self.close_cost.values())
        chars = {c for c in sentence if not c.isspace()}
        self.new_line_cost = min((vocab.mincost(c.encode()) for c in chars), default=INF) + cheapest_close
        self.start = State(b"", 0, frozenset(), False)
        # Every token this grammar can ever allow is in here (a superset): parts of the sentence,
        # of the type names and of `没有`, tokens with `_`, a newline or only spaces, and EOS.
        fixed = _BREAK.join([_NO_ENTITY] + [raw for _, raw in self.names])
        self._fixed = vocab.fixed_ids(fixed)
        self._relevant = self._relevant_ids = None  # built on first use (most rows never need them)

    @property
    def relevant(self):
        if self._relevant is None:
            self._relevant = self.vocab.spelling_ids(self.sentence) | self._fixed
        return self._relevant

    def relevant_ids(self, state, device):
        """The token ids that may be allowed in `state` (a superset), for the scan past the top
        candidates. Inside a line that is a list of a few: what continues the line where it
        occurs in the sentence, parts of the names, and tokens with `_`, a newline or spaces."""
        line = state.line
        if not line:
            if self._relevant_ids is None:
                self._relevant_ids = torch.tensor(sorted(self.relevant), device=device)
            return self._relevant_ids
        found, vocab, sent = set(self._fixed), self.vocab, self.sentence
        pos = sent.find(line)
        while pos >= 0:
            end = pos + len(line)
            for j in range(end + 1, min(len(sent), end + vocab.longest) + 1):
                piece = sent[end:j]
                if piece not in vocab.prefixes:
                    break
                found.update(vocab.ids_of.get(piece, ()))
            pos = sent.find(line, pos + 1)
        return torch.tensor(sorted(found), device=device)

    def _entity(self, data):
        """`data` as an entity string when it can close a line now, else None."""
        if not data or _char_end_missing(data) != 0 or self.sentence.find(data) < 0:
            return None
        try:
            entity = data.decode().strip()
        except UnicodeDecodeError:
            return None
        return entity or None

    def _close(self, entity, seen):
        """Fewest tokens for `_<name>` after `entity`, over the names not yet used with it."""
        return min((self.close_cost[name] for name, _ in self.names if (entity, name) not in seen), default=INF)

    def _entity_cost(self, line, seen):
        """Tokens to complete a line whose bytes so far are a substring of the sentence."""
        missing = _char_end_missing(line)
        if missing < 0 or line[0] & 0xC0 == 0x80:
            return INF
        sent, best = self.sentence, INF
        if missing == 0:
            entity = self._entity(line)
            if entity is not None:
                best = self._close(entity, seen)
            if best < INF:
                return best
        # Finish the character (or add one more) where the line occurs, then close it.
        pos = sent.find(line)
        while pos >= 0:
            end = pos + len(line)
            if missing:
                nxt = end + missing
            else:
                tail = sent[end:end + 4]
                size = next((k for k in range(1, len(tail) + 1) if _char_end_missing(tail[:k]) == 0), 0)
                nxt = end + size
            if nxt > end:
                entity = self._entity(line + sent[end:nxt])
                if entity is not None:
                    best = min(best, self.vocab.mincost(sent[end:nxt]) + self._close(entity, seen))
            pos = sent.find(line, pos + 1)
        return best

    def cost(self, state):
        """Fewest tokens that complete the answer from `state` (0: complete; inf: cannot)."""
        line, lines, seen = state.line, state.lines, state.seen
        best = INF
        if lines == 0 and _NO_ENTITY.startswith(line):
            best = self.vocab.mincost(_NO_ENTITY[len(line):])
        if not line:
            return best if lines == 0 else self.new_line_cost
        if self.sentence.find(line) >= 0:
            best = min(best, self._entity_cost(line, seen))
        cut = line.rfind(_END)
        if cut > 0:
            entity = self._entity(line[:cut])
            if entity is not None:
                typed = line[cut + 1:]
                for name, raw in self.names:
                    if raw.startswith(typed) and (entity, name) not in seen:
                        best = min(best, self.vocab.mincost(raw[len(typed):]))
        return best

    def _pair(self, line, seen):
        """The (entity, name) a complete, new line holds, else None."""
        cut = line.rfind(_END)
        if cut <= 0:
            return None
        entity = self._entity(line[:cut])
        typed = line[cut + 1:]
        for name, raw in self.names:
            if raw == typed and entity is not None and (entity, name) not in seen:
                return entity, name
        return None

    def step(self, state, data):
        """The state after the bytes `data`, or None where they break the grammar."""
        line, lines, seen, spaced = state
        for k, piece in enumerate(data.split(_BREAK)):
            if k:
                pair = self._pair(line, seen)
                if pair is None:
                    return None
                line, lines, seen, spaced = b"", lines + 1, seen | {pair}, False
            if not line and piece.startswith(b" "):
                if spaced:
                    return None
                piece, spaced = piece.lstrip(b" "), True
            if piece:
                line += piece
        return State(line, lines, seen, spaced)

    def allowed(self, state, order, score_of, left, greedy=True):
        """The allowed token ids among `order` (most likely first; `score_of`: id -> logit) with
        `left` tokens of budget, this one included; greedy stops at the first one and its exact
        ties. Also returns whether a grammatical token was refused only for the budget."""
        tb, eos, found, first_score = self.vocab.token_bytes, self.vocab.eos_id, [], None
        complete, relevant, over_budget = None, self._relevant, False  # relevant: a cheap filter once built
        for tok in order:
            if found and greedy and score_of[tok] != first_score:
                break
            if relevant is not None and tok not in relevant:
                continue
            if tok == eos:
                if complete is None:
                    complete = self.cost(state) == 0
                ok = complete
            else:
                data = tb[tok]
                nxt = self.step(state, data) if data else None
                cost = self.cost(nxt) if nxt is not None else INF
                ok = cost <= left - 1
                over_budget |= left - 1 < cost < INF
            if ok:
                if not found:
                    first_score = score_of[tok]
                found.append(tok)
        return found, over_budget

    def finish(self, text):
        """`text` cut back to its complete part: a last line that is not complete is dropped (a
        safety net; the budget rule already ends answers on complete lines)."""
        state = self.step(self.start, text.encode())
        if state is not None and self.cost(state) == 0:
            return text
        kept = []
        for line in text.split(LINE_BREAK):
            state = self.step(self.start, LINE_BREAK.join(kept + [line]).encode())
            if state is None or self.cost(state) != 0:
                break
            kept.append(line)
        return LINE_BREAK.join(kept).strip() or NO_ENTITY


class AnswerStates:
    """The grammar states of one batch's rows while they generate, and the tokens each may take.

    `grammars` has one Grammar (or None: unconstrained) per row; `advance` feeds the tokens the
    rows produced, `choose` returns what the rows may produce next from their scores. Scores may
    cover the whole vocabulary or only the tokens in `token_ids` (the union of what the rows can
    ever allow: `best_allowed` needs no other logit).
    """

    def __init__(self, vocab, grammars, max_new_tokens, policy=DEFAULT_POLICY, candidates=CANDIDATES, greedy=True,
                 eos_penalty=0.0):
        # `policy` comes checked from Grounding (answer_states builds these from one).
        self.vocab, self.grammars, self.policy, self.eos_penalty = vocab, grammars, policy, eos_penalty
        self.max_new_tokens, self.candidates, self.greedy = max_new_tokens, candidates, greedy
        self.states = [g.start if g is not None else None for g in grammars]
        self.done = 0  # tokens generated so far
        self._token_ids = self._member = self._eos_col = None

    @property
    def needs_full_logits(self):
        """Whether `choose` needs the scores of every token: an unconstrained row, sampling, or the
        `first_choice` policy (the model's first choice over the whole vocabulary)."""
        return not self.greedy or self.policy == "first_choice" or any(g is None for g in self.grammars)

    def token_ids(self, device):
        """The sorted ids of every token some row can allow (a superset of each row's answers)."""
        if self._token_ids is None:
            ids = sorted(set().union(*(g.relevant for g in self.grammars)))
            self._token_ids = torch.tensor(ids, device=device)
            self._eos_col = ids.index(self.vocab.eos_id)  # EOS is in every grammar's set
            col = {tok: j for j, tok in enumerate(ids)}
            member = torch.zeros(len(self.grammars), len(ids), dtype=torch.bool)
            for r, g in enumerate(self.grammars):
                member[r, [col[t] for t in g.relevant]] = True
            self._member = member.to(device)
        return self._token_ids

    def active_rows(self):
        return [r for r, s in enumerate(self.states) if s is not None]

    def advance(self, tokens):
        """Feed each row's last token (`tokens[r]`; ignored for rows that finished or are free)."""
        for r, state in enumerate(self.states):
            if state is None:
                continue
            if tokens[r] == self.vocab.eos_id:
                self.states[r] = None  # finished
            else:
                # Never None: the token was allowed in this state.
                self.states[r] = self.grammars[r].step(state, self.vocab.token_bytes[tokens[r]] or b"")
        self.done += 1

    def choose(self, rows, scores, restricted=False):
        """The allowed tokens of each of `rows` (None for a free row), most likely first: greedy
        keeps the best one and its exact ties, sampling every allowed one of the top candidates.
        `scores` has one row per entry of `rows`, over the whole vocabulary or, `restricted`,
        over `token_ids()` (rows' tokens outside their own set are masked here)."""
        ids = self._token_ids if restricted else None
        if restricted:
            scores = scores.masked_fill(~self._member[rows], -INF)
        if self.eos_penalty:
            # EOS is only ever allowed where the answer is complete: the penalty moves the list's end
            # and nothing else (a copy: the caller's scores stay as the model gave them).
            eos_col = self.vocab.eos_id if ids is None else self._eos_col
            if not restricted:
                scores = scores.clone()
            scores[:, eos_col] -= self.eos_penalty
        left = self.max_new_tokens - self.done  # tokens this step and after
        top = torch.topk(scores, min(self.candidates, scores.shape[1]), dim=1)
        # Scores travel to the host once per step with their ids (one read per token would be one
        # device sync each on a GPU); the greedy tie check compares these floats.
        top_ids = (top.indices if ids is None else ids[top.indices]).tolist()
        strict = self.policy == "first_choice" and self.done > 0 and self.greedy
        chosen = []
        for j, (r, order, values) in enumerate(zip(rows, top_ids, top.values.tolist())):
            grammar, state = self.grammars[r], self.states[r]
            if grammar is None or state is None:
                chosen.append(None)
                continue
            allowed, over_budget = grammar.allowed(state, order[:1] if strict else order, dict(zip(order, values)),
                                                   left, self.greedy)
            if not allowed and strict and not over_budget:
                # Mid-answer, the model's first choice breaks the grammar: it is inventing a
                # string, repeating a pair or drifting from the format. Forcing a less likely
                # token there names a wrong entity or type (measured: precision fell from 0.42 to
                # 0.24 on the from-scratch demo model); ending the answer keeps what was complete
                # (Grammar.finish drops the unfinished line).
                allowed = [self.vocab.eos_id]
            if not allowed:
                # The wider scan (the answer's first token, or a line to close before the budget
                # runs out): the tokens this row can allow in this state, most likely first.
                wide = grammar.relevant_ids(state, scores.device)
                cols = wide if ids is None else torch.searchsorted(ids, wide)
                values, where = torch.sort(scores[j, cols], descending=True)
                rest = wide[where].tolist()
                allowed, _ = grammar.allowed(state, rest, dict(zip(rest, values.tolist())), left, self.greedy)
            chosen.append(allowed or [self.vocab.eos_id])  # nothing fits: end; finish drops a partial line
        return chosen

    def finish(self, row, text):
        """Row `row`'s decoded answer, cut back to its complete part when the row is grounded."""
        grammar = self.grammars[row]
        return text if grammar is None else grammar.finish(text)


class GroundedLogitsProcessor(LogitsProcessor):
    """AnswerStates inside transformers' `generate` (sampling): masks every token that would
    break its row's grammar. The prompt length is taken from the first call, so the processor
    sees only the tokens generated after it."""

    def __init__(self, answers):
        self.answers = answers
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            self.answers.advance(input_ids[:, -1].tolist())
        self.started = True
        rows = self.answers.active_rows()
        if not rows:
            return scores
        keep_rows, keep_cols = [], []
        for r, allowed in zip(rows, self.answers.choose(rows, scores[rows])):
            keep_rows += [r] * len(allowed)
            keep_cols += allowed
        idx_r = torch.tensor(keep_rows, device=scores.device)
        idx_c = torch.tensor(keep_cols, device=scores.device)
        kept = scores[idx_r, idx_c]
        if self.answers.eos_penalty:
            kept = kept - self.answers.eos_penalty * (idx_c == self.answers.vocab.eos_id)  # as choose scored them
        if len(rows) == scores.shape[0]:
            scores.fill_(-INF)  # in place: generate does not use the raw scores again
        else:
            scores[rows] = -INF
        scores[idx_r, idx_c] = kept
        return scores


def answer_states(tokenizer, grounding, rows, max_new_tokens, candidates=CANDIDATES, greedy=True):
    """The AnswerStates of one batch: `rows` are the indices of its prompts in `grounding.sentences`."""
    vocab = vocab_for(tokenizer)
    grammars = [None if grounding.sentences[i] is None else Grammar(vocab, grounding.sentences[i], grounding.label_names)
                for i in rows]
    return AnswerStates(vocab, grammars, max_new_tokens, grounding.policy, candidates, greedy, grounding.eos_penalty)
