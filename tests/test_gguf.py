"""model_hub/convert_gguf_to_hf.py on tiny GGUF files written here, and its one-line refusals.

The files are written the way llama.cpp's convert_hf_to_gguf.py writes them, with the `gguf`
package's GGUFWriter, from tiny random HF models: tensor names from a table written out here
(GGUF's standard names), LLaMA's q/k rows in Meta's interleaved order, Gemma's norms stored as
1 + w, one tensor as Q8_0 blocks. The expected weights are the source model's own tensors (and
for the Q8_0 tensor the blocks dequantised by hand), and the expected logits the source
model's forward pass: nothing of the converter or of transformers' GGUF reader computes them.
"""
import json
import os

import gguf
import numpy as np
import pytest
import torch

from conftest import ROOT
from model_hub import convert_gguf_to_hf as convert
from model_hub._llama_layout import hf_to_meta_permute
from test_model_hub import SENTENCES, assert_one_line_error, spm_dir  # noqa: F401 (spm_dir: a fixture)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6)
# HF name inside model.layers.N. -> GGUF name inside blk.N., per architecture (GGUF's standard
# tensor names, as llama.cpp's gguf-py/gguf/tensor_mapping.py lists them).
LAYER_NAMES = {
    "llama": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"},
    "gemma3": {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
}
COMMON_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                      "mlp.down_proj": "ffn_down"}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
QUANTIZED = "model.layers.1.mlp.down_proj.weight"  # written as Q8_0 blocks (its rows are 128 = 4 blocks of 32)


def gguf_name(hf_name, arch):
    base = hf_name.removesuffix(".weight")
    if base in GLOBAL_NAMES:
        return GLOBAL_NAMES[base] + ".weight"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{({**COMMON_LAYER_NAMES, **LAYER_NAMES[arch]})[rest]}.weight"


def tiny_source_model(arch, vocab):  # vocab: gguf_vocab's
    """A tiny random model whose every weight matters: norms and all drawn at random (Gemma's
    norms start at 0 otherwise), as multiples of 1/1024 so that 1 + w is exact in float32."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    torch.manual_seed(0)
    ids = dict(vocab_size=len(vocab[1]), bos_token_id=vocab[4]["bos"], eos_token_id=vocab[4]["eos"])
    if arch == "llama":
        config = LlamaConfig(**ids, tie_word_embeddings=False, **TINY)
    else:
        config = Gemma3TextConfig(**ids, pad_token_id=0, sliding_window=8, tie_word_embeddings=True, **TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randint(-512, 512, p.shape) / 1024)
    return model


# Gemma's special tokens come first in its vocabulary, as in the real file: <pad> 0, <eos> 1, <bos> 2,
# <unk> 3, <mask> 4 (the tokenizer class adds any of them the vocabulary lacks, past its end).
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def gguf_vocab(spm_dir, arch):
    """(SentencePiece processor, tokens, scores, token types, {bos, eos, unk, pad: id}) for the file:
    the tiny SentencePiece vocabulary, with Gemma's special tokens in place of LLaMA's for gemma3."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    # SentencePiece's piece types as gguf's TokenType (llama.cpp's convert does the same).
    types = [gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
    tokens, scores = [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)]
    if arch == "llama":
        return sp, tokens, scores, types, {"bos": 1, "eos": 2, "unk": 0, "pad": None}
    special_types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL]
    return (sp, GEMMA_SPECIALS + tokens[3:], [0.0] * 5 + scores[3:], special_types + types[3:],
            {"bos": 2, "eos": 1, "unk": 3, "pad": 0})


def write_gguf(path, arch, model, vocab, quantize=(), tokenizer=True, chat_template=None, alignment=None):
    """`model` as llama.cpp writes it (F32 tensors, the names in `quantize` as Q8_0), with the
    vocabulary in its metadata unless `tokenizer` is False, and `chat_template` if given."""
    _, tokens, scores, types, ids = vocab
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    else:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
        w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    if tokenizer:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(ids["bos"])
        w.add_eos_token_id(ids["eos"])
        w.add_unk_token_id(ids["unk"])
        if ids["pad"] is not None:
            w.add_pad_token_id(ids["pad"])
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied head is not written: its absence is how a GGUF says "tied"
        t = t.detach().float()
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            t = hf_to_meta_permute(t, c.num_attention_heads)  # llama.cpp's own q/k row order
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            t = hf_to_meta_permute(t, c.num_key_value_heads)
        if arch == "gemma3" and "norm" in name:
            t = t + 1  # Gemma scales by 1 + w; llama.cpp stores the sum
        data = t.numpy()
        if name in quantize:
            w.add_tensor(gguf_name(name, arch), gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name, arch), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q8_0_by_hand(t):
    """A tensor's values after Q8_0 as ggml defines them (quantize_row_q8_0_ref): blocks of 32
    along a row, each with the scale d = max|x| / 127 (stored as fp16) and 32 int8
    q = roundf(x * (1 / d)) computed with the unrounded d; the value read back is fp16(d) * q."""
    blocks = t.detach().float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    scaled = blocks * inverse
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # C's roundf: halves away from zero
    return (d.half().float() * q).reshape(t.shape)


def tiny_file(arch, spm_dir, d):  # noqa: F811 (spm_dir is the imported fixture)
    vocab = gguf_vocab(spm_dir, arch)
    source = tiny_source_model(arch, vocab)
    return source, vocab, write_gguf(d / f"tiny-{arch}.gguf", arch, source, vocab, quantize={QUANTIZED})


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def converted(request, spm_dir, tmp_path_factory):  # noqa: F811
    arch = request.param
    d = tmp_path_factory.mktemp(f"gguf-{arch}")
    source, vocab, path = tiny_file(arch, spm_dir, d)
    out = convert.main([f"--gguf_file={path}", f"--output_dir={d / 'hf'}"])
    return {"arch": arch, "source": source, "gguf": path, "out": out, "vocab": vocab}


def test_converted_weights_equal_the_source_tensors(converted):
    from safetensors.torch import load_file

    source, out = converted["source"], converted["out"]
    saved = load_file(str(out / "model.safetensors"))
    expected = {k: v for k, v in source.state_dict().items()}
    if source.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # saved once, as the embedding
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        want = q8_0_by_hand(tensor) if name == QUANTIZED else tensor
        assert saved[name].dtype == torch.float32, name  # auto: a file holding quantized blocks -> float32
        assert torch.equal(saved[name], want), name
    # The quantized tensor really went through Q8_0 (so the check above is not comparing the source with itself).
    assert not torch.equal(q8_0_by_hand(source.state_dict()[QUANTIZED]), source.state_dict()[QUANTIZED])


def test_converted_folder_is_an_ordinary_hf_model(converted):
    """The project's loader opens it, its logits are the source model's (the same weights under the
    same configuration), and its tokenizer holds the GGUF's vocabulary and special tokens."""
    from model_utils import load_model_and_tokenizer

    arch, source, out = converted["arch"], converted["source"], converted["out"]
    config = json.loads((out / "config.json").read_text())
    expected_class = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
    assert config["architectures"] == [expected_class] and config["dtype"] == "float32"
    assert "quantization_config" not in config
    sp, tokens, ids = converted["vocab"][0], converted["vocab"][1], converted["vocab"][4]
    assert (config["bos_token_id"], config["eos_token_id"]) == (ids["bos"], ids["eos"])
    model, tokenizer = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
    assert type(model).__name__ == expected_class
    assert len(tokenizer) == len(tokens)  # nothing added past the vocabulary: no embedding resize
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (ids["bos"], ids["eos"], ids["unk"])
    assert tokenizer("文本").input_ids[0] == ids["bos"]  # plain tokenizer(text) starts with BOS, as the file says
    ids = torch.tensor([[ids["bos"]] + sp.encode(SENTENCES[1]) + sp.encode(SENTENCES[0])])
    if arch == "gemma3":
        assert ids.shape[1] > source.config.sliding_window  # the sliding window is in play
    with torch.no_grad():
        want = source(ids).logits
        got = model(ids).logits
    q = source.state_dict()[QUANTIZED]
    with torch.no_grad():  # the source with its one tensor as the file holds it
        q_copy = q.clone()
        source.get_parameter(QUANTIZED).copy_(q8_0_by_hand(q))
        want_q = source(ids).logits
        source.get_parameter(QUANTIZED).copy_(q_copy)
    torch.testing.assert_close(got, want_q, atol=1e-5, rtol=1e-5)
    assert (got - want).abs().max() > 0  # Q8_0 changed something: the comparison above is the file's values
    if arch == "llama":
        # A sentencepiece vocabulary with scores: the rebuilt tokenizer cuts text as SentencePiece does.
        assert tokenizer(SENTENCES[1]).input_ids == [sp.bos_id()] + sp.encode(SENTENCES[1])


def test_dtype_and_overwrite(converted, tmp_path):
    out = tmp_path / "bf16"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    convert.main([f"--gguf_file={converted['gguf']}", f"--output_dir={out}", "--dtype=bfloat16", "--overwrite=True"])
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    embed = converted["source"].state_dict()["model.embed_tokens.weight"]
    assert torch.equal(saved["model.embed_tokens.weight"], embed.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # The folder was replaced as a whole: nothing of the earlier one is left, nothing beside it either.
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


# --------------------------------------------------------------------------- refusals, one line each

@pytest.fixture(scope="module")
def tiny_gguf(spm_dir, tmp_path_factory):  # noqa: F811
    return tiny_file("gemma3", spm_dir, tmp_path_factory.mktemp("gguf-file"))[2]


def run_refused(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    return assert_one_line_error(capsys, e, *fragments)


@pytest.mark.parametrize("keep", [3, 20, 2000, "data"])
def test_cut_short_file_is_one_line(tiny_gguf, tmp_path, capsys, keep):
    data = tiny_gguf.read_bytes()
    keep = len(data) - 100 if keep == "data" else keep  # inside the tensor data, or inside the header
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    fragments = ("not a GGUF file",) if keep < 4 else ("cut short",)
    run_refused(capsys, [f"--gguf_file={cut}", f"--output_dir={tmp_path / 'out'}"], str(cut), *fragments)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # no temporary folder left behind


def test_foreign_file_is_one_line(spm_dir, tmp_path, capsys):  # noqa: F811
    other = spm_dir / "tokenizer.model"
    run_refused(capsys, [f"--gguf_file={other}", f"--output_dir={tmp_path / 'out'}"],
                str(other), "not a GGUF file", "b'GGUF'")


def test_unsupported_version_is_one_line(tiny_gguf, tmp_path, capsys):
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    old = tmp_path / "v1.gguf"
    old.write_bytes(bytes(data))
    run_refused(capsys, [f"--gguf_file={old}", f"--output_dir={tmp_path / 'out'}"], "GGUF version 1")


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    # rwkv6 is a real llama.cpp architecture that transformers does not read from GGUF.
    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    run_refused(capsys, [f"--gguf_file={path}", f"--output_dir={tmp_path / 'out'}"],
                str(path), "'rwkv6' model, which transformers cannot read from GGUF")
    assert not (tmp_path / "out").exists()


def test_missing_file_is_one_line(tmp_path, capsys):
    run_refused(capsys, [f"--gguf_file={tmp_path / 'nope.gguf'}", f"--output_dir={tmp_path / 'out'}"],
                "does not exist")


def test_existing_output_is_kept(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    run_refused(capsys, [f"--gguf_file={tiny_gguf}", f"--output_dir={out}"], "not empty", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_output_holding_the_source_is_refused(tiny_gguf, tmp_path, capsys):
    d = tmp_path / "models"
    d.mkdir()
    src = d / "sub" / "tiny.gguf"
    src.parent.mkdir()
    src.write_bytes(tiny_gguf.read_bytes())
    run_refused(capsys, [f"--gguf_file={src}", f"--output_dir={d}", "--overwrite=True"], "inside output_dir")
    assert src.is_file()


def test_default_source_without_its_packages_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, convert.PACKAGE, None)  # as if it were not installed
    run_refused(capsys, [f"--output_dir={tmp_path / 'out'}"], "make gemma", "requirements-gemma.txt")


# --------------------------------------------------------------------------- the real Gemma 3 270M

GEMMA_DIR = ROOT / "model_hub" / "gemma-3-270m"


@pytest.mark.slow
@pytest.mark.skipif(not (GEMMA_DIR / "config.json").is_file(),
                    reason="model_hub/gemma-3-270m/ is absent (make gemma converts it; tests never download)")
def test_real_gemma_tokenizes_trains_and_scores(train16, tmp_path):
    """The converted Gemma 3 270M end to end: an MSRA example's tokens, two LoRA steps through
    train_trainer.py, test.py on two sentences."""
    from conftest import load_script
    from dataset import NerCollate, load_data
    from model_utils import load_tokenizer

    tokenizer = load_tokenizer(GEMMA_DIR)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    record = next(r for r in load_data(train16) if "\n" in r["answer"])  # an answer of several lines
    encoded = NerCollate({"prompt_style": "alpaca"}, tokenizer).encode(record)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids[0] == 2 and ids[-1] == 1  # <bos> prompt answer <eos>
    answer = [t for t in labels if t != -100]
    assert answer == tokenizer.encode(record["answer"], add_special_tokens=False) + [1]
    assert 107 in answer  # Gemma's newline token separates the answer lines
    assert 90 <= len(ids) <= 160  # about 114 tokens for an MSRA example

    save_dir = tmp_path / "run"
    options = {"model_dir": GEMMA_DIR, "train_path": train16, "dev_path": "", "save_dir": save_dir,
               "max_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
               "log_steps": 1, "save_steps": 2, "eval_steps": 0, "lora_dropout": 0.0}
    load_script("train_trainer").main([f"--{k}={v}" for k, v in options.items()])
    adapter = save_dir / "adapter_model"
    log = json.loads((adapter / "log_history.json").read_text())
    losses = [row["loss"] for row in log if "loss" in row]
    # A random model starts at ln(262,144) = 12.5 nats per token; a pretrained one far below.
    assert len(losses) == 2 and all(0 < loss < 7 for loss in losses), losses
    assert json.loads((adapter / "train_args.json").read_text())["prompt_style"] == "alpaca"

    out = tmp_path / "eval"
    metrics = load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", "--limit=2",
                                        "--batch_size=2", "--max_new_tokens=16", f"--output_dir={out}"])
    assert metrics["num_examples"] == 2 and metrics["unparseable_lines"] == 0  # grounded decoding
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(row["output"] for row in rows)  # grounded answers: never empty


# --------------------------------------------------------------------------- output folders, leftovers

@pytest.fixture
def no_conversion(monkeypatch):
    """Fail loudly if a conversion starts: proves a refusal came before the long work."""
    def boom(*args, **kwargs):
        raise AssertionError("the conversion started before the error")

    monkeypatch.setattr(convert, "load_config", boom)


def test_linked_output_dir_is_refused_and_left_alone(tiny_gguf, tmp_path, capsys, no_conversion):
    target = tmp_path / "real-model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    link = tmp_path / "model"
    link.symlink_to(target)
    run_refused(capsys, [f"--gguf_file={tiny_gguf}", f"--output_dir={link}", "--overwrite=True"],
                f"output_dir '{link}' is a symbolic link (to {target})")
    assert link.is_symlink() and os.listdir(target) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "real-model"]  # nothing hidden beside them


KILLED_DURING_WRITE = """
import os, sys
sys.path.insert(0, {root!r})
from model_hub import convert_gguf_to_hf as convert
write = convert.write_model
def write_then_die(*args):
    write(*args)
    os._exit(9)  # as kill -9 would: no cleanup of any kind
convert.write_model = write_then_die
convert.main({argv!r})
"""


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next(tiny_gguf, tmp_path):
    import subprocess
    import sys

    out, temp = tmp_path / "models" / "tiny", tmp_path / "tmp"
    temp.mkdir()
    argv = [f"--gguf_file={tiny_gguf}", f"--output_dir={out}"]
    env = {**os.environ, "TMPDIR": str(temp)}
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_WRITE.format(root=str(ROOT), argv=argv)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 9, killed.stderr[-2000:]
    left = [p for p in [*out.parent.iterdir(), *temp.iterdir()] if p.name.startswith((".", "gguf-"))]
    assert left, "the killed run left nothing to clean up"
    done = subprocess.run([sys.executable, "model_hub/convert_gguf_to_hf.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"] and list(temp.iterdir()) == []
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("where, fragment", [("under_a_file", "is a file, not a folder"),
                                             ("unwritable", "cannot write in /proc/")])
def test_output_dir_that_cannot_be_written_fails_before_converting(tiny_gguf, tmp_path, capsys, where, fragment,
                                                                    no_conversion):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "model" if where == "under_a_file" else "/proc/no-such-folder/model"
    run_refused(capsys, [f"--gguf_file={tiny_gguf}", f"--output_dir={out}"], "config key 'output_dir'", fragment)


def test_default_source_with_a_part_missing_is_one_line(tmp_path, capsys, monkeypatch, no_conversion):
    import sys

    pytest.importorskip(convert.PACKAGE)  # installed by make gemma (requirements-gemma.txt)
    monkeypatch.setitem(sys.modules, convert.PACKAGE + "_part3", None)  # as if that package were not installed
    run_refused(capsys, [f"--output_dir={tmp_path / 'out'}"], "cannot rebuild", "a part is missing",
                convert.PACKAGE + "_part3", "requirements-gemma.txt")
    assert not (tmp_path / "out").exists()


def test_zero_alignment_is_one_line(spm_dir, tmp_path, capsys, no_conversion):  # noqa: F811
    import struct

    vocab = gguf_vocab(spm_dir, "gemma3")
    good = write_gguf(tmp_path / "aligned32.gguf", "gemma3", tiny_source_model("gemma3", vocab), vocab, alignment=32)
    entry = struct.pack("<Q", len("general.alignment")) + b"general.alignment" + struct.pack("<I", 4)
    data = good.read_bytes()
    assert data.count(entry + struct.pack("<I", 32)) == 1
    bad = tmp_path / "aligned0.gguf"
    bad.write_bytes(data.replace(entry + struct.pack("<I", 32), entry + struct.pack("<I", 0)))
    run_refused(capsys, [f"--gguf_file={bad}", f"--output_dir={tmp_path / 'out'}"], str(bad),
                "general.alignment is 0")


def test_file_without_a_tokenizer_is_one_line(spm_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the error")

    monkeypatch.setattr(convert, "load_dequantised", no_weights)
    vocab = gguf_vocab(spm_dir, "gemma3")
    path = write_gguf(tmp_path / "no-tokenizer.gguf", "gemma3", tiny_source_model("gemma3", vocab), vocab,
                      tokenizer=False)
    run_refused(capsys, [f"--gguf_file={path}", f"--output_dir={tmp_path / 'out'}"], str(path),
                "no tokenizer in its metadata (tokenizer.ggml.tokens)")


# --------------------------------------------------------------------------- the chat template it copies

@pytest.mark.parametrize("template, verdict", [
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}<assistant>",
     "prompt_style=chat_template can use it"),
    ("{{ ''.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
     "prompt_style=chat_template refuses it: the chat template in {out}/chat_template.jinja cannot be used: the "
     "sandbox refused it"),
])
def test_converter_says_what_chat_template_it_copied(spm_dir, tmp_path, capsys, template, verdict):  # noqa: F811
    vocab = gguf_vocab(spm_dir, "gemma3")
    path = write_gguf(tmp_path / "chat.gguf", "gemma3", tiny_source_model("gemma3", vocab), vocab,
                      chat_template=template)
    out = tmp_path / "out"
    convert.main([f"--gguf_file={path}", f"--output_dir={out}"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("chat template:")]
    assert len(lines) == 1
    assert f"{len(template):,} characters from the GGUF's metadata" in lines[0]
    assert verdict.format(out=out) in lines[0]
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == template
