"""QLoRA (quantization=4bit) and 8-bit base weights on the CPU: what the base is loaded as, the
adapter in plain PEFT, both merges, and every refusal.

Training with a 4-bit base is also covered where training is tested (tests/test_training.py:
memorisation, resume after a kill, two DeepSpeed ranks).
"""
import json
import sys

import bitsandbytes as bnb
import pytest
import torch

from conftest import PYTHON, as_argv, load_script, run_cmd
from test_architectures import ARCHS, QUICK, build


def quantized_layers(model):
    return {type(m).__name__ for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def short_run(tmp_path, model_dir, train16, quantization, **extra):
    """A 3-step training with a quantised base, in-process; returns the adapter folder."""
    options = {**QUICK, "model_dir": model_dir, "train_path": train16, "save_dir": tmp_path / f"run-{quantization}",
               "quantization": quantization, **extra}
    return load_script("train_trainer").main(as_argv(options))


# --------------------------------------------------------------- what inference loads

@pytest.mark.parametrize("quantization,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_inference_loads_the_base_as_trained_unless_overridden(tmp_path, tiny_model, train16, quantization, layer):
    from model_utils import load_for_inference

    adapter = short_run(tmp_path, tiny_model, train16, quantization)
    assert json.loads((tmp_path / f"run-{quantization}" / "train_args.json").read_text())["quantization"] == quantization
    model, _, _ = load_for_inference(adapter, device="cpu")
    assert quantized_layers(model) == {layer}
    # The output layer stays unquantised (transformers leaves it out), the adapter is on top.
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    model, _, _ = load_for_inference(adapter, device="cpu", quantization="none")
    assert quantized_layers(model) == set()


def test_qlora_adapter_reloads_in_plain_peft(memorised_qlora, train16):
    """The adapter folder is an ordinary PEFT adapter: transformers + bitsandbytes + PEFT, none
    of the project's code, give the logits the project's loader gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from model_utils import load_for_inference

    adapter = memorised_qlora / "adapter_model"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "adapter_model.bin").exists()
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    for module in plain.modules():  # bitsandbytes' bf16 eval path on AVX512-BF16 CPUs: off, as
        if hasattr(module, "support_avx512bf16_for_cpu"):  # the loader turns it off for fp32 layers
            module.support_avx512bf16_for_cpu = False
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    ours, _, _ = load_for_inference(str(adapter), device="cpu")
    assert quantized_layers(plain) == quantized_layers(ours) == {"Linear4bit"}
    text = json.loads(train16.read_text(encoding="utf-8").splitlines()[0])["query"]
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        expected, got = plain(input_ids=ids).logits, ours(input_ids=ids).logits
        with plain.disable_adapter():
            untrained = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - untrained).abs().max() > 1e-2  # the adapter is what makes the difference


@pytest.mark.parametrize("in_features,out_features,compute_dtype,kept", [
    (128, 64, torch.float32, False),   # fits, but would compute in bf16 what was asked in fp32
    (128, 64, torch.bfloat16, True),   # fits and computes in the dtype asked for
    (96, 64, torch.bfloat16, False),   # input size not a multiple of the 64-wide block
    (128, 48, torch.bfloat16, False),  # output size not a multiple of the 32-row packing
])
def test_bf16_cpu_path_kept_only_where_it_computes_what_was_asked(in_features, out_features, compute_dtype, kept):
    from quantization import keep_4bit_numerics

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=True).to("cpu")
    layer.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU, whatever this one has
    keep_4bit_numerics(torch.nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is kept
    if not kept:  # the layer computes as in training: x times its dequantised weight
        x = torch.randn(3, in_features, dtype=compute_dtype)
        with torch.no_grad():
            expected = x @ bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(compute_dtype).T
            torch.testing.assert_close(layer.eval()(x), expected, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------- merging

def logits_and_outputs(model, tokenizer, prompts):
    from generation import generate

    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([p])).logits for p in prompts]
    return logits, generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # the merge script's own LLaMA path, and PEFT's
def test_dequantized_merge_equals_4bit_base_plus_adapter(arch, tiny_model, train16, tmp_path, capsys,
                                                         record_property):
    from dataset import NerCollate, load_data
    from model_utils import load_for_inference, load_model_and_tokenizer

    base = tmp_path / f"tiny-{arch}"
    build(arch, tiny_model, base)
    adapter = short_run(tmp_path, base, train16, "4bit", prompt_style=ARCHS[arch][2])
    trained, tokenizer, train_args = load_for_inference(adapter, device="cpu")  # base-4bit + adapter
    assert quantized_layers(trained) == {"Linear4bit"}
    collate = NerCollate(train_args, tokenizer)
    prompts = [collate.inference_ids(r, 8, 512)[0] for r in load_data(train16)[:6]]
    expected_logits, expected = logits_and_outputs(trained, tokenizer, prompts)

    merge = load_script("model_hub/merge_llama_with_chinese_lora")
    distance = {}
    for mode in ("dequantized", "base"):
        capsys.readouterr()
        merge.main(["--lora_model", str(adapter), "--output_dir", str(tmp_path / mode), "--merge_into", mode])
        err = capsys.readouterr().err
        assert ("trained against 4bit base weights" in err) == (mode == "base"), err
        merged, merged_tokenizer = load_model_and_tokenizer(str(tmp_path / mode), dtype="float32", device="cpu")
        assert quantized_layers(merged) == set()  # a plain model: deployable without bitsandbytes
        logits, outputs = logits_and_outputs(merged, merged_tokenizer, prompts)
        distance[mode] = max(float((a - b).abs().max()) for a, b in zip(logits, expected_logits))
        if mode == "dequantized":
            assert outputs == expected
            for a, b in zip(logits, expected_logits):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        else:
            same = f"{sum(a == b for a, b in zip(outputs, expected))}/{len(prompts)}"
            record_property("full_precision_merge_same_greedy_outputs", same)
    record_property("dequantized_merge_max_logit_diff", distance["dequantized"])
    record_property("full_precision_merge_max_logit_diff", distance["base"])
    print(f"\n{arch}: max |logit difference| from base-4bit + adapter: dequantized merge "
          f"{distance['dequantized']:.2e}, full-precision merge {distance['base']:.2e} "
          f"(greedy outputs equal for {same} prompts)")
    # The default merge is another model (the base without its quantisation error), not a rounding of it.
    assert distance["base"] > 100 * max(distance["dequantized"], 1e-6)


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_dequantized_merge_needs_a_4bit_adapter(quantization, tiny_model, tmp_path, capsys):
    adapter = tmp_path / "adapter"  # refused on its train_args.json, before any weights are read
    adapter.mkdir()
    (adapter / "train_args.json").write_text(json.dumps({"model_dir": str(tiny_model), "quantization": quantization}))
    merge = load_script("model_hub/merge_llama_with_chinese_lora")
    with pytest.raises(SystemExit) as e:
        merge.main(["--lora_model", str(adapter), "--output_dir", str(tmp_path / "o"), "--merge_into", "dequantized"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: merge_into=dequantized merges one adapter trained with quantization=4bit, but adapter '{adapter}' "
        f"was trained with quantization={quantization} (its train_args.json); use merge_into=base"]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- refusals

def one_line_error(main, capsys):
    from config_utils import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_full_finetuning_of_a_quantised_base_is_refused_before_loading(tmp_path, train16):
    # model_dir does not exist: had anything been loaded, the error would name it instead.
    proc = run_cmd([PYTHON, "train_trainer.py", "--finetuning=full", "--quantization=4bit", f"--train_path={train16}",
                    "--model_dir=/nonexistent", f"--save_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'quantization': 4bit base weights are frozen, so they cannot be fully fine-tuned; "
        "use finetuning=lora (QLoRA) or quantization=none"]


def test_zero_stage_3_is_refused_with_a_quantised_base(tmp_path, tiny_model, train16, capsys):
    trainer = load_script("train_deepspeed")
    err = one_line_error(lambda: trainer.main(as_argv({"model_dir": tiny_model, "train_path": train16,
                                                       "save_dir": tmp_path, "quantization": "4bit",
                                                       "zero_stage": 3})), capsys)
    assert err.startswith("error: config key 'zero_stage': ZeRO stage 3 is not supported")


@pytest.mark.parametrize("script", ["test", "predict", "chat_ner", "train_trainer"])
def test_unknown_quantization_is_one_line(script, capsys):
    extra = {"test": [], "predict": ["--text=x"], "chat_ner": ["--interactive", "--lora_model=x"], "train_trainer": []}[script]
    module = load_script(script)
    err = one_line_error(lambda: module.main(["--quantization=2bit", *extra]), capsys)
    assert err == "error: config key 'quantization': '2bit' is not one of none, 4bit, 8bit"


def test_missing_bitsandbytes_is_one_line(monkeypatch, tiny_model, train16, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    trainer = load_script("train_trainer")
    err = one_line_error(lambda: trainer.main(as_argv({"model_dir": tiny_model, "train_path": train16,
                                                       "save_dir": tmp_path, "quantization": "4bit"})), capsys)
    assert err.startswith("error: config key 'quantization': 4bit needs bitsandbytes")
    assert "pip install 'bitsandbytes>=0.50,<0.51'" in err


@pytest.mark.parametrize("quantization,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_bitsandbytes_without_support_for_the_device_is_one_line(monkeypatch, tmp_path, tiny_model, train16,
                                                                 capsys, quantization, layer):
    """A build whose kernels do not run on this device (as bitsandbytes before 0.44 on a CPU)."""
    def unsupported(self, x):
        raise NotImplementedError("no kernel for this device in this build")

    monkeypatch.setattr(getattr(bnb.nn, layer), "forward", unsupported)
    trainer = load_script("train_trainer")
    err = one_line_error(lambda: trainer.main(as_argv({"model_dir": tiny_model, "train_path": train16,
                                                       "save_dir": tmp_path, "quantization": quantization})), capsys)
    assert err == (f"error: config key 'quantization': bitsandbytes {bnb.__version__} cannot run {quantization} "
                   f"layers on cpu (no kernel for this device in this build); use quantization=none or a "
                   f"bitsandbytes build for cpu ('bitsandbytes>=0.50,<0.51')")
    assert not any(tmp_path.iterdir())  # refused before the save_dir was touched


def test_resume_with_another_quantization_is_refused(tmp_path, tiny_model, train16):
    from config_utils import UserError, parse_config
    from run_folder import prepare_save_dir
    from train_core import TRAIN_DEFAULTS

    (tmp_path / "train_args.json").write_text(json.dumps({"model_dir": str(tiny_model), "quantization": "4bit"}))
    cfg = parse_config(TRAIN_DEFAULTS, {"model_dir": str(tiny_model), "train_path": str(train16),
                                        "save_dir": str(tmp_path), "resume": True})
    with pytest.raises(UserError, match=r"holds a run with quantization=4bit, not none; resume with the same"):
        prepare_save_dir(cfg)
