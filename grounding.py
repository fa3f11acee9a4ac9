"""Grounded decoding: NER answers that can only name substrings of their sentence.

Each row of a batch follows its answer format's grammar (grammar.py: what a grounded answer may
be, on bytes); this module is the tensor side. `AnswerStates` holds one batch's grammar states
and chooses the tokens each row may take from the model's scores; `GroundedLogitsProcessor`
puts it inside transformers' `generate` (as a `logits_processor`, for sampling); the project's
own greedy loop (generation.py) asks it for each row's next token (`next_tokens`).

- Cheap and exact where the model already obeys: only the model's top `candidates` tokens (by
  logit) are checked, most likely first; greedy decoding stops at the first allowed one, so an
  answer that obeys the grammar is generated unchanged. When none of them is allowed, the
  tokens the row can allow in its state (`relevant_ids`) are scanned in logit order.
- One owner for the next token: `next_tokens` (greedy) and `mask` (transformers' generate)
  both choose through `_allowed`, which alone applies the EOS penalty; greedy takes the lowest
  id among exact ties, as argmax over the masked scores would.
- An answer's end can be biased (`eos_penalty`, a logit subtracted from EOS wherever the
  answer could end; 0 by default): a lightly tuned model's choice after a complete seed line,
  another line or EOS, is close to even, and greedy decoding then stops after one entity too often.
- Two greedy policies (POLICIES). `best_allowed`: every step takes the most likely allowed
  token; it only ever looks at the tokens a row can allow (a few hundred of a 262,144-token
  vocabulary), so generation computes only those logits. `first_choice`: past the first
  token, the model's first choice over the whole vocabulary or the end of the answer there
  (the unfinished line is dropped): a model that breaks the grammar mid-answer is inventing a
  string or repeating a pair; it needs every logit. With sampling, the draw is among the
  allowed tokens of the top `candidates` (as top_k would do).
"""
import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from answer_format import DEFAULT_ANSWER_FORMAT, check_answer_format
from grammar import make_grammar
from token_bytes import INF, vocab_for

CANDIDATES = 24  # top tokens (by logit) checked first; the wider scan only runs when none fits
# Greedy decoding's choice past the first token. best_allowed is the default: on a tuned model
# both score alike and it runs faster; a model that often breaks the grammar mid-answer does
# better with first_choice (BENCHMARKS.md, "Figures behind code choices"; README: "Grounded decoding").
POLICIES = ("first_choice", "best_allowed")
DEFAULT_POLICY = "best_allowed"


def policy_problem(policy):
    """What is wrong with a greedy policy name (None: nothing); the one check, for Grounding and
    the config key `grounding_policy` alike."""
    return None if policy in POLICIES else f"{policy!r} is not one of {', '.join(POLICIES)}"


@dataclass
class Grounding:
    """What generate needs to ground its answers: one sentence per prompt (None: that row is not
    constrained), the label set ({type code: name}; answers use the names), the greedy policy,
    the logit subtracted from EOS where an answer could end (0: none) and the answer format."""
    sentences: list
    label_names: dict
    policy: str = DEFAULT_POLICY
    eos_penalty: float = 0.0
    answer_format: str = DEFAULT_ANSWER_FORMAT

    def __post_init__(self):
        problem = policy_problem(self.policy)
        if problem:
            raise ValueError(f"grounding policy: {problem}")
        if not math.isfinite(self.eos_penalty):
            raise ValueError(f"eos_penalty {self.eos_penalty!r}: expected a finite number")
        check_answer_format(self.answer_format)


class AnswerStates:
    """The grammar states of one batch's rows while they generate, and the tokens each may take.

    `grammars` has one Grammar (or None: unconstrained) per row. Greedy decoding asks
    `next_tokens` (one id per row, the rows' states advanced past it); transformers' generate
    feeds the tokens with `advance` and masks its scores with `mask`. Scores may cover the whole
    vocabulary or only the tokens in `token_ids` (the union of what the rows can ever allow:
    `best_allowed` needs no other logit; `logit_ids` says which the caller must compute).
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

    def logit_ids(self, device):
        """The ids of the tokens whose logits next_tokens needs (`token_ids`), or None where it
        needs every token's (needs_full_logits)."""
        return None if self.needs_full_logits else self.token_ids(device)

    def active_rows(self):
        return [r for r, s in enumerate(self.states) if s is not None]

    def advance(self, tokens):
        """Feed each row's last token (`tokens[r]`; ignored for rows that finished or are free)."""
        self._advance(tokens)

    def _advance(self, tokens):
        for r, state in enumerate(self.states):
            if state is None:
                continue
            if tokens[r] == self.vocab.eos_id:
                self.states[r] = None  # finished
            else:
                # Never None: the token was allowed in this state.
                self.states[r] = self.grammars[r].step(state, self.vocab.token_bytes[tokens[r]] or b"")
        self.done += 1

    def next_tokens(self, rows, scores, restricted=False):
        """Greedy decoding's next token of each of `rows` (the batch rows still generating, one
        per row of `scores`): the most likely allowed token, the lowest id among exact ties; a
        free row's argmax. The rows' states advance past the tokens returned."""
        best = scores.argmax(-1).tolist() if self.needs_full_logits else None
        allowed, _ = self._allowed(rows, scores, restricted)
        tokens = [best[j] if ok is None else min(ok) for j, ok in enumerate(allowed)]
        by_row = [None] * len(self.states)
        for r, tok in zip(rows, tokens):
            by_row[r] = tok
        self._advance(by_row)
        return tokens

    def mask(self, scores):
        """`scores` (every row, the whole vocabulary; changed in place) with each token a
        grounded row may not take next at -inf and the EOS penalty applied, for transformers'
        generate."""
        rows = self.active_rows()
        if not rows:
            return scores
        allowed, scored = self._allowed(rows, scores[rows])
        keep_j, keep_cols = [], []
        for j, ok in enumerate(allowed):
            keep_j += [j] * len(ok)
            keep_cols += ok
        idx_j = torch.tensor(keep_j, device=scores.device)
        idx_c = torch.tensor(keep_cols, device=scores.device)
        kept = scored[idx_j, idx_c]  # as _allowed scored them: the EOS penalty applied
        if len(rows) == scores.shape[0]:
            scores.fill_(-INF)  # in place: generate does not use the raw scores again
        else:
            scores[rows] = -INF
        scores[torch.tensor(rows, device=scores.device)[idx_j], idx_c] = kept
        return scores

    def _allowed(self, rows, scores, restricted=False):
        """(The allowed tokens of each of `rows` (None for a free row), most likely first, and the
        scores they were chosen by). Greedy keeps the best one and its exact ties, sampling every
        allowed one of the top candidates. `scores` has one row per entry of `rows`, over the
        whole vocabulary or, `restricted`, over `token_ids()` (rows' tokens outside their own set
        are masked here); the EOS penalty is applied here and nowhere else."""
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
                # token there names a wrong entity or type (precision fell: BENCHMARKS.md,
                # "Figures behind code choices"); ending the answer keeps what was complete (Grammar.finish
                # drops the unfinished line).
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
        return chosen, scores

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
        return self.answers.mask(scores)


def answer_states(tokenizer, grounding, rows, max_new_tokens, candidates=CANDIDATES, greedy=True):
    """The AnswerStates of one batch: `rows` are the indices of its prompts in `grounding.sentences`."""
    vocab = vocab_for(tokenizer)
    grammars = [None if grounding.sentences[i] is None
                else make_grammar(grounding.answer_format, vocab, grounding.sentences[i], grounding.label_names)
                for i in rows]
    return AnswerStates(vocab, grammars, max_new_tokens, grounding.policy, candidates, greedy, grounding.eos_penalty)
