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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python model_hub/<script>.py`: the project's modules live one up

import torch  # noqa: E402

from config_utils import ConfigError, parse_config, require_keys, run_cli  # noqa: E402
from files import share_files, write_json  # noqa: E402
from model_utils import check_model_dir, load_model_and_tokenizer, model_type_of, read_train_args  # noqa: E402
from quantization import quantized_weights  # noqa: E402
from model_hub._llama_layout import (  # noqa: E402
    ModelHubError, check_output_dir, copy_tokenizer_files, has_tokenizer, hf_to_meta_permute, meta_ffn_params,
    prepare_output_dir, save_shard, shard_file_name, tensor_table, write_index,
)
from model_hub._merge_inputs import VOCAB_TENSORS, BaseWeights, LoraAdapter  # noqa: E402  (what the merge reads)

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
