"""LoRA-tune (or, with --finetuning=full, fully fine-tune) a LLaMA model for NER with a native DeepSpeed engine loop.

    python train_deepspeed.py --model_dir=model_hub/tiny-llama --max_steps=20
    deepspeed --num_gpus 2 train_deepspeed.py
    mpirun -np 2 python train_deepspeed.py          # MPI discovery through mpi4py

Same config dict and builders as train_trainer.py; the DeepSpeed config is generated from it
(no JSON to keep in sync). Gradient accumulation, clipping and precision are DeepSpeed's.
Each optimizer step's loss is the mean over every answer token of the step (all ranks, all
micro-batches), so 2 processes at batch b train exactly like 1 process at batch 2b.
"""
import itertools
import math
import os
import random
import socket
from pathlib import Path

import torch

from build import build_datasets, build_model, load_training_tokenizer, lr_schedule, training_dtype
from config_utils import ConfigError, run_cli
from dataset import length_grouped_indices
from loss import batch_loss
from run_folder import (ENGINE_CHECKPOINTS, load_checkpoint_file, output_dir, prepare_save_dir, remove_old_checkpoints,
                        resolve_resume, restore_rng_state, rng_file, save_rng_state)
from train_core import (TRAIN_DEFAULTS, check_zero_stage, export_trained, finish_run, launch, report_engine, start_run,
                        validate_train_config)

DEFAULTS = {
    **TRAIN_DEFAULTS,
    "save_dir": "./checkpoint/msra/train_deepspeed/",  # engine checkpoints, train_args.json and the final adapter_model/ (or model/)
    "zero_stage": 1,  # 0, 1 or 2: LoRA's optimizer state is small, 1 is enough for 7B (3 would partition weights)
    "offload_optimizer": False,  # keep Adam state in CPU memory (the original repository's setting); slower
}


def deepspeed_config(cfg, world_size):
    """The DeepSpeed JSON, derived from the config dict so it never drifts from it."""
    _, mixed = training_dtype(cfg)
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


def on_device(collate, dataset, indices, device):
    """The padded batch of `dataset[indices]`, on `device`."""
    return {k: v.to(device) for k, v in collate.pad([dataset[i] for i in indices]).items()}


def evaluate(engine, dev_set, collate, batch_size, rank, world):
    """Mean token cross-entropy over the dev set, each rank scoring its share."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        idx = list(range(rank, len(dev_set), world))
        for i in range(0, len(idx), batch_size):
            batch = on_device(collate, dev_set, idx[i:i + batch_size], engine.device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = engine(**batch, num_items_in_batch=n).loss
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    engine.train()
    total = total.to(engine.device)
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def save_checkpoint(engine, tokenizer, cfg, step, log_history, rank):
    root = ENGINE_CHECKPOINTS.root(cfg.save_dir)
    tag = f"{ENGINE_CHECKPOINTS.prefix}{step}"
    # Frozen base weights are excluded: a checkpoint holds the adapter, optimizer and scheduler
    # (finetuning=full: nothing is frozen, so it holds the whole model).
    # The RNG file first: DeepSpeed's `latest` (written by save_checkpoint) then marks a
    # checkpoint that is complete with it.
    (root / tag).mkdir(parents=True, exist_ok=True)
    save_rng_state(rng_file(root / tag, rank))
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "log_history": log_history},
                           exclude_frozen_parameters=True)
    if rank == 0:
        # The adapter (or model) as of this step, for evaluating a run in progress. It stays inside
        # its checkpoint: <save_dir>/adapter_model/ (or model/) appears only when training has finished.
        export_trained(engine.module, tokenizer, cfg, out_dir=root / tag / output_dir(cfg).name)
    torch.distributed.barrier()
    if rank == 0:
        remove_old_checkpoints(cfg.save_dir, ENGINE_CHECKPOINTS, cfg.save_total_limit)


def restrict_checkpoint_loading(engine):
    """Make the engine read checkpoint files through run_folder.load_checkpoint_file
    (weights_only=True): DeepSpeed itself unpickles them with weights_only=False."""
    engine.checkpoint_engine.load = load_checkpoint_file


def load_checkpoint(engine, ckpt, rank):
    restrict_checkpoint_loading(engine)
    path, client = engine.load_checkpoint(str(Path(ckpt).parent), tag=Path(ckpt).name, load_module_strict=False)
    if path is None:
        raise ConfigError(f"config key 'resume': '{ckpt}' is not a DeepSpeed checkpoint")
    restore_rng_state(rng_file(ckpt, rank))
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


def validate(cfg):
    """Every check of the config that needs nothing loaded, this launcher's keys included."""
    validate_train_config(cfg)
    check_zero_stage(cfg.zero_stage)


def main(argv=None):
    return launch(DEFAULTS, validate, train, argv)


def init_distributed():
    """(rank, world size) of this process, once every process has joined."""
    import deepspeed

    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=distributed_port())
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def optimizer_steps(cfg, n_examples, world):
    """(optimizer steps per epoch, optimizer steps of the whole run)."""
    per_step = cfg.train_batch_size * world * cfg.gradient_accumulation_steps
    per_epoch = n_examples // (cfg.train_batch_size * world) // cfg.gradient_accumulation_steps
    if per_epoch == 0:
        raise ConfigError(
            f"{n_examples} training examples do not fill one optimizer step of "
            f"{per_step} examples (train_batch_size x processes x gradient_accumulation_steps)"
        )
    return per_epoch, cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)


def build_engine(cfg, model, world, total_steps):
    """The DeepSpeed engine over the trainable weights, and its learning-rate scheduler."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world), lr_scheduler=lr_schedule(cfg, total_steps),
    )
    return engine, scheduler


def step_schedule(train_set, cfg, world, steps_per_epoch, start, total_steps):
    """Yield (step number, the step's global micro-batches, its answer tokens) for every optimizer
    step after `start`. An epoch's order depends on its number alone, so a resumed run goes on
    with the batches the interrupted one would have trained on."""
    # label tokens per example (positions after the shift that carry a target)
    targets = [sum(1 for t in f["labels"][1:] if t != -100) for f in train_set.features]
    micro, gas = cfg.train_batch_size, cfg.gradient_accumulation_steps
    step = start
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        order = epoch_order(train_set.lengths, micro * world, cfg.seed, epoch, cfg.group_by_length)
        # The first `skip` steps of the epoch were trained before the checkpoint resumed from.
        for micro_batches in itertools.islice(step_batches(order, micro, world, gas), skip, None):
            step += 1
            yield step, micro_batches, sum(targets[i] for per_rank in micro_batches for part in per_rank for i in part)
            if step >= total_steps:
                return


def train_step(engine, train_set, collate, micro_batches, n_items, cfg, rank, world):
    """One optimizer step over this rank's share of the step's micro-batches; returns the step's
    loss averaged over every rank (the mean over all answer tokens of the step)."""
    gas = len(micro_batches)
    step_loss = 0.0
    for per_rank in micro_batches:
        batch = on_device(collate, train_set, per_rank[rank], engine.device)
        # Sum of token losses / tokens in the whole step, times the factors DeepSpeed
        # divides by (accumulation steps, data-parallel ranks): an exact global mean.
        loss = batch_loss(engine, batch, cfg, num_items_in_batch=n_items) * (world * gas)
        engine.backward(loss)
        engine.step()
        step_loss += float(loss.detach()) / (world * gas)
    total = torch.tensor([step_loss], device=engine.device)
    torch.distributed.all_reduce(total)
    return float(total)


def due(step, every, total_steps):
    """Whether something done every `every` steps (0: never) is done after `step`; the last step always."""
    return every > 0 and (step % every == 0 or step == total_steps)


class RunLog:
    """What the loop reports: the progress bar, the Trainer-style log_history records (kept in every
    checkpoint and exported with the result) and, on rank 0, TensorBoard scalars."""

    def __init__(self, cfg, rank, step, total_steps, log_history):
        from tqdm import tqdm

        self.cfg, self.total_steps, self.history, self.window = cfg, total_steps, log_history, []
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.save_dir, "runs"))
        self.bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train_deepspeed")

    def train_loss(self, step, loss, lr):
        self.window.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if due(step, self.cfg.log_steps, self.total_steps):
            self.history.append({"step": step, "loss": sum(self.window) / len(self.window), "learning_rate": lr})
            self._scalars(step, {"train/loss": self.history[-1]["loss"], "train/learning_rate": lr})
            self.window = []

    def eval_loss(self, step, loss):
        self.history.append({"step": step, "eval_loss": loss})
        self._scalars(step, {"eval/loss": loss})
        self.bar.write(f"step {step}: dev loss {loss:.4f}")

    def _scalars(self, step, values):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        self.bar.close()
        if self.writer:
            self.writer.close()


def train(cfg, train_records, dev_records):
    prepare_save_dir(cfg)
    resume_from = resolve_resume(cfg, ENGINE_CHECKPOINTS)
    tokenizer = load_training_tokenizer(cfg)
    # Tokenised and checked before the weights load: a max_seq_length nothing fits fails in seconds.
    train_set, dev_set, collate = build_datasets(cfg, tokenizer, train_records, dev_records)
    rank, world = init_distributed()
    steps_per_epoch, total_steps = optimizer_steps(cfg, len(train_set), world)
    model, tokenizer = build_model(cfg, tokenizer)
    engine, scheduler = build_engine(cfg, model, world, total_steps)
    step, log_history = load_checkpoint(engine, resume_from, rank) if resume_from else (0, [])
    if rank == 0:
        report_engine(engine)
        start_run(cfg, model, tokenizer, train_set, dev_set, collate)
        print(f"{world} process(es), {total_steps} optimizer steps; rendezvous at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
    log = RunLog(cfg, rank, step, total_steps, log_history)

    engine.train()
    for step, micro_batches, n_items in step_schedule(train_set, cfg, world, steps_per_epoch, step, total_steps):
        loss = train_step(engine, train_set, collate, micro_batches, n_items, cfg, rank, world)
        log.train_loss(step, loss, scheduler.get_last_lr()[0])
        if dev_set is not None and due(step, cfg.eval_steps, total_steps):
            log.eval_loss(step, evaluate(engine, dev_set, collate, cfg.eval_batch_size, rank, world))
        if due(step, cfg.save_steps, total_steps):
            save_checkpoint(engine, tokenizer, cfg, step, log.history, rank)

    log.close()
    if rank == 0:
        finish_run(engine.module, tokenizer, cfg, log.history)  # stages 0-2: weights are whole, no gather
    torch.distributed.barrier()
    return str(output_dir(cfg))


if __name__ == "__main__":
    run_cli(main)
