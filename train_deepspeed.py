"""LoRA-tune (or, with --finetuning=full, fully fine-tune) a LLaMA model for NER with a native DeepSpeed engine loop.

    python train_deepspeed.py --model_dir=model_hub/tiny-llama --max_steps=20
    deepspeed --num_gpus 2 train_deepspeed.py
    mpirun -np 2 python train_deepspeed.py          # MPI discovery through mpi4py

Same config dict and builders as train_trainer.py; the DeepSpeed config is generated from it
(no JSON to keep in sync). Gradient accumulation, clipping and precision are DeepSpeed's.
Each optimizer step's loss is the mean over every answer token of the step (all ranks, all
micro-batches), so 2 processes at batch b train exactly like 1 process at batch 2b.
"""
import math
import os
import random
import shutil
import socket
from pathlib import Path

import torch

from config_utils import ConfigError, parse_config, run_cli
from dataset import length_grouped_indices
from loss import batch_loss
from train_core import (
    TRAIN_DEFAULTS, build_datasets, build_model, check_zero_stage, export_trained, finish_run,
    load_checkpoint_file, load_datasets_checked, load_training_tokenizer, lr_schedule, output_dir, prepare_save_dir,
    report_engine, resolve_resume, save_dir_lock, start_run, training_dtype, validate_train_config,
)

CHECKPOINTS = "checkpoints"  # engine checkpoints live in <save_dir>/checkpoints/global_step<N>/

DEFAULTS = {
    **TRAIN_DEFAULTS,
    "save_dir": "./checkpoint/msra/train_deepspeed/",  # engine checkpoints, train_args.json and the final adapter_model/ (or model/)
    "zero_stage": 1,  # 0, 1 or 2: LoRA's optimizer state is small, 1 is enough for 7B (3 would partition weights)
    "offload_optimizer": False,  # keep Adam state in CPU memory (the original repository's setting); slower
}


def deepspeed_config(cfg, world_size):
    """The DeepSpeed JSON, derived from the config dict so it never drifts from it."""
    _, mixed = training_dtype(cfg)
    check_zero_stage(cfg.zero_stage)
    zero = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay,
                # torch's AdamW: DeepSpeed's fused kernel needs a compiler at first use, and the
                # optimizer step over LoRA weights is a negligible part of a step anyway.
                # (offload_optimizer uses DeepSpeedCPUAdam, which DeepSpeed compiles itself.)
                **({} if cfg.offload_optimizer else {"torch_adam": True}),
            },
        },
        "bf16": {"enabled": mixed == "bf16"},
        "fp16": {"enabled": mixed == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,  # progress is shown by our tqdm bar instead
        "wall_clock_breakdown": False,
    }


def epoch_order(lengths, global_batch, seed, epoch, group_by_length):
    """The example order of one epoch, identical on every rank (seeded by seed + epoch)."""
    if group_by_length:
        return length_grouped_indices(lengths, global_batch, seed + epoch)
    order = list(range(len(lengths)))
    random.Random(seed + epoch).shuffle(order)
    return order


def step_batches(order, micro, world, gas):
    """Yield, per optimizer step, the global micro-batches (lists of indices, one list per rank)."""
    global_micro = micro * world
    n_micro = len(order) // global_micro  # the last incomplete global batch is dropped
    for s in range(n_micro // gas):
        step = []
        for m in range(gas):
            start = (s * gas + m) * global_micro
            chunk = order[start:start + global_micro]
            step.append([chunk[r * micro:(r + 1) * micro] for r in range(world)])
        yield step


def evaluate(engine, dev_set, collate, batch_size, rank, world):
    """Mean token cross-entropy over the dev set, each rank scoring its share."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    device = engine.device
    with torch.no_grad():
        idx = list(range(rank, len(dev_set), world))
        for i in range(0, len(idx), batch_size):
            batch = collate.pad([dev_set[j] for j in idx[i:i + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = engine(**batch, num_items_in_batch=n).loss
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    engine.train()
    total = total.to(device)
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _rng_file(ckpt, rank):
    return Path(ckpt) / f"rng_state_{rank}.pt"


def save_checkpoint(engine, tokenizer, cfg, step, log_history, rank):
    root = Path(cfg.save_dir) / CHECKPOINTS
    tag = f"global_step{step}"
    # Frozen base weights are excluded: a checkpoint holds the adapter, optimizer and scheduler
    # (finetuning=full: nothing is frozen, so it holds the whole model).
    # The RNG file first: DeepSpeed's `latest` (written by save_checkpoint) then marks a
    # checkpoint that is complete with it.
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               _rng_file(root / tag, rank))
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "log_history": log_history},
                           exclude_frozen_parameters=True)
    if rank == 0:
        # The adapter (or model) as of this step, for evaluating a run in progress. It stays inside
        # its checkpoint: <save_dir>/adapter_model/ (or model/) appears only when training has finished.
        export_trained(engine.module, tokenizer, cfg, out_dir=root / tag / output_dir(cfg).name)
    torch.distributed.barrier()
    if rank == 0 and cfg.save_total_limit > 0:
        done = sorted((int(p.name[len("global_step"):]), p) for p in root.glob("global_step*") if p.is_dir())
        for _, old in done[:-cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def latest_engine_checkpoint(save_dir):
    latest = Path(save_dir) / CHECKPOINTS / "latest"  # DeepSpeed writes it after a complete save
    return str(latest.parent / latest.read_text().strip()) if latest.is_file() else None


def restrict_checkpoint_loading(engine):
    """Make the engine read checkpoint files through train_core.load_checkpoint_file
    (weights_only=True): DeepSpeed itself unpickles them with weights_only=False."""
    engine.checkpoint_engine.load = load_checkpoint_file


def load_checkpoint(engine, ckpt, rank):
    restrict_checkpoint_loading(engine)
    path, client = engine.load_checkpoint(str(Path(ckpt).parent), tag=Path(ckpt).name, load_module_strict=False)
    if path is None:
        raise ConfigError(f"config key 'resume': '{ckpt}' is not a DeepSpeed checkpoint")
    rng = _rng_file(ckpt, rank)
    if rng.is_file():
        state = torch.load(rng, weights_only=True)
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    return client["step"], client["log_history"]


def distributed_port():
    """MASTER_PORT when the launcher or the user set it, else a port that is free now.

    DeepSpeed's MPI discovery (plain `python`, or mpirun) would otherwise set 29500 every time,
    so a second run on the same machine dies on a taken port. Under mpirun rank 0 picks the
    port and tells the others.
    """
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) > 1:
        from mpi4py import MPI

        port = MPI.COMM_WORLD.bcast(port, root=0)
    return port


def main(argv=None):
    cfg = parse_config(DEFAULTS, argv)
    validate_train_config(cfg)
    check_zero_stage(cfg.zero_stage)
    train_records, dev_records = load_datasets_checked(cfg)  # fail fast, before the model loads
    with save_dir_lock(cfg.save_dir):
        return train(cfg, train_records, dev_records)


def train_step(engine, train_set, collate, micro_batches, n_items, cfg, rank, world):
    """One optimizer step over this rank's share of the step's micro-batches; returns the step's
    loss averaged over every rank (the mean over all answer tokens of the step)."""
    gas = len(micro_batches)
    step_loss = 0.0
    for per_rank in micro_batches:
        batch = collate.pad([train_set[i] for i in per_rank[rank]])
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        # Sum of token losses / tokens in the whole step, times the factors DeepSpeed
        # divides by (accumulation steps, data-parallel ranks): an exact global mean.
        loss = batch_loss(engine, batch, cfg, num_items_in_batch=n_items) * (world * gas)
        engine.backward(loss)
        engine.step()
        step_loss += float(loss.detach()) / (world * gas)
    total = torch.tensor([step_loss], device=engine.device)
    torch.distributed.all_reduce(total)
    return float(total)


def train(cfg, train_records, dev_records):
    import deepspeed
    from tqdm import tqdm

    prepare_save_dir(cfg)
    resume_from = resolve_resume(cfg, latest_engine_checkpoint)

    tokenizer = load_training_tokenizer(cfg)
    # Tokenised and checked before the weights load: a max_seq_length nothing fits fails in seconds.
    train_set, dev_set, collate = build_datasets(cfg, tokenizer, train_records, dev_records)

    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=distributed_port())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    micro, gas = cfg.train_batch_size, cfg.gradient_accumulation_steps
    steps_per_epoch = len(train_set) // (micro * world) // gas
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_set)} training examples do not fill one optimizer step of "
            f"{micro * world * gas} examples (train_batch_size x processes x gradient_accumulation_steps)"
        )
    model, tokenizer = build_model(cfg, tokenizer)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    schedule = lr_schedule(cfg, total_steps)

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world), lr_scheduler=schedule,
    )
    step, log_history = 0, []
    if resume_from:
        step, log_history = load_checkpoint(engine, resume_from, rank)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        report_engine(engine)
        start_run(cfg, model, tokenizer, train_set, dev_set, collate)
        print(f"{world} process(es), {total_steps} optimizer steps; rendezvous at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")

        writer = SummaryWriter(os.path.join(cfg.save_dir, "runs"))

    # label tokens per example (positions after the shift that carry a target)
    targets = [sum(1 for t in f["labels"][1:] if t != -100) for f in train_set.features]
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train_deepspeed")
    engine.train()
    window = []
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        order = epoch_order(train_set.lengths, micro * world, cfg.seed, epoch, cfg.group_by_length)
        for s, micro_batches in enumerate(step_batches(order, micro, world, gas)):
            if s < skip:
                continue  # already trained before the checkpoint we resumed from
            n_items = sum(targets[i] for per_rank in micro_batches for part in per_rank for i in part)
            window.append(train_step(engine, train_set, collate, micro_batches, n_items, cfg, rank, world))
            step += 1
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_steps == 0 or step == total_steps:
                log_history.append({"step": step, "loss": sum(window) / len(window), "learning_rate": lr})
                if writer:
                    writer.add_scalar("train/loss", log_history[-1]["loss"], step)
                    writer.add_scalar("train/learning_rate", lr, step)
                window = []
            if dev_set is not None and cfg.eval_steps > 0 and (step % cfg.eval_steps == 0 or step == total_steps):
                dev_loss = evaluate(engine, dev_set, collate, cfg.eval_batch_size, rank, world)
                log_history.append({"step": step, "eval_loss": dev_loss})
                if writer:
                    writer.add_scalar("eval/loss", dev_loss, step)
                bar.write(f"step {step}: dev loss {dev_loss:.4f}")
            if step % cfg.save_steps == 0 or step == total_steps:
                save_checkpoint(engine, tokenizer, cfg, step, log_history, rank)
            if step >= total_steps:
                break
    bar.close()
    if rank == 0:
        finish_run(engine.module, tokenizer, cfg, log_history)  # stages 0-2: weights are whole, no gather
        writer.close()
    torch.distributed.barrier()
    return str(output_dir(cfg))


if __name__ == "__main__":
    run_cli(main)
