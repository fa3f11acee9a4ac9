"""A training run's folder (save_dir): what is in it, what may be resumed from it, and whether
its checkpoint files are whole and safe to load.

    <save_dir>/.train.lock                     held by the run writing here (save_dir_lock)
    <save_dir>/train_args.json                 the resolved config of the run
    <save_dir>/checkpoint-<N>/                 the HF Trainer's checkpoints (train_trainer.py)
    <save_dir>/checkpoints/global_step<N>/     DeepSpeed engine checkpoints (train_deepspeed.py)
    <save_dir>/adapter_model/ or model/        the finished result, renamed into place at the end

Both launchers prepare the folder, resolve `--resume` and check a checkpoint's files through
this module; only the checkpoint layout (CheckpointLayout) differs between them.
"""
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from config_utils import ConfigError, UserError, check_writable
from files import refuse_link
from model_utils import TRAIN_ARGS_FILE, check_model_dir

ADAPTER_DIR = "adapter_model"  # finetuning=lora: <save_dir>/adapter_model/ (adapter + tokenizer + train_args.json)
MODEL_DIR = "model"  # finetuning=full: <save_dir>/model/ (whole model, loadable wherever an adapter folder is)


# test.py's outputs, metrics.json last: it marks a complete evaluation (files.commit_files).
EVAL_OUTPUTS = ("predictions.jsonl", "report.html", "metrics.json")


def default_eval_dir(model_folder, test_path):
    """Where test.py writes an evaluation unless told: beside the adapter (or model) folder, never
    in it, since the run's next export (a resume, an overwrite) replaces that folder whole:
    <save_dir>/eval_<test file> for a training run's export, else <folder>-eval_<test file>."""
    folder, stem = Path(model_folder), Path(test_path).stem
    if folder.name in (ADAPTER_DIR, MODEL_DIR):
        return folder.parent / f"eval_{stem}"
    return folder.with_name(f"{folder.name}-eval_{stem}")


def move_evaluation(folder):
    """Move an evaluation test.py wrote into `folder` (an export about to be replaced) to a new
    folder beside it and say where; returns that folder, or None when there is none."""
    found = [name for name in EVAL_OUTPUTS if (Path(folder) / name).is_file()]
    if not found:
        return None
    base = default_eval_dir(folder, "earlier")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    for name in found:
        os.replace(Path(folder) / name, dest / name)
    print(f"note: the evaluation in {folder} ({', '.join(found)}) was moved to {dest}: the new export "
          f"replaces that folder", flush=True)
    return dest


def output_dir(cfg):
    """Where the trained result goes: <save_dir>/adapter_model (lora) or <save_dir>/model (full)."""
    return Path(cfg.save_dir) / (MODEL_DIR if cfg.finetuning == "full" else ADAPTER_DIR)


def global_rank():
    """This process's rank as the launchers (deepspeed, torchrun, mpirun) announce it."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


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


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a launcher keeps its checkpoints, `<save_dir>/<folder>/<prefix><step>/`, and how it
    marks one complete: a file written last inside it, or (done_names_newest) a file beside the
    checkpoints naming the newest complete one."""
    folder: str  # below save_dir ("" for save_dir itself)
    prefix: str  # the checkpoint folder's name before its step number
    done: str
    done_names_newest: bool = False

    def root(self, save_dir):
        return Path(save_dir) / self.folder

    def step(self, path):
        """The step number in a checkpoint folder's name, or None for a folder of another name."""
        m = re.fullmatch(rf"{re.escape(self.prefix)}(\d+)", Path(path).name)
        return int(m.group(1)) if m else None

    def is_complete(self, path):
        path = Path(path)
        if not self.done_names_newest:
            return (path / self.done).is_file()
        newest = path.parent / self.done
        step = self.step(newest.read_text().strip()) if newest.is_file() else None
        return step is not None and self.step(path) <= step  # saves are in step order: earlier ones are whole


# The Trainer writes trainer_state.json last; DeepSpeed writes `latest` (the tag of the newest
# checkpoint) after a complete save.
TRAINER_CHECKPOINTS = CheckpointLayout(folder="", prefix="checkpoint-", done="trainer_state.json")
ENGINE_CHECKPOINTS = CheckpointLayout(folder="checkpoints", prefix="global_step", done="latest", done_names_newest=True)


def checkpoints_in(folder, layout):
    """[(step, path)] of the checkpoint folders of `layout` directly in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = ((layout.step(entry), entry) for entry in folder.iterdir() if entry.is_dir())
    return sorted((step, entry) for step, entry in found if step is not None)


def latest_checkpoint(save_dir, layout):
    """The newest complete checkpoint of a run, so that a run killed while saving resumes from
    the one before; None when there is none."""
    done = [path for _, path in checkpoints_in(layout.root(save_dir), layout) if layout.is_complete(path)]
    return str(done[-1]) if done else None


def remove_old_checkpoints(save_dir, layout, keep):
    """Keep the newest `keep` checkpoints (all of them for keep <= 0)."""
    if keep > 0:
        for _, old in checkpoints_in(layout.root(save_dir), layout)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


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
    # The export replaces its folder with a rename (staged_folder): refused before any work.
    refuse_link(out, str(out), "point --save_dir at the real folder or remove the link")
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
        stale = (sorted(save_dir.glob(f"{TRAINER_CHECKPOINTS.prefix}*"))
                 + sorted(save_dir.glob(ENGINE_CHECKPOINTS.folder)))
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


def resolve_resume(cfg, layout):
    """None when starting fresh; else the checkpoint to resume from: for True the latest complete
    one of `layout`, else the path given (validate_train_config checked that it exists)."""
    if not cfg.resume:
        return None
    if cfg.resume is True:
        ckpt = latest_checkpoint(cfg.save_dir, layout)
        if ckpt is None:
            raise UserError(f"resume=True but save_dir '{cfg.save_dir}' holds no complete checkpoint")
    else:
        ckpt = str(cfg.resume)
    check_checkpoint_files(ckpt, layout)
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


# The RNG state files of a checkpoint: the Trainer's rng_state.pth (rng_state_<rank>.pth with
# several processes) and the engine loop's rng_state_<rank>.pt.
RNG_FILE = re.compile(r"rng_state(_\d+)?\.pth?")


def rng_file(ckpt, rank):
    """The engine loop's RNG state file of one rank."""
    return Path(ckpt) / f"rng_state_{rank}.pt"


def save_rng_state(path):
    """Python's, torch's and (when there is one) the GPU's random state, for an exact resume."""
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, path)


def restore_rng_state(path):
    """Put back what save_rng_state wrote (nothing when the file is absent)."""
    if not Path(path).is_file():
        return
    state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_files(ckpt):
    # Hidden entries are temporary exports a kill left behind, not part of the checkpoint.
    return sorted(p for p in Path(ckpt).rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ckpt).parts))


def check_checkpoint_files(ckpt, layout):
    """Refuse a checkpoint with a cut or garbled file (killed while saving, disk full, bad copy),
    naming the file and the newest earlier checkpoint that is whole."""
    for path in _checkpoint_files(ckpt):
        why = _damage(path)
        if why is None:
            if RNG_FILE.fullmatch(path.name):
                # Small, and loaded later by a library that would name no file: refused here first.
                from transformers.trainer_pt_utils import safe_globals as numpy_globals

                with numpy_globals():  # the Trainer's RNG files hold numpy's state
                    load_checkpoint_file(path)
            continue
        step = layout.step(ckpt)
        earlier = [p for s, p in checkpoints_in(Path(ckpt).parent, layout) if step is not None and s < step]
        good = next((p for p in reversed(earlier) if not any(_damage(f) for f in _checkpoint_files(p))), None)
        hint = (f"resume from the earlier checkpoint with --resume={good}" if good
                else "no earlier checkpoint is whole: start over with --overwrite=True")
        raise UserError(f"checkpoint file {path} is damaged ({why}); {hint}")
