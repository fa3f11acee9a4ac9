"""The one model loader, used by every script: how is a model (and its adapter) loaded?

`load_model_and_tokenizer` opens a LLaMA directory (the merged Chinese-Alpaca-7B or the tiny
test model alike), optionally quantising the base weights with bitsandbytes while they load
(`quantization=4bit|8bit`), fixes the tokenizer's pad token, resizes embeddings to the tokenizer
and optionally applies a LoRA adapter. `load_for_inference` does the same starting from a trained
adapter folder, reading the base model path from its `train_args.json`, or from a fully
fine-tuned model folder (`<save_dir>/model`: config.json and train_args.json, no adapter), which
is then the model itself. The inference config keys live in infer_config.py, generation in
generation.py.
"""
import contextlib
import json
import pickle
import sys
import warnings
from pathlib import Path

import torch

from config_utils import UserError
from answer_format import DEFAULT_ANSWER_FORMAT, check_answer_format
from dataset import PROMPT_STYLES, check_label_names, check_prompt_style, read_text
from devices import resolve_device
from quantization import check_quantization, check_quantization_name, keep_4bit_numerics, quantization_config

TRAIN_ARGS_FILE = "train_args.json"
MODEL_HELP = (
    "see the README's model steps (convert Meta's weights, merge the Chinese LoRAs), "
    "or build the embedded test model with `python model_hub/build_tiny_llama.py` "
    "and pass --model_dir=model_hub/tiny-llama"
)


class ModelLoadError(UserError):
    pass


def loaded_as(model, adapter=None):
    """What a loaded model is, read from the model itself (what an evaluation records beside its
    scores): the base model folder it was loaded from, the dtype it computes in, bitsandbytes'
    quantization of its layers, and, for an adapter, whether it was folded into the weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = {type(m).__name__ for m in base.modules() if type(m).__module__.startswith("bitsandbytes")}
    quantization = "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else "none"
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    is_adapter = adapter is not None and not is_full_model(adapter)
    return {"base_model": base.name_or_path, "dtype": str(dtype).removeprefix("torch."), "quantization": quantization,
            "merge_lora": (not hasattr(model, "get_base_model")) if is_adapter else None}


# Every dtype name a script accepts, in one table (training, inference and the model_hub scripts).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def dtype_from_name(name):
    """A dtype name -> torch dtype; "auto" (or empty) -> None, for the caller to decide."""
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"config key 'dtype': unknown dtype '{name}'; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(dtype="auto", device="cpu"):
    """'auto' -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    chosen = dtype_from_name(dtype)
    if chosen is not None:
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def meta_model(model_dir, trust_remote_code=False):
    """The model built from its config on the meta device: its modules and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_type_of(model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")


def check_model_dir(model_dir, trust_remote_code=False):
    """A Hugging Face model folder of an architecture transformers builds itself (any causal LM:
    LLaMA, Qwen2/3, Mistral, ...); code shipped with the model only with trust_remote_code."""
    from transformers import CONFIG_MAPPING

    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model_dir '{model_dir}' does not exist; {MODEL_HELP}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"model_dir '{model_dir}' has no config.json, so it is not a HF model directory; {MODEL_HELP}")
    model_type = model_type_of(path)
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise ModelLoadError(
            f"model_dir '{model_dir}' holds model_type '{model_type}', which transformers does not implement; "
            f"if you trust the code that comes with the model, pass --trust_remote_code=True")
    return path


def warn_remote_code(trust_remote_code):
    if trust_remote_code:
        print("warning: trust_remote_code=True runs Python code from the model folder; use it only for models "
              "whose code you trust", file=sys.stderr)


def _has_tokenizer(path):
    return path is not None and any(
        (Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")
    )


# A tokenizer's small text files, read by transformers with a traceback for a bad byte or a
# cut file: read here first, so that is one line naming the file and line.
TOKENIZER_TEXT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def check_tokenizer_files(path):
    for name in TOKENIZER_TEXT_FILES:
        file = Path(path) / name
        if file.is_file():
            text = read_text(file)
            if file.suffix == ".json":
                try:
                    json.loads(text)
                except json.JSONDecodeError as e:
                    raise ModelLoadError(f"{file}:{e.lineno}: not valid JSON ({e.msg}); the tokenizer's files are "
                                         f"damaged: copy them again from the model") from None


def load_tokenizer(path, padding_side="left", trust_remote_code=False):
    from transformers import AutoTokenizer

    if not _has_tokenizer(path):
        raise ModelLoadError(f"no tokenizer (tokenizer.model or tokenizer.json) in '{path}'")
    check_tokenizer_files(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # LLaMA ships no pad token. unk keeps EOS unambiguous; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_dir, tokenizer_path=None, lora_model=None, dtype="auto",
                             device="auto", trust_remote_code=False, is_trainable=False, tokenizer=None,
                             quantization="none", prompt_style=None):
    """Base model (+ optional LoRA adapter) and its tokenizer, ready on `device`.

    `quantization` 4bit or 8bit stores the base model's linear layers (all but the output layer)
    in bitsandbytes' NF4 or int8 while they load, on `device`, which they then cannot leave;
    everything else, and an adapter, stays in `dtype`.

    The tokenizer comes from `tokenizer_path`, else the adapter folder when it holds one, else
    `model_dir` (or is the already loaded `tokenizer`). A tokenizer larger than the model's embedding (Chinese-Alpaca's pad token:
    49,954 vs 49,953) resizes the embeddings; a smaller one is refused, since ids past its end
    would be rows the tokenizer never produces but the adapter may have been trained against.
    """
    from transformers import AutoModelForCausalLM

    model_path = check_model_dir(model_dir, trust_remote_code)
    warn_remote_code(trust_remote_code)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if device.type == "cpu" and torch_dtype == torch.float16:
        raise ModelLoadError("fp16 is not supported on the CPU; use dtype=float32 or bfloat16")
    check_quantization(quantization, device)
    quantized = {}
    if quantization != "none":
        quantized = dict(quantization_config=quantization_config(quantization, torch_dtype), device_map={"": device})
    if tokenizer_path is None:
        tokenizer_path = lora_model if _has_tokenizer(lora_model) else model_path
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    if prompt_style:
        check_prompt_style(prompt_style, tokenizer)  # a chat template that cannot be used fails before the weights
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=torch_dtype, trust_remote_code=trust_remote_code, **quantized
    )
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(len(tokenizer))
    elif len(tokenizer) < vocab:
        raise ModelLoadError(
            f"tokenizer '{tokenizer_path}' has {len(tokenizer)} tokens but model '{model_dir}' has "
            f"{vocab} embeddings; use the tokenizer that belongs to this model (--tokenizer_path)"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if quantization == "4bit" and device.type == "cpu":
        keep_4bit_numerics(model)
    if lora_model:
        model = apply_adapter(model, lora_model, is_trainable=is_trainable)
    if not quantized:  # quantised layers were loaded onto `device`
        model.to(device)
    if not is_trainable:
        model.eval()
    return model, tokenizer


@contextlib.contextmanager
def peft_quietly():
    """PEFT asks the model whether it checkpoints through a property transformers deprecates,
    warning on every adapter loaded or made; nothing the user can act on, so that one warning
    is silenced while PEFT wraps the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_adapter(model, lora_model, is_trainable=False):
    from peft import PeftModel

    path = Path(lora_model)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"lora_model '{lora_model}' holds no adapter_config.json")
    check_adapter_config(path)
    args_file = path / TRAIN_ARGS_FILE
    if args_file.is_file():
        trained_vocab = json.loads(args_file.read_text(encoding="utf-8")).get("vocab_size")
        vocab = model.get_input_embeddings().weight.shape[0]
        if trained_vocab is not None and trained_vocab != vocab:
            raise ModelLoadError(
                f"adapter '{lora_model}' was trained with a vocabulary of {trained_vocab} tokens, "
                f"but the base model has {vocab}"
            )
    try:
        with peft_quietly():
            return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)
    except pickle.UnpicklingError:
        # PEFT reads adapter_model.bin with weights_only=True, which refused what the file holds.
        raise ModelLoadError(
            f"adapter '{lora_model}': adapter_model.bin holds pickled objects other than tensors and is not "
            f"loaded (it could run code); use an adapter saved as adapter_model.safetensors (this project's "
            f"training writes only those)") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        # PEFT prints one "size mismatch" line per tensor (60 for a 7B adapter): show the first.
        first = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise ModelLoadError(
            f"adapter '{lora_model}' does not fit this base model ({first}); use the base model it was "
            f"trained on (model_dir in its {TRAIN_ARGS_FILE}) and an unedited adapter_config.json"
        ) from None
    except Exception as e:
        from safetensors import SafetensorError

        if not isinstance(e, SafetensorError):
            raise
        raise ModelLoadError(
            f"adapter '{lora_model}': its weights file cannot be read ({e}); the file is damaged or "
            f"incomplete: copy it again or export it again from the run's last checkpoint"
        ) from None


def is_full_model(folder):
    """A fully fine-tuned model folder: a HF model directory (config.json) without an adapter."""
    path = Path(folder)
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def check_adapter_config(lora_model):
    """An adapter folder's adapter_config.json, when it has one: valid JSON (PEFT's reader gives a
    traceback for a cut file) and a LoRA adapter, the only kind training writes and merging
    folds into the weights. Read before any weights load."""
    path = Path(lora_model) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the adapter folder is damaged or "
                             f"was cut short: copy it again, or export it again from the run's last checkpoint") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise ModelLoadError(f"adapter '{lora_model}' is a {peft_type or 'untyped'} adapter; this project trains and "
                             f"loads LORA adapters ({path})")
    return config


def read_train_args(lora_model):
    path = Path(lora_model)
    if not path.is_dir():
        raise ModelLoadError(f"adapter folder '{lora_model}' does not exist; train one first (see README)")
    check_adapter_config(path)
    args_file = path / TRAIN_ARGS_FILE
    if not args_file.is_file():
        return None
    try:
        train_args = json.loads(args_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{args_file}: not valid JSON ({e}); it is written by training, restore it from there") from None
    answer_format = check_answer_format(train_args.get("answer_format", DEFAULT_ANSWER_FORMAT),
                                        f"{args_file}: key 'answer_format'")
    if "label_names" in train_args:
        check_label_names(train_args["label_names"], args_file, answer_format)
    style = train_args.get("prompt_style", "alpaca")
    expected = PROMPT_STYLES.get(style)
    if expected is None or train_args.get("prompt_id", expected) != expected:
        raise ModelLoadError(
            f"adapter '{lora_model}' was trained with prompt '{train_args.get('prompt_id')}' (prompt_style "
            f"'{style}'); this code builds {', '.join(f'{k}: {v}' for k, v in PROMPT_STYLES.items())}"
        )
    return train_args


def load_for_inference(lora_model=None, model_dir=None, tokenizer_path=None, dtype="auto", device="auto",
                       trust_remote_code=False, quantization=None, merge_lora=False, prompt_style=None):
    """Model, tokenizer and the training config, from an adapter folder, a fully fine-tuned
    model folder (`lora_model=<save_dir>/model`) or a bare model.

    `merge_lora` folds the adapter into the base weights (PEFT's merge_and_unload) once loaded:
    each adapted layer then runs one matmul instead of three, which per generated token is the
    layers' launch overhead as much as their arithmetic. A 4- or 8-bit base keeps the adapter apart
    (merging would requantise the weights the adapter was trained against).

    `model_dir` given explicitly wins over the one recorded in `train_args.json` (for an
    adapter; a fully fine-tuned folder is its own model and takes no other). So does
    `quantization`: None loads the base as training did (train_args.json's `quantization`), so
    a QLoRA adapter runs on the same 4-bit weights it was trained against.

    The prompt style (`prompt_style`, else the adapter's) is checked against the tokenizer
    before the weights load.
    """
    train_args = {}
    if lora_model and is_full_model(lora_model):
        if model_dir and Path(model_dir).resolve() != Path(lora_model).resolve():
            raise ModelLoadError(
                f"'{lora_model}' is a fully fine-tuned model, not an adapter: it needs no base model "
                f"(drop model_dir '{model_dir}')"
            )
        train_args = read_train_args(lora_model) or {}
        model, tokenizer = load_model_and_tokenizer(lora_model, tokenizer_path=tokenizer_path, dtype=dtype,
                                                    device=device, trust_remote_code=trust_remote_code,
                                                    quantization=quantization or "none",
                                                    prompt_style=prompt_style or train_args.get("prompt_style"))
        return model, tokenizer, train_args
    if lora_model:
        train_args = read_train_args(lora_model)
        if train_args is None:
            if not model_dir:
                raise ModelLoadError(
                    f"adapter '{lora_model}' has no {TRAIN_ARGS_FILE}; pass --model_dir=<base model>"
                )
            train_args = {}
        recorded = train_args.get("model_dir")
        if model_dir and recorded and Path(model_dir).resolve() != Path(recorded).resolve():
            print(f"warning: --model_dir={model_dir} differs from the base model the adapter was trained on "
                  f"({recorded}, in {Path(lora_model) / TRAIN_ARGS_FILE})", file=sys.stderr)
        if not model_dir and recorded and not Path(recorded).is_absolute() and not Path(recorded).is_dir():
            # Training records model_dir as it was given: relative to where training ran.
            raise ModelLoadError(
                f"{Path(lora_model) / TRAIN_ARGS_FILE} records model_dir '{recorded}', a path relative to the folder "
                f"training ran in, and {Path.cwd()} holds no such folder; run from that folder or pass "
                f"--model_dir=<base model>")
        model_dir = model_dir or recorded
    if not model_dir:
        raise ModelLoadError("no base model: pass --model_dir or --lora_model=<trained adapter folder>")
    if quantization is None:
        quantization = check_quantization_name(train_args.get("quantization", "none"),
                                               f"{Path(lora_model or '') / TRAIN_ARGS_FILE}: key 'quantization'")
    model, tokenizer = load_model_and_tokenizer(
        model_dir, tokenizer_path=tokenizer_path, lora_model=lora_model, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code,  # never taken from train_args.json: an adapter cannot turn it on
        quantization=quantization, prompt_style=prompt_style or train_args.get("prompt_style"),
    )
    if merge_lora and lora_model and quantization == "none":
        model = model.merge_and_unload()
    return model, tokenizer, train_args
