"""What may a grounded answer be, in each answer format, one byte at a time?

Pure Python on bytes; the tensor side (which tokens a batch row may take next, and the hook into
transformers' generate) is grounding.py. One grammar per answer format (answer_format.py):

- seed: `没有` alone, or lines `<entity>_<type name>`, `<entity>` a non-empty substring of the
  sentence, no (entity, type) pair twice.
- typed: one line per type of the label set in its order, `<type name>：没有` or
  `<type name>：e1；e2`, each entity a substring, none twice in a line; EOS only after the last line.
- inline: the sentence's copy (answer_format.copy_text) written exactly, where a mark
  `[<entity>|<type name>]` may wrap any non-empty run of it that starts and ends on character
  boundaries; EOS only after the whole copy.

Every grammar gives the same interface to grounding.AnswerStates: `start`, `step(state, bytes)`
(None once the bytes break the grammar), `cost(state)` (the fewest tokens that complete the
answer: 0 complete, inf impossible), `allowed(...)`, `relevant` and `relevant_ids(state)` (the
tokens a row can allow at all, and in a state: supersets), `finish(text)`.

How it works (the shared part is grammar_base.py's, the tokens' bytes token_bytes.py's):
- Spaces at the start of a line (seed, typed) or of the answer (inline) are ignored
  (SentencePiece's first answer piece is `▁`; the parsers strip them too), one run per line, so
  a model that keeps producing `▁` cannot spend its budget on spaces; elsewhere a space is only
  allowed where the sentence has one.
- The grammar knows its budget: a token is allowed only if the answer can still be completed in
  the tokens left. Answers are never cut mid-line (mid-mark).
- Cheap and exact where the model already obeys: only the model's top candidates (by logit)
  are checked, most likely first; greedy decoding stops at the first allowed one, so an answer
  that obeys the grammar is generated unchanged.
"""
from typing import NamedTuple

from answer_format import CLOSE, ENTITY_END, ITEM_SEP, LINE_BREAK, NO_ENTITY, OPEN, SEP, TYPE_MARK, copy_text
from grammar_base import Grammar, label_names_bytes
from token_bytes import INF

_NO_ENTITY = NO_ENTITY.encode()
_BREAK, _END = LINE_BREAK.encode(), ENTITY_END.encode()  # the answer's line break and seed's entity end, as bytes
_TYPE_MARK, _ITEM_SEP = TYPE_MARK.encode(), ITEM_SEP.encode()
_OPEN, _SEP, _CLOSE = OPEN.encode(), SEP.encode(), CLOSE.encode()


class State(NamedTuple):
    """seed: where an answer stands: the current line's bytes, the lines completed, the (entity,
    name) pairs they hold, and whether this line's leading spaces were given."""
    line: bytes
    lines: int
    seen: frozenset
    spaced: bool


class SeedGrammar(Grammar):
    """The seed format's grammar for one sentence; its states are `State`s."""
    MARKS = (_END,)

    def __init__(self, vocab, sentence, label_names):
        super().__init__(vocab, sentence, label_names, "seed", [_NO_ENTITY] + [raw for _, raw in label_names_bytes(label_names)])
        self.close_cost = {name: vocab.mincost(_END + raw) for name, raw in self.names}
        cheapest_close = min(self.close_cost.values())
        chars = {c for c in sentence if not c.isspace()}
        self.new_line_cost = min((vocab.mincost(c.encode()) for c in chars), default=INF) + cheapest_close
        self.start = State(b"", 0, frozenset(), False)
        self._relevant_ids = None

    def relevant_ids(self, state, device):
        """Inside a line: what continues the line where it occurs in the sentence, parts of the
        names, and tokens with `_`, a newline or spaces."""
        import torch

        line = state.line
        if not line:
            if self._relevant_ids is None:
                self._relevant_ids = torch.tensor(sorted(self.relevant), device=device)
            return self._relevant_ids
        found, sent = set(self._fixed), self.sentence
        pos = sent.find(line)
        while pos >= 0:
            found |= self.vocab.continuations(sent, pos + len(line))
            pos = sent.find(line, pos + 1)
        return torch.tensor(sorted(found), device=device)

    def _close(self, entity, seen):
        """Fewest tokens for `_<name>` after `entity`, over the names not yet used with it."""
        return min((self.close_cost[name] for name, _ in self.names if (entity, name) not in seen), default=INF)

    def cost(self, state):
        """Fewest tokens that complete the answer from `state` (0: complete; inf: cannot)."""
        line, lines, seen = state.line, state.lines, state.seen
        best = INF
        if lines == 0 and _NO_ENTITY.startswith(line):
            best = self.vocab.mincost(_NO_ENTITY[len(line):])
        if not line:
            return best if lines == 0 else self.new_line_cost
        if self.sentence.find(line) >= 0:
            best = min(best, self._entity_cost(line, lambda entity: self._close(entity, seen)))
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


class TypedState(NamedTuple):
    """typed: the type line being written (its index in the label set), its bytes so far, and
    whether its leading spaces were given."""
    k: int
    line: bytes
    spaced: bool


class TypedGrammar(Grammar):
    """The typed format's grammar for one sentence: every type once, in the label set's order."""
    MARKS = (_TYPE_MARK, _ITEM_SEP)

    def __init__(self, vocab, sentence, label_names):
        heads = [raw + _TYPE_MARK for _, raw in label_names_bytes(label_names)]
        super().__init__(vocab, sentence, label_names, "typed", [_NO_ENTITY, _ITEM_SEP] + heads)
        self.heads = heads
        # Fewest tokens for the lines after line k, each naming no entity.
        self.tail = [vocab.mincost(b"".join(_BREAK + head + _NO_ENTITY for head in heads[k + 1:]))
                     for k in range(len(heads))]
        chars = {c for c in sentence if not c.isspace()}
        self.item_cost = min((vocab.mincost(c.encode()) for c in chars), default=INF)
        self.start = TypedState(0, b"", False)

    def _read(self, k, line):
        """A line's bytes so far -> (its complete entities, the item being written), (None, b"")
        while its head is unfinished, or None where they break the grammar."""
        head = self.heads[k]
        if len(line) < len(head):
            return (None, b"") if head.startswith(line) else None
        if not line.startswith(head):
            return None
        *complete, partial = line[len(head):].split(_ITEM_SEP)
        seen = set()
        for item in complete:
            entity = None if item == _NO_ENTITY else self._entity(item)
            if entity is None or entity in seen:
                return None
            seen.add(entity)
        return seen, partial

    def _line_done(self, k, line):
        """Whether line k, `line`, is complete: `没有` alone, or its last entity complete and new."""
        read = self._read(k, line)
        if read is None or read[0] is None:
            return False
        seen, partial = read
        if partial == _NO_ENTITY:
            return not seen
        entity = self._entity(partial)
        return entity is not None and entity not in seen and entity != NO_ENTITY

    def step(self, state, data):
        k, line, spaced = state
        for j, piece in enumerate(data.split(_BREAK)):
            if j:
                if k + 1 >= len(self.heads) or not self._line_done(k, line):
                    return None
                k, line, spaced = k + 1, b"", False
            if not line and piece.startswith(b" "):
                if spaced:
                    return None
                piece, spaced = piece.lstrip(b" "), True
            line += piece
        if self._read(k, line) is None:
            return None
        return TypedState(k, line, spaced)

    def cost(self, state):
        k, line, _ = state
        seen, partial = self._read(k, line)
        rest, vocab = self.tail[k], self.vocab
        if seen is None:  # inside the head
            return vocab.mincost(self.heads[k][len(line):] + _NO_ENTITY) + rest
        first = not seen

        def close(entity):
            return 0 if entity not in seen and entity != NO_ENTITY else INF

        best = INF
        if first and _NO_ENTITY.startswith(partial):
            best = vocab.mincost(_NO_ENTITY[len(partial):])
        if not partial:
            best = min(best, self.item_cost)
        elif partial != _NO_ENTITY and self.sentence.find(partial) >= 0:
            best = min(best, self._entity_cost(partial, close))
        for k in range(1, len(_ITEM_SEP)):  # the separator's first bytes (byte-fallback tokens spell it)
            if partial.endswith(_ITEM_SEP[:k]):
                entity = self._entity(partial[:-k])
                if entity is not None and close(entity) == 0:
                    best = min(best, vocab.mincost(_ITEM_SEP[k:]) + self.item_cost)
        return best + rest

    def relevant_ids(self, state, device):
        import torch

        k, line, _ = state
        read = self._read(k, line)
        if read is None or read[0] is None or not read[1]:
            return super().relevant_ids(state, device)
        found, sent, partial = set(self._fixed), self.sentence, read[1]
        pos = sent.find(partial)
        while pos >= 0:
            found |= self.vocab.continuations(sent, pos + len(partial))
            pos = sent.find(partial, pos + 1)
        return torch.tensor(sorted(found), device=device)

    def finish(self, text):
        """`text` cut back to its complete lines and entities (a safety net, as SeedGrammar's)."""
        state = self.step(self.start, text.encode())
        if state is not None and (self.cost(state) == 0 or self._line_done(state.k, state.line)):
            return text
        for cut in sorted((i for i, c in enumerate(text) if c in (ITEM_SEP, LINE_BREAK)), reverse=True):
            state = self.step(self.start, text[:cut].encode())
            if state is not None and self._line_done(state.k, state.line):
                return text[:cut]
        return ""


COPY, ENTITY, TYPE = 0, 1, 2  # inline: writing the copy, a marked entity, its type name


class InlineState(NamedTuple):
    """inline: bytes of the copy written, the mode (COPY, ENTITY, TYPE), where the marked entity
    began in the copy, the type name's bytes so far, and whether the answer's leading spaces were
    given."""
    at: int
    mode: int
    begin: int
    typed: bytes
    spaced: bool


class InlineGrammar(Grammar):
    """The inline format's grammar for one sentence: its copy, with entities marked in place."""
    MARKS = (_OPEN, _SEP, _CLOSE)

    def __init__(self, vocab, sentence, label_names):
        self.closes = [raw + _CLOSE for _, raw in label_names_bytes(label_names)]
        super().__init__(vocab, sentence, label_names, "inline", self.closes)
        self.copy = copy_text(sentence).encode()
        n = len(self.copy)
        self.boundary = [i == n or self.copy[i] & 0xC0 != 0x80 for i in range(n + 1)]
        self.suffix = vocab.suffix_costs(self.copy)  # fewest tokens writing the copy from byte i on
        self.close_cost = min(vocab.mincost(_SEP + close) for close in self.closes)
        self.start = InlineState(0, COPY, 0, b"", False)

    @property
    def written(self):
        return self.copy

    def step(self, state, data):
        at, mode, begin, typed, spaced = state
        copy, n = self.copy, len(self.copy)
        if at == 0 and mode == COPY and data.startswith(b" ") and not copy.startswith(b" "):
            if spaced:
                return None
            data, spaced = data.lstrip(b" "), True
        for byte in data:
            if mode == TYPE:
                typed += bytes((byte,))
                if typed in self.closes:
                    mode, typed = COPY, b""
                elif not any(close.startswith(typed) for close in self.closes):
                    return None
            elif at < n and copy[at] == byte:  # the copy's own bytes never hold a mark
                at += 1
            elif mode == COPY and byte == _OPEN[0] and at < n and self.boundary[at]:
                mode, begin = ENTITY, at
            elif mode == ENTITY and byte == _SEP[0] and at > begin and self.boundary[at]:
                mode = TYPE
            else:
                return None
        return InlineState(at, mode, begin, typed, spaced)

    def cost(self, state):
        at, mode, begin, typed, _ = state
        if mode == COPY:
            return self.suffix[at]
        if mode == TYPE:
            return min(self.vocab.mincost(c[len(typed):]) for c in self.closes if c.startswith(typed)) + self.suffix[at]
        end = at if at > begin and self.boundary[at] else next(i for i in range(at + 1, len(self.copy) + 1)
                                                               if self.boundary[i])
        return self.vocab.mincost(self.copy[at:end]) + self.close_cost + self.suffix[end]

    def relevant_ids(self, state, device):
        import torch

        if state.mode == TYPE:
            return torch.tensor(sorted(self._fixed), device=device)
        return torch.tensor(sorted(self._fixed | self.vocab.continuations(self.copy, state.at)), device=device)

    def finish(self, text):
        """`text` with an unclosed mark taken out (its entity's text kept as copied): a safety net."""
        state = self.step(self.start, text.encode())
        if state is None or state.mode == COPY:
            return text
        cut = text.rfind(OPEN)
        return text[:cut] + text[cut + 1:].split(SEP)[0]


GRAMMARS = {"seed": SeedGrammar, "typed": TypedGrammar, "inline": InlineGrammar}


def make_grammar(answer_format, vocab, sentence, label_names):
    """The grammar of `answer_format` for one sentence."""
    return GRAMMARS[answer_format](vocab, sentence, label_names)
