"""What a LoRA merge reads: a base model's weight files (one file, one tensor at a time) and each
LoRA adapter folder (its low-rank updates per base weight and its full replacement weights),
checked before anything is written. merge_llama_with_chinese_lora.py merges them.
"""
import math
import re
from pathlib import Path

from model_utils import check_model_dir
from model_hub._llama_layout import IGNORED_TENSORS, ModelHubError, load_torch_file, read_json, safetensors_read

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
