"""Both trainers on the tiny model: learning, adapter-only checkpoints, 2 processes, resume, bad input."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MEMORISE, PYTHON, ROOT, as_argv, free_port, load_script, run_cmd, score_adapter

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "train_args.json", "tokenizer_config.json"}


def adapter_tensors(adapter_dir):
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_losses(adapter_dir):
    history = json.loads((Path(adapter_dir) / "log_history.json").read_text())
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


# ----------------------------------------------------------------------------- learning

@pytest.mark.slow
@pytest.mark.parametrize("run,quantization", [("memorised_trainer", "none"), ("memorised_qlora", "4bit")])
def test_trainer_memorises_and_saves_what_inference_needs(run, quantization, request, train16, tiny_model):
    adapter = request.getfixturevalue(run) / "adapter_model"
    assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
    assert (adapter / "loss_curve.png").stat().st_size > 0
    args = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    assert Path(args["model_dir"]) == Path(tiny_model)
    assert args["vocab_size"] == 4000 and args["learning_rate"] == MEMORISE["learning_rate"]
    assert args["quantization"] == quantization  # test.py below loads the base this way by default
    history = json.loads((adapter / "log_history.json").read_text())
    assert any("eval_loss" in r for r in history)
    metrics, _ = score_adapter(adapter, train16)
    assert metrics["f1"] >= 0.95, metrics


def test_trainer_checkpoints_hold_no_base_weights(memorised_trainer, tiny_model):
    base_bytes = (Path(tiny_model) / "model.safetensors").stat().st_size
    checkpoints = sorted(memorised_trainer.glob("checkpoint-*"))
    assert checkpoints, "save_steps=50 over 150 steps must leave checkpoints"
    for ckpt in checkpoints:
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}
        tensors = adapter_tensors(ckpt)
        # Only LoRA matrices and the modules trained in full (embed_tokens, lm_head) are saved.
        assert all("lora_" in k or "embed_tokens" in k or "lm_head" in k for k in tensors), list(tensors)[:5]
        assert not any("layers.0.self_attn.q_proj.weight" == k.split("base_model.model.model.")[-1] for k in tensors)
    # A run without trainable embeddings saves LoRA only: far smaller than the base model.
    lora_only = sum(t.numel() * t.element_size() for k, t in adapter_tensors(checkpoints[-1]).items() if "lora_" in k)
    assert lora_only < base_bytes / 5


@pytest.mark.slow
def test_deepspeed_trainer_memorises(tmp_path, tiny_model, train16):
    options = {**MEMORISE, "model_dir": tiny_model, "train_path": train16, "dev_path": train16,
               "save_dir": tmp_path / "ds"}
    proc = run_cmd([PYTHON, "train_deepspeed.py", *as_argv(options)])
    engine = json.loads(proc.stdout.split("deepspeed engine: ")[1].splitlines()[0])
    assert engine["learning_rate"] == MEMORISE["learning_rate"]
    assert engine["micro_batch_per_gpu"] == MEMORISE["train_batch_size"]
    adapter = tmp_path / "ds" / "adapter_model"
    assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
    ckpt = tmp_path / "ds" / "checkpoints" / "global_step150"
    # Engine checkpoints exclude the frozen base weights.
    states = torch.load(next(ckpt.glob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert states and all("lora_" in k or "embed_tokens" in k or "lm_head" in k for k in states)
    metrics, _ = score_adapter(adapter, train16)
    assert metrics["f1"] >= 0.95, metrics


# ------------------------------------------------------------------ two processes, one source

SHORT = {"lora_dropout": 0.0, "learning_rate": 5e-3, "max_steps": 6, "log_steps": 1, "eval_steps": 0,
         "save_steps": 100, "group_by_length": False, "warmup_ratio": 0.0}


@pytest.mark.distributed
@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("script", ["train_trainer.py", "train_deepspeed.py"])
def test_two_processes_match_one_process(tmp_path, tiny_model, train16, script, quantization):
    common = {**SHORT, "model_dir": tiny_model, "train_path": train16, "dev_path": train16,
              "quantization": quantization}
    two = run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script,
                   *as_argv({**common, "train_batch_size": 2, "save_dir": tmp_path / "two"})])
    run_cmd([PYTHON, script, *as_argv({**common, "train_batch_size": 4, "save_dir": tmp_path / "one"})])
    # The command line is what the engine trains with (read back from the engine itself).
    engine = json.loads(two.stdout.split("deepspeed engine: ")[1].splitlines()[0])
    assert engine["world_size"] == 2 and engine["micro_batch_per_gpu"] == 2
    assert engine["learning_rate"] == pytest.approx(5e-3)
    two_losses, one_losses = train_losses(tmp_path / "two" / "adapter_model"), train_losses(tmp_path / "one" / "adapter_model")
    assert [s for s, _ in two_losses] == [s for s, _ in one_losses] == list(range(1, 7))
    # Same examples per optimizer step, loss averaged over all answer tokens of the step: the
    # first step's loss is the same computation; later ones drift only by optimizer rounding.
    assert two_losses[0][1] == pytest.approx(one_losses[0][1], rel=1e-5)
    for (_, a), (_, b) in zip(two_losses, one_losses):
        assert a == pytest.approx(b, rel=2e-2)
    assert not (tmp_path / "two" / "adapter_model.tmp").exists()


# ----------------------------------------------------------------------------------- resume

RESUME = {"lora_dropout": 0.1, "learning_rate": 3e-3, "max_steps": 12, "save_steps": 4, "log_steps": 2,
          "eval_steps": 0, "train_batch_size": 4}


def _kill_after(cmd, marker, timeout=600):
    """Start a training run and SIGKILL it as soon as `marker` exists (a checkpoint was written)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), proc.stderr.read()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("finetuning,output,quantization", [("lora", "adapter_model", "none"),
                                                            ("full", "model", "none"),
                                                            ("lora", "adapter_model", "4bit")])
@pytest.mark.parametrize("script,ckpt,marker", [
    ("train_trainer.py", "checkpoint-4", "trainer_state.json"),
    # The step's export (adapter or whole model) is the last thing a DeepSpeed checkpoint writes.
    ("train_deepspeed.py", "checkpoints/global_step4", "{output}/train_args.json"),
])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_model, train16, script, ckpt, marker,
                                                     finetuning, output, quantization):
    def weights(folder):
        return load_file(str(Path(folder) / f"{output}.safetensors"))

    common = {**RESUME, "finetuning": finetuning, "quantization": quantization, "model_dir": tiny_model,
              "train_path": train16, "dev_path": train16}
    run_cmd([PYTHON, script, *as_argv({**common, "save_dir": tmp_path / "once"})])
    killed = tmp_path / "killed"
    _kill_after([PYTHON, script, *as_argv({**common, "save_dir": killed})], killed / ckpt / marker.format(output=output))
    # Only a finished run has <save_dir>/adapter_model/ (or model/): test.py cannot take a step-4 result.
    assert not (killed / output).exists()
    leftover = killed / f".{output}-x1y2"  # what a kill during an export leaves behind
    leftover.mkdir()
    resume_from = killed / ckpt
    start = weights(resume_from) if script == "train_trainer.py" else None
    run_cmd([PYTHON, script, *as_argv({**common, "save_dir": killed, "resume": resume_from})])
    assert not leftover.exists()
    once, resumed = weights(tmp_path / "once" / output), weights(killed / output)
    assert max_diff(once, resumed) < 1e-6
    if start is not None:  # the checkpoint really was mid-run: training moved the weights on
        assert max_diff(start, resumed) > 1e-4
    if finetuning == "full":  # every weight trained, not only an adapter
        assert max_diff(load_file(str(Path(tiny_model) / "model.safetensors")), resumed) > 1e-4


def test_resume_true_picks_latest_complete_trainer_checkpoint(tmp_path):
    from run_folder import TRAINER_CHECKPOINTS, latest_checkpoint

    for step, complete in [(4, True), (8, True), (12, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path, TRAINER_CHECKPOINTS) == str(tmp_path / "checkpoint-8")


def test_resume_true_picks_the_engine_checkpoint_deepspeed_marked_latest(tmp_path):
    from run_folder import ENGINE_CHECKPOINTS, latest_checkpoint, remove_old_checkpoints

    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):  # 12: killed while saving, before DeepSpeed wrote `latest`
        (root / f"global_step{step}").mkdir(parents=True)
    assert latest_checkpoint(tmp_path, ENGINE_CHECKPOINTS) is None
    (root / "latest").write_text("global_step8")
    assert latest_checkpoint(tmp_path, ENGINE_CHECKPOINTS) == str(root / "global_step8")
    remove_old_checkpoints(tmp_path, ENGINE_CHECKPOINTS, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["global_step12", "global_step8", "latest"]


# -------------------------------------------------------------------------------- bad input

def test_bad_training_file_fails_before_model_loads(tmp_path, train16):
    bad = tmp_path / "train.txt"
    bad.write_text(train16.read_text(encoding="utf-8") + '{"instruct": "x", "query": "y"}\n', encoding="utf-8")
    # model_dir does not exist: had the model been loaded first, the error would name it instead.
    proc = run_cmd([PYTHON, "train_trainer.py", f"--train_path={bad}", "--model_dir=/nonexistent",
                    f"--save_dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}:17: missing key 'answer' (keys: ['instruct', 'query'])"]


def test_finished_adapter_is_not_overwritten(memorised_trainer, tiny_model, train16):
    before = (memorised_trainer / "adapter_model" / "adapter_model.safetensors").read_bytes()
    train = load_script("train_trainer")
    with pytest.raises(Exception, match="already holds a finished adapter"):
        train.main(as_argv({"model_dir": tiny_model, "train_path": train16, "dev_path": train16,
                            "save_dir": memorised_trainer}))
    with pytest.raises(Exception, match="holds a run of base model"):
        train.main(as_argv({"model_dir": ROOT, "train_path": train16, "dev_path": train16,
                            "save_dir": memorised_trainer, "resume": True}))
    assert (memorised_trainer / "adapter_model" / "adapter_model.safetensors").read_bytes() == before


def test_fp16_on_cpu_is_a_clear_error(tmp_path, tiny_model, train16):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    from config_utils import ConfigError

    # Checked with the rest of the config before any data, DeepSpeed or weights: in-process, instant.
    with pytest.raises(ConfigError, match="^config key 'dtype': fp16 training needs a GPU"):
        load_script("train_deepspeed").main([f"--model_dir={tiny_model}", f"--train_path={train16}",
                                             f"--dev_path={train16}", f"--save_dir={tmp_path}", "--dtype=fp16"])


def test_interrupted_export_keeps_previous_adapter(memorised_trainer, tmp_path):
    core = load_script("train_core")
    from config_utils import Config
    from model_utils import load_model_and_tokenizer

    src = memorised_trainer / "adapter_model"
    args = json.loads((src / "train_args.json").read_text())
    model, tokenizer = load_model_and_tokenizer(args["model_dir"], lora_model=str(src))
    cfg = Config({**args, "save_dir": str(tmp_path)})
    first = core.export_trained(model, tokenizer, cfg)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def broken_save(*a, **k):
        raise KeyboardInterrupt  # as if Ctrl-C arrived half-way through the export

    tokenizer.save_pretrained = broken_save
    with pytest.raises(KeyboardInterrupt):
        core.export_trained(model, tokenizer, cfg)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model"]  # no temporary folder left


@pytest.mark.distributed
def test_mpirun_launches_train_deepspeed(tmp_path, tiny_model, train16):
    mpirun = Path(sys.executable).parent / "mpirun"
    env_root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    options = {**SHORT, "max_steps": 2, "model_dir": tiny_model, "train_path": train16, "dev_path": train16,
               "train_batch_size": 2, "save_dir": tmp_path / "mpi"}
    proc = run_cmd([str(mpirun), "-np", "2", "--oversubscribe", PYTHON, "train_deepspeed.py", *as_argv(options)],
                   env_extra=env_root)
    engine = json.loads(proc.stdout.split("deepspeed engine: ")[1].splitlines()[0])
    assert engine["world_size"] == 2  # MPI discovery gave both ranks one process group
    assert (tmp_path / "mpi" / "adapter_model" / "adapter_model.safetensors").is_file()


def lora_model_and_batch(tiny_model, train16, **options):
    """The tiny model with LoRA (non-zero B, so gradients flow through every projection), in
    training mode, a batch of 8 training examples and the config."""
    from config_utils import parse_config
    from build import build_datasets, build_model, load_datasets_checked
    from train_core import TRAIN_DEFAULTS

    cfg = parse_config(TRAIN_DEFAULTS, {"model_dir": str(tiny_model), "train_path": str(train16), "dev_path": "",
                                        "lora_dropout": 0.0, **options})
    records, _ = load_datasets_checked(cfg)
    model, tokenizer = build_model(cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    train, _, collate = build_datasets(cfg, tokenizer, records, [])
    model.train()
    return cfg, model, tokenizer, collate.pad([train[i] for i in range(8)])


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shared_prefix_loss_and_gradients_equal_the_plain_forward(tiny_model, train16):
    from loss import loss_free_prefix_length, shared_prefix_loss

    _, model, _, batch = lora_model_and_batch(tiny_model, train16, lora_modules_to_save="embed_tokens,lm_head")
    # The shared part is BOS + template + instruction: count it from the rows themselves.
    rows = batch["input_ids"].tolist()
    common = next(i for i in range(len(rows[0])) if len({r[i] for r in rows}) > 1)
    assert loss_free_prefix_length(batch) == common > 16

    n_items = int((batch["labels"][:, 1:] != -100).sum())
    plain, plain_grads = loss_and_grads(model, lambda: model(**batch, num_items_in_batch=n_items).loss)
    shared, shared_grads = loss_and_grads(model, lambda: shared_prefix_loss(model, batch, n_items))
    assert shared == pytest.approx(plain, rel=1e-6)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 10
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_fresh_start_refuses_then_clears_an_earlier_runs_checkpoints(tmp_path, tiny_model, train16):
    from config_utils import UserError, parse_config
    from run_folder import prepare_save_dir
    from train_core import TRAIN_DEFAULTS

    for stale in ("checkpoint-1000", "checkpoints/global_step1000"):
        (tmp_path / stale).mkdir(parents=True)
    options = {"model_dir": str(tiny_model), "train_path": str(train16), "save_dir": str(tmp_path)}
    with pytest.raises(UserError, match="holds checkpoints of an earlier run"):
        prepare_save_dir(parse_config(TRAIN_DEFAULTS, options))
    assert (tmp_path / "checkpoint-1000").is_dir()
    prepare_save_dir(parse_config(TRAIN_DEFAULTS, {**options, "overwrite": True}))
    assert not (tmp_path / "checkpoint-1000").exists() and not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------- sentences without entities

def test_keep_no_entity_keeps_every_entity_sentence_and_a_seeded_share_of_the_rest():
    from build import keep_no_entity as keep
    records = [{"query": f"文本：城市{i}", "answer": f"城市{i}_地名" if i % 4 == 0 else "没有", "id": i}
               for i in range(2000)]
    with_entities = [r for r in records if r["answer"] != "没有"]
    columns, seed_info = ("instruct", "query", "answer"), {}  # data folders without a format: seed

    def keep_no_entity(records, fraction, seed, info=seed_info):
        return keep(records, fraction, columns, seed, info)

    kept = keep_no_entity(records, 0.5, seed=7)
    assert [r for r in kept if r["answer"] != "没有"] == with_entities
    assert [r["id"] for r in kept] == sorted(r["id"] for r in kept)  # file order
    none = sum(r["answer"] == "没有" for r in kept)
    assert abs(none - 750) < 4 * (1500 * 0.25) ** 0.5  # binomial(1500, 0.5): mean 750, sd 19
    assert keep_no_entity(records, 0.5, seed=7) == kept
    assert keep_no_entity(records, 0.5, seed=8) != kept
    assert keep_no_entity(records, 0.0, seed=7) == with_entities
    assert keep_no_entity(records, 1.0, seed=7) == records
    # The same sentences written in the other formats: the same sentences are kept.
    for fmt, answer in (("typed", lambda i: f"人名：没有\n地名：城市{i}\n机构名：没有"), ("inline", lambda i: f"[城市{i}|地名]")):
        other = [{**r, "answer": answer(r["id"]) if r["answer"] != "没有" else
                  ("人名：没有\n地名：没有\n机构名：没有" if fmt == "typed" else r["query"][3:])} for r in records]
        again = keep_no_entity(other, 0.5, seed=7, info={"answer_format": fmt})
        assert [r["id"] for r in again] == [r["id"] for r in kept]


def test_no_entity_fraction_trains_on_the_sentences_with_entities(tmp_path, tiny_model, train16, capsys):
    answers = [json.loads(line)["answer"] for line in train16.read_text(encoding="utf-8").splitlines()]
    none = answers.count("没有")
    assert 0 < none < len(answers)
    save_dir = tmp_path / "run"
    load_script("train_trainer").main(as_argv({"model_dir": tiny_model, "train_path": train16, "dev_path": "",
                                               "save_dir": save_dir, "max_steps": 1, "no_entity_fraction": 0}))
    out = capsys.readouterr().out
    assert f"{none} of the {len(answers)} training sentences left out" in out
    assert f"train {len(answers) - none} examples" in out
    assert json.loads((save_dir / "train_args.json").read_text())["no_entity_fraction"] == 0


@pytest.mark.parametrize("share_prefix", [True, False])
def test_batch_vocabulary_loss_is_the_softmax_over_the_batchs_tokens(tiny_model, train16, share_prefix):
    """loss_vocabulary=batch: cross-entropy of each answer token against the tokens the batch
    holds, computed here from the full logits of the plain forward."""
    from loss import batch_loss

    cfg, model, tokenizer, batch = lora_model_and_batch(tiny_model, train16, loss_vocabulary="batch",
                                                        share_prefix=share_prefix)
    # By hand: the ids every row holds where its mask is 1, as a sorted list of columns.
    columns = sorted({t for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
                      for t, m in zip(row, mask) if m})
    assert len(columns) < tokenizer.vocab_size // 2  # a real restriction, not the whole vocabulary

    def by_hand():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        picked = logits[labels != -100][:, columns].float()
        targets = torch.tensor([columns.index(t) for t in labels[labels != -100].tolist()])
        return torch.nn.functional.cross_entropy(picked, targets)

    expected, expected_grads = loss_and_grads(model, by_hand)
    got, got_grads = loss_and_grads(model, lambda: batch_loss(model, batch, cfg))
    assert got == pytest.approx(expected, rel=1e-5)
    full, _ = loss_and_grads(model, lambda: model(**batch).loss)
    assert got < full  # fewer negatives: the restricted softmax gives the targets more mass
    assert expected_grads.keys() == got_grads.keys() and any("lora_A" in n for n in got_grads)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)
