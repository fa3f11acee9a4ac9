"""Training steps with the loss over the whole vocabulary against the loss over the tokens the
batch holds (loss_vocabulary=all / batch), timed side by side on a real model:

    python bench/loss_vocabulary.py                  # Gemma 3 270M, the demo's inline data
    python bench/loss_vocabulary.py --batches=4 --rounds=3

The same length-grouped batches of the training data (as the Trainer groups them) run forward
and backward through loss.batch_loss under each setting in turn, round after round, so a noisy
machine slows both alike; the figure is the ratio of the summed step times, each setting's
fastest round. Prints a markdown table (last run: BENCHMARKS.md, "Figures behind code choices").
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config_utils import parse_config, run_cli  # noqa: E402

DEFAULTS = {
    "model_dir": "model_hub/gemma-3-270m",  # make gemma
    "train_path": "data/msra_inline/instruct_data/train.txt",  # make demo's processed data
    "max_seq_length": 512,  # the demo's
    "batch_size": 16,  # the demo's
    "batches": 2,  # length-grouped batches timed per round
    "rounds": 2,  # each setting runs every batch once a round; its fastest round counts
}


def main(argv=None):
    from build import build_datasets, build_model, load_datasets_checked
    from loss import batch_loss, batch_vocabulary
    from train_trainer import DEFAULTS as TRAINER_DEFAULTS

    cfg = parse_config(DEFAULTS, argv)
    settings = {"model_dir": cfg.model_dir, "train_path": cfg.train_path, "dev_path": "", "lora_dropout": 0.0,
                "max_seq_length": cfg.max_seq_length, "train_limit": 4 * cfg.batch_size * (cfg.batches + 1)}
    tcfg = {v: parse_config(TRAINER_DEFAULTS, {**settings, "loss_vocabulary": v}) for v in ("all", "batch")}
    records, _ = load_datasets_checked(tcfg["all"])
    model, tokenizer = build_model(tcfg["all"])
    train, _, collate = build_datasets(tcfg["all"], tokenizer, records, [])
    order = sorted(range(len(train)), key=lambda i: len(train[i]["input_ids"]))
    middle = len(order) // 2 - cfg.batches * cfg.batch_size // 2  # batches of a typical length
    batches = [collate.pad([train[i] for i in order[middle + k * cfg.batch_size:middle + (k + 1) * cfg.batch_size]])
               for k in range(cfg.batches)]
    model.train()
    batch_loss(model, batches[0], tcfg["all"]).backward()  # warm-up: allocations, oneDNN's kernels
    rounds = {v: [] for v in tcfg}
    for _ in range(cfg.rounds):
        for v, c in tcfg.items():
            start = time.perf_counter()
            for batch in batches:
                batch_loss(model, batch, c).backward()
            rounds[v].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    best = {v: min(times) for v, times in rounds.items()}
    shapes = ", ".join("x".join(map(str, b["input_ids"].shape)) for b in batches)
    sizes = ", ".join(str(len(batch_vocabulary(b))) for b in batches)
    print(f"{Path(cfg.model_dir).name}, {torch.get_num_threads()} threads; batches {shapes}; tokens in each: {sizes} "
          f"of {model.get_output_embeddings().weight.shape[0]:,}")
    print("| loss over | seconds a step (fastest round) | relative |\n|---|---|---|")
    for v in tcfg:
        print(f"| {v} | {best[v] / cfg.batches:.2f} | {best['all'] / best[v]:.2f}x |")
    return best


if __name__ == "__main__":
    run_cli(main)
