"""Entities for given texts, with a trained adapter (or a fully fine-tuned model folder, <save_dir>/model).

    python predict.py --text="去年，我们又被评为“北京市首届家庭藏书状元明星户”。"
    python predict.py --input_file=sentences.txt           # one text per line
    python predict.py --input_file=data/msra/instruct_data/test.txt --limit=3 --output_file=pred.jsonl

Prints the `文本 >>> / 预测 >>>` view of taishan1994/Chinese-LLaMA-Alpaca-LoRA-Tuning (`真实 >>>`
too when the input is instruct JSONL with answers) and optionally writes JSONL with each
entity's character offsets in the text. A text longer than the model was trained on is cut
into windows at sentence ends; every character is read, and offsets refer to the whole text.
"""
from pathlib import Path

from config_utils import ConfigError, check_writable, parse_config, run_cli
from answer_format import NO_ENTITY, copy_text, parse
from dataset import (COLUMN_DEFAULTS, QUERY_PREFIX, DataError, PromptEncoder, encode_text, load_data, read_text,
                     sentence_of)
from files import write_jsonl
from metrics import mention_spans
from generation import ner_generate
from infer_config import (INFER_DEFAULTS, answer_format_for, check_infer_config, instruct_for, label_names_for,
                          load_from_config, recorded_args)

DEFAULTS = {
    **INFER_DEFAULTS,
    "text": "",  # one text to analyse; separate several with ||
    "input_file": "",  # one text per line, or instruct JSONL (instruct/query[/answer])
    "input_format": "auto",  # auto: JSONL when every non-blank line is a JSON object, else text; or text | jsonl
    "limit": 0,  # first N inputs only (0 = all)
    "output_file": "",  # JSONL with entities and their character offsets
    "instruct": "",  # for plain-text inputs; "" = the instruction the adapter was trained with
}

# Where a long text may be cut, best first: sentence ends, then clause breaks, then anywhere.
BREAKS = ("。！？；!?;\n", "，,、：:", "")
INPUT_FORMATS = ("auto", "text", "jsonl")
# A window shorter than this cannot hold most entities (MSRA's longest names run past 10
# characters): a budget that leaves less is refused, not read one character at a time.
MIN_WINDOW_CHARS = 16


def _is_jsonl(lines):
    """auto: JSONL when every non-blank line is a JSON object (a text line that starts with `{` is
    text)."""
    import json

    for line in lines:
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                return False
        except json.JSONDecodeError:
            return False
    return True


def read_inputs(cfg, instruct):
    """-> list of instruct records (with 'answer' when the input has one)."""
    if cfg.input_format not in INPUT_FORMATS:
        raise ConfigError(f"config key 'input_format': {cfg.input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    if cfg.text and cfg.input_file:
        raise ConfigError("give --text or --input_file, not both")
    if cfg.text:
        texts = [t.strip().removeprefix("\ufeff") for t in cfg.text.split("||")]
        if not any(texts):
            raise ConfigError("config key 'text': the text is blank; give the sentence to analyse")
        return [{"instruct": instruct, "query": QUERY_PREFIX + t} for t in texts if t]
    if not cfg.input_file:
        raise ConfigError("give --text=... or --input_file=... (one text per line, or instruct JSONL)")
    path = Path(cfg.input_file)
    lines = read_text(path).split("\n")
    if cfg.input_format == "jsonl" or cfg.input_format == "auto" and _is_jsonl(lines):
        return load_data(path, columns=tuple(COLUMN_DEFAULTS.values())[:2])  # instruct, query
    records = [{"instruct": instruct, "query": QUERY_PREFIX + line.strip()} for line in lines if line.strip()]
    if not records:
        raise DataError(f"{path}:1: file holds no text")
    return records


def split_windows(text, fits, breaks=BREAKS):
    """Cut `text` into consecutive pieces that each `fits`, cutting at the best break available.

    Returns [(start offset, piece)]; the pieces joined give the text back exactly.
    """
    if fits(text) or len(text) <= 1:
        return [(0, text)]
    marks, rest = breaks[0], breaks[1:]
    if marks:
        units, start = [], 0
        for i, ch in enumerate(text):
            if ch in marks:
                units.append(text[start:i + 1])
                start = i + 1
        if start < len(text):
            units.append(text[start:])
    else:
        units = list(text)
    if len(units) == 1:
        return split_windows(text, fits, rest)
    windows, current, start = [], "", 0  # `current` is the window being filled, from `start`
    for unit in units:
        if fits(current + unit):
            current += unit
            continue
        if current:
            windows.append((start, current))
            start += len(current)
        if fits(unit):
            current = unit
            continue
        # One sentence too long for a window: cut it at the next kind of break; its last piece
        # stays open, so the next sentence may still join it.
        pieces = split_windows(unit, fits, rest)
        windows += [(start + s, piece) for s, piece in pieces[:-1]]
        start += pieces[-1][0]
        current = pieces[-1][1]
    if current:
        windows.append((start, current))
    return windows


def entity_offsets(text, entities):
    """[(entity, type)] -> [{entity, type, begin, end}] with every occurrence in the text (end exclusive,
    found by metrics.mention_spans, the scorer's own reading). A generated entity that does not
    occur in the text gets begin = end = -1.
    """
    spans = []
    for entity, etype in entities:
        found = [{"entity": entity, "type": etype, "begin": b, "end": e}
                 for b, e, _ in mention_spans(text, [(entity, etype)])]
        spans += found or [{"entity": entity, "type": etype, "begin": -1, "end": -1}]
    return spans


def windowed(records, tokenizer, train_args, max_new_tokens, context):
    """Records whose prompt would not fit -> one record per window; returns (records, owner index, start).
    An inline answer copies its window, so there the window's copy must fit too."""
    encoder = PromptEncoder(train_args, tokenizer)
    # What the model was trained to read (max_seq_length), and never past its context window.
    budget = min(encoder.max_seq_length, context) - max_new_tokens
    copies = answer_format_for(train_args) == "inline"
    pieces, owners, starts = [], [], []
    for n, rec in enumerate(records):
        text = sentence_of(rec["query"])

        def fits(piece, rec=rec):
            copy = len(encode_text(tokenizer, copy_text(piece))) if copies else 0
            return len(encoder.prompt_ids(rec["instruct"], QUERY_PREFIX + piece)) + copy <= budget
        if not fits(text[:MIN_WINDOW_CHARS]):
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves fewer than {MIN_WINDOW_CHARS} characters of text per window "
                f"within max_seq_length={encoder.max_seq_length} (the adapter's, from training; the model's context "
                f"is {context}): lower --max_new_tokens (answers of MSRA need about 64)")
        for start, piece in split_windows(text, fits):
            pieces.append({**rec, "query": QUERY_PREFIX + piece})
            owners.append(n)
            starts.append(start)
    return pieces, owners, starts


def joined_output(answer_format, outputs):
    """The answers of a text's windows as one: the seed format's lines with the windows that found
    nothing left out, the typed format's lines of every window, the inline copies joined back
    into the marked text."""
    if answer_format == "inline":
        return "".join(outputs)
    if answer_format == "typed":
        return "\n".join(outputs)
    found = [o for o in outputs if o.strip() and o.strip() != NO_ENTITY]
    return "\n".join(found) if found else NO_ENTITY


def predict_records(model, tokenizer, train_args, records, cfg, label_names):
    """Instruct records -> one result per record: {text, entities [{entity, type, begin, end}],
    windows, output}, the record --output_file holds. Long texts are read in windows; `cfg` gives
    the INFER_DEFAULTS answer keys (batch_size, max_new_tokens, grounding); the answer format is
    the adapter's (train_args). serve.py answers through this function too, so the server and
    this script cannot disagree about a text."""
    answer_format = answer_format_for(train_args)
    # Records here use the standard column names whatever the adapter was trained with.
    train_args = {**train_args, **COLUMN_DEFAULTS}
    pieces, owners, starts = windowed(records, tokenizer, train_args, cfg.max_new_tokens,
                                      model.config.max_position_embeddings)
    outputs, _ = ner_generate(model, tokenizer, train_args, pieces, cfg.batch_size, cfg.max_new_tokens,
                              grounded=cfg.grounded, label_names=label_names, policy=cfg.grounding_policy,
                              eos_penalty=cfg.eos_penalty)
    results = [{"text": sentence_of(r["query"]), "outputs": [], "entities": [], "windows": 0}
               for r in records]
    for piece, owner, start, output in zip(pieces, owners, starts, outputs):
        result = results[owner]
        result["windows"] += 1
        result["outputs"].append(output)
        window_text = sentence_of(piece["query"])
        for span in entity_offsets(window_text, parse(answer_format, output, window_text, label_names).entities):
            if span["begin"] >= 0:
                span["begin"] += start
                span["end"] += start
            result["entities"].append(span)
    for result in results:
        result["output"] = joined_output(answer_format, result.pop("outputs"))
    return results


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    check_infer_config(cfg)
    recorded = recorded_args(cfg)
    label_names = label_names_for(recorded)
    records = read_inputs(cfg, cfg.instruct or instruct_for(recorded))
    if cfg.limit > 0:
        records = records[:cfg.limit]
    if cfg.output_file:
        check_writable(cfg.output_file, "output_file", folder=False)  # before the model loads
    model, tokenizer, train_args = load_from_config(cfg)
    results = predict_records(model, tokenizer, train_args, records, cfg, label_names)
    for rec, result in zip(records, results):
        print("=" * 100)
        print(f"文本 >>>  {result['text']}")
        if result["windows"] > 1:
            print(f"(a long text: read in {result['windows']} windows, cut at sentence ends to fit the length "
                  f"the model was trained on)")
        print(f"预测 >>>  {result['output']}")
        if "answer" in rec:
            print(f"真实 >>>  {rec['answer']}")
    if cfg.output_file:
        write_jsonl(cfg.output_file, results)
        print(f"wrote {cfg.output_file}")
    return results


if __name__ == "__main__":
    run_cli(main)
