"""The training core shared by train_trainer.py and train_deepspeed.py.

Both launchers take the same config dict (TRAIN_DEFAULTS plus a few keys of their own) and
call the same builders: data is read and checked first (a bad line must not cost minutes of
loading 7B weights), then the base model through the one loader, LoRA through PEFT (or no
wrapper at all with finetuning=full), the tokenised datasets and the collator. The trained
result (an adapter, or the whole model) is exported by one function, atomically.
"""
import fcntl
import json
import math
import os
import pickle
import random
import re
import shutil
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from config_utils import ConfigError, UserError, check_writable
from dataset import (COLUMN_DEFAULTS, DEFAULT_LABEL_NAMES, NO_ENTITY, PROMPT_STYLES, EncodedDataset, NerCollate,
                     check_prompt_style, columns_of, load_data, read_data_info, staged_folder, write_json)
from model_utils import (TRAIN_ARGS_FILE, check_model_dir, check_quantization, load_model_and_tokenizer, load_tokenizer,
                         meta_model, resolve_dtype)

ADAPTER_DIR = "adapter_model"  # finetuning=lora: <save_dir>/adapter_model/ (adapter + tokenizer + train_args.json)
MODEL_DIR = "model"  # finetuning=full: <save_dir>/model/ (whole model, loadable wherever an adapter folder is)
FINETUNING = ("lora", "full")
ALL_LINEAR = "all-linear"  # PEFT: every nn.Linear except the output layer; the names go into adapter_config.json

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
    training_dtype(cfg)
    if cfg.quantization != "none" and cfg.finetuning == "full":
        raise ConfigError(f"config key 'quantization': {cfg.quantization} base weights are frozen, so they cannot be "
                          f"fully fine-tuned; use finetuning=lora (QLoRA) or quantization=none")
    check_quantization(cfg.quantization, training_device())
    if cfg.resume and cfg.resume is not True and not Path(str(cfg.resume)).is_dir():
        raise ConfigError(f"config key 'resume': checkpoint '{cfg.resume}' does not exist")
    check_prompt_style(cfg.prompt_style)
    output_dir(cfg)  # finetuning is lora or full
    if (Path(cfg.model_dir) / "config.json").is_file():  # else prepare_save_dir explains model_dir
        check_model_dir(cfg.model_dir, cfg.trust_remote_code)
        if cfg.finetuning == "lora" and list(cfg.lora_target_modules) != [ALL_LINEAR]:
            check_target_modules(linear_module_names(cfg.model_dir, cfg.trust_remote_code), cfg.lora_target_modules)


def training_device():
    """Where this process trains: its launcher's GPU (LOCAL_RANK), else the CPU. Quantised base
    weights are loaded there directly (bitsandbytes' layers are not moved after loading)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def check_zero_stage(stage, where="config key 'zero_stage'"):
    """ZeRO 0-2 only, for both trainers: stage 3 partitions the weights the adapter export reads."""
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: ZeRO stage {stage} is not supported; use 0, 1 or 2 (stage 3 partitions "
                          f"the weights the adapter export reads, and LoRA's optimizer state is small anyway)")


LOCK_FILE = ".train.lock"


@contextmanager
def save_dir_lock(save_dir):
    """Hold `<save_dir>/.train.lock` for the whole run, so a second training into the same
    save_dir is refused instead of mixing its checkpoints and adapter with this one's.

    The lock is an flock on the file, which the kernel releases when the process ends however it
    ends: the lock of a killed run is never stale. The file holds the pid for the error message.
    Only the main process (rank 0) takes it; the other ranks belong to the same run.
    """
    if global_rank() != 0:
        yield
        return
    check_writable(save_dir, "save_dir")  # before any weights load
    path = Path(save_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"config key 'save_dir': cannot write {path} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"save_dir '{save_dir}' is in use by training process {holder} ({path}); wait for it "
                f"to finish or pass another --save_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def training_dtype(cfg):
    """(torch dtype for the base weights, 'bf16'|'fp16'|None for mixed precision)."""
    cuda = torch.cuda.is_available()
    torch_dtype = resolve_dtype(cfg.dtype, "cuda" if cuda else "cpu")
    if torch_dtype == torch.float16 and not cuda:
        raise ConfigError("config key 'dtype': fp16 training needs a GPU; use dtype=fp32 (or bf16) on a CPU")
    return torch_dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(torch_dtype)


def output_dir(cfg):
    """Where the trained result goes: <save_dir>/adapter_model (lora) or <save_dir>/model (full)."""
    if cfg.finetuning not in FINETUNING:
        raise ConfigError(f"config key 'finetuning': {cfg.finetuning!r} is not one of {', '.join(FINETUNING)}")
    return Path(cfg.save_dir) / (MODEL_DIR if cfg.finetuning == "full" else ADAPTER_DIR)


def load_datasets_checked(cfg):
    """Check the config's choices, then read and validate train/dev JSONL before anything heavy happens."""
    output_dir(cfg)
    columns = columns_of(cfg)
    train = load_data(cfg.train_path, columns)
    dev = load_data(cfg.dev_path, columns) if cfg.dev_path else []
    if cfg.train_limit > 0:
        train = train[:cfg.train_limit]
    if cfg.no_entity_fraction < 1:
        n = len(train)
        train = keep_no_entity(train, cfg.no_entity_fraction, columns[2], cfg.seed)
        if global_rank() == 0:
            print(f"no_entity_fraction={cfg.no_entity_fraction}: {n - len(train)} of the {n} training sentences "
                  f"left out (answer {NO_ENTITY}), {len(train)} kept", flush=True)
    if cfg.dev_limit > 0:
        dev = dev[:cfg.dev_limit]
    return train, dev


def keep_no_entity(records, fraction, answer_column, seed):
    """All records with entities and a seeded `fraction` of those whose answer is NO_ENTITY, in
    file order. Every rank draws the same subset (same seed), so DeepSpeed's sampler still splits
    one dataset.

    Why: a sentence without entities costs a full forward and backward and teaches one answer.
    A small model trained from nothing learns more entities per step with fewer of them (the
    demo: micro F1 0.378 keeping half against 0.320 keeping all, same steps, seed and learning
    rate; README "The demo"), and still answers `没有` on most entity-free test sentences.
    """
    rng = random.Random(seed)
    return [r for r in records if r[answer_column].strip() != NO_ENTITY or rng.random() < fraction]


def _finished_adapter(save_dir):
    """A finished adapter or full model (the export's last step renames it into place)."""
    save_dir = Path(save_dir)
    return (save_dir / ADAPTER_DIR / "adapter_config.json").is_file() or (save_dir / MODEL_DIR / "config.json").is_file()


def prepare_save_dir(cfg):
    """Refuse to clobber a finished run; check that a run being resumed used the same base model.

    Called under save_dir_lock: what it finds half-written belongs to a run that is over.
    """
    save_dir = Path(cfg.save_dir)
    if global_rank() == 0:
        # Temporary exports of an interrupted run (see export_trained) are never resumed from.
        for leftover in [*save_dir.glob(f".{ADAPTER_DIR}-*"), *save_dir.glob(f".{MODEL_DIR}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    out = output_dir(cfg)
    if out.is_symlink():
        # The export replaces its folder with a rename: that would replace the link, never
        # update what it points to, so a linked export folder is refused before any work.
        raise UserError(f"{out} is a symbolic link (to {os.readlink(out)}); point --save_dir at the real folder "
                        f"or remove the link")
    recorded = save_dir / TRAIN_ARGS_FILE
    if cfg.resume:
        if recorded.is_file():
            try:
                old = json.loads(recorded.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{recorded}: not valid JSON ({e}); it records the run to resume") from None
            if Path(old.get("model_dir", "")).resolve() != Path(cfg.model_dir).resolve():
                raise UserError(
                    f"save_dir '{save_dir}' holds a run of base model '{old.get('model_dir')}', "
                    f"not '{cfg.model_dir}'; pass the same model_dir or another save_dir"
                )
            if old.get("finetuning", "lora") != cfg.finetuning:
                raise UserError(
                    f"save_dir '{save_dir}' holds a finetuning={old.get('finetuning', 'lora')} run, and "
                    f"--resume continues it as it was: pass --finetuning={old.get('finetuning', 'lora')}, or "
                    f"another save_dir for a finetuning={cfg.finetuning} run"
                )
            if old.get("quantization", "none") != cfg.quantization:
                # The checkpoint's adapter learned against those base weights, not these.
                raise UserError(
                    f"save_dir '{save_dir}' holds a run with quantization={old.get('quantization', 'none')}, "
                    f"not {cfg.quantization}; resume with the same quantization or train into another save_dir"
                )
    else:
        stale = sorted(save_dir.glob("checkpoint-*")) + sorted(save_dir.glob("checkpoints"))
        if (_finished_adapter(save_dir) or stale) and not cfg.overwrite:
            what = ("checkpoints of an earlier run" if not _finished_adapter(save_dir) else
                    "a finished model" if (save_dir / MODEL_DIR / "config.json").is_file() else "a finished adapter")
            raise UserError(
                f"save_dir '{save_dir}' already holds {what}; pass --overwrite=True to start over "
                f"(its checkpoints are removed) or --resume=True to continue its run"
            )
        if stale and global_rank() == 0:
            # A fresh run must not resume from, or rotate against, the old run's checkpoints.
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
    check_model_dir(cfg.model_dir, cfg.trust_remote_code)


def global_rank():
    """This process's rank as the launchers (deepspeed, torchrun, mpirun) announce it."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def latest_trainer_checkpoint(save_dir):
    """The newest `checkpoint-N` folder the Trainer finished writing (trainer_state.json is its
    last file), so a run killed while saving resumes from the previous, complete one."""
    found = []
    if Path(save_dir).is_dir():
        for entry in Path(save_dir).iterdir():
            m = re.match(r"^checkpoint-(\d+)$", entry.name)
            if m and (entry / "trainer_state.json").is_file():
                found.append((int(m.group(1)), entry))
    return str(max(found)[1]) if found else None


def resolve_resume(cfg, find_latest):
    """None when starting fresh; else the checkpoint to resume from (`find_latest(save_dir)` for True)."""
    if not cfg.resume:
        return None
    if cfg.resume is True:
        ckpt = find_latest(cfg.save_dir)
        if ckpt is None:
            raise UserError(f"resume=True but save_dir '{cfg.save_dir}' holds no complete checkpoint")
    else:
        ckpt = str(cfg.resume)
        if not Path(ckpt).is_dir():
            raise UserError(f"config key 'resume': checkpoint '{cfg.resume}' does not exist")
    check_checkpoint_files(ckpt)
    return ckpt


def _damage(path):
    """Why a checkpoint file cannot be whole (cheap: headers and sizes only), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return "shorter than its header"
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
                return "its header is cut or garbled"
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            return None if size == 8 + n + end else f"{size} bytes where its header promises {8 + n + end}"
    if path.suffix in (".pt", ".pth", ".bin") and head[:2] == b"PK":
        try:
            zipfile.ZipFile(path).close()  # the index sits at the end: a cut file has none
        except zipfile.BadZipFile:
            return "cut short (no zip index at its end)"
    return None


def _allowed_checkpoint_classes():
    """The only non-tensor objects in this project's DeepSpeed checkpoints (ZeRO 0-2, any precision)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path, map_location=None):
    """torch.load of a DeepSpeed checkpoint file with weights_only=True.

    DeepSpeed unpickles its files with weights_only=False, which runs whatever code a crafted
    file carries. Every file this project writes holds tensors, plain containers and the few
    DeepSpeed classes above; anything else is refused before it can run.
    """
    try:
        with torch.serialization.safe_globals(_allowed_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the refused object on the line that says GLOBAL.
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "an unknown object")
        raise UserError(f"checkpoint file {path} holds more than training state ({what}); "
                        f"it was not written by this project's training and is not loaded") from None


def verify_deepspeed_checkpoint(ckpt):
    """Load every DeepSpeed file of a checkpoint safely once, for a resume that DeepSpeed itself
    performs inside another library (the Trainer's): a crafted file is refused before it runs."""
    for path in sorted(Path(ckpt).glob("global_step*/*.pt")):
        load_checkpoint_file(path, map_location="cpu")


def _step_of(path):
    m = re.search(r"(\d+)$", Path(path).name)
    return int(m.group(1)) if m else -1


def _checkpoint_files(ckpt):
    # Hidden entries are temporary exports a kill left behind, not part of the checkpoint.
    return sorted(p for p in Path(ckpt).rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ckpt).parts))


def check_checkpoint_files(ckpt):
    """Refuse a checkpoint with a cut or garbled file (killed while saving, disk full, bad copy),
    naming the file and the newest earlier checkpoint that is whole."""
    for path in _checkpoint_files(ckpt):
        why = _damage(path)
        if why is None:
            if re.fullmatch(r"rng_state(_\d+)?\.pth?", path.name):
                # Small, and loaded later by a library that would name no file: refused here first.
                from transformers.trainer_pt_utils import safe_globals as numpy_globals

                with numpy_globals():  # the Trainer's RNG files hold numpy's state
                    load_checkpoint_file(path)
            continue
        earlier = sorted((p for p in Path(ckpt).parent.iterdir()
                          if p.is_dir() and p != Path(ckpt) and 0 <= _step_of(p) < _step_of(ckpt)), key=_step_of)
        good = next((p for p in reversed(earlier) if not any(_damage(f) for f in _checkpoint_files(p))), None)
        hint = (f"resume from the earlier checkpoint with --resume={good}" if good
                else "no earlier checkpoint is whole: start over with --overwrite=True")
        raise UserError(f"checkpoint file {path} is damaged ({why}); {hint}")


def load_training_tokenizer(cfg):
    """The tokenizer training uses (cfg.tokenizer_path, else model_dir's): loaded before the
    model, so the data can be tokenised and checked before any weights load."""
    return load_tokenizer(cfg.tokenizer_path or cfg.model_dir, trust_remote_code=cfg.trust_remote_code)


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
    model = get_peft_model(model, lora_config)
    # Mixed precision keeps master weights in fp32: fp16 trainable weights cannot be unscaled,
    # and bf16 ones lose small updates. Only the (small) trainable part is upcast.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, tokenizer


def build_datasets(cfg, tokenizer, train_records, dev_records):
    collate = NerCollate(cfg, tokenizer)
    train = EncodedDataset(train_records, collate)
    if not train.features:
        raise UserError(
            f"{cfg.train_path}: none of its {len(train_records)} examples fits max_seq_length={cfg.max_seq_length} "
            f"(the template, instruction and answer alone are longer); raise --max_seq_length"
        )
    dev = EncodedDataset(dev_records, collate) if dev_records else None
    return train, dev, collate


def resolved_args(cfg, tokenizer):
    """What inference needs beside the adapter: the whole config plus vocabulary, prompt id, and
    the label set and instruction process.py recorded beside the training data."""
    args = cfg.to_dict()
    args.pop("local_rank", None)
    info = read_data_info(cfg.train_path) or {}
    args.update(vocab_size=len(tokenizer), prompt_id=PROMPT_STYLES[cfg.prompt_style],
                label_names=info.get("label_names", DEFAULT_LABEL_NAMES), instruct=info.get("instruct", ""))
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


def lr_schedule(cfg, total_steps):
    """optimizer -> the warmup-then-decay scheduler both trainers use (transformers' own functions)."""
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)  # as TrainingArguments rounds a ratio

    def build(optimizer):
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps)

    return build
