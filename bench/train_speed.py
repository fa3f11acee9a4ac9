"""How fast training runs: one Trainer run through the project's own builders, and the same
optimizer steps over the same batches in a bare PyTorch loop, each timed past its warm-up steps."""
import time

import torch

from config_utils import parse_config


class CountingCollate:
    """Wraps a collator: records real vs padded tokens; `pad_to` fixes the length (the original recipe)."""

    def __init__(self, collate, pad_to=None):
        self.collate, self.pad_to = collate, pad_to
        self.real = self.total = 0
        self.batches = []

    def __call__(self, batch):
        out = self.collate(batch)
        if self.pad_to and out["input_ids"].shape[1] < self.pad_to:
            extra = self.pad_to - out["input_ids"].shape[1]
            pad = lambda t, v: torch.nn.functional.pad(t, (0, extra), value=v)  # noqa: E731
            out = {"input_ids": pad(out["input_ids"], self.collate.pad_id),
                   "attention_mask": pad(out["attention_mask"], 0), "labels": pad(out["labels"], -100)}
        self.real += int(out["attention_mask"].sum())
        self.total += out["attention_mask"].numel()
        self.batches.append(out)
        return out


def train_config(cfg, model_dir, save_dir, group_by_length, max_seq_length, share_prefix=True):
    from train_trainer import DEFAULTS as TRAINER_DEFAULTS

    return parse_config(TRAINER_DEFAULTS, {
        "model_dir": model_dir, "train_path": cfg.train_path, "dev_path": "", "save_dir": save_dir,
        "train_limit": cfg.train_examples, "max_steps": cfg.steps, "train_batch_size": cfg.train_batch_size,
        "group_by_length": group_by_length, "max_seq_length": max_seq_length, "lora_dropout": 0.0,
        "log_steps": max(cfg.steps // 4, 1), "eval_steps": 0, "save_steps": 10 ** 6, "overwrite": True,
        "dtype": cfg.dtype, "seed": cfg.seed, "gradient_checkpointing": cfg.gradient_checkpointing,
        "share_prefix": share_prefix, "quantization": cfg.quantization,
    })


WARMUP_STEPS = 2  # steps excluded from every timing (first-step allocation and thread start-up)


def warmup_steps(steps):
    """The steps a training run leaves out of its timing: WARMUP_STEPS, fewer when the run is too
    short to keep one timed step after them (a one-step run is timed whole)."""
    return max(min(WARMUP_STEPS, steps - 1), 0)


def _rate(tcfg, elapsed, warmup):
    return (tcfg.max_steps - warmup) * tcfg.train_batch_size / elapsed


def run_trainer(tcfg, pad_to=None):
    """One Trainer run through the project's own builders; returns (stats, counting collator)."""
    from transformers import TrainerCallback

    warmup = warmup_steps(tcfg.max_steps)

    class StepClock(TrainerCallback):
        start = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            if warmup == 0:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    from build import build_datasets, build_model, load_datasets_checked
    from train_core import validate_train_config
    from train_trainer import make_trainer, training_arguments

    validate_train_config(tcfg)
    train_records, _ = load_datasets_checked(tcfg)
    model, tokenizer = build_model(tcfg)
    train_set, _, collate = build_datasets(tcfg, tokenizer, train_records, [])
    counting = CountingCollate(collate, pad_to)
    args = training_arguments(tcfg)
    args.save_strategy = "no"
    args.report_to = []
    args.disable_tqdm = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    trainer = make_trainer(tcfg, model=model, args=args, train_dataset=train_set, data_collator=counting,
                           callbacks=[clock])
    trainer.train()
    elapsed = clock.end - clock.start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed = counting.batches[warmup:tcfg.max_steps]
    stats = {"seconds": elapsed, "examples_per_second": _rate(tcfg, elapsed, warmup),
             "tokens_per_second": sum(int(b["attention_mask"].sum()) for b in timed) / elapsed,
             "non_padding_fraction": counting.real / counting.total, "final_loss": losses[-1]}
    if torch.cuda.is_available():
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del trainer, model
    return stats, counting


def run_bare(tcfg, batches):
    """The same optimizer steps over the same batches with no Trainer: forward, backward, clip, step."""
    from build import build_model, lr_schedule, training_dtype
    from loss import batch_loss

    model, _ = build_model(tcfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    if tcfg.gradient_checkpointing:
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    # The Trainer's default optimizer (adamw_torch_fused), so only the Trainer around it differs.
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  eps=tcfg.adam_epsilon, weight_decay=tcfg.weight_decay, fused=True)
    scheduler = lr_schedule(tcfg, len(batches))(optimizer)
    _, mixed = training_dtype(tcfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed == "bf16")
    losses = []
    warmup = warmup_steps(tcfg.max_steps)
    start = time.perf_counter()  # restarted after the warm-up steps, if the run has any
    for step, batch in enumerate(batches, 1):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = batch_loss(model, batch, tcfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step == warmup:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    window = losses[-tcfg.log_steps:]  # what the Trainer's last logged loss averages
    timed = batches[warmup:]
    return {"seconds": elapsed, "examples_per_second": _rate(tcfg, elapsed, warmup),
            "tokens_per_second": sum(int(b["attention_mask"].sum()) for b in timed) / elapsed,
            "non_padding_fraction": real / total, "final_loss": sum(window) / len(window)}
