"""What bytes does each token of a tokenizer write, and how few tokens spell a string?

The grammars (grammar.py) constrain decoded text in UTF-8 bytes: every vocabulary token's bytes
are computed once per tokenizer (`vocab_for`): byte-level BPE pieces through GPT-2's byte map,
SentencePiece pieces with `▁` as a space and byte-fallback pieces like `<0xE5>` as that one
byte. A token may span the end of an entity, a mark, a type name and a newline; its bytes are
run through a grammar as they come. The answer budget is counted with the fewest tokens that
spell what is missing (`mincost`, `suffix_costs`).
"""
import re
import weakref

from answer_format import LINE_BREAK

INF = float("inf")
_BREAK = LINE_BREAK.encode()
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_VOCABS = weakref.WeakKeyDictionary()  # tokenizer -> _Vocab


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
        self.eos_id = tokenizer.eos_token_id
        self._cost, self._fixed, self._marked = {}, {}, {}

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

    def continuations(self, text, at):
        """Ids of the tokens whose bytes are a prefix of text[at:]."""
        found = set()
        for j in range(at + 1, min(len(text), at + self.longest) + 1):
            piece = text[at:j]
            if piece not in self.prefixes:
                break
            found.update(self.ids_of.get(piece, ()))
        return found

    def marked_ids(self, marks):
        """Ids of the tokens that hold one of `marks` (bytes) or only spaces: the tokens that may
        join a format's marks to the text around them, candidates in any row."""
        ids = self._marked.get(marks)
        if ids is None:
            ids = self._marked[marks] = [i for i, data in enumerate(self.token_bytes)
                                         if data and (any(m in data for m in marks) or not data.strip(b" "))]
        return ids

    def fixed_ids(self, fixed, marks):
        """Ids of the tokens that may appear in any answer of a label set and format (`fixed`:
        its names and words, joined by a line break; `marks`: the format's marks): parts of those,
        tokens with a mark, a newline or only spaces, and EOS."""
        key = (fixed, marks)
        ids = self._fixed.get(key)
        if ids is None:
            ids = self._fixed[key] = self.spelling_ids(fixed) | set(self.marked_ids(marks + (_BREAK,))) | {self.eos_id}
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
                piece = text[i:j]
                if piece not in self.prefixes:
                    break  # no token starts with it, so none with anything longer either
                if best[i] + 1 < best[j] and piece in self.spellings:
                    best[j] = best[i] + 1
        self._cost[text] = best[n]
        return best[n]

    def suffix_costs(self, text):
        """[fewest tokens spelling text[i:] for every i], the last entry 0."""
        n = len(text)
        best = [INF] * n + [0]
        for i in range(n - 1, -1, -1):
            for j in range(i + 1, min(n, i + self.longest) + 1):
                piece = text[i:j]
                if piece not in self.prefixes:
                    break
                if best[j] + 1 < best[i] and piece in self.spellings:
                    best[i] = best[j] + 1
        return best


def vocab_for(tokenizer):
    """The token table of `tokenizer`, built once per tokenizer object."""
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = _Vocab(tokenizer)
    return vocab

