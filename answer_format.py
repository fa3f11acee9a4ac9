"""What an NER answer looks like: the answer formats, each with its writer, its parser and the
instruction that asks for it.

A format changes how the entities of a sentence are written, never what counts as correct: the
gold of every format is the corpus's entity list, and each parser gives back the same
(entity, type code) pairs, in order of first appearance, duplicates removed.

- `seed` (the default, as taishan1994/Chinese-LLaMA-Alpaca-LoRA-Tuning): one `实体_类型` line per
  entity, or `没有` when there is none.
- `typed`: every type of the label set once, in its order, one line each, `类型：实体1；实体2` or
  `类型：没有`; the answer cannot end before the last type.
- `inline`: the sentence copied with each entity marked in place, `[实体|类型]`; in the copy the
  three mark characters of the sentence itself are written as their full-width forms (one
  character for one, so offsets hold), so a mark is never ambiguous.

process.py writes the answers (`format_answer`), records the format in data_info.json, training
copies it into train_args.json, and test.py, predict.py and chat_ner.py read answers with it
(`parse`); grounded decoding constrains them with the format's grammar (grammar.py).
"""
import re
from dataclasses import dataclass, field

from config_utils import ConfigError

# Tag type -> the Chinese name used in answers. process.py takes a different map as config.
DEFAULT_LABEL_NAMES = {"PER": "人名", "LOC": "地名", "ORG": "机构名"}
# The instruction of taishan1994/Chinese-LLaMA-Alpaca-LoRA-Tuning for MSRA (the model is asked for people, places and organisations).
DEFAULT_INSTRUCT = (
    "你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，"
    "返回'实体_实体类型'，不同实体间用\\n分隔。如果没有结果，回答'没有'。"
)
NO_ENTITY = "没有"  # the whole seed answer when a sentence has no entity; a type without entities in typed
# The one line break of an answer: writers join lines with it, the parsers and the grammars of
# grounded decoding split on it and on nothing else (not on \r, U+2028 or the other breaks
# str.splitlines knows), so an entity may hold any other character of its sentence.
LINE_BREAK = "\n"
ENTITY_END = "_"  # seed: ends an answer line's entity; the type name follows it

ANSWER_FORMATS = ("seed", "typed", "inline")
DEFAULT_ANSWER_FORMAT = "seed"

TYPE_MARK = "："  # typed: ends the type name of a line
ITEM_SEP = "；"  # typed: between the entities of one type (no MSRA entity holds one)
OPEN, SEP, CLOSE = "[", "|", "]"  # inline: [entity|type]
# inline: the mark characters of a sentence as its copy writes them (same length: offsets hold).
COPY_ESCAPES = {OPEN: "［", SEP: "｜", CLOSE: "］"}
_ESCAPE_TABLE = str.maketrans(COPY_ESCAPES)
_INLINE_MARKS = re.compile("([" + re.escape(OPEN + SEP + CLOSE) + "])")

# The characters each format gives a meaning to: a type name holding one could not be read back.
_RESERVED = {"seed": (ENTITY_END, LINE_BREAK), "typed": (TYPE_MARK, ITEM_SEP, LINE_BREAK),
             "inline": (OPEN, SEP, CLOSE, LINE_BREAK)}

_INSTRUCTIONS = {
    "seed": DEFAULT_INSTRUCT,
    "typed": ("你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名。按人名、地名、机构名的顺序，"
              "每类一行，写'实体类型：实体1；实体2'，该类没有实体时写'实体类型：没有'。"),
    "inline": ("你现在是一个实体识别模型，你需要标出文本里面的人名、地名、机构名：照抄文本，把其中每个实体"
               "写成'[实体|实体类型]'。"),
}


@dataclass
class ParsedAnswer:
    entities: list[tuple[str, str]] = field(default_factory=list)  # (entity_text, type_code), no duplicates
    bad_lines: list[str] = field(default_factory=list)  # parts of the answer the format cannot read


def check_answer_format(name, where="config key 'answer_format'"):
    if name not in ANSWER_FORMATS:
        raise ConfigError(f"{where}: answer format {name!r} is not one of {', '.join(ANSWER_FORMATS)}")
    return name


def label_name_problem(name, answer_format=DEFAULT_ANSWER_FORMAT):
    """Why `name` cannot be a type name in answers of `answer_format` (None when it can)."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    for mark in _RESERVED[answer_format]:
        if mark in name:
            what = "a line break, which ends an answer line" if mark == LINE_BREAK else \
                f"'{mark}', which the {answer_format} answer format uses as a mark"
            return f"it contains {what}"
    if name != name.strip():
        return "it starts or ends with a space"
    return None


def ner_instruct(label_names, answer_format=DEFAULT_ANSWER_FORMAT):
    """The NER instruction for a label set and format; MSRA's types in the seed format give
    DEFAULT_INSTRUCT exactly."""
    names = "、".join(label_names.values())
    return _INSTRUCTIONS[answer_format].replace("人名、地名、机构名", names)


def copy_text(sentence):
    """The sentence as an inline answer copies it: its mark characters in full-width form."""
    return sentence.translate(_ESCAPE_TABLE)


# ---------------------------------------------------------------------------------- writers

def entity_problem(answer_format, sentence, spans):
    """Why the entities `spans` [(begin, end, type)] of `sentence` cannot be written in
    `answer_format` (None when they can): a parser must read back exactly these pairs."""
    for b, e, _ in spans:
        entity = sentence[b:e]
        if LINE_BREAK in entity:
            return f"entity {entity!r} holds a line break, which ends an answer line"
        if answer_format == "seed" and not entity.strip():
            return f"entity {entity!r} is blank"
        if answer_format == "typed" and (ITEM_SEP in entity or entity.strip() in ("", NO_ENTITY)):
            return f"entity {entity!r} cannot be written in the typed format (it holds '{ITEM_SEP}' or reads as none)"
    if answer_format == "inline":
        ordered = sorted(spans)
        for (b1, e1, _), (b2, e2, _) in zip(ordered, ordered[1:]):
            if b2 < e1:
                return (f"entities {sentence[b1:e1]!r} and {sentence[b2:e2]!r} overlap, which the inline format "
                        f"cannot mark")
    return None


def _pairs(sentence, spans):
    """(entity, type) in order of first appearance, duplicates removed."""
    return list(dict.fromkeys((sentence[b:e], t) for b, e, t in sorted(spans)))


def format_answer(entities, label_names=None):
    """seed: [(entity, type), ...] -> `实体_类型` lines, first appearance order, no duplicates."""
    label_names = DEFAULT_LABEL_NAMES if label_names is None else label_names
    lines = [f"{entity}{ENTITY_END}{label_names[etype]}" for entity, etype in dict.fromkeys(entities)]
    return LINE_BREAK.join(lines) if lines else NO_ENTITY


def write_answer(answer_format, sentence, spans, label_names):
    """The answer to `sentence` whose entities are `spans` [(begin, end, type code)], in
    `answer_format` (entity_problem must have found none)."""
    if answer_format == "seed":
        return format_answer(_pairs(sentence, spans), label_names)
    if answer_format == "typed":
        pairs = _pairs(sentence, spans)
        lines = []
        for code, name in label_names.items():
            items = [entity for entity, t in pairs if t == code]
            lines.append(f"{name}{TYPE_MARK}{ITEM_SEP.join(items) if items else NO_ENTITY}")
        return LINE_BREAK.join(lines)
    parts, at = [], 0
    for b, e, t in sorted(spans):
        parts += [copy_text(sentence[at:b]), OPEN, copy_text(sentence[b:e]), SEP, label_names[t], CLOSE]
        at = e
    parts.append(copy_text(sentence[at:]))
    return "".join(parts)


# ---------------------------------------------------------------------------------- parsers

def _type_lookup(label_names):
    """Chinese name or code -> code. Codes are accepted too, since both forms are unambiguous."""
    lookup = {code: code for code in label_names}
    lookup.update({name: code for code, name in label_names.items()})
    return lookup


def parse(answer_format, text, sentence, label_names=None):
    """Answer text in `answer_format` -> ParsedAnswer. `sentence` is the text the answer is about
    (the inline format reads its entities from their place in it)."""
    label_names = DEFAULT_LABEL_NAMES if label_names is None else label_names
    if answer_format == "seed":
        return parse_answer(text, label_names)
    if answer_format == "typed":
        return _parse_typed(text or "", _type_lookup(label_names))
    return _parse_inline(text or "", sentence, _type_lookup(label_names))


def parse_answer(text, label_names=None):
    """A seed-format answer -> ParsedAnswer.

    Lines are split on LINE_BREAK alone, as the grammar of grounded decoding splits them (an
    entity may hold a \\r or U+2028 of its sentence). Each line is split on its LAST "_" so
    entities that contain "_" survive; a line that is exactly NO_ENTITY means "no entity here"
    and is not an error. Generated text never holds an end-of-sequence token (generation stops
    at its id), so `</s>` in an answer is text like any other.
    """
    lookup = _type_lookup(DEFAULT_LABEL_NAMES if label_names is None else label_names)
    entities, bad_lines = [], []
    for raw in (text or "").split(LINE_BREAK):
        line = raw.strip()
        if not line or line == NO_ENTITY:
            continue
        entity, sep, type_name = line.rpartition(ENTITY_END)
        entity, type_name = entity.strip(), type_name.strip()
        if not sep or not entity or type_name not in lookup:
            bad_lines.append(line)
            continue
        entities.append((entity, lookup[type_name]))
    return ParsedAnswer(entities=list(dict.fromkeys(entities)), bad_lines=bad_lines)


def _parse_typed(text, lookup):
    """`类型：实体；实体` lines in any order (grounded answers hold every type once, in order)."""
    entities, bad_lines = [], []
    for raw in text.split(LINE_BREAK):
        line = raw.strip()
        if not line:
            continue
        name, mark, body = line.partition(TYPE_MARK)
        if not mark or name.strip() not in lookup:
            bad_lines.append(line)
            continue
        code = lookup[name.strip()]
        for item in body.split(ITEM_SEP):
            item = item.strip()
            if item and item != NO_ENTITY:
                entities.append((item, code))
    return ParsedAnswer(entities=list(dict.fromkeys(entities)), bad_lines=bad_lines)


def _parse_inline(text, sentence, lookup):
    """The marked copy -> its entities. Where the text outside the marks is the sentence's copy
    (always, under grounded decoding) an entity is the sentence's characters at its place;
    elsewhere it is the marked text as written."""
    pieces = _INLINE_MARKS.split(text)
    aligned = sentence is not None and "".join(
        p for k, p in enumerate(pieces) if k % 2 == 0 and not _is_type_piece(pieces, k)) == copy_text(sentence)
    entities, bad_lines = [], []
    at, k = 0, 0  # characters of the copy so far; piece index
    while k < len(pieces):
        piece = pieces[k]
        if piece != OPEN:
            if piece in (SEP, CLOSE):
                bad_lines.append(piece + (pieces[k + 1] if k + 1 < len(pieces) else ""))
            else:
                at += len(piece)
            k += 1
            continue
        # OPEN entity SEP type CLOSE
        window = pieces[k:k + 5]
        if len(window) == 5 and window[2] == SEP and window[4] == CLOSE:
            if window[1] and window[3].strip() in lookup:
                entity = sentence[at:at + len(window[1])] if aligned else window[1]
                entities.append((entity, lookup[window[3].strip()]))
            else:  # an empty entity or a type outside the label set
                bad_lines.append("".join(window))
            at += len(window[1])
            k += 5
        else:  # an unfinished or malformed mark: its text still counts as copied
            text_after = pieces[k + 1] if k + 1 < len(pieces) else ""
            bad_lines.append(OPEN + text_after)
            at += len(text_after)
            k += 2
    return ParsedAnswer(entities=list(dict.fromkeys(entities)), bad_lines=bad_lines)


def _is_type_piece(pieces, k):
    """Whether text piece `k` of a split inline answer is a type name (between SEP and CLOSE)."""
    return 0 < k < len(pieces) - 1 and pieces[k - 1] == SEP and pieces[k + 1] == CLOSE
