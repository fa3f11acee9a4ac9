"""Entities for given texts, with a trained adapter (or a fully fine-tuned model folder, <save_dir>/model).

    python predict.py --text="去年，我们又被评为“北京市首届家庭藏书状元明星户”。"
    python predict.py --input_file=sentences.txt           # one text per line
    python predict.py --input_file=data/msra/instruct_data/test.txt --limit=3 --output_file=pred.jsonl

Prints the seed's `文本 >>> / 预测 >>>` view (`真实 >>>` too when the input is instruct JSONL
with answers) and optionally writes JSONL with each entity's character offsets in the text.
"""
import json
from pathlib import Path

from config_utils import ConfigError, parse_config, run_cli
from dataset import DEFAULT_INSTRUCT, QUERY_PREFIX, DataError, load_data
from metrics import parse_answer
from model_utils import INFER_DEFAULTS, load_from_config, ner_generate

DEFAULTS = {
    **INFER_DEFAULTS,
    "text": "",  # one text to analyse; separate several with ||
    "input_file": "",  # one text per line, or instruct JSONL (instruct/query[/answer])
    "limit": 0,  # first N inputs only (0 = all)
    "output_file": "",  # JSONL with entities and their character offsets
    "instruct": DEFAULT_INSTRUCT,  # used for plain-text inputs; JSONL inputs carry their own
}


def read_inputs(cfg):
    """-> list of instruct records (with 'answer' when the input has one)."""
    if cfg.text:
        return [{"instruct": cfg.instruct, "query": QUERY_PREFIX + t.strip()} for t in cfg.text.split("||") if t.strip()]
    if not cfg.input_file:
        raise ConfigError("give --text=... or --input_file=... (one text per line, or instruct JSONL)")
    path = Path(cfg.input_file)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason})") from None
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("{"):
        return load_data(path, columns=("instruct", "query"))
    records = [{"instruct": cfg.instruct, "query": QUERY_PREFIX + line.strip()} for line in lines if line.strip()]
    if not records:
        raise DataError(f"{path}:1: file holds no text")
    return records


def entity_offsets(text, entities):
    """[(entity, type)] -> [{entity, type, begin, end}] with every occurrence in the text (end exclusive).

    A generated entity that does not occur in the text gets begin = end = -1.
    """
    spans = []
    for entity, etype in entities:
        start, found = text.find(entity), False
        while start != -1:
            spans.append({"entity": entity, "type": etype, "begin": start, "end": start + len(entity)})
            found = True
            start = text.find(entity, start + len(entity))
        if not found:
            spans.append({"entity": entity, "type": etype, "begin": -1, "end": -1})
    return spans


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    records = read_inputs(cfg)
    if cfg.limit > 0:
        records = records[:cfg.limit]
    model, tokenizer, train_args = load_from_config(cfg)
    # Records here use the standard column names whatever the adapter was trained with.
    columns = {"instruct_column": "instruct", "query_column": "query"}
    outputs, _ = ner_generate(model, tokenizer, {**train_args, **columns}, records, cfg.batch_size, cfg.max_new_tokens)
    results = []
    for rec, output in zip(records, outputs):
        text = rec["query"].removeprefix(QUERY_PREFIX)
        entities = parse_answer(output).entities
        print("=" * 100)
        print(f"文本 >>>  {text}")
        print(f"预测 >>>  {output}")
        if "answer" in rec:
            print(f"真实 >>>  {rec['answer']}")
        results.append({"text": text, "output": output, "entities": entity_offsets(text, entities)})
    if cfg.output_file:
        Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output_file, "w", encoding="utf-8") as f:
            for row in results:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {cfg.output_file}")
    return results


if __name__ == "__main__":
    run_cli(main)
