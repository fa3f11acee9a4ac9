"""Instruction data for NER: the prompt formats, JSONL loading and the label-masking collator.

Every script that feeds a model a prompt (training, test, predict, chat, serve) gets its token
ids from here (encode_prompt, through PromptEncoder and NerCollate), so the ids a model sees at
inference are exactly the prompt part of what it was trained on. Writing outputs to disk is
files.py's.
"""
import json
import random
import re
from pathlib import Path

import torch

from answer_format import DEFAULT_ANSWER_FORMAT, check_answer_format, label_name_problem
from config_utils import UserError

# Every prompt format lives here, selected by the `prompt_style` recorded beside each adapter.
# alpaca: Chinese-Alpaca's template, as taishan1994/Chinese-LLaMA-Alpaca-LoRA-Tuning trained with it (the default).
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)
# llama2_chat: Chinese-Alpaca-2's format (LLaMA-2 chat with its default system prompt).
LLAMA2_CHAT_TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"
DEFAULT_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
# chat_template: the tokenizer's own chat template (Qwen's ChatML, Llama-3's headers, ...), with
# DEFAULT_SYSTEM as the system turn and the instruction as the user turn.
PROMPT_STYLES = {  # style -> id saved beside every adapter, so inference can check it
    "alpaca": "chinese-alpaca-v1",
    "llama2_chat": "chinese-alpaca-2",
    "chat_template": "tokenizer-chat-template",
}
PROMPT_ID = PROMPT_STYLES["alpaca"]

QUERY_PREFIX = "文本："
# process.py writes {"label_names": {type: name}, "instruct": ...} beside the instruct files;
# training copies both into train_args.json, so test/predict/chat read answers with the types
# the data was made with and ask plain texts with the instruction the model learnt.
DATA_INFO_FILE = "data_info.json"


# The JSONL keys of an instruct record, as config keys (training records them in train_args.json).
COLUMN_DEFAULTS = {
    "instruct_column": "instruct",  # JSONL key of the instruction
    "query_column": "query",  # JSONL key of the text (文本：...)
    "response_column": "answer",  # JSONL key of the answer the model learns
}


def sentence_of(query):
    """The sentence a query asks about: the text after `文本：`."""
    return query.removeprefix(QUERY_PREFIX)


def columns_of(args):
    """(instruct, query, answer) column names of a config or train_args dict, defaults filled in."""
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    return tuple(get(key, default) or default for key, default in COLUMN_DEFAULTS.items())


class DataError(UserError):
    """Bad data file: the message starts with `path:line:`."""


class PromptError(UserError, ValueError):
    """A prompt that cannot be built: unknown style, no chat template, a tokenizer without BOS/EOS."""


class TooLongError(ValueError):
    """Template, instruction and answer alone exceed max_seq_length (the query cannot shrink enough)."""


def check_label_names(names, where, answer_format=DEFAULT_ANSWER_FORMAT):
    """{type code: name} usable in answers of `answer_format`: non-empty, unique, each name
    generable unambiguously; else one line naming `where` (a config key or a file)."""
    if not isinstance(names, dict) or not names:
        raise DataError(f"{where}: 'label_names' must be an object of non-empty type -> name strings")
    seen = set()
    for code, name in names.items():
        problem = "the type code is empty" if not isinstance(code, str) or not code else label_name_problem(name, answer_format)
        if problem is None and name in seen:
            problem = "it is used for two types"
        if problem:
            raise DataError(f"{where}: label name {name!r} (type {code!r}) cannot be used: {problem}")
        seen.add(name)
    return names


def read_data_info(data_path):
    """What process.py recorded beside `data_path` (a data file): label_names, instruct and
    answer_format (absent in folders written before formats existed: seed), or None."""
    path = Path(data_path).parent / DATA_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}:1: expected a JSON object with 'label_names'")
    answer_format = check_answer_format(info.get("answer_format", DEFAULT_ANSWER_FORMAT), f"{path}:1")
    check_label_names(info.get("label_names"), f"{path}:1", answer_format)
    return info


def read_text(path, what="file"):
    """A UTF-8 text file as one string, a leading BOM removed (Windows editors add one).

    Every text input of the project goes through here, so a missing file or another encoding
    is one line naming the file (and the line of the first bad byte).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if "\n" not in text and "\r" in text.rstrip("\r"):
        # Every reader splits lines at LF (CRLF works too); a file of CR-only line ends would be
        # one line, and any message about it would quote the whole file.
        raise DataError(f"{path}:1: its lines end in a carriage return alone (CR, old Mac line ends), not LF; "
                        f"save it with LF or CRLF line ends")
    return text.removeprefix("\ufeff")


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text):
    """The first lone UTF-16 surrogate in `text` (JSON's \\ud800 escapes decode to one), or None:
    it is no character, and writing it as UTF-8, or tokenising it, fails."""
    m = _SURROGATE.search(text)
    return m.group() if m else None


def check_surrogates(record, keys, where):
    """One line naming `where` (path:line) and the key whose string holds a lone surrogate."""
    for key in keys:
        value = record.get(key)
        ch = lone_surrogate(value) if isinstance(value, str) else None
        if ch is not None:
            raise DataError(f"{where}: key '{key}' holds a lone UTF-16 surrogate (\\u{ord(ch):04x}), which is no "
                            f"character (a JSON escape of half a UTF-16 pair); fix or drop that text")


def check_prompt_style(style, tokenizer=None):
    """A known prompt style; with a tokenizer, chat_template also needs its template to render
    the user's text (rendered here once, bounded: chat_template.py), before any weights load."""
    if style not in PROMPT_STYLES:
        raise PromptError(f"config key 'prompt_style': {style!r} is not one of {', '.join(PROMPT_STYLES)}")
    if style == "chat_template" and tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("config key 'prompt_style': chat_template needs a tokenizer with a chat template, and "
                              f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none; use alpaca or "
                              f"llama2_chat")
        from chat_template import chat_parts

        chat_parts(tokenizer, DEFAULT_SYSTEM)
    return style


def _render_chat(tokenizer, instruction):
    """The chat template's prompt for `instruction` as the user's turn (DEFAULT_SYSTEM as the
    system turn where the template has one): rendered once per template in a bounded process
    around a marker (chat_template.py), the instruction put in the marker's place."""
    from chat_template import chat_parts, template_source

    prompt = chat_parts(tokenizer, DEFAULT_SYSTEM).around(instruction)
    if instruction.strip() not in prompt:  # every prompt holds the instruction and the sentence, on every path
        raise PromptError(f"the chat template in {template_source(tokenizer)} does not write the user's text")
    return prompt


def build_prompt(instruct, query=None, style="alpaca", tokenizer=None):
    """The prompt text for one example; the model's answer follows it directly.

    NER examples give both parts (joined by a newline, as in training); free chat gives the
    whole instruction as `instruct`. `chat_template` renders through `tokenizer`.
    """
    instruction = instruct if query is None else f"{instruct}\n{query}"
    if style == "alpaca":
        return PROMPT_TEMPLATE.format(instruction=instruction)
    if style == "llama2_chat":
        return LLAMA2_CHAT_TEMPLATE.format(system=DEFAULT_SYSTEM, instruction=instruction)
    check_prompt_style(style, tokenizer)
    return _render_chat(tokenizer, instruction)


def encode_text(tokenizer, text):
    """Token ids of user text (an instruction, a sentence, an answer) as text: `</s>`, `<s>`,
    `<unk>` or `<|im_end|>` typed in a sentence are characters, never the control tokens
    themselves (else a sentence could end its own prompt, or an entity hold EOS)."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


_SPECIAL_TEXTS = {}  # id(tokenizer) -> the texts its tokenizer would read as special or added tokens


def _special_texts(tokenizer):
    key = id(tokenizer)
    if key not in _SPECIAL_TEXTS:
        added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
        _SPECIAL_TEXTS[key] = tuple(t for t in dict.fromkeys(added + list(tokenizer.all_special_tokens)) if t)
    return _SPECIAL_TEXTS[key]


def encode_prompt(tokenizer, instruct, query=None, style="alpaca"):
    """The prompt's token ids: what inference feeds the model, and the prompt part of a training
    sequence (the collator builds its sequences with this same function). The alpaca and
    llama2_chat texts start with BOS and hold no control tokens, so the whole text is encoded
    as text; a chat template writes its own start and turn tokens, which stay control tokens
    while the user's part inside it is encoded as text."""
    if style != "chat_template":
        return [tokenizer.bos_token_id] + encode_text(tokenizer, build_prompt(instruct, query, style, tokenizer))
    check_prompt_style(style, tokenizer)
    instruction = instruct if query is None else f"{instruct}\n{query}"
    if not any(t in instruction for t in _special_texts(tokenizer)):
        return tokenizer.encode(_render_chat(tokenizer, instruction), add_special_tokens=False)
    # The user's text holds what reads as a control token: the template's two sides are encoded
    # as the template's, the user's part as text.
    from chat_template import chat_parts

    parts = chat_parts(tokenizer, DEFAULT_SYSTEM)
    return (tokenizer.encode(parts.before, add_special_tokens=False)
            + encode_text(tokenizer, instruction.strip() if parts.trims else instruction)
            + tokenizer.encode(parts.after, add_special_tokens=False))


def load_data(path, columns=tuple(COLUMN_DEFAULTS.values()), allow_empty=False, line_numbers=False):
    """Read instruct JSONL into a list of dicts; any bad line fails with `path:line: reason`.

    Blank lines are skipped. Every record must hold each name in `columns` as a string.
    With `line_numbers`, returns (records, the file line of each record) for later checks.
    """
    path = Path(path)
    records, linenos = [], []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        for col in columns:
            if col not in rec:
                raise DataError(f"{path}:{lineno}: missing key '{col}' (keys: {sorted(rec)})")
            if not isinstance(rec[col], str):
                raise DataError(f"{path}:{lineno}: key '{col}' must be a string")
        check_surrogates(rec, columns, f"{path}:{lineno}")
        records.append(rec)
        linenos.append(lineno)
    if not records and not allow_empty:
        raise DataError(f"{path}:1: file holds no examples")
    return (records, linenos) if line_numbers else records


class PromptEncoder:
    """Prompt token ids for instruct records, in the adapter's prompt style: what inference feeds
    the model (`inference_ids`) and the prompt part of a training sequence (NerCollate).

    `args` is the flat config or train_args (attribute or dict access): it names the columns,
    `max_seq_length` and `prompt_style`. A query too long for the budget loses characters from
    its end only, never the template, instruction or answer.
    """

    def __init__(self, args, tokenizer):
        get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
        self.instruct_column, self.query_column, self.response_column = columns_of(args)
        self.max_seq_length = int(get("max_seq_length", 256))
        self.prompt_style = check_prompt_style(get("prompt_style", "alpaca") or "alpaca", tokenizer)
        self.tokenizer = tokenizer
        needs_bos = self.prompt_style != "chat_template"  # a chat template writes its own start tokens
        if tokenizer.eos_token_id is None or (needs_bos and tokenizer.bos_token_id is None):
            raise PromptError(f"the tokenizer needs BOS and EOS tokens for NER training with the "
                            f"{self.prompt_style} prompt (a chat_template prompt needs EOS only)")

    def _ids(self, text):
        return encode_text(self.tokenizer, text)

    def prompt_ids(self, instruct, query):
        return encode_prompt(self.tokenizer, instruct, query, self.prompt_style)

    def inference_ids(self, example, max_new_tokens, context=None):
        """Prompt ids for generation, the query shortened (as in training) so that prompt plus
        `max_new_tokens` fit `context` tokens (default max_seq_length; generation passes the
        model's context window). Returns (ids, was_shortened)."""
        instruct, query = example[self.instruct_column], example[self.query_column]
        ids = self.prompt_ids(instruct, query)
        budget = (context or self.max_seq_length) - max_new_tokens
        if len(ids) <= budget:
            return ids, False
        return self._shorten_query(instruct, query, budget), True

    def _shorten_query(self, instruct, query, budget):
        # Binary search for the longest query prefix (in characters) whose prompt fits; keeps
        # the template's tail ("### Response: ") intact so the model still knows where to answer.
        lo, hi = 0, len(query)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.prompt_ids(instruct, query[:mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        ids = self.prompt_ids(instruct, query[:lo])
        if len(ids) > budget:
            raise TooLongError(
                f"max_seq_length={self.max_seq_length} cannot hold the prompt template, "
                f"the instruction and the answer; raise max_seq_length"
            )
        return ids

class NerCollate(PromptEncoder):
    """Tokenise `prompt answer [EOS]` (the prompt starting with BOS or the chat template's own start),
    mask the prompt out of the loss, pad dynamically. For chat templates EOS is the end-of-turn
    token (Qwen's <|im_end|>, Llama-3's <|eot_id|>): the loss covers the answer and the turn's end.
    Too-long examples lose characters from the end of the query text only, never the template,
    instruction, answer or EOS; `self.truncated` counts them. An answer that copies its sentence
    (`answer_format` inline) would then copy text its prompt no longer holds: such an example is
    left out instead (EncodedDataset counts it).
    """

    def __init__(self, args, tokenizer, answer_format=DEFAULT_ANSWER_FORMAT):
        super().__init__(args, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.truncated = 0
        self.copies_query = answer_format == "inline"

    def encode(self, example):
        instruct, query = example[self.instruct_column], example[self.query_column]
        answer_ids = self._ids(example[self.response_column]) + [self.tokenizer.eos_token_id]
        prompt_ids = self.prompt_ids(instruct, query)
        budget = self.max_seq_length - len(answer_ids)
        if len(prompt_ids) > budget:
            if self.copies_query:
                raise TooLongError(f"max_seq_length={self.max_seq_length} cannot hold this sentence and its copy")
            prompt_ids = self._shorten_query(instruct, query, budget)
            self.truncated += 1
        return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}

    def pad(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        input_ids, attention_mask, labels = [], [], []
        for f in features:
            n = len(f["input_ids"])
            # Right padding for training: positions stay 0..n-1 for every real token.
            input_ids.append(f["input_ids"] + [self.pad_id] * (longest - n))
            attention_mask.append([1] * n + [0] * (longest - n))
            labels.append(f["labels"] + [-100] * (longest - n))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    def collate_fn(self, batch):
        """Raw examples or already-encoded ones (with `input_ids`/`labels`) -> padded tensors."""
        return self.pad([b if "input_ids" in b else self.encode(b) for b in batch])

    __call__ = collate_fn


class EncodedDataset(torch.utils.data.Dataset):
    """Examples tokenised once up front (not once per epoch); `lengths` feeds length grouping.

    An example whose answer cannot fit max_seq_length even with an empty query is left out
    (cutting the answer would teach the model to stop early) and counted in `skipped`.
    """

    def __init__(self, records, collate):
        self.features, self.skipped = [], 0
        for r in records:
            try:
                self.features.append(collate.encode(r))
            except TooLongError:
                self.skipped += 1
        self.lengths = [len(f["input_ids"]) for f in self.features]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i]


def length_grouped_indices(lengths, batch_size, seed, mega_factor=200):
    """A shuffled order in which each run of `batch_size` indices has similar lengths.

    Indices are shuffled, cut into mega-batches of `mega_factor * batch_size`, each sorted by
    length and cut into batches; the batches are then shuffled, so training still sees a
    random stream while padding inside a batch stays small. Same seed, same order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = max(batch_size * mega_factor, batch_size)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return [i for b in batches for i in b]
