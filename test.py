"""Evaluate a trained adapter or fully fine-tuned model: batched greedy generation, entity-level P/R/F1.

    python test.py                                   # the Trainer's adapter on MSRA test
    python test.py --lora_model=checkpoint/msra/train_deepspeed/adapter_model --limit=200
    python test.py --no_adapter=True --model_dir=model_hub/chinese-alpaca-7b
    python test.py --lora_model=checkpoint/msra/demo/model      # a --finetuning=full run (make demo)

The base model, columns and max length come from the adapter's train_args.json. Writes
predictions.jsonl (text, answer, output, entities) and metrics.json to output_dir.
"""
import json
import time
from pathlib import Path

from config_utils import ConfigError, parse_config, run_cli
from dataset import QUERY_PREFIX, load_data
from metrics import format_table, parse_answer, score
from model_utils import INFER_DEFAULTS, load_from_config, ner_generate, read_train_args

DEFAULTS = {
    **INFER_DEFAULTS,
    "test_path": "data/msra/instruct_data/test.txt",
    "limit": 0,  # evaluate the first N examples only (0 = all)
    "output_dir": None,  # None: the adapter folder (or ./outputs/base_model with no_adapter)
}


def main(argv=None):
    from tqdm import tqdm

    cfg = parse_config(DEFAULTS, argv)
    if cfg.no_adapter and not cfg.model_dir:
        raise ConfigError("no_adapter=True needs --model_dir=<base model>")
    # The test file is checked, with the columns the adapter was trained on, before the model loads.
    recorded = {} if cfg.no_adapter else (read_train_args(cfg.lora_model) or {})
    query_col = recorded.get("query_column", "query")
    answer_col = recorded.get("response_column", "answer")
    records = load_data(cfg.test_path, (recorded.get("instruct_column", "instruct"), query_col, answer_col))
    if cfg.limit > 0:
        records = records[:cfg.limit]
    model, tokenizer, train_args = load_from_config(cfg)

    start = time.perf_counter()
    with tqdm(total=len(records), desc="test", unit="ex") as bar:
        outputs, shortened = ner_generate(model, tokenizer, train_args, records, cfg.batch_size,
                                          cfg.max_new_tokens, progress=bar.update)
    elapsed = time.perf_counter() - start

    examples, rows = [], []
    for rec, output in zip(records, outputs):
        text = rec[query_col].removeprefix(QUERY_PREFIX)
        gold = parse_answer(rec[answer_col])
        pred = parse_answer(output)
        examples.append({"text": text, "gold": gold.entities, "pred": pred.entities,
                         "bad_lines": len(pred.bad_lines)})
        rows.append({"text": text, "answer": rec[answer_col], "output": output,
                     "entities": [list(e) for e in pred.entities], "bad_lines": pred.bad_lines})
    metrics = score(examples)
    metrics.update(examples_per_second=len(records) / elapsed, queries_shortened=shortened,
                   test_path=str(cfg.test_path), lora_model=None if cfg.no_adapter else str(cfg.lora_model))

    out_dir = Path(cfg.output_dir or ("outputs/base_model" if cfg.no_adapter else cfg.lora_model))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(format_table(metrics))
    print(f"{len(records)} examples in {elapsed:.1f}s ({len(records) / elapsed:.1f} examples/s)")
    print(f"wrote {out_dir / 'predictions.jsonl'} and {out_dir / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
