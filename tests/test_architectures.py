"""Other causal LMs and their prompt formats, on tiny random models built here from config classes.

For each architecture: both trainers train a LoRA adapter (PEFT's all-linear targets), the
adapter reloads, test.py scores it, the inference prompt is the training prompt token for
token (checked against the format written out independently), and the merged model gives the
same greedy outputs as base plus adapter.
"""
import json
import shutil

import pytest
import torch

from conftest import PYTHON, as_argv, free_port, load_script, run_cmd
from dataset import DEFAULT_SYSTEM, NerCollate, load_data

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral's instruct format knows no system role: the prompt falls back to the user turn alone.
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
           "{{ raise_exception('only user and assistant roles') }}{% elif m['role'] == 'user' %}"
           "[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
QUICK = {"lora_dropout": 0.0, "train_batch_size": 4, "max_steps": 3, "save_steps": 3, "eval_steps": 0,
         "log_steps": 1, "learning_rate": 1e-2, "warmup_ratio": 0.0, "dev_path": ""}

ARCHS = {
    # name: (config class, extra config, prompt_style, chat template or None)
    "llama": ("LlamaConfig", {}, "llama2_chat", None),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "chat_template", CHATML),
    "mistral": ("MistralConfig", {"sliding_window": None}, "chat_template", MISTRAL),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}, "alpaca", None),
    # Gemma 3 (the text model, as Gemma 3 270M): embeddings scaled by sqrt(hidden), norms as 1 + w, q/k
    # norms, a sliding-window layer beside a global one; the window (32 tokens) is shorter than an MSRA
    # prompt here, so the prefix caches of training and generation meet the window's cache.
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 32,
                                    "layer_types": ["sliding_attention", "full_attention"]}, "alpaca", None),
}


def build(arch, tiny_model, out, **overrides):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, extra, _, template = ARCHS[arch]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if template == CHATML:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"  # a chat model's turn ends here, and so does generation
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **SMALL, **{**extra, **overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return tokenizer


def expected_prompt(arch, tokenizer, instruction):
    """The prompt as each format's documentation writes it, built without the project's code."""
    style = ARCHS[arch][2]
    if style == "llama2_chat":
        text = f"[INST] <<SYS>>\n{DEFAULT_SYSTEM}\n<</SYS>>\n\n{instruction} [/INST]"
        return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    if style == "alpaca":
        text = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                f"the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
        return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    if arch == "qwen2":
        text = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n"
                f"<|im_start|>assistant\n")
    else:
        text = f"{tokenizer.bos_token}[INST] {instruction} [/INST]"
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_trains_reloads_scores_and_merges(arch, tiny_model, train16, tmp_path):
    from model_utils import load_for_inference, load_model_and_tokenizer
    from generation import generate, ner_generate

    base = tmp_path / f"tiny-{arch}"
    build(arch, tiny_model, base)
    style = ARCHS[arch][2]
    options = {**QUICK, "model_dir": base, "train_path": train16, "prompt_style": style}

    # Trainer, in-process; adapter_config.json names every linear projection, not the output layer.
    load_script("train_trainer").main(as_argv({**options, "save_dir": tmp_path / "trainer"}))
    adapter = tmp_path / "trainer" / "adapter_model"
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert {t.rsplit(".", 1)[-1] for t in targets} == LINEAR
    args = json.loads((adapter / "train_args.json").read_text())
    assert args["prompt_style"] == style

    # Native DeepSpeed, a real process (free port: tests may run beside each other).
    run_cmd([PYTHON, "train_deepspeed.py", *as_argv({**options, "save_dir": tmp_path / "ds"})],
            env_extra={"MASTER_PORT": str(free_port())}, timeout=600)
    assert (tmp_path / "ds" / "adapter_model" / "adapter_model.safetensors").is_file()

    # The inference prompt: the training sequence's prompt part, and the format as documented.
    model, loaded_tokenizer, train_args = load_for_inference(str(adapter), device="cpu")
    record = load_data(train16)[0]
    collate = NerCollate(train_args, loaded_tokenizer)
    training = collate.encode(record)
    prompt_len = training["labels"].index(next(t for t in training["labels"] if t != -100))
    inference, _ = collate.inference_ids(record, max_new_tokens=16, context=512)
    assert inference == training["input_ids"][:prompt_len]
    assert inference == expected_prompt(arch, loaded_tokenizer, record["instruct"] + "\n" + record["query"])
    assert training["input_ids"][-1] == loaded_tokenizer.eos_token_id  # the answer ends with the turn's end

    # The shared-prefix paths are exact on this architecture too: the training loss, and generation.
    from config_utils import parse_config
    from train_core import TRAIN_DEFAULTS
    from loss import loss_free_prefix_length, shared_prefix_loss

    cfg = parse_config(TRAIN_DEFAULTS, {**options, "save_dir": str(tmp_path / "trainer")})
    batch = NerCollate(cfg, loaded_tokenizer).pad([NerCollate(cfg, loaded_tokenizer).encode(r)
                                                   for r in load_data(train16)[:4]])
    assert loss_free_prefix_length(batch) > 16
    with torch.no_grad():
        n_items = int((batch["labels"][:, 1:] != -100).sum())
        plain_loss = model(**batch, num_items_in_batch=n_items).loss
        assert float(shared_prefix_loss(model, batch, n_items)) == pytest.approx(float(plain_loss), rel=1e-5)
    records = load_data(train16)[:6]
    assert (ner_generate(model, loaded_tokenizer, train_args, records, batch_size=3, max_new_tokens=8, grounded=False,
                         prefix_cache=True)[0]
            == ner_generate(model, loaded_tokenizer, train_args, records, batch_size=3, max_new_tokens=8, grounded=False,
                            prefix_cache=False)[0])

    # test.py scores the adapter.
    metrics = load_script("test").main([f"--lora_model={adapter}", f"--test_path={train16}", "--limit=4",
                                        "--max_new_tokens=8", f"--output_dir={tmp_path / 'eval'}"])
    assert metrics["num_examples"] == 4 and "mention" in metrics

    # Merged into its base (the merge script: LLaMA's own layout, or PEFT for the others).
    prompts = [collate.inference_ids(r, 8, 512)[0] for r in load_data(train16)[:6]]
    expected = generate(model, loaded_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    merged_dir = tmp_path / "merged"
    load_script("model_hub/merge_llama_with_chinese_lora").main(
        ["--lora_model", str(adapter), "--output_dir", str(merged_dir)])
    merged, merged_tokenizer = load_model_and_tokenizer(str(merged_dir), dtype="float32", device="cpu")
    assert generate(merged, merged_tokenizer, prompts, max_new_tokens=8, batch_size=3) == expected
    # Logits too, and the adapter really changed the base: equal outputs are not a coincidence.
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        tuned, merged_logits = model(ids).logits, merged(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    torch.testing.assert_close(merged_logits, tuned, atol=1e-4, rtol=1e-4)
    assert (tuned - plain).abs().max() > 1e-3


@pytest.mark.parametrize("window", [512, 32])
def test_generation_prefix_cache_under_a_sliding_window(window, tiny_model, train16, tmp_path):
    """The shared-prefix cache is used when every row fits inside the window (Gemma 3 270M's 512
    tokens against MSRA's prompts) and left out when keys could slide out of it: the outputs are
    the plain batches' either way."""
    from dataset import PromptEncoder
    from model_utils import load_model_and_tokenizer
    from generation import generate, shared_prefix_length

    base = tmp_path / "gemma3"
    build("gemma3", tiny_model, base, sliding_window=window)
    model, tokenizer = load_model_and_tokenizer(str(base), dtype="float32", device="cpu")
    encoder = PromptEncoder({"prompt_style": "alpaca"}, tokenizer)
    prompts = [encoder.inference_ids(r, 8, 512)[0] for r in load_data(train16)[:6]]
    shared = shared_prefix_length(prompts)
    assert shared > 30 and max(map(len, prompts)) > 32  # a real prefix, and rows longer than the small window
    calls = []
    model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                          with_kwargs=True)
    cached = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, prefix_cache=True)
    assert ((1, shared) in calls) == (max(map(len, prompts)) + 8 <= window)
    assert cached == generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, prefix_cache=False)


def test_chat_template_without_template_is_one_line(tiny_model, train16, tmp_path, capsys):
    base = tmp_path / "tiny-llama"
    shutil.copytree(tiny_model, base)
    from config_utils import run_cli

    trainer = load_script("train_trainer")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: trainer.main(as_argv({**QUICK, "model_dir": base, "train_path": train16,
                                              "prompt_style": "chat_template", "save_dir": tmp_path / "run"})))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat_template needs a tokenizer with a chat template" in err[0], err
