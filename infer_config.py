"""Which settings does inference run with, and are they valid before anything loads?

The config keys test.py, predict.py and serve.py share (`INFER_DEFAULTS`), their checks
(`check_infer_config`, before any weights load), what an adapter's train_args.json says its
answers are (label set, instruction, answer format) and the loader driven by those keys
(`load_from_config`). Loading itself is model_utils.py's; it imports nothing from here, so
training never pulls in the grammar.
"""
from answer_format import DEFAULT_ANSWER_FORMAT, DEFAULT_LABEL_NAMES, ner_instruct
from config_utils import ConfigError
from dataset import read_data_info
from grounding import DEFAULT_POLICY, policy_problem
from devices import check_device
from model_utils import load_for_inference, read_train_args, resolve_dtype
from quantization import check_quantization_name

# Config keys shared by test.py, predict.py and serve.py.
INFER_DEFAULTS = {
    "lora_model": "./checkpoint/msra/train_trainer/adapter_model",  # trained adapter folder, or <save_dir>/model of a full fine-tune
    "no_adapter": False,  # True: evaluate the base model alone (needs model_dir)
    "model_dir": None,  # None: the base model recorded in the adapter's train_args.json
    "tokenizer_path": None,  # None: the adapter's tokenizer, else model_dir's
    "batch_size": 32,  # prompts generated together (similar lengths are grouped)
    "max_new_tokens": 64,  # answer budget; MSRA answers are ~10 tokens, the longest ~60
    "grounded": True,  # answers may only name substrings of the sentence and the label set's types (grounding.py)
    "grounding_policy": DEFAULT_POLICY,  # greedy grounded choice: best_allowed (only allowed tokens' logits) or first_choice (README)
    "eos_penalty": 0.0,  # grounded: logit taken from EOS where an answer could end; >0 lists more entities (README)
    "dtype": "auto",  # auto: bf16/fp16 on a GPU, fp32 on CPU
    "device": "auto",  # auto: cuda when available, else cpu; or e.g. cuda:1
    "trust_remote_code": False,  # run code shipped with the model (only for models transformers lacks)
    "quantization": None,  # None: as the adapter was trained (train_args.json), else none; or none, 4bit, 8bit
    "merge_lora": True,  # fold the adapter into the base weights once at load (same model, fewer matmuls); not for a 4/8-bit base
}


def check_infer_config(cfg):
    """The INFER_DEFAULTS keys that can be wrong without loading anything: checked first."""
    for key in ("batch_size", "max_new_tokens"):
        if cfg[key] < 1:
            raise ConfigError(f"config key '{key}': {cfg[key]} must be at least 1")
    resolve_dtype(cfg.dtype)
    check_device(cfg.device)
    problem = policy_problem(cfg.grounding_policy)
    if problem:
        raise ConfigError(f"config key 'grounding_policy': {problem}")
    if cfg.quantization is not None:
        check_quantization_name(cfg.quantization)
    if cfg.no_adapter and not cfg.model_dir:
        raise ConfigError("no_adapter=True needs --model_dir=<base model>")


def recorded_args(cfg):
    """The adapter's train_args.json ({} for no_adapter or an adapter without one), read before any
    weights load so that columns and labels can be checked first."""
    return {} if cfg.no_adapter else (read_train_args(cfg.lora_model) or {})


def label_names_for(train_args, data_path=None):
    """The label set answers are read with: the adapter's (train_args.json), else the one
    process.py wrote beside the data, else MSRA's."""
    info = (read_data_info(data_path) if data_path else None) or {}
    return train_args.get("label_names") or info.get("label_names") or DEFAULT_LABEL_NAMES


def instruct_for(train_args):
    """The instruction plain texts get: the one the adapter was trained with, else the standard one."""
    return train_args.get("instruct") or ner_instruct(label_names_for(train_args), answer_format_for(train_args))


def answer_format_for(train_args):
    """The answer format the adapter was trained on (train_args.json; checked when it was read):
    answers are read and grounded with it and no other. Adapters trained before formats existed
    wrote the seed format."""
    return train_args.get("answer_format", DEFAULT_ANSWER_FORMAT)


def load_from_config(cfg):
    """load_for_inference driven by INFER_DEFAULTS keys; returns model, tokenizer, train_args."""
    return load_for_inference(
        None if cfg.no_adapter else cfg.lora_model, model_dir=cfg.model_dir,
        tokenizer_path=cfg.tokenizer_path, dtype=cfg.dtype, device=cfg.device,
        trust_remote_code=cfg.trust_remote_code, quantization=cfg.quantization, merge_lora=cfg.merge_lora,
    )
