"""Merge LoRA adapters into a LLaMA base model: the Chinese-LLaMA/Alpaca LoRAs, or a trained NER adapter.

    python merge_llama_with_chinese_lora.py --base_model ./7B-hf \\
        --lora_model "./chinese-llama-plus-lora-7b,chinese-alpaca-plus-lora-7b" \\
        --output_type huggingface --output_dir ./chinese-alpaca-7b
    python model_hub/merge_llama_with_chinese_lora.py \\
        --lora_model checkpoint/msra/train_trainer/adapter_model --output_dir model_hub/msra-ner-merged

LoRAs are merged in the order given. The tokenizer is copied from the last LoRA folder (else
from the base); the embeddings and output head are first resized to its length (49,953 for
LLaMA-Plus, 49,954 for Alpaca-Plus; new rows start at the mean of the old ones unless a LoRA
supplies them). Each LoRA adds `B @ A * lora_alpha / r` to the weights it targets (transposed
when fan_in_fan_out), and the weights it lists in modules_to_save (embed_tokens, lm_head)
replace the current ones. Without --base_model, the base is the `model_dir` recorded in the
first adapter's train_args.json, which is how a trained NER adapter is exported for deployment.

A QLoRA adapter (trained with quantization=4bit, as its train_args.json records) is merged by
default into the full-precision base, as is common practice, with a warning: it was trained
against the 4-bit weights, so the merged model is close to, not equal to, base-4bit + adapter.
--merge_into=dequantized merges it into the base's 4-bit weights dequantised (bitsandbytes'
dequantize_4bit of the same NF4 quantisation training used): exactly the model it was trained
with, in the base's dtype (fp32: to float rounding). That needs the 4-bit base in memory
(about a quarter of the base's fp16 size) beside the shards.

--output_type huggingface writes config.json, safetensors shards (one per base shard) with an
index, and the tokenizer; pth writes Meta's layout (consolidated.00.pth, params.json, q/k rows
permuted back to interleaved rotary pairs), which convert_llama_weights_to_hf.py reads back.

Peak memory: the LoRA files (two Plus LoRAs: about 2 GB, mostly their full embed_tokens and
lm_head) plus one base shard and its merged copy (the base's shard size, 2 GB from our
converter) plus one fp32 weight while it is merged. pth output holds the whole merged model
until consolidated.00.pth is written: about the model's size (7B in fp16: 13.5 GB) more.
"""
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python model_hub/<script>.py`: the project's modules live one up

import torch  # noqa: E402

from config_utils import ConfigError, parse_config, require_keys, run_cli  # noqa: E402
from files import share_files, write_json  # noqa: E402
from model_utils import (  # noqa: E402
    check_model_dir, load_model_and_tokenizer, model_type_of, quantized_weights, read_train_args,
)
from model_hub._llama_layout import (  # noqa: E402
    IGNORED_TENSORS, ModelHubError, check_output_dir, copy_tokenizer_files, has_tokenizer,
    hf_to_meta_permute, load_torch_file, meta_ffn_params, prepare_output_dir, read_json,
    safetensors_read, save_shard, shard_file_name, tensor_table, write_index,
)

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB_TENSORS = (EMBED, HEAD)
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Whole weights a LoRA saves: `m.weight` (modules_to_save; PEFT strips the wrapper), and with
# PEFT's save_embedding_layers also `m.modules_to_save[.adapter].weight`, `m.original_module.weight`
# (the untouched base copy) or `m.base_layer.weight` (a LoRA-targeted layer's resized base).
FULL_KEY = re.compile(r"^(?P<module>.+?)(?P<wrap>\.modules_to_save(?:\.[^.]+)?|\.original_module|\.base_layer)?"
                      r"\.(?P<param>weight|bias)$")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


DEFAULTS = {
    "base_model": "",  # HF LLaMA folder (e.g. ./7B-hf); "" = model_dir in the first adapter's train_args.json
    "lora_model": "",  # LoRA folder(s), comma-separated, merged in this order; the last one's tokenizer is used (required)
    "output_type": "huggingface",  # huggingface: HF folder (safetensors); pth: Meta's consolidated.00.pth + params.json
    "output_dir": "",  # folder for the merged model, created (required)
    "overwrite": False,  # write into a non-empty output_dir
    "merge_into": "base",  # base: the full-precision base weights; dequantized: a 4-bit (QLoRA) adapter's dequantised 4-bit weights
}
OUTPUT_TYPES = ("huggingface", "pth")
MERGE_INTO = ("base", "dequantized")


def parse_args(argv=None):
    """The original merge script's flags, parsed strictly by config_utils like every script of the project."""
    args = require_keys(parse_config(DEFAULTS, argv), "lora_model", "output_dir")
    if args.output_type not in OUTPUT_TYPES:
        raise ConfigError(f"config key 'output_type': {args.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if args.merge_into not in MERGE_INTO:
        raise ConfigError(f"config key 'merge_into': {args.merge_into!r} is not one of {', '.join(MERGE_INTO)}")
    return args


class BaseWeights:
    """An HF LLaMA folder's weight files, read one file (and one tensor) at a time."""

    def __init__(self, model_dir):
        self.dir = check_model_dir(model_dir)
        self.config = read_json(self.dir / "config.json")
        self.files = self._find_files()
        self.shapes = {}
        for path in self.files:
            for name, shape in self._shapes(path).items():
                if not IGNORED_TENSORS.search(name):
                    self.shapes[name] = shape

    def _find_files(self):
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (self.dir / index).is_file():
                weight_map = read_json(self.dir / index).get("weight_map", {})
                files = [self.dir / f for f in dict.fromkeys(weight_map.values())]
                for f in files:
                    if not f.is_file():
                        raise ModelHubError(f"missing file {f} (listed in {self.dir / index})")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.dir / single).is_file():
                return [self.dir / single]
        raise ModelHubError(f"missing file {self.dir / 'model.safetensors'}: base_model holds no weights")

    @staticmethod
    def _shapes(path):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safetensors_read(path, "base weights"), safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return {k: tuple(v.shape) for k, v in load_torch_file(path, "base weights").items()}

    def tensors(self, path):
        """(name, tensor) of one weight file, read one at a time."""
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safetensors_read(path, "base weights"), safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if not IGNORED_TENSORS.search(name):
                        yield name, f.get_tensor(name)
        else:
            for name, t in load_torch_file(path, "base weights").items():
                if not IGNORED_TENSORS.search(name):
                    yield name, t


def _pattern_value(patterns, module, default):
    # PEFT's rank_pattern/alpha_pattern: a key matches a module name or its dotted suffix.
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


class LoraAdapter:
    """One LoRA folder: low-rank updates per base weight, and full replacement weights."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelHubError(f"lora_model '{path}' does not exist")
        self.config = read_json(self.path / "adapter_config.json")
        self._check_config()
        self.file = next((self.path / n for n in ADAPTER_FILES if (self.path / n).is_file()), None)
        if self.file is None:
            raise ModelHubError(f"missing file {self.path / 'adapter_model.bin'} (or adapter_model.safetensors)")
        state = self._load()
        self.pairs, self.replacements = {}, {}  # base weight name -> (A, B) / tensor
        self.modules = {}  # base weight name -> LoRA module name, for messages
        self._priority = {}
        for key, tensor in state.items():
            self._add(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key, key, tensor)
        for name, pair in self.pairs.items():
            if None in pair:
                raise ModelHubError(f"lora '{self.path}': module {self.modules[name]} has only one of lora_A, lora_B")

    def _check_config(self):
        c = self.config
        unsupported = [
            (c.get("peft_type", "LORA") != "LORA", f"peft_type {c.get('peft_type')} (only LORA)"),
            (c.get("use_dora"), "use_dora (DoRA)"), (c.get("lora_bias"), "lora_bias"),
            (c.get("target_parameters"), "target_parameters"), (c.get("layer_replication"), "layer_replication"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ModelHubError(f"lora '{self.path}': {what} cannot be merged by this script")

    def _load(self):
        if self.file.suffix == ".safetensors":
            from safetensors.torch import load_file

            with safetensors_read(self.file, "adapter"):
                return load_file(str(self.file))
        return load_torch_file(self.file, "adapter")

    def _add(self, key, raw_key, tensor):
        match = LORA_KEY.match(key)
        if match:
            name = match.group("module") + ".weight"
            self.modules[name] = match.group("module")
            pair = self.pairs.setdefault(name, [None, None])
            pair[0 if match.group("ab") == "A" else 1] = tensor
            return
        match = FULL_KEY.match(key)
        if not match:
            raise ModelHubError(f"lora '{self.path}': tensor {raw_key} is neither a LoRA update nor a saved module")
        wrap = match.group("wrap") or ""
        if wrap == ".original_module":
            return  # PEFT's untouched copy of the base weight
        name = f"{match.group('module')}.{match.group('param')}"
        # One weight may be saved under several keys (PEFT's save_embedding_layers adds the
        # wrapper's own); the trained copy wins over base_layer, which LoRA pairs then update.
        priority = 2 if wrap == ".base_layer" else 0
        if name not in self.replacements or priority < self._priority[name]:
            self.modules[name] = match.group("module")
            self.replacements[name] = tensor
            self._priority[name] = priority

    def scaling(self, module):
        r = _pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8))
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", 8))
        return r, alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def delta(self, name):
        a, b = self.pairs[name]
        d = (b.float() @ a.float()) * self.scaling(self.modules[name])[1]
        return d.T if self.config.get("fan_in_fan_out") else d

    def check(self, name, shape):
        """Raise unless this LoRA's tensors for `name` fit a current weight of `shape`."""
        module = self.modules[name]
        if name in self.replacements:
            got = tuple(self.replacements[name].shape)
            # Vocabulary rows may differ (a LoRA brings its own tokenizer); nothing else may.
            fits = got[1:] == shape[1:] if name in VOCAB_TENSORS else got == shape
            if not fits:
                raise ModelHubError(f"lora '{self.path}': module {module} saves a weight of shape {got}, "
                                    f"but the base weight {name} has shape {shape}")
            shape = got
        if name not in self.pairs:
            return shape
        a, b = (tuple(t.shape) for t in self.pairs[name])
        r = self.scaling(module)[0]
        out_in = (shape[1], shape[0]) if self.config.get("fan_in_fan_out") else shape
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r or (b[0], a[1]) != out_in:
            raise ModelHubError(f"lora '{self.path}': module {module} has lora_A {a} and lora_B {b} (r={r}), "
                                f"which do not fit the base weight {name} of shape {shape}")
        return shape


def resolve_base_model(base_model, lora_dirs):
    if base_model:
        return base_model
    recorded = (read_train_args(lora_dirs[0]) or {}).get("model_dir")
    if not recorded:
        raise ModelHubError(f"no base model: pass --base_model (adapter '{lora_dirs[0]}' records no model_dir "
                            f"in train_args.json)")
    # Training records it relative to where it ran, normally the project root.
    for candidate in (Path(recorded), ROOT / recorded):
        if candidate.is_dir():
            return str(candidate)
    raise ModelHubError(f"base model '{recorded}' recorded in {Path(lora_dirs[0]) / 'train_args.json'} "
                        f"does not exist; pass --base_model")


def final_vocab_size(tokenizer_dir, loras):
    from model_utils import load_tokenizer

    vocab = len(load_tokenizer(tokenizer_dir))
    for lora in loras:
        trained = (read_train_args(lora.path) or {}).get("vocab_size")
        if trained is not None and trained != vocab:
            raise ModelHubError(f"adapter '{lora.path}' was trained with a vocabulary of {trained} tokens, "
                                f"but the tokenizer in {tokenizer_dir} has {vocab}")
    return vocab


def check_plan(base, loras, vocab, tokenizer_dir):
    """Every LoRA tensor has a base weight it fits, in merge order; nothing is written before."""
    shapes = dict(base.shapes)
    for name in VOCAB_TENSORS:
        if name in shapes:
            if shapes[name][0] > vocab:
                raise ModelHubError(f"the tokenizer in {tokenizer_dir} has {vocab} tokens, fewer than the "
                                    f"{shapes[name][0]} rows of {name} in the base model")
            shapes[name] = (vocab,) + shapes[name][1:]
    for lora in loras:
        for name in dict.fromkeys([*lora.replacements, *lora.pairs]):
            if name not in shapes:
                raise ModelHubError(f"lora '{lora.path}': module {lora.modules[name]} is not in the base model "
                                    f"(no tensor {name})")
            shapes[name] = lora.check(name, shapes[name])
    for name in VOCAB_TENSORS:
        if name in shapes and shapes[name][0] > vocab:
            raise ModelHubError(f"{name} has {shapes[name][0]} rows after merging, but the tokenizer in "
                                f"{tokenizer_dir} has {vocab} tokens")


def resize_rows(t, vocab):
    if t.shape[0] >= vocab:
        return t
    mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(vocab - t.shape[0], *t.shape[1:])], dim=0)


def merge_tensor(name, t, loras, vocab, dequantized=None):
    """One base tensor with every LoRA merged in; `dequantized` ({name: () -> weight}) replaces
    the base weights of 4-bit layers by the dequantised weights those layers compute with."""
    dtype = t.dtype
    if dequantized and name in dequantized:
        t = dequantized[name]().float()
    if name in VOCAB_TENSORS:
        t = resize_rows(t, vocab)
    for lora in loras:
        if name in lora.replacements:
            t = lora.replacements[name]
        if name in lora.pairs:
            t = t.float() + lora.delta(name)
    if name in VOCAB_TENSORS:
        t = resize_rows(t, vocab)
    return t.to(dtype).contiguous()


def meta_params(config, vocab):
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ModelHubError(f"head_dim {config['head_dim']} differs from hidden_size/num_attention_heads; "
                            f"Meta's layout cannot express it")
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ModelHubError("a scaled rotary embedding cannot be written in Meta's layout")
    params = {"dim": dim, **meta_ffn_params(dim, config["intermediate_size"]), "n_heads": n_heads,
              "n_layers": config["num_hidden_layers"], "norm_eps": config.get("rms_norm_eps", 1e-6),
              "vocab_size": vocab}
    if n_kv != n_heads:
        params["n_kv_heads"] = n_kv
    if rope_theta != 10000.0:
        params["rope_theta"] = rope_theta
    return params


def to_meta(merged, params):
    """HF-named tensors -> Meta-named ones, q/k rows back to interleaved rotary pairs."""
    out = {}
    for meta_name, hf_name, _, rotary in tensor_table(params["n_layers"]):
        if hf_name not in merged:
            raise ModelHubError(f"the merged model has no {hf_name}, which Meta's layout needs for {meta_name}")
        t = merged.pop(hf_name)
        if rotary:
            t = hf_to_meta_permute(t, params["n_heads"] if rotary == "q" else params.get("n_kv_heads", params["n_heads"]))
        out[meta_name] = t.contiguous()
    if merged:
        raise ModelHubError(f"tensor {sorted(merged)[0]} has no place in Meta's layout; use --output_type huggingface")
    return out


def merge_with_peft(base_model, lora_dirs, out, args):
    """Other architectures (Qwen, Mistral, ...): PEFT's own merge_and_unload, saved as a Hugging Face
    folder. The tensor-by-tensor path below knows LLaMA's layout (and Meta's .pth) only."""
    if args.output_type != "huggingface" or len(lora_dirs) != 1:
        raise ModelHubError(f"base model '{base_model}' is not a LLaMA model: merge one adapter with "
                            f"--output_type huggingface (pth output and several LoRAs need LLaMA's layout)")
    if args.merge_into == "dequantized":
        from model_utils import apply_adapter

        # transformers' dequantize replaces each 4-bit layer by a plain one holding bitsandbytes'
        # dequantize_4bit of its weights, then PEFT merges into those.
        tokenizer_path = lora_dirs[0] if has_tokenizer(lora_dirs[0]) else None
        model, tokenizer = load_model_and_tokenizer(base_model, tokenizer_path=tokenizer_path, dtype="float32",
                                                    device="cpu", quantization="4bit")
        model = apply_adapter(model.dequantize(), lora_dirs[0])
    else:
        model, tokenizer = load_model_and_tokenizer(base_model, lora_model=lora_dirs[0], dtype="float32", device="cpu")
    merged = model.merge_and_unload()
    prepare_output_dir(out, args.overwrite)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    share_files(out)  # safetensors writes 0600
    print(f"merged {lora_dirs[0]} into {base_model} with PEFT: Hugging Face output in {out}")
    return out


def check_merge_into(merge_into, lora_dirs):
    """merge_into=dequantized needs one adapter trained on 4-bit weights; merging a quantised
    adapter into the full-precision base is allowed, with a warning."""
    quantization = {d: (read_train_args(d) or {}).get("quantization", "none") for d in lora_dirs}
    if merge_into == "dequantized":
        if len(lora_dirs) != 1 or quantization[lora_dirs[0]] != "4bit":
            what = (f"{len(lora_dirs)} adapters" if len(lora_dirs) != 1 else
                    f"adapter '{lora_dirs[0]}' was trained with quantization={quantization[lora_dirs[0]]} "
                    f"(its train_args.json)")
            raise ModelHubError(f"merge_into=dequantized merges one adapter trained with quantization=4bit, but {what}; "
                                f"use merge_into=base")
        return
    for lora_dir, mode in quantization.items():
        if mode != "none":
            print(f"warning: adapter '{lora_dir}' was trained against {mode} base weights; merged into the "
                  f"full-precision base it gives outputs close to, not equal to, base-{mode} + adapter "
                  f"(--merge_into=dequantized merges a 4bit adapter into the weights it was trained on)",
                  file=sys.stderr)


def merge(args):
    lora_dirs = [s.strip() for s in args.lora_model.split(",") if s.strip()]
    if not lora_dirs:
        raise ModelHubError("--lora_model names no folder")
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite, inputs=[args.base_model or None, *lora_dirs])
    for d in lora_dirs:  # before read_train_args, whose message is about trained adapters
        if not Path(d).is_dir():
            raise ModelHubError(f"lora_model '{d}' does not exist")
    base_model = resolve_base_model(args.base_model, lora_dirs)
    check_output_dir(out, args.overwrite, inputs=[base_model])
    check_merge_into(args.merge_into, lora_dirs)
    if model_type_of(check_model_dir(base_model)) != "llama":
        return merge_with_peft(base_model, lora_dirs, out, args)
    loras = [LoraAdapter(d) for d in lora_dirs]
    base = BaseWeights(base_model)
    tokenizer_dir = next((Path(d) for d in (lora_dirs[-1], base_model) if has_tokenizer(d)), None)
    if tokenizer_dir is None:
        raise ModelHubError(f"missing file {Path(lora_dirs[-1]) / 'tokenizer.model'}: neither the last LoRA "
                            f"nor the base model holds a tokenizer")
    vocab = final_vocab_size(tokenizer_dir, loras)
    check_plan(base, loras, vocab, tokenizer_dir)
    dequantized = None
    if args.merge_into == "dequantized":
        # The base quantised as training quantised it (the one loader, NF4 with double quantisation);
        # each 4-bit layer's weight is dequantised when its shard is merged.
        model, _ = load_model_and_tokenizer(base_model, tokenizer_path=tokenizer_dir, dtype="float32", device="cpu",
                                            quantization="4bit")
        dequantized = quantized_weights(model)

    prepare_output_dir(out, args.overwrite)
    merged_pth, weight_map, total = {}, {}, 0
    for index, path in enumerate(base.files):
        tensors = {name: merge_tensor(name, t, loras, vocab, dequantized) for name, t in base.tensors(path)}
        if args.output_type == "pth":
            merged_pth.update(tensors)
            continue
        file_name = shard_file_name(index, len(base.files))
        total += save_shard(tensors, out / file_name)
        weight_map.update({name: file_name for name in tensors})
        del tensors
    copy_tokenizer_files(tokenizer_dir, out)
    if args.output_type == "pth":
        params = meta_params(base.config, vocab)
        torch.save(to_meta(merged_pth, params), out / "consolidated.00.pth")
        write_json(out / "params.json", params)
    else:
        write_index(out, weight_map, total)
        config = {k: v for k, v in base.config.items() if k != "transformers_version"}
        config["vocab_size"] = vocab
        config.setdefault("architectures", ["LlamaForCausalLM"])  # bases converted without it still serve
        write_json(out / "config.json", config)
        if (base.dir / "generation_config.json").is_file():
            (out / "generation_config.json").write_text(
                (base.dir / "generation_config.json").read_text(encoding="utf-8"), encoding="utf-8")
    names = ", ".join(str(lora.path) for lora in loras)
    print(f"merged {names} into {base.dir}: vocabulary {vocab}, {args.output_type} output in {out}")
    return out


def main(argv=None):
    return run_cli(lambda: merge(parse_args(argv)))


if __name__ == "__main__":
    main()
