"""What does every answer format's grammar share?

The sentence whose substrings an answer may name (an entity ends only on a character boundary
and only as a substring of the sentence's bytes, so byte tokens can only complete a character of
the sentence), the label names, the tokens a row can allow at all (`relevant`, a superset) and
the budget-aware choice among a row's candidates (`allowed`): a token is allowed only if the
answer can still be completed in the tokens left, counted with the fewest tokens that spell what
is missing (token_bytes.py). The formats themselves are grammar.py's.
"""
from answer_format import LINE_BREAK, label_name_problem
from token_bytes import INF

_BREAK = LINE_BREAK.encode()


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


def label_names_bytes(label_names):
    return [(name, name.encode()) for name in label_names.values()]



class Grammar:
    """What every format's grammar shares: the sentence, the label names, the token filter and
    the choice among a row's candidates (`allowed`)."""
    MARKS = ()  # the format's marks, as bytes

    def __init__(self, vocab, sentence, label_names, answer_format, fixed):
        self.vocab = vocab
        self.sentence = sentence.encode()
        self.names = label_names_bytes(label_names)
        for name, _ in self.names:
            problem = label_name_problem(name, answer_format)
            if problem:
                raise ValueError(f"label name {name!r} cannot be generated unambiguously: {problem}")
        # Every token this grammar can ever allow is in here (a superset): parts of the sentence,
        # of the fixed words, tokens with a mark, a newline or only spaces, and EOS.
        self._fixed = vocab.fixed_ids(_BREAK.join(fixed), self.MARKS)
        self._relevant = None  # built on first use (most rows never need it)

    @property
    def written(self):
        """The text whose pieces an answer writes (the sentence; the inline format's copy of it)."""
        return self.sentence

    @property
    def relevant(self):
        if self._relevant is None:
            self._relevant = self.vocab.spelling_ids(self.written) | self._fixed
        return self._relevant

    def relevant_ids(self, state, device):
        """The token ids that may be allowed in `state` (a superset), for the scan past the top
        candidates."""
        import torch

        return torch.tensor(sorted(self.relevant), device=device)

    def _entity(self, data):
        """`data` as an entity string when it can end an entity now, else None."""
        if not data or _char_end_missing(data) != 0 or self.sentence.find(data) < 0:
            return None
        try:
            entity = data.decode().strip()
        except UnicodeDecodeError:
            return None
        return entity or None

    def _entity_cost(self, data, close):
        """Tokens to complete an entity whose bytes so far, `data`, are a substring of the
        sentence, and to close it: `close(entity)` is what closing costs (inf: not allowed)."""
        missing = _char_end_missing(data)
        if missing < 0 or data[0] & 0xC0 == 0x80:
            return INF
        sent, best = self.sentence, INF
        if missing == 0:
            entity = self._entity(data)
            if entity is not None:
                best = close(entity)
            if best < INF:
                return best
        # Finish the character (or add one more) where the data occurs, then close it.
        pos = sent.find(data)
        while pos >= 0:
            end = pos + len(data)
            if missing:
                nxt = end + missing
            else:
                tail = sent[end:end + 4]
                size = next((k for k in range(1, len(tail) + 1) if _char_end_missing(tail[:k]) == 0), 0)
                nxt = end + size
            if nxt > end:
                entity = self._entity(data + sent[end:nxt])
                if entity is not None:
                    best = min(best, self.vocab.mincost(sent[end:nxt]) + close(entity))
            pos = sent.find(data, pos + 1)
        return best

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

