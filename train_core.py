"""The training core shared by train_trainer.py and train_deepspeed.py.

Both launchers take the same config dict (TRAIN_DEFAULTS plus a few keys of their own) and
call the same builders: data is read and checked first (a bad line must not cost minutes of
loading 7B weights), then the base model through the one loader, LoRA through PEFT (or no
wrapper at all with finetuning=full), the tokenised datasets and the collator. The trained
result (an adapter, or the whole model) is exported by one function, atomically.
"""
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from config_utils import ConfigError, UserError
from dataset import PROMPT_ID, EncodedDataset, NerCollate, load_data
from model_utils import TRAIN_ARGS_FILE, check_model_dir, load_model_and_tokenizer

ADAPTER_DIR = "adapter_model"  # finetuning=lora: <save_dir>/adapter_model/ (adapter + tokenizer + train_args.json)
MODEL_DIR = "model"  # finetuning=full: <save_dir>/model/ (whole model, loadable wherever an adapter folder is)
FINETUNING = ("lora", "full")
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TRAIN_DEFAULTS = {
    "data_name": "msra",
    "model_dir": "./model_hub/chinese-alpaca-7b",  # merged Chinese-Alpaca-7B (README: model steps)
    "tokenizer_path": None,  # None: the tokenizer in model_dir
    "finetuning": "lora",  # lora: adapter on a frozen base (7B); full: every weight trained (small models, the demo)
    "lora": {
        "r": 8,  # rank; 8 is the common choice for 7B task tuning
        "alpha": 16,  # scale alpha/r = 2, as in alpaca-lora and most LoRA recipes
        "dropout": 0.05,
        "target_modules": LLAMA_PROJECTIONS,  # all seven projections, as the seed
        "modules_to_save": [],  # e.g. embed_tokens,lm_head to train them fully (the tiny model needs it)
    },
    "max_seq_length": 256,  # tokens; MSRA examples average ~127 with Chinese-LLaMA, 1.5% exceed 192
    "instruct_column": "instruct",
    "query_column": "query",
    "response_column": "answer",
    "train_path": "data/msra/instruct_data/train.txt",
    "dev_path": "data/msra/instruct_data/dev.txt",
    "train_limit": 0,  # use only the first N training examples (0 = all)
    "dev_limit": 200,  # dev examples for the periodic eval loss (0 = all); 200 keeps eval cheap
    "train_batch_size": 12,  # per process, as the seed
    "eval_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,  # LoRA needs ~1e-4..3e-4 (alpaca-lora 3e-4, QLoRA 2e-4); the seed's 1e-5 barely moves it
    "weight_decay": 0.0,  # LoRA updates are low-rank already; decay mostly slows them
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "warmup_ratio": 0.03,  # fraction of optimizer steps with linear warmup
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,  # one pass over 49,658 MSRA sentences is ~4,100 steps at batch 12
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "group_by_length": True,  # length-grouped batches: <1% padding instead of ~25% for random batches
    "gradient_checkpointing": False,  # trade ~30% speed for activation memory on long batches
    "share_prefix": True,  # run the prompt prefix all rows share once per batch (exact; off under checkpointing)
    "dtype": "auto",  # auto: bf16 on GPUs that have it, fp16 (with loss scaling) on older GPUs, fp32 on CPU
    "save_dir": "./checkpoint/msra/train_trainer/",
    "log_steps": 10,
    "eval_steps": 200,  # optimizer steps between dev-loss evaluations (0 = never)
    "save_steps": 200,  # optimizer steps between checkpoints
    "save_total_limit": 2,  # checkpoints kept (the latest ones)
    "seed": 42,
    "resume": None,  # True: continue from the latest checkpoint in save_dir; or a checkpoint path
    "overwrite": False,  # replace a finished adapter already in save_dir
    "local_rank": -1,  # set by the DeepSpeed launcher
    "deepspeed_json_path": "deepspeed.json",
}


def training_dtype(cfg):
    """(torch dtype for the base weights, 'bf16'|'fp16'|None for mixed precision)."""
    cuda = torch.cuda.is_available()
    name = cfg.dtype
    if name == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if cuda else "fp32"
    aliases = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    name = aliases.get(name, name)
    if name not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"config key 'dtype': {cfg.dtype!r} is not one of auto, bf16, fp16, fp32")
    if name == "fp16" and not cuda:
        raise ConfigError("config key 'dtype': fp16 training needs a GPU; use dtype=fp32 (or bf16) on a CPU")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    return torch_dtype, (None if name == "fp32" else name)


def output_dir(cfg):
    """Where the trained result goes: <save_dir>/adapter_model (lora) or <save_dir>/model (full)."""
    if cfg.finetuning not in FINETUNING:
        raise ConfigError(f"config key 'finetuning': {cfg.finetuning!r} is not one of {', '.join(FINETUNING)}")
    return Path(cfg.save_dir) / (MODEL_DIR if cfg.finetuning == "full" else ADAPTER_DIR)


def load_datasets_checked(cfg):
    """Check the config's choices, then read and validate train/dev JSONL before anything heavy happens."""
    output_dir(cfg)
    columns = (cfg.instruct_column, cfg.query_column, cfg.response_column)
    train = load_data(cfg.train_path, columns)
    dev = load_data(cfg.dev_path, columns) if cfg.dev_path else []
    if cfg.train_limit > 0:
        train = train[:cfg.train_limit]
    if cfg.dev_limit > 0:
        dev = dev[:cfg.dev_limit]
    return train, dev


def _finished_adapter(save_dir):
    """A finished adapter or full model (the export's last step renames it into place)."""
    save_dir = Path(save_dir)
    return (save_dir / ADAPTER_DIR / "adapter_config.json").is_file() or (save_dir / MODEL_DIR / "config.json").is_file()


def prepare_save_dir(cfg):
    """Refuse to clobber a finished run; check that a run being resumed used the same base model."""
    save_dir = Path(cfg.save_dir)
    recorded = save_dir / TRAIN_ARGS_FILE
    if cfg.resume:
        if recorded.is_file():
            old = json.loads(recorded.read_text(encoding="utf-8"))
            if Path(old.get("model_dir", "")).resolve() != Path(cfg.model_dir).resolve():
                raise UserError(
                    f"save_dir '{save_dir}' holds a run of base model '{old.get('model_dir')}', "
                    f"not '{cfg.model_dir}'; pass the same model_dir or another save_dir"
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
    check_model_dir(cfg.model_dir)


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
        return ckpt
    if not Path(str(cfg.resume)).is_dir():
        raise UserError(f"config key 'resume': checkpoint '{cfg.resume}' does not exist")
    return str(cfg.resume)


def build_model(cfg):
    """Base model through the one loader, LoRA on top (finetuning=full: no wrapper, every weight
    trained); trainable weights kept in fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's A matrices are drawn here: the same seed gives the same run
    torch_dtype, _ = training_dtype(cfg)
    model, tokenizer = load_model_and_tokenizer(
        cfg.model_dir, tokenizer_path=cfg.tokenizer_path, dtype=torch_dtype, device="cpu", is_trainable=True
    )
    # Training sequences are right-padded (labels line up with positions 0..n-1).
    tokenizer.padding_side = "right"
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.finetuning == "full":
        model.requires_grad_(True)
        model.float()  # every weight is trained: master weights in fp32 (see below)
        return model, tokenizer
    lora_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules), modules_to_save=list(cfg.lora_modules_to_save) or None,
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
    dev = EncodedDataset(dev_records, collate) if dev_records else None
    return train, dev, collate


def resolved_args(cfg, tokenizer):
    """What inference needs beside the adapter: the whole config plus vocabulary and prompt id."""
    args = cfg.to_dict()
    args.pop("local_rank", None)
    args.update(vocab_size=len(tokenizer), prompt_id=PROMPT_ID)
    return args


def start_run(cfg, model, tokenizer, train_set, dev_set, collate):
    """Main process only: record the resolved config in save_dir and say what will be trained."""
    os.makedirs(cfg.save_dir, exist_ok=True)
    write_json(os.path.join(cfg.save_dir, TRAIN_ARGS_FILE), resolved_args(cfg, tokenizer))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"finetuning={cfg.finetuning}: trainable params {trainable:,} of {total:,} "
          f"({100 * trainable / total:.2f}%)", flush=True)
    print(f"train {len(train_set)} examples, dev {len(dev_set) if dev_set else 0}; "
          f"{collate.truncated} queries shortened and {train_set.skipped} examples left out "
          f"(answer alone too long) to fit max_seq_length={cfg.max_seq_length}", flush=True)


def write_json(path, data):
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
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
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            os.replace(out_dir, old)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is meant to be shared
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


MIN_SHARED_TOKENS = 16  # below this, a separate prefix pass costs more than it saves


def shared_prefix_length(batch):
    """Leading tokens every row of a right-padded batch shares and that carry no loss.

    Every MSRA example starts with BOS + template + instruction (~70% of its tokens). Positions
    whose prediction is trained (labels after the shift) must stay in the per-row part.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0).long().cumprod(0)
    n = int(same.sum())
    trained = (labels != -100).any(dim=0).nonzero()
    if len(trained):
        n = min(n, int(trained[0]) - 1)  # the token before the first target stays with its row
    return n if n >= MIN_SHARED_TOKENS else 0


def batch_loss(model, batch, cfg, num_items_in_batch=None):
    """The training loss of one batch, as both trainers compute it."""
    if cfg.share_prefix and not cfg.gradient_checkpointing:
        return shared_prefix_loss(model, batch, num_items_in_batch)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**batch, **kwargs).loss


def shared_prefix_loss(model, batch, num_items_in_batch=None):
    """The batch's loss with its shared prefix run once instead of once per row.

    The prefix's keys and values are computed for one row and repeated for the batch (the
    repeat is differentiable, so their gradients add up as in a full batch); the rows then run
    only their own tokens on top, and the output layer runs only where a target is trained
    (answer_loss). Without LoRA dropout the loss and gradients equal the plain forward's up to
    float rounding (tests/test_training.py checks both). With dropout the rows share one
    dropout mask on the prefix: the expected gradient is unchanged, its noise is correlated
    across the rows of a batch.
    """
    n = shared_prefix_length(batch)
    if n == 0:
        return answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], num_items_in_batch)
    ids = batch["input_ids"]
    cache = model(input_ids=ids[:1, :n], use_cache=True, logits_to_keep=1).cache  # its logits carry no loss
    cache.batch_repeat_interleave(ids.shape[0])
    return answer_loss(model, ids[:, n:], batch["attention_mask"], batch["labels"][:, n:], num_items_in_batch,
                       cache=cache, use_cache=True)


def answer_loss(model, input_ids, attention_mask, labels, num_items_in_batch=None, **forward):
    """Causal-LM cross-entropy (as transformers' ForCausalLMLoss) with logits computed only at
    positions whose next token is a target: the answer, ~10 of a row's ~60 own tokens on MSRA.

    The output layer is vocabulary x hidden: on the demo's small model it is over half of the
    per-token work, and on 7B the full logits are the largest activation of a step.
    """
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts token p + 1
    keep = targets != -100
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **forward).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (trained positions, vocabulary), row-major as keep
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets[keep])
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
