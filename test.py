"""Evaluate a trained adapter or fully fine-tuned model: batched greedy generation, entity-level P/R/F1.

    python test.py                                   # the Trainer's adapter on MSRA test
    python test.py --lora_model=checkpoint/msra/train_deepspeed/adapter_model --limit=200
    python test.py --no_adapter=True --model_dir=model_hub/chinese-alpaca-7b
    python test.py --lora_model=checkpoint/msra/demo/model      # a --finetuning=full run (make demo)

The base model, columns, label set and max length come from the adapter's train_args.json.
Writes predictions.jsonl (text, answer, output, entities), metrics.json and report.html to
output_dir (by default <save_dir>/eval_<test file>, beside the adapter folder that a later export
replaces), all three together, metrics.json last. Scores are reported at two levels: set level (the distinct (entity, type) pairs
of each sentence, as LLM information-extraction papers count) and mention level (every
annotated character span, as the BERT-CRF literature counts MSRA; gold spans come from the
ori_data file process.py wrote beside the instruct data).
"""
import json
import random
import time
from pathlib import Path

from answer_format import DEFAULT_ANSWER_FORMAT, parse
from config_utils import ConfigError, check_writable, parse_config, run_cli
from dataset import DataError, columns_of, load_data, read_data_info, read_text, sentence_of
from files import commit_files, json_text, jsonl_text
from metrics import bootstrap_f1, format_table, mention_spans, score, score_mentions
from infer_config import (INFER_DEFAULTS, answer_format_for, check_infer_config, label_names_for, load_from_config,
                          recorded_args)
from model_utils import loaded_as
from generation import ner_generate
from report import render_report
from run_folder import EVAL_OUTPUTS, default_eval_dir

DEFAULTS = {
    **INFER_DEFAULTS,
    "test_path": "data/msra/instruct_data/test.txt",  # instruct JSONL with gold answers
    "limit": 0,  # evaluate the first N examples only (0 = all)
    "sample": 0,  # evaluate a seeded random sample of N examples (0 = all); metrics.json gets a bootstrap interval
    "seed": 0,  # the sample's seed
    "output_dir": None,  # None: beside the adapter folder, <save_dir>/eval_<test file> (./outputs/base_model with no_adapter)
}


def gold_answers(records, linenos, texts, answer_col, label_names, test_path, answer_format):
    """Parse every gold answer with the label set and answer format; a part it cannot read is an
    error, never a silently smaller gold set (a type missing from the label set would lower
    recall unseen)."""
    golds = []
    for rec, lineno, text in zip(records, linenos, texts):
        gold = parse(answer_format, rec[answer_col], text, label_names)
        if gold.bad_lines:
            shape = "is not '实体_类型'" if answer_format == "seed" else f"cannot be read as a {answer_format}-format answer"
            raise DataError(
                f"{test_path}:{lineno}: answer {'line' if answer_format == 'seed' else 'part'} {gold.bad_lines[0]!r} "
                f"{shape} with a type of this label set ({', '.join(label_names.values())}); process the data and "
                f"train with the same --label_names" + ("" if answer_format == "seed" else " and --answer_format")
            )
        golds.append(gold)
    return golds


def check_data_format(test_path, answer_format):
    """The test data must be written in the adapter's answer format: its prompts carry that
    format's instruction, and the model answers in the format it learnt."""
    data_format = (read_data_info(test_path) or {}).get("answer_format", DEFAULT_ANSWER_FORMAT)
    if data_format != answer_format:
        raise DataError(f"{test_path}: its data is in the {data_format} answer format (data_info.json beside it) but "
                        f"the adapter was trained on {answer_format}; process the test data with "
                        f"--answer_format={answer_format} (into another --data_name) and pass that test_path")


def gold_spans(test_path, linenos, texts):
    """Each test sentence's annotated (begin, end, type) spans, from the ori_data file that
    process.py wrote beside the instruct file (same line order, same text), or None when there
    is none. A line that disagrees with the instruct file is an error naming both lines: a
    mention level silently computed another way would not be the number the user asked for."""
    ori = Path(test_path).parent.parent / "ori_data" / Path(test_path).name
    if not ori.is_file():
        return None
    lines = read_text(ori).split("\n")
    spans = []
    for lineno, text in zip(linenos, texts):
        where = f"{ori}:{lineno}"
        if lineno > len(lines) or not lines[lineno - 1].strip():
            raise DataError(f"{where}: missing: {ori} has no sentence for {test_path}:{lineno}; run process.py again")
        try:
            rec = json.loads(lines[lineno - 1])
            if rec["text"] != text:
                raise DataError(f"{where}: its text differs from {test_path}:{lineno}; the two files must come from "
                                f"the same process.py run (run it again), or move {ori} away to score mentions by "
                                f"string occurrences")
            spans.append([(e["entity_index"]["begin"], e["entity_index"]["end"], e["entity_type"])
                          for e in rec["entity_list"]])
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: missing or malformed field {e}") from None
    return spans


def prepare_output_dir(cfg):
    out_dir = Path(cfg.output_dir or ("outputs/base_model" if cfg.no_adapter else
                                      default_eval_dir(cfg.lora_model, cfg.test_path)))
    check_writable(out_dir, "output_dir")
    for name in EVAL_OUTPUTS:  # each is replaced by a rename, which a folder of that name would refuse
        if (out_dir / name).is_dir():
            raise ConfigError(f"config key 'output_dir': {out_dir / name} is a folder; it is where {name} goes")
    return out_dir


def main(argv=None):
    from tqdm import tqdm

    cfg = parse_config(DEFAULTS, argv)
    check_infer_config(cfg)
    for key in ("limit", "sample"):
        if cfg[key] < 0:
            raise ConfigError(f"config key '{key}': {cfg[key]} must be 0 (all) or more")
    # The test file is checked, with the columns and labels the adapter was trained on, and the
    # output folder made, before the model loads: nothing after generation can fail on them.
    recorded = recorded_args(cfg)
    columns = columns_of(recorded)
    _, query_col, answer_col = columns
    records, linenos = load_data(cfg.test_path, columns, line_numbers=True)
    if cfg.limit > 0:
        records, linenos = records[:cfg.limit], linenos[:cfg.limit]
    sample_of = len(records)
    sample = cfg.sample if 0 < cfg.sample < sample_of else None  # as applied: a larger sample is all of them
    if sample:
        keep = sorted(random.Random(cfg.seed).sample(range(sample_of), sample))  # file order kept
        records, linenos = [records[i] for i in keep], [linenos[i] for i in keep]
    label_names = label_names_for(recorded, cfg.test_path)
    answer_format = answer_format_for(recorded)
    check_data_format(cfg.test_path, answer_format)
    texts = [sentence_of(rec[query_col]) for rec in records]
    golds = gold_answers(records, linenos, texts, answer_col, label_names, cfg.test_path, answer_format)
    spans = gold_spans(cfg.test_path, linenos, texts)
    out_dir = prepare_output_dir(cfg)
    model, tokenizer, train_args = load_from_config(cfg)

    start = time.perf_counter()
    with tqdm(total=len(records), desc="test", unit="ex") as bar:
        outputs, shortened = ner_generate(model, tokenizer, train_args, records, cfg.batch_size,
                                          cfg.max_new_tokens, progress=bar.update, grounded=cfg.grounded,
                                          label_names=label_names, policy=cfg.grounding_policy,
                                          eos_penalty=cfg.eos_penalty)
    elapsed = time.perf_counter() - start

    examples, rows = [], []
    for text, rec, gold, output in zip(texts, records, golds, outputs):
        pred = parse(answer_format, output, text, label_names)
        examples.append({"text": text, "gold": gold.entities, "pred": pred.entities,
                         "bad_lines": len(pred.bad_lines)})
        rows.append({"text": text, "answer": rec[answer_col], "output": output,
                     "entities": [list(e) for e in pred.entities], "bad_lines": pred.bad_lines})
    metrics = score(examples, label_names)
    for ex, gold, sentence_spans in zip(examples, golds, spans or [None] * len(examples)):
        # Without ori_data, every occurrence of each gold string stands in for its spans.
        ex["gold_spans"] = sentence_spans if spans else mention_spans(ex["text"], gold.entities)
    adapter = None if cfg.no_adapter else str(cfg.lora_model)
    # What was scored, read from the loaded model: two runs of one adapter on other weights differ here.
    metrics.update(level="set", f1_ci95=bootstrap_f1(examples, seed=cfg.seed), sample=sample,
                   sample_of=sample_of if sample else None, seed=cfg.seed,
                   grounding_policy=cfg.grounding_policy if cfg.grounded else None,
                   eos_penalty=cfg.eos_penalty if cfg.grounded else None, max_new_tokens=cfg.max_new_tokens,
                   examples_per_second=len(records) / elapsed, queries_shortened=shortened,
                   test_path=str(cfg.test_path), lora_model=adapter, **loaded_as(model, adapter),
                   label_names=label_names, answer_format=answer_format)
    metrics["mention"] = score_mentions(examples, label_names)
    metrics["mention"]["gold_spans"] = "annotated spans (ori_data)" if spans else "every occurrence of each gold string"
    # All three are written whole first, then renamed into place together, metrics.json last:
    # an interruption leaves the earlier run's three files, never a mix of two runs.
    texts = {"predictions.jsonl": jsonl_text(rows), "report.html": render_report(metrics, examples),
             "metrics.json": json_text(metrics)}
    commit_files([(out_dir / name, texts[name]) for name in EVAL_OUTPUTS])
    print(format_table(metrics))
    if shortened:
        print(f"note: {shortened} of {len(records)} prompts were cut to fit the model's "
              f"{model.config.max_position_embeddings}-token context beside max_new_tokens={cfg.max_new_tokens} "
              f"(their sentences lost characters from the end): the F1 above counts their answers; "
              f"lower --max_new_tokens to read them whole")
    print(f"{len(records)} examples in {elapsed:.1f}s ({len(records) / elapsed:.1f} examples/s)")
    if not spans:
        print("note: no ori_data beside the test file: mention-level gold spans are every occurrence of each "
              "gold string")
    print(f"wrote {out_dir / 'predictions.jsonl'}, {out_dir / 'metrics.json'} and {out_dir / 'report.html'}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
