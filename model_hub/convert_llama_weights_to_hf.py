"""Convert Meta's original LLaMA weights to a Hugging Face LLaMA folder.

    python convert_llama_weights_to_hf.py --input_dir ./ --model_size 7B --output_dir ./7B-hf
    python convert_llama_weights_to_hf.py --input_dir ./ --model_size tokenizer_only --output_dir ./7B-hf

`input_dir` holds `tokenizer.model` and a `<model_size>/` folder with `params.json` and
`consolidated.00.pth` ... (13B and larger: several shards); a folder holding those files
directly (as `merge_llama_with_chinese_lora.py --output_type pth` writes) works too. Every
shape comes from `params.json` and the weights; `--intermediate_size` only double-checks.

Writes config.json, generation_config.json, safetensors shards with
model.safetensors.index.json, and the tokenizer (tokenizer.json, tokenizer_config.json and a
copy of tokenizer.model). `tokenizer_only` writes just the tokenizer, also into a folder that
already holds converted weights.

Peak memory: about one output shard (--max_shard_size, default 2 GB) plus two copies of the
largest single tensor (the concatenated pieces and their permuted copy; for 7B in fp16 the
32000x4096 embedding, 0.25 GB), so about 2.5 GB for any model size. The Meta shards are
memory-mapped, not loaded: their pages are read when a tensor is assembled and the OS may drop
them again (a pre-2020 legacy-format shard cannot be mapped and is read whole instead).
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python model_hub/<script>.py`: the project's modules live one up

from config_utils import parse_config, require_keys, run_cli  # noqa: E402
from files import write_json  # noqa: E402
from model_utils import dtype_from_name  # noqa: E402
from model_hub._llama_layout import (  # noqa: E402
    IGNORED_TENSORS, ModelHubError, check_output_dir, dtype_name, has_tokenizer,
    load_torch_file, meta_to_hf_permute, parse_size, plan_shards, prepare_output_dir,
    read_json, save_shard, shard_file_name, tensor_table, write_index,
)

TOKENIZER_ONLY = "tokenizer_only"
# Shards Meta released per size; fewer files than this means one is missing.
KNOWN_SHARD_COUNTS = {"7B": 1, "13B": 2, "30B": 4, "33B": 4, "65B": 8, "70B": 8}
SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")


DEFAULTS = {
    "input_dir": "",  # folder with tokenizer.model and a <model_size>/ folder of Meta weights (required)
    "model_size": "7B",  # sub-folder of input_dir (7B, 13B, 30B, 65B, 70B), or tokenizer_only
    "output_dir": "",  # folder for the HF model, created (required)
    "dtype": "auto",  # auto (keep the checkpoint's), float16, bfloat16 or float32
    "intermediate_size": 0,  # feed-forward width to expect; 0 = read it from the feed_forward.w1 weights
    "max_position_embeddings": 2048,  # context length in tokens for config.json (LLaMA 2048, Llama 2 4096)
    "max_shard_size": "2GB",  # largest safetensors shard written (e.g. 2GB, 500MB)
    "overwrite": False,  # write into a non-empty output_dir
}


def parse_args(argv=None):
    """The original conversion script's flags (`--input_dir ./ --model_size 7B --output_dir ./7B-hf`),
    parsed strictly by config_utils like every script of the project."""
    return require_keys(parse_config(DEFAULTS, argv), "input_dir", "output_dir")


def find_checkpoint(input_dir, model_size):
    """-> (folder with params.json, [shard paths in order])."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ModelHubError(f"input_dir '{input_dir}' does not exist")
    sized = input_dir / model_size
    model_dir = sized if sized.is_dir() or not (input_dir / "params.json").is_file() else input_dir
    if not (model_dir / "params.json").is_file():
        raise ModelHubError(f"missing file {model_dir / 'params.json'}")
    found = {}
    for path in model_dir.glob("consolidated.*.pth"):
        match = SHARD_NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    expected = max(len(found), KNOWN_SHARD_COUNTS.get(model_size, 1), max(found, default=-1) + 1)
    for i in range(expected):
        if i not in found:
            raise ModelHubError(f"missing shard {model_dir / f'consolidated.{i:02d}.pth'}")
    return model_dir, [found[i] for i in range(expected)]


def find_tokenizer_dir(*dirs):
    for d in dirs:
        if has_tokenizer(d):
            return Path(d)
    raise ModelHubError(f"missing file {Path(dirs[0]) / 'tokenizer.model'}")


def load_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer, LlamaTokenizer

    try:
        if any((tokenizer_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            # HF files beside it (a merged Chinese model): keeps added tokens such as Alpaca's pad.
            return AutoTokenizer.from_pretrained(str(tokenizer_dir))
        # legacy=True: the LLaMA tokenizer's behaviour under the transformers versions LLaMA and
        # Chinese-LLaMA were released with (also what model_hub/build_tiny_llama.py uses).
        return LlamaTokenizer.from_pretrained(str(tokenizer_dir), legacy=True)
    except Exception as e:  # protobuf / sentencepiece errors carry their own advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelHubError(f"cannot read the tokenizer in {tokenizer_dir}: {first}") from None


def write_tokenizer(tokenizer, tokenizer_dir, output_dir):
    import shutil

    # LLaMA's tokenizer starts every text with BOS (the original conversion writes
    # add_bos_token: true); transformers 5 does not unless told, and other tools read the flag.
    tokenizer.add_bos_token, tokenizer.add_eos_token = True, False
    tokenizer.save_pretrained(str(output_dir))
    config_file = Path(output_dir) / "tokenizer_config.json"
    config = read_json(config_file)
    config.update(add_bos_token=True, add_eos_token=False)
    write_json(config_file, config)
    if (tokenizer_dir / "tokenizer.model").is_file():
        # SentencePiece users (and Meta's own code) read the original model file.
        shutil.copyfile(tokenizer_dir / "tokenizer.model", Path(output_dir) / "tokenizer.model")


def read_params(path):
    params = read_json(path)
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise ModelHubError(f"{path}: '{key}' must be a positive integer, got {params.get(key)!r}")
    if params.get("use_scaled_rope"):
        raise ModelHubError(f"{path}: use_scaled_rope (Llama 3.1) is not supported by this converter")
    n_heads, dim = params["n_heads"], params["dim"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise ModelHubError(f"{path}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not give "
                            f"an even head size shared by whole groups of heads")
    return {
        "dim": dim, "n_layers": params["n_layers"], "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "head_dim": dim // n_heads, "norm_eps": float(params.get("norm_eps", 1e-6)),
        "vocab_size": params.get("vocab_size", -1), "rope_theta": float(params.get("rope_theta", 10000.0)),
    }


class MetaCheckpoint:
    """Memory-mapped Meta shards, checked against params.json; `tensor(meta_name)` assembles one
    full tensor from its pieces."""

    def __init__(self, model_dir, shard_paths, intermediate_size=None):
        self.params_path = model_dir / "params.json"
        self.params = read_params(self.params_path)
        self.paths = shard_paths
        self.shards = [load_torch_file(p, "shard") for p in shard_paths]
        for path, shard in zip(self.paths, self.shards):
            if not isinstance(shard, dict):
                raise ModelHubError(f"{path} holds a {type(shard).__name__}, not a state dict of tensors")
        self.table = tensor_table(self.params["n_layers"])
        self.vocab_size = self._vocab_size()
        self.intermediate_size = intermediate_size or self._summed_rows("layers.0.feed_forward.w1.weight")
        self._check()

    def _get(self, i, name):
        if name not in self.shards[i]:
            raise ModelHubError(f"tensor {name} is missing from {self.paths[i]}")
        return self.shards[i][name]

    def _summed_rows(self, name):
        return sum(self._get(i, name).shape[0] for i in range(len(self.shards)))

    def _vocab_size(self):
        declared = self.params["vocab_size"]
        # LLaMA-1 params.json says -1: the vocabulary is whatever the embedding holds.
        return declared if isinstance(declared, int) and declared > 0 else self._get(0, "tok_embeddings.weight").shape[0]

    def full_shape(self, meta_name):
        p = self.params
        q, kv = p["n_heads"] * p["head_dim"], p["n_kv_heads"] * p["head_dim"]
        ffn, dim = self.intermediate_size, p["dim"]
        shapes = {"tok_embeddings.weight": (self.vocab_size, dim), "output.weight": (self.vocab_size, dim),
                  "norm.weight": (dim,), "attention.wq.weight": (q, dim), "attention.wk.weight": (kv, dim),
                  "attention.wv.weight": (kv, dim), "attention.wo.weight": (dim, q),
                  "feed_forward.w1.weight": (ffn, dim), "feed_forward.w3.weight": (ffn, dim),
                  "feed_forward.w2.weight": (dim, ffn), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
        return shapes[re.sub(r"^layers\.\d+\.", "", meta_name)]

    def _check(self):
        n = len(self.shards)
        p = self.params
        source = (f"params.json dim={p['dim']}, n_heads={p['n_heads']}, n_kv_heads={p['n_kv_heads']}, "
                  f"vocab {self.vocab_size}, intermediate_size {self.intermediate_size}, {n} shard(s)")
        for meta_name, _, split, _ in self.table:
            full = self.full_shape(meta_name)
            piece = list(full)
            if split is not None:
                if full[split] % n:
                    raise ModelHubError(f"{meta_name}: size {full[split]} cannot be split into {n} shards ({source})")
                piece[split] //= n
            for i in range(n):
                got = tuple(self._get(i, meta_name).shape)
                if got != tuple(piece):
                    raise ModelHubError(f"{meta_name} in {self.paths[i].name} has shape {got}, expected "
                                        f"{tuple(piece)} ({source})")
        known = {m for m, _, _, _ in self.table}
        for i, shard in enumerate(self.shards):
            for name in shard:
                if name not in known and not IGNORED_TENSORS.search(name):
                    raise ModelHubError(f"{self.paths[i].name} holds tensor {name} that params.json "
                                        f"(n_layers={p['n_layers']}) does not describe")

    def dtype(self):
        return self._get(0, "tok_embeddings.weight").dtype

    def tensor(self, meta_name, split, rotary, dtype):
        import torch

        if split is None or len(self.shards) == 1:
            t = self.shards[0][meta_name]
        else:
            t = torch.cat([s[meta_name] for s in self.shards], dim=split)
        if rotary == "q":
            t = meta_to_hf_permute(t, self.params["n_heads"])
        elif rotary == "k":
            t = meta_to_hf_permute(t, self.params["n_kv_heads"])
        return t.to(dtype)


def write_config(ckpt, tokenizer, dtype, max_position_embeddings, output_dir):
    from transformers import GenerationConfig, LlamaConfig

    p = ckpt.params
    config = LlamaConfig(
        vocab_size=ckpt.vocab_size, hidden_size=p["dim"], intermediate_size=ckpt.intermediate_size,
        num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"],
        rms_norm_eps=p["norm_eps"], rope_theta=p["rope_theta"], max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config.dtype = dtype_name(dtype)
    config.architectures = ["LlamaForCausalLM"]  # serving tools (vLLM, TGI) pick the model class from it
    config.save_pretrained(str(output_dir))
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(
        str(output_dir))


def write_weights(ckpt, dtype, max_shard_bytes, output_dir):
    """Safetensors shards of whole layers' tensors in model order, one shard in memory at a time."""
    sizes = []
    for meta_name, hf_name, _, _ in ckpt.table:
        numel = 1
        for d in ckpt.full_shape(meta_name):
            numel *= d
        sizes.append((hf_name, numel * dtype.itemsize))
    groups = plan_shards(sizes, max_shard_bytes)
    by_hf = {hf: (meta, split, rot) for meta, hf, split, rot in ckpt.table}
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        file_name = shard_file_name(index, len(groups))
        tensors = {hf: ckpt.tensor(*by_hf[hf], dtype) for hf in names}
        total += save_shard(tensors, Path(output_dir) / file_name)
        weight_map.update({hf: file_name for hf in names})
        del tensors
    write_index(output_dir, weight_map, total)
    return len(groups), total


def convert(args):
    input_dir = Path(args.input_dir)
    out = Path(args.output_dir)
    if args.model_size == TOKENIZER_ONLY:
        if not input_dir.is_dir():
            raise ModelHubError(f"input_dir '{input_dir}' does not exist")
        # The seed runs this after the weights, into the same folder: a model folder may get
        # its tokenizer (re)written; any other non-empty folder needs --overwrite.
        check_output_dir(out, args.overwrite, inputs=[input_dir], kept=lambda names: "config.json" in names)
        tokenizer_dir = find_tokenizer_dir(input_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_tokenizer(tokenizer, tokenizer_dir, out)
        print(f"wrote the tokenizer ({len(tokenizer)} tokens) to {out}")
        return out

    check_output_dir(out, args.overwrite, inputs=[input_dir, input_dir / args.model_size])
    dtype_arg = dtype_from_name(args.dtype)  # None: keep the checkpoint's
    max_shard_bytes = parse_size(args.max_shard_size)
    model_dir, shard_paths = find_checkpoint(input_dir, args.model_size)
    tokenizer_dir = find_tokenizer_dir(input_dir, model_dir)
    ckpt = MetaCheckpoint(model_dir, shard_paths, args.intermediate_size or None)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) != ckpt.vocab_size:
        print(f"note: the tokenizer has {len(tokenizer)} tokens, the weights {ckpt.vocab_size} rows; "
              f"load the model with a tokenizer that matches its embeddings", file=sys.stderr)
    dtype = dtype_arg or ckpt.dtype()

    prepare_output_dir(out, args.overwrite)
    write_tokenizer(tokenizer, tokenizer_dir, out)
    n_files, total = write_weights(ckpt, dtype, max_shard_bytes, out)
    write_config(ckpt, tokenizer, dtype, args.max_position_embeddings, out)
    p = ckpt.params
    print(f"wrote {out}: {p['n_layers']} layers, hidden {p['dim']}, vocabulary {ckpt.vocab_size}, "
          f"{dtype_name(dtype)}, {total / 1e9:.2f} GB in {n_files} shard(s)")
    return out


def main(argv=None):
    return run_cli(lambda: convert(parse_args(argv)))


if __name__ == "__main__":
    main()
