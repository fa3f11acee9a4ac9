"""What a training run is built from, the same for both launchers: the training data (read and
checked first: a bad line must not cost minutes of loading 7B weights), the tokenizer, the base
model through the one loader with LoRA through PEFT (or no wrapper at all with finetuning=full),
the tokenised datasets with their collator, the learning-rate schedule, and the precision
and device the model trains with.
"""
import math
import os
import random

import torch

from config_utils import UserError
from answer_format import DEFAULT_ANSWER_FORMAT, DEFAULT_LABEL_NAMES, write_answer
from dataset import EncodedDataset, NerCollate, columns_of, load_data, read_data_info, sentence_of
from model_utils import load_model_and_tokenizer, load_tokenizer, peft_quietly, resolve_dtype
from run_folder import global_rank

ALL_LINEAR = "all-linear"  # PEFT: every nn.Linear except the output layer; the names go into adapter_config.json


def training_device():
    """Where this process trains: its launcher's GPU (LOCAL_RANK), else the CPU. Quantised base
    weights are loaded there directly (bitsandbytes' layers are not moved after loading)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def training_dtype(cfg):
    """(torch dtype for the base weights, 'bf16'|'fp16'|None for mixed precision); fp16 on a CPU
    is refused by validate_train_config."""
    torch_dtype = resolve_dtype(cfg.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    return torch_dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch_dtype)


def load_datasets_checked(cfg):
    """Read and validate train/dev JSONL before anything heavy happens."""
    columns = columns_of(cfg)
    train = load_data(cfg.train_path, columns)
    dev = load_data(cfg.dev_path, columns) if cfg.dev_path else []
    if cfg.train_limit > 0:
        train = train[:cfg.train_limit]
    if cfg.no_entity_fraction < 1:
        n = len(train)
        train = keep_no_entity(train, cfg.no_entity_fraction, columns, cfg.seed, read_data_info(cfg.train_path) or {})
        if global_rank() == 0:
            print(f"no_entity_fraction={cfg.no_entity_fraction}: {n - len(train)} of the {n} training sentences "
                  f"left out (answers naming no entity), {len(train)} kept", flush=True)
    if cfg.dev_limit > 0:
        dev = dev[:cfg.dev_limit]
    return train, dev


def keep_no_entity(records, fraction, columns, seed, data_info):
    """All records with entities and a seeded `fraction` of those whose answer names none (the
    answer format's empty answer, `没有` in the seed format), in file order. Every rank draws the
    same subset (same seed), so DeepSpeed's sampler still splits one dataset; every answer format
    of one corpus keeps the same sentences.

    Why: a sentence without entities costs a full forward and backward and teaches one answer.
    A small model trained from nothing learns more entities per step with fewer of them (the
    from-scratch demo's F1 each way: BENCHMARKS.md, "Figures behind code choices"), and still
    answers `没有` on most entity-free test sentences.
    """
    _, query_column, answer_column = columns
    answer_format = data_info.get("answer_format", DEFAULT_ANSWER_FORMAT)
    label_names = data_info.get("label_names", DEFAULT_LABEL_NAMES)

    def empty(record):
        return write_answer(answer_format, sentence_of(record[query_column]), [], label_names)

    rng = random.Random(seed)
    return [r for r in records if r[answer_column].strip() != empty(r).strip() or rng.random() < fraction]


def load_training_tokenizer(cfg):
    """The tokenizer training uses (cfg.tokenizer_path, else model_dir's): loaded before the
    model, so the data can be tokenised and checked before any weights load."""
    return load_tokenizer(cfg.tokenizer_path or cfg.model_dir, trust_remote_code=cfg.trust_remote_code)


def build_model(cfg, tokenizer=None):
    """Base model through the one loader, LoRA on top (finetuning=full: no wrapper, every weight
    trained); trainable weights kept in fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's A matrices are drawn here: the same seed gives the same run
    torch_dtype, _ = training_dtype(cfg)
    if cfg.finetuning == "full":
        torch_dtype = torch.float32  # every weight is trained: master weights in fp32 (see below)
    quantized = cfg.quantization != "none"
    model, tokenizer = load_model_and_tokenizer(
        cfg.model_dir, tokenizer_path=cfg.tokenizer_path, dtype=torch_dtype, is_trainable=True,
        # Unquantised weights load on the CPU and the Trainer or DeepSpeed moves them;
        # quantised ones are quantised where they will run.
        device=training_device() if quantized else "cpu",
        tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code, quantization=cfg.quantization,
    )
    if quantized:
        from peft import prepare_model_for_kbit_training

        # PEFT's QLoRA preparation: every base weight frozen, the unquantised ones (norms,
        # embeddings, output layer) in fp32 for stable training. Checkpointing is enabled below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Training sequences are right-padded (labels line up with positions 0..n-1).
    tokenizer.padding_side = "right"
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.finetuning == "full":
        return model, tokenizer
    lora_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=ALL_LINEAR if list(cfg.lora_target_modules) == [ALL_LINEAR] else list(cfg.lora_target_modules),
        modules_to_save=list(cfg.lora_modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    with peft_quietly():
        model = get_peft_model(model, lora_config)
    # Mixed precision keeps master weights in fp32: fp16 trainable weights cannot be unscaled,
    # and bf16 ones lose small updates. Only the (small) trainable part is upcast.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, tokenizer


def build_datasets(cfg, tokenizer, train_records, dev_records):
    """(train set, dev set or None, the collator that pads their batches), tokenised once."""
    collate = NerCollate(cfg, tokenizer, (read_data_info(cfg.train_path) or {}).get("answer_format", DEFAULT_ANSWER_FORMAT))
    train = EncodedDataset(train_records, collate)
    if not train.features:
        raise UserError(
            f"{cfg.train_path}: none of its {len(train_records)} examples fits max_seq_length={cfg.max_seq_length} "
            f"(the template, instruction and answer alone are longer); raise --max_seq_length"
        )
    dev = EncodedDataset(dev_records, collate) if dev_records else None
    return train, dev, collate


def lr_schedule(cfg, total_steps):
    """optimizer -> the warmup-then-decay scheduler both trainers use (transformers' own functions)."""
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)  # as TrainingArguments rounds a ratio

    def build(optimizer):
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps)

    return build
