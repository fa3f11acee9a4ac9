"""model_hub/convert_llama_weights_to_hf.py and merge_llama_with_chinese_lora.py on tiny models.

Golden logits come from computations that share no code with the scripts: a forward pass
written here in Meta's own formulation (complex rotary on interleaved pairs) for the
converter, and PEFT applying the adapters for the merge.
"""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from answer_format import DEFAULT_INSTRUCT
from dataset import PROMPT_ID, PROMPT_TEMPLATE, QUERY_PREFIX, encode_prompt
from model_hub import convert_llama_weights_to_hf as convert
from model_hub import merge_llama_with_chinese_lora as merge
from model_utils import load_model_and_tokenizer
from generation import generate

CONVERT = ROOT / "model_hub" / "convert_llama_weights_to_hf.py"
MERGE = ROOT / "model_hub" / "merge_llama_with_chinese_lora.py"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SENTENCES = ["中共中央致中国致公党十一大的贺词", "北京大学的张三在上海工作", "今天天气很好，没有实体",
             "The quick brown fox jumps over the lazy dog 123"]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A SentencePiece BPE tokenizer.model with LLaMA's conventions, trained in a second."""
    import random

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    chars = sorted(set("".join(SENTENCES) + DEFAULT_INSTRUCT))
    lines = [PROMPT_TEMPLATE.format(instruction=DEFAULT_INSTRUCT + "\n" + QUERY_PREFIX)] * 50
    lines += ["".join(rng.choice(chars) for _ in range(rng.randint(5, 30))) for _ in range(300)]
    (d / "corpus.txt").write_text("\n".join(x.replace("\n", " ") for x in lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    (d / "corpus.txt").unlink()
    return d


def spm_size(spm_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model")).get_piece_size()


def meta_ffn_size(dim, multiple_of, mult=None):
    # Meta's llama/model.py FeedForward.__init__.
    hidden = int(2 * (4 * dim) / 3)
    if mult is not None:
        hidden = int(mult * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Dimension each tensor is split along in Meta's model-parallel shards (fairscale layers).
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def random_meta_weights(params, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    dim, nh = params["dim"], params["n_heads"]
    nkv, hd = params.get("n_kv_heads", nh), params["dim"] // params["n_heads"]
    ffn = meta_ffn_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    w = {"tok_embeddings.weight": rnd(vocab, dim, scale=1.0), "norm.weight": 1 + rnd(dim),
         "output.weight": rnd(vocab, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        w.update({p + "attention.wq.weight": rnd(nh * hd, dim), p + "attention.wk.weight": rnd(nkv * hd, dim),
                  p + "attention.wv.weight": rnd(nkv * hd, dim), p + "attention.wo.weight": rnd(dim, nh * hd),
                  p + "feed_forward.w1.weight": rnd(ffn, dim), p + "feed_forward.w2.weight": rnd(dim, ffn),
                  p + "feed_forward.w3.weight": rnd(ffn, dim), p + "attention_norm.weight": 1 + rnd(dim),
                  p + "ffn_norm.weight": 1 + rnd(dim)})
    return w


def write_meta_checkpoint(model_dir, params, weights, n_shards):
    """params.json + consolidated.NN.pth, each shard holding its slice as Meta's code saves it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "params.json").write_text(json.dumps(params))
    for s in range(n_shards):
        shard = {}
        for name, t in weights.items():
            split = META_SPLIT.get(name.split(".")[-2])
            shard[name] = t.chunk(n_shards, dim=split)[s].clone() if split is not None else t.clone()
        shard["rope.freqs"] = torch.zeros(params["dim"] // params["n_heads"] // 2)  # LLaMA-1 ships it
        torch.save(shard, model_dir / f"consolidated.{s:02d}.pth")


def meta_reference_logits(w, params, tokens):
    """LLaMA's forward as Meta's llama/model.py writes it: interleaved pairs rotated as complex
    numbers, RMSNorm, grouped KV heads repeated, SwiGLU, causal attention."""
    dim, nh = params["dim"], params["n_heads"]
    nkv, hd, eps = params.get("n_kv_heads", nh), dim // nh, params["norm_eps"]
    bsz, seqlen = tokens.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(seqlen, hd // 2), torch.outer(torch.arange(seqlen).float(), freqs))

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotary(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.view(1, seqlen, 1, hd // 2)).flatten(3)

    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        q = rotary((x @ w[p + "attention.wq.weight"].T).view(bsz, seqlen, nh, hd))
        k = rotary((x @ w[p + "attention.wk.weight"].T).view(bsz, seqlen, nkv, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(bsz, seqlen, nkv, hd)
        k, v = (t[:, :, :, None, :].expand(bsz, seqlen, nkv, nh // nkv, hd).reshape(bsz, seqlen, nh, hd)
                for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = F.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        h = h + (scores @ v).transpose(1, 2).reshape(bsz, seqlen, -1) @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)) \
            @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["output.weight"].T


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def run_script(script, args, cwd):
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(capsys, excinfo, *fragments):
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


# --------------------------------------------------------------------------- convert

CONVERT_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
                  "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "vocab_size": -1}


def test_convert_two_shards_matches_meta_reference(spm_dir, tmp_path, capsys):
    vocab = spm_size(spm_dir)
    weights = random_meta_weights(CONVERT_PARAMS, vocab, seed=1)
    write_meta_checkpoint(tmp_path / "7B", CONVERT_PARAMS, weights, n_shards=2)
    shutil.copy(spm_dir / "tokenizer.model", tmp_path / "tokenizer.model")

    # The original repository's command line, from inside model_hub-like folder.
    proc = run_script(CONVERT, ["--input_dir", "./", "--model_size", "7B", "--output_dir", "./7B-hf"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "7B-hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) >= {"model.embed_tokens.weight", "lm_head.weight",
                                        "model.layers.1.self_attn.k_proj.weight"}
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (2, 224)  # 32*ceil(int(1.3*170)/32)

    # The original repository's second step, rewriting the tokenizer of the converted folder.
    convert.main(["--input_dir", str(tmp_path), "--model_size", "tokenizer_only", "--output_dir", str(out)])
    model, tokenizer = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert tokenizer.encode(SENTENCES[1], add_special_tokens=False) == sp.encode(SENTENCES[1])

    tokens = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = meta_reference_logits(weights, CONVERT_PARAMS, tokens)
    got = hf_logits(model, tokens)
    assert expected.abs().max() > 1  # logits far from zero: a wrong permutation cannot pass by luck
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- merge

V_BASE_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=512)


def hf_tokenizer(spm_dir):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(spm_dir), legacy=True)


def save_tokenizer(tokenizer, spm_dir, folder):
    tokenizer.save_pretrained(str(folder))
    shutil.copy(spm_dir / "tokenizer.model", folder / "tokenizer.model")  # as the Chinese LoRAs ship it


@pytest.fixture(scope="module")
def tiny_base(spm_dir, tmp_path_factory):
    """A tiny HF LLaMA saved in several safetensors shards, with the spm tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hub") / "7B-hf"
    torch.manual_seed(0)
    tokenizer = hf_tokenizer(spm_dir)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **V_BASE_SHAPE))
    model.save_pretrained(str(d), max_shard_size="200KB")
    save_tokenizer(tokenizer, spm_dir, d)
    assert len(list(d.glob("model-*.safetensors"))) > 1
    return d


def load_base(base_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


def make_lora(base_model, folder, perturb_saved_modules=False, safe=True, **lora_args):
    """A PEFT LoRA with non-zero A and B; modules_to_save copies are moved off the base."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base_model, LoraConfig(init_lora_weights=False, **lora_args))
    if perturb_saved_modules:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(str(folder), safe_serialization=safe)
    return peft_model


@pytest.fixture(scope="module")
def chinese_loras(spm_dir, tiny_base):
    """Like chinese-llama-plus-lora (all projections, .bin) and chinese-alpaca-plus-lora
    (q/v, embed_tokens and lm_head saved whole, a tokenizer one token larger: the pad)."""
    hub = tiny_base.parent
    llama_lora, alpaca_lora = hub / "chinese-llama-plus-lora-7b", hub / "chinese-alpaca-plus-lora-7b"
    torch.manual_seed(1)
    make_lora(load_base(tiny_base), llama_lora, safe=False, r=4, lora_alpha=8, target_modules=PROJECTIONS)
    save_tokenizer(hf_tokenizer(spm_dir), spm_dir, llama_lora)

    tokenizer = hf_tokenizer(spm_dir)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    base = load_base(tiny_base)
    base.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(2)
    make_lora(base, alpaca_lora, perturb_saved_modules=True, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
              modules_to_save=["embed_tokens", "lm_head"])
    save_tokenizer(tokenizer, spm_dir, alpaca_lora)
    assert (llama_lora / "adapter_model.bin").is_file()
    return llama_lora, alpaca_lora, len(tokenizer)


def peft_reference(tiny_base, loras, vocab, tokens):
    """Base resized to the final tokenizer, then each adapter applied by PEFT in turn."""
    from peft import PeftModel

    model = load_base(tiny_base)
    model.resize_token_embeddings(vocab)
    for i, lora in enumerate(loras):
        model = PeftModel.from_pretrained(model, str(lora))
        if i < len(loras) - 1:
            model = model.merge_and_unload()
    model.eval()
    return hf_logits(model, tokens)


def test_merge_chinese_loras_matches_peft_and_pth_roundtrip(tiny_base, chinese_loras, tmp_path):
    llama_lora, alpaca_lora, vocab = chinese_loras
    hub = tiny_base.parent
    tokens = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))
    tokens[0, -1] = vocab - 1  # the added pad token: its row comes from the second LoRA
    expected = peft_reference(tiny_base, [llama_lora, alpaca_lora], vocab, tokens)
    base_logits = hf_logits(load_base(tiny_base), tokens[:, :-1])
    assert (expected[:, :-1, :vocab - 1] - base_logits).abs().max() > 0.1  # the LoRAs change the model

    # The original repository's command line (second path without ./, as the original README writes it).
    out = tmp_path / "chinese-alpaca-7b"
    proc = run_script(MERGE, ["--base_model", "./7B-hf", "--lora_model",
                              "./chinese-llama-plus-lora-7b,chinese-alpaca-plus-lora-7b",
                              "--output_type", "huggingface", "--output_dir", str(out)], hub)
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
    assert len(tokenizer) == vocab and model.get_input_embeddings().weight.shape[0] == vocab
    torch.testing.assert_close(hf_logits(model, tokens), expected, atol=1e-4, rtol=0)

    # pth (Meta layout), converted back to HF by the converter, in several output shards.
    pth = tmp_path / "pth"
    merge.main(["--base_model", str(tiny_base), "--lora_model", f"{llama_lora},{alpaca_lora}",
                "--output_type", "pth", "--output_dir", str(pth)])
    params = json.loads((pth / "params.json").read_text())
    assert meta_ffn_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 192
    assert sorted(p.name for p in pth.glob("*.pth")) == ["consolidated.00.pth"]
    back = tmp_path / "back-hf"
    convert.main(["--input_dir", str(pth), "--model_size", "7B", "--output_dir", str(back),
                  "--max_shard_size", "150KB"])
    assert len(list(back.glob("model-*.safetensors"))) > 1
    model, tokenizer = load_model_and_tokenizer(str(back), dtype="float32", device="cpu")
    assert len(tokenizer) == vocab
    torch.testing.assert_close(hf_logits(model, tokens), expected, atol=1e-4, rtol=0)


def test_merge_ner_adapter_for_deployment(spm_dir, tiny_base, tmp_path):
    from model_utils import load_tokenizer

    adapter = tmp_path / "checkpoint" / "adapter_model"
    torch.manual_seed(4)
    make_lora(load_base(tiny_base), adapter, r=4, lora_alpha=8, target_modules=PROJECTIONS,
              modules_to_save=["embed_tokens", "lm_head"], perturb_saved_modules=True)
    tokenizer = load_tokenizer(tiny_base)
    tokenizer.save_pretrained(str(adapter))  # as train_core.py saves beside the adapter
    (adapter / "train_args.json").write_text(json.dumps(
        {"model_dir": str(tiny_base), "vocab_size": len(tokenizer), "prompt_id": PROMPT_ID}))

    model, tokenizer = load_model_and_tokenizer(str(tiny_base), lora_model=str(adapter), dtype="float32", device="cpu")
    prompts = [encode_prompt(tokenizer, DEFAULT_INSTRUCT, QUERY_PREFIX + s) for s in SENTENCES]
    expected = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    expected_logits = hf_logits(model, torch.tensor([prompts[0]]))

    out = tmp_path / "msra-ner-merged"
    merge.main(["--lora_model", str(adapter), "--output_dir", str(out)])  # base from train_args.json
    merged, merged_tokenizer = load_model_and_tokenizer(str(out), dtype="float32", device="cpu")
    assert generate(merged, merged_tokenizer, prompts, max_new_tokens=8, batch_size=4) == expected
    assert any(expected)
    torch.testing.assert_close(hf_logits(merged, torch.tensor([prompts[0]])), expected_logits, atol=1e-4, rtol=0)
    base, _ = load_model_and_tokenizer(str(tiny_base), dtype="float32", device="cpu")
    assert generate(base, tokenizer, prompts, max_new_tokens=8, batch_size=4) != expected  # the adapter matters


# --------------------------------------------------------------------------- bad input

SMALL_PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 16, "norm_eps": 1e-6, "vocab_size": -1}


@pytest.fixture
def small_meta(spm_dir, tmp_path):
    """input_dir with tokenizer.model and a two-shard 13B/ folder (a tiny one)."""
    write_meta_checkpoint(tmp_path / "13B", SMALL_PARAMS, random_meta_weights(SMALL_PARAMS, spm_size(spm_dir), 5), 2)
    shutil.copy(spm_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    return tmp_path


def run_convert(root, *extra):
    convert.main(["--input_dir", str(root), "--model_size", "13B", "--output_dir", str(root / "out"), *extra])


def test_convert_missing_params(small_meta, capsys):
    (small_meta / "13B" / "params.json").unlink()
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    assert_one_line_error(capsys, e, str(small_meta / "13B" / "params.json"))


def test_convert_missing_tokenizer(small_meta, capsys):
    (small_meta / "tokenizer.model").unlink()
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    assert_one_line_error(capsys, e, "tokenizer.model")


def test_convert_missing_shard(small_meta, capsys):
    (small_meta / "13B" / "consolidated.01.pth").unlink()  # 13B comes in two shards
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    assert_one_line_error(capsys, e, "consolidated.01.pth")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_convert_truncated_shard_is_one_line(small_meta, capsys, keep):
    path = small_meta / "13B" / "consolidated.01.pth"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])  # an interrupted download
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    # One line: no "legacy torch format" note (a zip file cut short is not an old format).
    assert_one_line_error(capsys, e, "consolidated.01.pth", "cut short")


def test_convert_shards_that_do_not_fit(small_meta, capsys):
    path = small_meta / "13B" / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    shard["layers.0.attention.wk.weight"] = torch.zeros(24, 32)
    torch.save(shard, path)
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    assert_one_line_error(capsys, e, "layers.0.attention.wk.weight", "(24, 32)", "(16, 32)")


def test_convert_params_that_do_not_fit_the_shards(spm_dir, small_meta, capsys):
    vocab = spm_size(spm_dir)
    (small_meta / "13B" / "params.json").write_text(json.dumps({**SMALL_PARAMS, "dim": 48, "n_heads": 3}))
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    assert_one_line_error(capsys, e, "tok_embeddings.weight", f"({vocab}, 16)", f"({vocab}, 24)")


def test_convert_refuses_non_empty_output_dir(small_meta, capsys):
    (small_meta / "out").mkdir()
    (small_meta / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        run_convert(small_meta)
    assert_one_line_error(capsys, e, "not empty", "--overwrite")
    run_convert(small_meta, "--overwrite")
    assert (small_meta / "out" / "notes.txt").read_text() == "keep me"
    assert (small_meta / "out" / "model.safetensors.index.json").is_file()


def test_merge_lora_that_does_not_fit(tiny_base, chinese_loras, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-lora"
    shutil.copytree(chinese_loras[1], bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key] = torch.zeros(32, state[key].shape[1])
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(SystemExit) as e:
        merge.main(["--base_model", str(tiny_base), "--lora_model", str(bad), "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(capsys, e, "model.layers.1.self_attn.v_proj", "(32, 8)", "(64, 64)")
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_merge_refuses_non_empty_output_dir(tiny_base, chinese_loras, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    with pytest.raises(SystemExit) as e:
        merge.main(["--base_model", str(tiny_base), "--lora_model", str(chinese_loras[0]),
                    "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(capsys, e, "not empty", "--overwrite")


def test_merge_missing_adapter_file(tiny_base, chinese_loras, tmp_path, capsys):
    bad = tmp_path / "lora"
    shutil.copytree(chinese_loras[0], bad)
    (bad / "adapter_model.bin").unlink()
    with pytest.raises(SystemExit) as e:
        merge.main(["--base_model", str(tiny_base), "--lora_model", str(bad), "--output_dir", str(tmp_path / "o")])
    assert_one_line_error(capsys, e, "adapter_model.bin")


# ------------------------------------------------------- the original flags, strict parsing

@pytest.mark.parametrize("script,args,fragment", [
    (convert, ["--input_dir", "x"], "config key 'output_dir' is required"),
    (convert, ["--input_dir", "x", "--output_dir", "y", "--model_sise", "7B"], "did you mean model_size"),
    (merge, ["--lora_model", "a,b", "--output_dir", "y", "--output_type", "gguf"], "'gguf' is not one of huggingface, pth"),
    (merge, ["--output_dir", "y"], "config key 'lora_model' is required"),
])
def test_model_hub_flags_are_parsed_strictly(script, args, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(args)
    assert_one_line_error(capsys, e, fragment)


def test_model_hub_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit) as e:
        merge.main(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--output_type "))
    # The meaning written beside the default in the script, on the line under the key.
    assert "Meta's consolidated.00.pth + params.json" in lines[at + 1]


def test_converted_folder_loads_in_plain_transformers(small_meta):
    """Other tools load the converter's output with the Auto classes alone: they need the
    architectures field and a tokenizer that adds BOS, as the original conversion's does."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_convert(small_meta)
    out = small_meta / "out"
    assert AutoConfig.from_pretrained(out).architectures == ["LlamaForCausalLM"]
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(small_meta / "tokenizer.model"))
    # Plain tokenizer(text): BOS, then exactly SentencePiece's pieces, and no EOS.
    assert tokenizer(SENTENCES[1]).input_ids == [sp.bos_id()] + sp.encode(SENTENCES[1])
