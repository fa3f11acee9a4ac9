"""model_utils: the one loader (model, tokenizer, optional LoRA adapter) and its error messages.

Reference results come from transformers and PEFT called directly, not through model_utils.
"""
import json
import shutil

import pytest
import torch

from model_utils import (TRAIN_ARGS_FILE, ModelLoadError, apply_adapter, load_for_inference,
                         load_model_and_tokenizer, load_tokenizer)

TINY_VOCAB = 4000  # conftest builds the tiny model with vocab_size=4000
IDS = torch.tensor([[1, 5, 17, 300, 42, 999, 7]])


def plain_logits(model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def make_adapter(base_dir, out, train_args=None, tokenizer=None):
    """A small LoRA adapter on q/v with non-zero B (so it changes the output), saved with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    if train_args is not None:
        (out / TRAIN_ARGS_FILE).write_text(json.dumps(train_args), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def reference_adapter_logits(base_dir, adapter):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return logits(model)


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


# =========================================================================== base model

def test_loads_the_tiny_model_ready_for_inference(tiny_model):
    model, tok = load_model_and_tokenizer(tiny_model, device="cpu")
    assert not model.training
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id  # EOS stays unambiguous
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "left"
    assert len(tok) == TINY_VOCAB == model.get_input_embeddings().weight.shape[0]
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    assert next(model.parameters()).device.type == "cpu"
    assert torch.allclose(logits(model), plain_logits(tiny_model))


def test_dtype_argument(tiny_model):
    model, _ = load_model_and_tokenizer(tiny_model, dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="fp16"):
        load_model_and_tokenizer(tiny_model, dtype="float16", device="cpu")
    with pytest.raises(ModelLoadError, match="float64"):
        load_model_and_tokenizer(tiny_model, dtype="float64", device="cpu")


def test_missing_model_dir_points_at_the_readme_and_the_tiny_model(tmp_path):
    missing = tmp_path / "chinese-alpaca-7b"
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(missing, device="cpu")
    msg = str(e.value)
    assert str(missing) in msg and "README" in msg and "build_tiny_llama" in msg
    assert "\n" not in msg


def test_dir_without_config_json(tiny_model, tmp_path):
    d = tmp_path / "weights_only"
    d.mkdir()
    for f in tiny_model.glob("tokenizer*"):  # a tokenizer but no model config
        shutil.copy(f, d)
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(d, device="cpu")
    assert "config.json" in str(e.value) and str(d) in str(e.value)


def test_model_type_transformers_lacks_needs_trust_remote_code(model_copy):
    # Any architecture transformers implements loads (tests/test_architectures.py); code shipped
    # with a model runs only when the user says so.
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "my_custom_lm"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(model_copy, device="cpu")
    assert "my_custom_lm" in str(e.value) and "--trust_remote_code=True" in str(e.value)


def test_dir_without_a_tokenizer(model_copy):
    for name in ("tokenizer.model", "tokenizer.json"):
        if (model_copy / name).exists():
            (model_copy / name).unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model_and_tokenizer(model_copy, device="cpu")


def test_larger_tokenizer_resizes_the_embeddings(tiny_model, model_copy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_copy))
    tok.add_special_tokens({"pad_token": "[PAD]"})  # Chinese-Alpaca's 49,954 vs 49,953 case
    tok.save_pretrained(str(model_copy))
    assert len(tok) == TINY_VOCAB + 1

    model, loaded = load_model_and_tokenizer(model_copy, device="cpu")
    assert len(loaded) == TINY_VOCAB + 1
    assert model.get_input_embeddings().weight.shape[0] == TINY_VOCAB + 1
    assert model.get_output_embeddings().weight.shape[0] == TINY_VOCAB + 1
    assert loaded.pad_token == "[PAD]" and model.config.pad_token_id == TINY_VOCAB
    # The existing rows are kept as they were.
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert torch.equal(model.get_input_embeddings().weight[:TINY_VOCAB], base.get_input_embeddings().weight)


def test_smaller_tokenizer_is_refused_naming_both_sizes(tiny_model, model_copy):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(tiny_model))
    config.vocab_size = TINY_VOCAB + 5
    LlamaForCausalLM(config).save_pretrained(str(model_copy))
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(model_copy, device="cpu")
    msg = str(e.value)
    assert str(TINY_VOCAB) in msg and str(TINY_VOCAB + 5) in msg


def test_tokenizer_path_wins(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.add_tokens(["<new_piece>"])
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(str(tok_dir))
    model, loaded = load_model_and_tokenizer(tiny_model, tokenizer_path=tok_dir, device="cpu")
    assert len(loaded) == TINY_VOCAB + 1 == model.get_input_embeddings().weight.shape[0]


def test_load_tokenizer_sets_a_pad_token(tiny_model):
    tok = load_tokenizer(tiny_model, padding_side="right")
    assert tok.padding_side == "right"
    assert tok.pad_token_id == tok.unk_token_id == 0  # LLaMA has no pad; unk keeps EOS unambiguous


# =========================================================================== adapters

def test_adapter_with_recorded_model_dir(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter",
                           train_args={"model_dir": str(tiny_model), "max_seq_length": 256, "vocab_size": TINY_VOCAB})
    model, tok, train_args = load_for_inference(str(adapter), device="cpu")
    assert train_args["max_seq_length"] == 256
    assert not model.training
    expected = reference_adapter_logits(tiny_model, adapter)
    assert not torch.allclose(expected, plain_logits(tiny_model))  # the adapter changes the output
    assert torch.allclose(logits(model), expected, atol=1e-6)


def test_adapter_vocab_mismatch_names_both_sizes(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", train_args={"vocab_size": 4321})
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer(tiny_model, lora_model=str(adapter), device="cpu")
    msg = str(e.value)
    assert "4321" in msg and str(TINY_VOCAB) in msg
    from transformers import LlamaForCausalLM

    with pytest.raises(ModelLoadError, match="4321"):
        apply_adapter(LlamaForCausalLM.from_pretrained(str(tiny_model)), str(adapter))


def test_adapter_without_train_args_needs_model_dir(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    with pytest.raises(ModelLoadError) as e:
        load_for_inference(str(adapter), device="cpu")
    msg = str(e.value)
    assert TRAIN_ARGS_FILE in msg and "model_dir" in msg
    # With the base model given it loads, and applies the adapter.
    model, _, train_args = load_for_inference(str(adapter), model_dir=str(tiny_model), device="cpu")
    assert train_args == {}
    assert torch.allclose(logits(model), reference_adapter_logits(tiny_model, adapter), atol=1e-6)


def test_missing_adapter_folder(tmp_path):
    missing = tmp_path / "no_such_adapter"
    with pytest.raises(ModelLoadError) as e:
        load_for_inference(str(missing), device="cpu")
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_folder_without_adapter_config(tiny_model, tmp_path):
    d = tmp_path / "not_an_adapter"
    d.mkdir()
    (d / TRAIN_ARGS_FILE).write_text(json.dumps({"model_dir": str(tiny_model)}))
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_for_inference(str(d), device="cpu")


def test_adapter_trained_with_another_prompt_is_refused(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter",
                           train_args={"model_dir": str(tiny_model), "prompt_id": "vicuna"})
    with pytest.raises(ModelLoadError, match="vicuna"):
        load_for_inference(str(adapter), device="cpu")


def test_no_adapter_and_no_model_dir():
    with pytest.raises(ModelLoadError, match="model_dir"):
        load_for_inference(None, device="cpu")


def test_tokenizer_saved_beside_the_adapter_is_used(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.add_special_tokens({"pad_token": "[PAD]"})
    adapter = make_adapter(tiny_model, tmp_path / "adapter", tokenizer=tok,
                           train_args={"model_dir": str(tiny_model)})
    model, loaded, _ = load_for_inference(str(adapter), device="cpu")
    assert len(loaded) == TINY_VOCAB + 1 and loaded.pad_token == "[PAD]"
    assert model.get_input_embeddings().weight.shape[0] == TINY_VOCAB + 1


def test_the_loader_does_not_import_the_grammar():
    """Training loads its model through model_utils; the inference config (infer_config.py) and
    the grammar it names the policies of stay out of that import."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, model_utils; print(sorted({'infer_config', 'grounding', 'grammar'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
