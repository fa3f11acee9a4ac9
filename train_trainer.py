"""LoRA-tune (or fully fine-tune) a LLaMA model for NER with the HF Trainer (optionally under DeepSpeed).

    python train_trainer.py --model_dir=model_hub/tiny-llama --max_steps=20
    deepspeed train_trainer.py                      # uses deepspeed.json ("auto" values)
    deepspeed --num_gpus 2 train_trainer.py --train_batch_size=8

Every hyperparameter comes from the config dict below (override with --key=value);
deepspeed.json only says how DeepSpeed shards and offloads. Checkpoints under save_dir hold
the adapter, optimizer, scheduler and RNG state, never the base weights; the final adapter
goes to <save_dir>/adapter_model/. With --finetuning=full every weight is trained, checkpoints
hold the whole model, and the final model goes to <save_dir>/model/.
"""
import json
import os
from pathlib import Path

import torch

from build import build_datasets, build_model, load_training_tokenizer, training_dtype
from config_utils import ConfigError, run_cli
from files import share_files
from loss import batch_loss
from run_folder import (TRAINER_CHECKPOINTS, output_dir, prepare_save_dir, resolve_resume,
                        verify_deepspeed_checkpoint)
from train_core import (TRAIN_DEFAULTS, check_zero_stage, finish_run, launch, report_engine, start_run,
                        validate_train_config)

DEFAULTS = {
    **TRAIN_DEFAULTS,
    "use_deepspeed": "auto",  # auto: use deepspeed_json_path when started by the deepspeed launcher
    "jit_checkpoint": False,  # on SIGTERM, write a checkpoint before exiting (preemptible jobs)
}


def make_trainer(cfg, **kwargs):
    """A Trainer whose training loss is loss.batch_loss (shared-prefix forward when enabled)."""
    from transformers import Trainer

    class NerTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # nn.DataParallel (several GPUs in one process) splits the batch itself: the plain path.
            # The dev loss (not training) is always over the whole vocabulary.
            plain = not cfg.share_prefix and cfg.loss_vocabulary == "all"
            if return_outputs or not model.training or self.args.n_gpu > 1 or plain:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = batch_loss(model, inputs, cfg, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As Trainer.compute_loss does: num_items_in_batch counts the tokens of every
                # process, and gradients are averaged over processes.
                loss = loss * self.accelerator.num_processes
            return loss

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if self.is_world_process_zero() and folder.is_dir():
                share_files(folder)  # safetensors writes its files 0600

    return NerTrainer(**kwargs)


def use_deepspeed(cfg):
    if cfg.use_deepspeed == "auto":
        # The deepspeed launcher sets LOCAL_RANK/WORLD_SIZE for every rank it starts.
        return cfg.local_rank >= 0 or "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    return str(cfg.use_deepspeed).lower() in ("true", "1", "yes")


def training_arguments(cfg):
    from transformers import TrainingArguments

    _, mixed = training_dtype(cfg)
    return TrainingArguments(
        output_dir=cfg.save_dir,
        per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.log_steps,
        eval_strategy="steps" if cfg.eval_steps > 0 and cfg.dev_path else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        report_to=["tensorboard"],
        remove_unused_columns=False,  # our dataset yields ready input_ids/labels
        label_names=["labels"],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        deepspeed=cfg.deepspeed_json_path if use_deepspeed(cfg) else None,
        enable_jit_checkpoint=cfg.jit_checkpoint,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


def check_deepspeed_json(cfg):
    if not Path(cfg.deepspeed_json_path).is_file():
        raise ConfigError(f"config key 'deepspeed_json_path': {cfg.deepspeed_json_path} does not exist")
    stage = json.loads(Path(cfg.deepspeed_json_path).read_text(encoding="utf-8")).get(
        "zero_optimization", {}).get("stage", 0)
    check_zero_stage(stage, str(cfg.deepspeed_json_path))


def validate(cfg):
    """Every check of the config that needs nothing loaded, this launcher's keys included."""
    validate_train_config(cfg)
    if use_deepspeed(cfg):
        check_deepspeed_json(cfg)


def main(argv=None):
    return launch(DEFAULTS, validate, train, argv)


def train(cfg, train_records, dev_records):
    prepare_save_dir(cfg)
    resume_from = resolve_resume(cfg, TRAINER_CHECKPOINTS)
    args = training_arguments(cfg)
    if resume_from and args.deepspeed:
        verify_deepspeed_checkpoint(resume_from)  # the Trainer lets DeepSpeed unpickle it
    tokenizer = load_training_tokenizer(cfg)
    # Tokenised and checked before the weights load: a max_seq_length nothing fits fails in seconds.
    train_set, dev_set, collate = build_datasets(cfg, tokenizer, train_records, dev_records)
    model, tokenizer = build_model(cfg, tokenizer)
    if args.process_index == 0:
        start_run(cfg, model, tokenizer, train_set, dev_set, collate)

    trainer = make_trainer(
        cfg, model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
        data_collator=collate, processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume_from)

    if trainer.is_world_process_zero():
        if trainer.is_deepspeed_enabled:
            report_engine(trainer.model_wrapped)
        finish_run(trainer.model, tokenizer, cfg, trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()
    return str(output_dir(cfg))


if __name__ == "__main__":
    run_cli(main)
