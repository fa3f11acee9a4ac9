"""What train_trainer.py and train_deepspeed.py share around the training itself: the config
(TRAIN_DEFAULTS plus a few keys of each launcher's own), its validation before anything loads,
the launch (validate, read the data, lock save_dir, train), and the end of a run: the resolved
config recorded, the trained result (an adapter, or the whole model) exported atomically, its
log history and loss curve. The run's folder is run_folder.py's; what a run is built from (and
the precision and device it trains with), build.py's.
"""
import json
import os
import shutil
from pathlib import Path

import torch

from build import ALL_LINEAR, load_datasets_checked, training_device, training_dtype
from config_utils import ConfigError, parse_config
from answer_format import DEFAULT_ANSWER_FORMAT, DEFAULT_LABEL_NAMES
from dataset import COLUMN_DEFAULTS, PROMPT_STYLES, check_prompt_style, read_data_info
from files import staged_folder, write_json
from loss import LOSS_VOCABULARIES
from model_utils import TRAIN_ARGS_FILE, check_model_dir, meta_model
from quantization import check_quantization
from run_folder import move_evaluation, output_dir, save_dir_lock

FINETUNING = ("lora", "full")

TRAIN_DEFAULTS = {
    "data_name": "msra",
    "model_dir": "./model_hub/chinese-alpaca-7b",  # merged Chinese-Alpaca-7B (README: model steps)
    "tokenizer_path": None,  # None: the tokenizer in model_dir
    "finetuning": "lora",  # lora: adapter on a frozen base (7B); full: every weight trained (small models, the demo)
    "quantization": "none",  # none; 4bit: QLoRA (NF4 base weights, LoRA in dtype); 8bit: int8 base weights (bitsandbytes)
    "lora": {
        "r": 8,  # rank; 8 is the common choice for 7B task tuning
        "alpha": 16,  # scale alpha/r = 2, as in alpaca-lora and most LoRA recipes
        "dropout": 0.05,  # dropout on the LoRA input; 0 makes runs exactly repeatable step by step
        "target_modules": [ALL_LINEAR],  # every linear projection but the output layer (PEFT's all-linear): LLaMA's seven, as the original repository
        "modules_to_save": [],  # e.g. embed_tokens,lm_head to train them fully (the tiny model needs it)
    },
    "prompt_style": "alpaca",  # alpaca (Chinese-Alpaca), llama2_chat (Chinese-Alpaca-2), chat_template (the tokenizer's)
    "trust_remote_code": False,  # run code shipped with the model (only for models transformers lacks)
    "max_seq_length": 256,  # tokens; MSRA examples average ~127 with Chinese-LLaMA, 1.5% exceed 192
    **COLUMN_DEFAULTS,
    "train_path": "data/msra/instruct_data/train.txt",  # instruct JSONL (process.py writes it)
    "dev_path": "data/msra/instruct_data/dev.txt",  # dev JSONL for the eval loss; "" = none
    "train_limit": 0,  # use only the first N training examples (0 = all)
    "no_entity_fraction": 1.0,  # share of training sentences without entities to keep (a seeded subset; 42% of MSRA's have none)
    "dev_limit": 200,  # dev examples for the periodic eval loss (0 = all); 200 keeps eval cheap
    "train_batch_size": 12,  # per process, as the original repository (taishan1994/Chinese-LLaMA-Alpaca-LoRA-Tuning)
    "eval_batch_size": 16,  # per process, for the dev loss
    "gradient_accumulation_steps": 1,  # micro-batches per optimizer step
    "learning_rate": 2e-4,  # LoRA needs ~1e-4..3e-4 (alpaca-lora 3e-4, QLoRA 2e-4); the original repository's 1e-5 barely moves it
    "weight_decay": 0.0,  # LoRA updates are low-rank already; decay mostly slows them
    "adam_beta1": 0.9,  # AdamW first-moment decay
    "adam_beta2": 0.999,  # AdamW second-moment decay
    "adam_epsilon": 1e-8,  # AdamW denominator guard
    "max_grad_norm": 1.0,  # gradient clipping (global L2 norm)
    "warmup_ratio": 0.03,  # fraction of optimizer steps with linear warmup
    "lr_scheduler_type": "cosine",  # transformers scheduler name: linear, cosine, constant, ...
    "num_train_epochs": 1,  # one pass over 49,658 MSRA sentences is ~4,100 steps at batch 12
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "group_by_length": True,  # length-grouped batches: <1% padding instead of ~25% for random batches
    "gradient_checkpointing": False,  # trade ~30% speed for activation memory on long batches
    "share_prefix": True,  # run the prompt prefix all rows share once per batch (exact; off under checkpointing)
    "loss_vocabulary": "all",  # all: softmax over the whole vocabulary; batch: over the tokens the batch holds (loss.py)
    "dtype": "auto",  # auto: bf16 on GPUs that have it, fp16 (with loss scaling) on older GPUs, fp32 on CPU
    "save_dir": "./checkpoint/msra/train_trainer/",  # checkpoints, train_args.json and the final adapter_model/
    "log_steps": 10,  # optimizer steps between loss log lines
    "eval_steps": 200,  # optimizer steps between dev-loss evaluations (0 = never)
    "save_steps": 200,  # optimizer steps between checkpoints
    "save_total_limit": 2,  # checkpoints kept (the latest ones)
    "seed": 42,
    "resume": None,  # True: continue from the latest checkpoint in save_dir; or a checkpoint path
    "overwrite": False,  # replace a finished adapter already in save_dir
    "local_rank": -1,  # set by the DeepSpeed launcher
    "deepspeed_json_path": "deepspeed.json",  # DeepSpeed config for train_trainer.py under the deepspeed launcher
}


POSITIVE_KEYS = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_seq_length",
                 "log_steps", "save_steps", "lora_r", "num_train_epochs")


def launch(defaults, validate, train, argv=None):
    """Each launcher's main: the config parsed and `validate`d, the data read and checked (a bad
    line fails in a second, not after minutes of loading weights), then `train` under the
    save_dir lock."""
    cfg = parse_config(defaults, argv)
    validate(cfg)
    train_records, dev_records = load_datasets_checked(cfg)
    with save_dir_lock(cfg.save_dir):
        return train(cfg, train_records, dev_records)


def validate_train_config(cfg):
    """Everything about a training config that can be checked without loading anything.

    Both trainers call this first, so a typo costs a second, not a model load.
    """
    from transformers.trainer_utils import SchedulerType

    for key in POSITIVE_KEYS:
        if cfg[key] <= 0:
            raise ConfigError(f"config key '{key}': {cfg[key]} must be positive")
    if cfg.eval_steps < 0:
        raise ConfigError(f"config key 'eval_steps': {cfg.eval_steps} must be 0 (never) or positive")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.warmup_ratio <= 1:
        raise ConfigError("config keys 'lora_dropout' and 'warmup_ratio' must lie in [0, 1)")
    if not 0 <= cfg.no_entity_fraction <= 1:
        raise ConfigError(f"config key 'no_entity_fraction': {cfg.no_entity_fraction} must lie in [0, 1]")
    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler_type not in schedulers:
        raise ConfigError(f"config key 'lr_scheduler_type': {cfg.lr_scheduler_type!r} is not one of {', '.join(schedulers)}")
    if not cfg.lora_target_modules:
        raise ConfigError("config key 'lora_target_modules': name at least one module (e.g. q_proj,v_proj)")
    if training_dtype(cfg)[0] == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("config key 'dtype': fp16 training needs a GPU; use dtype=fp32 (or bf16) on a CPU")
    if cfg.quantization != "none" and cfg.finetuning == "full":
        raise ConfigError(f"config key 'quantization': {cfg.quantization} base weights are frozen, so they cannot be "
                          f"fully fine-tuned; use finetuning=lora (QLoRA) or quantization=none")
    check_quantization(cfg.quantization, training_device())
    if cfg.resume and cfg.resume is not True and not Path(str(cfg.resume)).is_dir():
        raise ConfigError(f"config key 'resume': checkpoint '{cfg.resume}' does not exist")
    check_prompt_style(cfg.prompt_style)
    if cfg.loss_vocabulary not in LOSS_VOCABULARIES:
        raise ConfigError(f"config key 'loss_vocabulary': {cfg.loss_vocabulary!r} is not one of {', '.join(LOSS_VOCABULARIES)}")
    if cfg.finetuning not in FINETUNING:
        raise ConfigError(f"config key 'finetuning': {cfg.finetuning!r} is not one of {', '.join(FINETUNING)}")
    if (Path(cfg.model_dir) / "config.json").is_file():  # else prepare_save_dir explains model_dir
        check_model_dir(cfg.model_dir, cfg.trust_remote_code)
        if cfg.finetuning == "lora" and list(cfg.lora_target_modules) != [ALL_LINEAR]:
            check_target_modules(linear_module_names(cfg.model_dir, cfg.trust_remote_code), cfg.lora_target_modules)


def check_zero_stage(stage, where="config key 'zero_stage'"):
    """ZeRO 0-2 only, for both trainers: stage 3 partitions the weights the adapter export reads."""
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: ZeRO stage {stage} is not supported; use 0, 1 or 2 (stage 3 partitions "
                          f"the weights the adapter export reads, and LoRA's optimizer state is small anyway)")


def linear_module_names(model_dir, trust_remote_code=False):
    """Names (last part) of the model's linear layers, from its config alone: the model is built on
    the meta device, which allocates no weights, so this takes a moment even for 7B."""
    model = meta_model(model_dir, trust_remote_code)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_target_modules(linear, names):
    """Every LoRA target must name a linear layer of the model (PEFT matches on name suffixes)."""
    missing = [t for t in names if t not in linear]
    if missing:
        raise ConfigError(f"config key 'lora_target_modules': {', '.join(missing)} matches no linear layer of "
                          f"this model; its linear layers are {', '.join(linear)}")


def resolved_args(cfg, tokenizer):
    """What inference needs beside the adapter: the whole config plus vocabulary, prompt id, and
    the label set, instruction and answer format process.py recorded beside the training data."""
    args = cfg.to_dict()
    args.pop("local_rank", None)
    info = read_data_info(cfg.train_path) or {}
    args.update(vocab_size=len(tokenizer), prompt_id=PROMPT_STYLES[cfg.prompt_style],
                label_names=info.get("label_names", DEFAULT_LABEL_NAMES), instruct=info.get("instruct", ""),
                answer_format=info.get("answer_format", DEFAULT_ANSWER_FORMAT))
    return args


def start_run(cfg, model, tokenizer, train_set, dev_set, collate):
    """Main process only: record the resolved config in save_dir and say what will be trained."""
    os.makedirs(cfg.save_dir, exist_ok=True)
    write_json(os.path.join(cfg.save_dir, TRAIN_ARGS_FILE), resolved_args(cfg, tokenizer))
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()  # PEFT's count: a 4-bit tensor holds 2 weights per byte
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    quantized = f", base weights {cfg.quantization}" if cfg.quantization != "none" else ""
    print(f"finetuning={cfg.finetuning}{quantized}: trainable params {trainable:,} of {total:,} "
          f"({100 * trainable / total:.2f}%)", flush=True)
    print(f"train {len(train_set)} examples, dev {len(dev_set) if dev_set else 0}; "
          f"{collate.truncated} queries shortened and {train_set.skipped} examples left out "
          f"(answer alone too long) to fit max_seq_length={cfg.max_seq_length}", flush=True)


def export_trained(model, tokenizer, cfg, out_dir=None, extra_files=()):
    """Write what training produced + tokenizer + train_args.json atomically.

    A PEFT model writes its adapter (`<save_dir>/adapter_model`); a fully fine-tuned one the
    whole model, config and generation config (`<save_dir>/model`), both as safetensors.
    Everything goes to a temporary folder beside the target, which then replaces it with a
    rename: an interrupted export leaves the previous one intact, never a half-written one.
    Under DeepSpeed the caller passes engine.module: ZeRO stages 0-2 (the only ones these
    trainers accept) keep every weight whole on every rank, so no gathering is needed.
    """
    out_dir = Path(out_dir or output_dir(cfg))
    with staged_folder(out_dir) as tmp:
        use_cache = model.config.use_cache
        model.config.use_cache = True  # training turns the KV cache off; the saved config is for inference
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            model.config.use_cache = use_cache
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / TRAIN_ARGS_FILE, resolved_args(cfg, tokenizer))
        for f in extra_files:
            shutil.copy(f, tmp)
        move_evaluation(out_dir)  # the rename below would delete a test.py evaluation written into it
    return out_dir


def report_engine(engine):
    """Print the values a DeepSpeed engine actually trains with, read back from the engine."""
    group = engine.optimizer.param_groups[0]
    values = {
        "micro_batch_per_gpu": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "world_size": engine.world_size,
        "learning_rate": group.get("initial_lr", group["lr"]),  # the peak, before the schedule
        "gradient_clipping": engine.gradient_clipping(),
        "zero_stage": engine.zero_optimization_stage(),
    }
    print("deepspeed engine: " + json.dumps(values), flush=True)
    return values


def finish_run(model, tokenizer, cfg, log_history):
    """Main process, after the last step: the export, its log history and loss curve."""
    out = export_trained(model, tokenizer, cfg)
    write_json(out / "log_history.json", log_history)
    plot_loss_curve(log_history, out / "loss_curve.png")
    print(f"{'model' if cfg.finetuning == 'full' else 'adapter'} written to {out}")


def plot_loss_curve(log_history, path):
    """Train and dev loss against optimizer step, from Trainer-style log records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    dev = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if dev:
        ax.plot(*zip(*dev), marker="o", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    if train or dev:  # a run shorter than log_steps has nothing to label
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
