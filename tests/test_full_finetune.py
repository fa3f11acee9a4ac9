"""Full fine-tuning (finetuning=full): learning, export and reload, resume, two DeepSpeed ranks;
and the demo's character-level tokenizer with tied embeddings."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MEMORISE, build_test_model, PYTHON, as_argv, free_port, load_script, run_cmd
from dataset import load_data
from test_inference import hand_parse
from test_training import DEEPSPEED, train_losses

FULL_FILES = {"config.json", "model.safetensors", "train_args.json", "tokenizer_config.json", "loss_curve.png"}
# The memorisation settings with no LoRA: every weight is trained at the same learning rate.
FULL = {**{k: v for k, v in MEMORISE.items() if not k.startswith("lora_")}, "finetuning": "full"}


def model_tensors(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def char_model(tmp_path_factory, msra_dir):
    """The demo's kind of model at test size: char tokenizer from 3,000 sentences, tied embeddings."""
    return build_test_model(tmp_path_factory, msra_dir, "tiny-llama-char", tokenizer_type="char",
                            tie_word_embeddings=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, train16):
    """train_trainer.py --finetuning=full run in-process until the tiny model memorises train16."""
    save_dir = tmp_path_factory.mktemp("full-run")
    options = {**FULL, "model_dir": tiny_model, "train_path": train16, "dev_path": train16,
               "save_dir": save_dir, "overwrite": True}
    out = load_script("train_trainer").main(as_argv(options))
    assert Path(out) == save_dir / "model"
    return save_dir


# -------------------------------------------------------------------------- the char tokenizer

def test_char_tokenizer_has_one_token_per_character_and_ties_embeddings(char_model):
    from model_utils import load_model_and_tokenizer

    model_dir, texts = char_model
    model, tokenizer = load_model_and_tokenizer(str(model_dir), device="cpu")
    for text in texts[:300]:
        pieces = [p for p in tokenizer.tokenize(text) if p != "▁"]
        # Every piece is one character, or one byte of a character too rare to get its own piece.
        assert all(len(p) == 1 or (p.startswith("<0x") and p.endswith(">")) for p in pieces), pieces
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # A common entity line is one token per character; the template's English words are one token each.
    assert tokenizer.tokenize("北京_地名")[-5:] == list("北京_地名")
    assert [p for p in tokenizer.tokenize("Below is an instruction") if p != "▁"] == ["Below", "is", "an", "instruction"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # Parameter count from the shape alone: tied embedding, per layer 4 attention and 3 MLP
    # matrices and 2 norms, the final norm.
    v, h, i, n = len(tokenizer), 128, 352, 2
    assert sum(p.numel() for p in model.parameters()) == v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h


def test_unknown_tokenizer_type_is_a_config_error(tmp_path):
    proc = run_cmd([PYTHON, "model_hub/build_tiny_llama.py", "--tokenizer_type=wordpiece",
                    f"--output_dir={tmp_path / 'm'}"], check=False)
    assert proc.returncode == 2 and "'tokenizer_type'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------- export and reload

@pytest.mark.slow
def test_full_export_and_reload_give_the_same_greedy_outputs(tmp_path, char_model, train16):
    from config_utils import parse_config
    from model_utils import load_for_inference
    from generation import ner_generate
    from build import build_datasets, build_model, load_datasets_checked
    from train_core import TRAIN_DEFAULTS, export_trained
    from loss import batch_loss

    model_dir, _ = char_model
    cfg = parse_config(TRAIN_DEFAULTS, {"model_dir": str(model_dir), "train_path": str(train16), "dev_path": "",
                                        "finetuning": "full", "save_dir": str(tmp_path)})
    records, _ = load_datasets_checked(cfg)
    model, tokenizer = build_model(cfg)
    assert all(p.requires_grad for p in model.parameters())
    train, _, collate = build_datasets(cfg, tokenizer, records, [])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(12):
        batch = collate.pad([train[j] for j in range(4 * (step % 4), 4 * (step % 4) + 4)])
        batch_loss(model, batch, cfg).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    in_memory, _ = ner_generate(model, tokenizer, cfg.to_dict(), records, batch_size=4, max_new_tokens=12,
                         grounded=False)

    out = export_trained(model, tokenizer, cfg)
    assert out == tmp_path / "model"
    assert FULL_FILES - {"loss_curve.png"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    assert model.config.use_cache is False  # training's setting is left alone; the saved config is for inference
    assert json.loads((out / "config.json").read_text())["use_cache"] is True

    reloaded, reloaded_tokenizer, train_args = load_for_inference(str(out), device="cpu")
    assert train_args["finetuning"] == "full" and train_args["model_dir"] == str(model_dir)
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    again, _ = ner_generate(reloaded, reloaded_tokenizer, train_args, records, batch_size=4, max_new_tokens=12,
                         grounded=False)
    assert again == in_memory
    # The decoded answers of a barely trained model may all be empty: compare 12 forced greedy tokens too.
    prompts = [collate.inference_ids(r, 12)[0] for r in records[:4]]

    def greedy_ids(m):
        with torch.no_grad():
            return [m.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]

    assert greedy_ids(reloaded) == greedy_ids(model)
    batch = collate.pad([train[j] for j in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    # What was reloaded is the trained model, not the base model it started from.
    base, _, _ = load_for_inference(None, model_dir=str(model_dir), device="cpu")
    with torch.no_grad():
        assert float((base(**batch).logits - model(**batch).logits).abs().max()) > 1e-2


def test_full_model_folder_refuses_a_second_base_model(full_run, tiny_model):
    from model_utils import ModelLoadError, load_for_inference

    with pytest.raises(ModelLoadError, match="fully fine-tuned model, not an adapter"):
        load_for_inference(str(full_run / "model"), model_dir=str(tiny_model), device="cpu")


# ------------------------------------------------------------------------------- learning

def test_full_finetune_learns_and_the_scripts_load_it_like_an_adapter(full_run, tiny_model, train16, tmp_path):
    out = full_run / "model"
    assert FULL_FILES <= {p.name for p in out.iterdir()}
    # Every weight moved away from the base model (embedding rows no example uses may not).
    base, trained = model_tensors(tiny_model), model_tensors(out)
    assert base.keys() == trained.keys()
    for name in base:
        assert not torch.equal(base[name], trained[name]), name
    # Trainer checkpoints hold the whole model (and the optimizer state for every weight).
    ckpt = sorted(full_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert model_tensors(ckpt).keys() == base.keys()

    records = load_data(train16)
    metrics = load_script("test").main(as_argv({"lora_model": out, "test_path": train16, "output_dir": tmp_path,
                                                "max_new_tokens": 48, "batch_size": 8}))
    # Recomputed from the written predictions with an independent parser: the model learned
    # (a random model scores 0), though full fine-tuning at these settings does not memorise all 16.
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    gold = sum(len(hand_parse(r["answer"])) for r in records)
    hits = sum(len(hand_parse(r["output"]) & hand_parse(rec["answer"])) for r, rec in zip(rows, records))
    assert gold > 0 and hits / gold >= 0.5 and metrics["f1"] >= 0.5, metrics
    # predict.py and chat_ner.py load the folder the same way: the same greedy answers as test.py.
    expected = [hand_parse(r["output"]) for r in rows[:2]]
    predicted = load_script("predict").main(as_argv({"lora_model": out, "input_file": train16, "limit": 2,
                                                     "max_new_tokens": 48}))
    assert [hand_parse(p["output"]) for p in predicted] == expected
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(r["instruct"] + r["query"] + "\n" for r in records[:2]), encoding="utf-8")
    run_cmd([PYTHON, "chat_ner.py", "--lora_model", str(out), "--with_prompt", "--data_file", str(inputs),
             "--predictions_file", str(tmp_path / "chat.json"), "--only_cpu", "--max_new_tokens", "48",
             "--grounded", "False"], timeout=300)  # compared with plain generate below
    # chat_ner's own prompt (no newline between instruction and text) answered by the model loaded in this process.
    from model_utils import load_for_inference
    from generation import generate

    chat_prompt_ids = load_script("chat_ner").prompt_ids
    model, tokenizer, _ = load_for_inference(str(out), device="cpu")
    prompts = [chat_prompt_ids(tokenizer, r["instruct"] + r["query"], True) for r in records[:2]]
    chat = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert [c["output"] for c in chat] == generate(model, tokenizer, prompts, max_new_tokens=48)


def test_finished_full_model_is_not_overwritten(full_run, tiny_model, train16):
    from config_utils import ConfigError

    train = load_script("train_trainer")
    before = (full_run / "model" / "model.safetensors").read_bytes()
    with pytest.raises(Exception, match="already holds a finished model"):
        train.main(as_argv({"model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": full_run,
                            "finetuning": "full"}))
    with pytest.raises(ConfigError, match="'finetuning'"):
        train.main(as_argv({"model_dir": tiny_model, "train_path": train16, "dev_path": "", "save_dir": full_run,
                            "finetuning": "qlora"}))
    assert (full_run / "model" / "model.safetensors").read_bytes() == before


# Resume after a kill equals the uninterrupted run: tests/test_training.py, parametrized over
# finetuning=lora and full.


# ------------------------------------------------------------------------ two DeepSpeed ranks

@pytest.mark.distributed
@pytest.mark.parametrize("script", ["train_deepspeed.py", "train_trainer.py"])
def test_full_two_deepspeed_ranks_match_one_process(tmp_path, tiny_model, train16, script):
    common = {"finetuning": "full", "learning_rate": 3e-3, "max_steps": 4, "log_steps": 1, "eval_steps": 0,
              "save_steps": 4, "group_by_length": False, "warmup_ratio": 0.0,
              "model_dir": tiny_model, "train_path": train16, "dev_path": train16}
    two = run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script,
                   *as_argv({**common, "train_batch_size": 2, "save_dir": tmp_path / "two"})], timeout=600)
    run_cmd([PYTHON, script, *as_argv({**common, "train_batch_size": 4, "save_dir": tmp_path / "one"})], timeout=600)
    engine = json.loads(two.stdout.split("deepspeed engine: ")[1].splitlines()[0])
    assert engine["world_size"] == 2 and engine["micro_batch_per_gpu"] == 2
    two_model, one_model = tmp_path / "two" / "model", tmp_path / "one" / "model"
    two_losses, one_losses = train_losses(two_model), train_losses(one_model)
    assert [s for s, _ in two_losses] == [s for s, _ in one_losses] == [1, 2, 3, 4]
    assert two_losses[0][1] == pytest.approx(one_losses[0][1], rel=1e-5)
    # The same examples per step: the whole model ends where the single process's does, up to
    # the rounding of summing gradients over two ranks (which Adam can amplify on weights whose
    # gradient is nearly zero, so the distance is measured against how far training moved them).
    base, two_weights, one_weights = model_tensors(tiny_model), model_tensors(two_model), model_tensors(one_model)
    assert two_weights.keys() == base.keys()

    def distance(a, b):
        return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5

    assert distance(two_weights, one_weights) < 1e-2 * distance(two_weights, base)
    if script == "train_deepspeed.py":
        # The engine checkpoint holds every weight: nothing is frozen under full fine-tuning.
        states = torch.load(next((tmp_path / "two" / "checkpoints" / "global_step4").glob("mp_rank_00_model_states.pt")),
                            weights_only=False)["module"]
        assert set(base) <= set(states)
