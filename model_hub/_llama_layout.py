"""What the model_hub scripts share: Meta <-> HF LLaMA tensor names, the q/k rotary
permutation, Meta's feed-forward size rule, and checking and writing output folders and shards.
"""
import json
import re
from contextlib import contextmanager
import shutil
import sys
from pathlib import Path

import torch

from config_utils import UserError
from files import share_files, write_json


class ModelHubError(UserError):
    pass


# Meta name (inside layers.N.) -> HF name (inside model.layers.N.), the dimension Meta's
# model-parallel shards split it along (None: replicated in every shard), and which rotary
# heads count applies to its rows ("q": n_heads, "k": n_kv_heads, None: not permuted).
LAYER_TENSORS = [
    ("attention.wq.weight", "self_attn.q_proj.weight", 0, "q"),
    ("attention.wk.weight", "self_attn.k_proj.weight", 0, "k"),
    ("attention.wv.weight", "self_attn.v_proj.weight", 0, None),
    ("attention.wo.weight", "self_attn.o_proj.weight", 1, None),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight", 0, None),
    ("feed_forward.w2.weight", "mlp.down_proj.weight", 1, None),
    ("feed_forward.w3.weight", "mlp.up_proj.weight", 0, None),
    ("attention_norm.weight", "input_layernorm.weight", None, None),
    ("ffn_norm.weight", "post_attention_layernorm.weight", None, None),
]
# Embeddings are split along the hidden dimension (fairscale's ParallelEmbedding), the output
# head along the vocabulary (ColumnParallelLinear).
GLOBAL_TENSORS = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", 1, None),
    ("norm.weight", "model.norm.weight", None, None),
    ("output.weight", "lm_head.weight", 0, None),
]
# Present in some checkpoints, recomputed by both codebases, never converted.
IGNORED_TENSORS = re.compile(r"(^|\.)(rope\.freqs|rotary_emb\.inv_freq)$")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
# Weight files a previous run may have left in an output folder; --overwrite removes them so a
# stale shard can never be loaded beside the new ones.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                        "pytorch_model.bin.index.json", "consolidated.*.pth")
def tensor_table(n_layers):
    """[(meta_name, hf_name, split_dim, rotary)] for every converted tensor, in model order."""
    table = [GLOBAL_TENSORS[0]]
    for i in range(n_layers):
        table += [(f"layers.{i}.{m}", f"model.layers.{i}.{h}", s, r) for m, h, s, r in LAYER_TENSORS]
    return table + GLOBAL_TENSORS[1:]


def meta_to_hf_permute(w, n_heads):
    """Meta rotates interleaved pairs (x0,x1),(x2,x3)...; HF's rotate_half pairs x_i with
    x_{i+d/2} inside each head. Reorder each head's output rows from interleaved to halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_permute(w, n_heads):
    """Inverse of `meta_to_hf_permute`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_intermediate_size(dim, multiple_of, ffn_dim_multiplier=None):
    """Feed-forward width as Meta's model.py computes it from params.json."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim, intermediate_size):
    """params.json entries (multiple_of, ffn_dim_multiplier) that make Meta's rule give
    `intermediate_size`: a power-of-two multiple_of when one fits (LLaMA-7B: 256), else the
    width itself as multiple_of, with a multiplier below 1 when the default width exceeds it."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_intermediate_size(dim, multiple_of) == intermediate_size:
            return {"multiple_of": multiple_of}
    params = {"multiple_of": intermediate_size}
    base = int(2 * 4 * dim / 3)
    if base > intermediate_size:
        params["ffn_dim_multiplier"] = intermediate_size / base
    assert meta_intermediate_size(dim, intermediate_size, params.get("ffn_dim_multiplier")) == intermediate_size
    return params


def parse_size(text):
    """'2GB', '500MB', '100KB' or a byte count -> bytes (decimal units, as transformers uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ModelHubError(f"--max_shard_size '{text}' is not a size such as 2GB, 500MB or 1000000")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ModelHubError(f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelHubError(f"{path}: not valid JSON ({e})") from None


def check_output_dir(output_dir, overwrite, inputs=(), kept=None):
    """Refuse a non-empty output folder unless `overwrite`, and one that is also an input.

    `kept(names)` may accept a non-empty folder anyway (tokenizer_only may add a tokenizer to
    a folder holding only weights).
    """
    out = Path(output_dir)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise ModelHubError(f"output_dir '{output_dir}' is also an input folder; choose another output_dir")
    if out.exists() and not out.is_dir():
        raise ModelHubError(f"output_dir '{output_dir}' is a file, not a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not overwrite and not (kept is not None and kept(names)):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ModelHubError(f"output_dir '{output_dir}' is not empty ({shown}); pass --overwrite to write into it")


def prepare_output_dir(output_dir, overwrite):
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for pattern in WEIGHT_FILE_PATTERNS:
            for stale in out.glob(pattern):
                stale.unlink()
    return out


def copy_tokenizer_files(src_dir, output_dir):
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(output_dir) / name)
            copied.append(name)
    return copied


def has_tokenizer(path):
    return path is not None and any((Path(path) / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))


def plan_shards(sizes, max_bytes):
    """[(name, nbytes)] in model order -> lists of names, each under max_bytes (a single
    larger tensor gets a shard of its own)."""
    shards, current, used = [], [], 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(index, count):
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(output_dir, weight_map, total_size):
    write_json(Path(output_dir) / "model.safetensors.index.json",
               {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def save_shard(tensors, path):
    from safetensors.torch import save_file

    # transformers refuses safetensors files without format=pt metadata.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    share_files(path)  # safetensors writes 0600; a converted model is meant to be read by others
    return sum(v.numel() * v.element_size() for v in tensors.values())


@contextmanager
def safetensors_read(path, what):
    """Reading a safetensors file: a cut or garbled one is one line naming it, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ModelHubError(f"cannot read {what} {path} ({e}): the file is damaged or incomplete; copy or "
                            f"export it again") from None


def load_torch_file(path, what="checkpoint"):
    """A torch.save file, memory-mapped when possible: its tensors are read from disk only
    when touched, so several shards may be open while little of them is in memory."""
    with open(path, "rb") as f:
        zip_format = f.read(2) == b"PK"  # torch >= 1.6 files are zip archives
    try:
        if zip_format:
            return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        # Pre-1.6 torch.save format: not mappable, so it is read whole.
        print(f"note: {path} is in the legacy torch format and is loaded into memory whole", file=sys.stderr)
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, cut or foreign files
        if zip_format and not _zip_index_present(path):
            reason = "the file is cut short (a zip archive without its index); download or copy it again"
        else:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ModelHubError(f"cannot read {what} {path}: {reason}") from None


def _zip_index_present(path):
    import zipfile

    try:
        zipfile.ZipFile(path).close()
        return True
    except zipfile.BadZipFile:
        return False


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")
