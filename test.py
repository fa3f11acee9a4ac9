"""Evaluate a trained adapter: batched greedy generation on the test split, entity-level P/R/F1.

    python test.py                                   # the Trainer's adapter on MSRA test
    python test.py --lora_model=checkpoint/msra/train_deepspeed/adapter_model --limit=200
    python test.py --no_adapter=True --model_dir=model_hub/chinese-alpaca-7b

The base model, columns, label set and max length come from the adapter's train_args.json.
Writes predictions.jsonl (text, answer, output, entities) and metrics.json to output_dir.
"""
import json
import time
from pathlib import Path

from config_utils import ConfigError, parse_config, run_cli
from dataset import QUERY_PREFIX, DataError, atomic_write_text, load_data
from metrics import format_table, parse_answer, score
from model_utils import INFER_DEFAULTS, check_infer_config, label_names_for, load_from_config, ner_generate, recorded_args

DEFAULTS = {
    **INFER_DEFAULTS,
    "test_path": "data/msra/instruct_data/test.txt",
    "limit": 0,  # evaluate the first N examples only (0 = all)
    "output_dir": None,  # None: the adapter folder (or ./outputs/base_model with no_adapter)
}


def gold_answers(records, linenos, answer_col, label_names, test_path):
    """Parse every gold answer with the label set; a line it cannot read is an error, never a
    silently smaller gold set (a type missing from the label set would lower recall unseen)."""
    golds = []
    for rec, lineno in zip(records, linenos):
        gold = parse_answer(rec[answer_col], label_names)
        if gold.bad_lines:
            raise DataError(
                f"{test_path}:{lineno}: answer line {gold.bad_lines[0]!r} is not '实体_类型' with a type of "
                f"this label set ({', '.join(label_names.values())}); process the data and train with the same "
                f"--label_names"
            )
        golds.append(gold)
    return golds


def prepare_output_dir(cfg):
    out_dir = Path(cfg.output_dir or ("outputs/base_model" if cfg.no_adapter else cfg.lora_model))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"config key 'output_dir': {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"config key 'output_dir': cannot create {out_dir} ({e.strerror})") from None
    return out_dir


def main(argv=None):
    from tqdm import tqdm

    cfg = parse_config(DEFAULTS, argv)
    check_infer_config(cfg)
    # The test file is checked, with the columns and labels the adapter was trained on, and the
    # output folder made, before the model loads: nothing after generation can fail on them.
    recorded = recorded_args(cfg)
    query_col = recorded.get("query_column", "query")
    answer_col = recorded.get("response_column", "answer")
    records, linenos = load_data(cfg.test_path, (recorded.get("instruct_column", "instruct"), query_col, answer_col),
                                 line_numbers=True)
    if cfg.limit > 0:
        records, linenos = records[:cfg.limit], linenos[:cfg.limit]
    label_names = label_names_for(recorded, cfg.test_path)
    golds = gold_answers(records, linenos, answer_col, label_names, cfg.test_path)
    out_dir = prepare_output_dir(cfg)
    model, tokenizer, train_args = load_from_config(cfg)

    start = time.perf_counter()
    with tqdm(total=len(records), desc="test", unit="ex") as bar:
        outputs, shortened = ner_generate(model, tokenizer, train_args, records, cfg.batch_size,
                                          cfg.max_new_tokens, progress=bar.update, grounded=cfg.grounded,
                                          label_names=label_names)
    elapsed = time.perf_counter() - start

    examples, rows = [], []
    for rec, gold, output in zip(records, golds, outputs):
        text = rec[query_col].removeprefix(QUERY_PREFIX)
        pred = parse_answer(output, label_names)
        examples.append({"text": text, "gold": gold.entities, "pred": pred.entities,
                         "bad_lines": len(pred.bad_lines)})
        rows.append({"text": text, "answer": rec[answer_col], "output": output,
                     "entities": [list(e) for e in pred.entities], "bad_lines": pred.bad_lines})
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = score(examples, label_names)
    metrics.update(examples_per_second=len(records) / elapsed, queries_shortened=shortened,
                   test_path=str(cfg.test_path), lora_model=None if cfg.no_adapter else str(cfg.lora_model),
                   label_names=label_names)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    print(format_table(metrics))
    print(f"{len(records)} examples in {elapsed:.1f}s ({len(records) / elapsed:.1f} examples/s)")
    print(f"wrote {out_dir / 'predictions.jsonl'} and {out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
