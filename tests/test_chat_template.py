"""A model's chat template is a program from the model's files (a GGUF's metadata among them):
prompt_style=chat_template renders it bounded, in a process of its own, around a marker for the
user's text, and refuses in one line naming its file a template that drops the user's text,
runs without end or touches Python's internals, in training and at inference alike.
"""
import json
import shutil

import pytest

from conftest import PYTHON, as_argv, load_script, run_cmd
from dataset import PromptError, PromptEncoder
from test_architectures import CHATML
from test_reliability import no_model_load, one_error_line  # noqa: F401 (a fixture)

TURNS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
END = "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
TEMPLATES = {
    # Renders the turns' roles but none of their text: prompts would hold no instruction and no sentence.
    "no_user_text": TURNS + END,
    # Nested ranges: the sandbox bounds each range (100,000), not the 10**10 iterations of both.
    "endless": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + CHATML,
    # Python's internals through an attribute: the sandbox refuses it.
    "internals": "{{ ''.__class__.__mro__ }}" + CHATML,
    # Doubling a string: a few seconds to fill all memory, under any time limit.
    "doubling": "{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 40 + CHATML,
}


def model_with_template(tiny_model, folder, template):
    """The tiny model with a ChatML tokenizer whose chat template is `template` (chat_template.jinja)."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    assert (folder / "chat_template.jinja").is_file()
    return folder


@pytest.mark.parametrize("kind, expected", [
    ("no_user_text", "does not write the user's text once, verbatim (it appears 0 times)"),
    ("endless", "cannot be used: took more than 1 s of CPU to render"),
    ("internals", "cannot be used: the sandbox refused it (access to attribute '__class__'"),
    ("doubling", "cannot be used: it needed more than"),
])
def test_training_refuses_the_template_before_the_model_loads(kind, expected, tiny_model, train16, tmp_path,
                                                               monkeypatch, no_model_load):
    if kind == "endless":
        monkeypatch.setattr("chat_template.RENDER_CPU_SECONDS", 1)  # 5 s by default
    model = model_with_template(tiny_model, tmp_path / "model", TEMPLATES[kind])
    options = {"model_dir": model, "train_path": train16, "dev_path": "", "save_dir": tmp_path / "run",
               "prompt_style": "chat_template", "max_steps": 1}
    with pytest.raises(PromptError) as e:
        load_script("train_trainer").main(as_argv(options))
    assert f"the chat template in {model / 'chat_template.jinja'} " in str(e.value) and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_inference_refuses_the_template_before_the_model_loads(untrained_adapter, train16, tiny_model, tmp_path,
                                                                no_model_load):
    # An adapter trained with prompt_style=chat_template whose tokenizer's template drops the user's text.
    adapter = tmp_path / "adapter"
    shutil.copytree(untrained_adapter, adapter)
    model_with_template(tiny_model, tmp_path / "tokenizer", TEMPLATES["no_user_text"])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tmp_path / "tokenizer" / name).is_file():
            shutil.copy(tmp_path / "tokenizer" / name, adapter / name)
    args = json.loads((adapter / "train_args.json").read_text(encoding="utf-8"))
    args.update(prompt_style="chat_template", prompt_id="tokenizer-chat-template")
    (adapter / "train_args.json").write_text(json.dumps(args), encoding="utf-8")
    for script, option in (("test", f"--test_path={train16}"), ("predict", "--text=北京")):
        with pytest.raises(PromptError, match=rf"chat template in {adapter / 'chat_template.jinja'} does not write"):
            load_script(script).main([f"--lora_model={adapter}", option, f"--output_dir={tmp_path / 'eval'}"]
                                     if script == "test" else [f"--lora_model={adapter}", option])


@pytest.mark.parametrize("kind, expected", [("endless", "took more than 5 s of CPU to render"),
                                            ("internals", "the sandbox refused it")])
def test_chat_ner_ends_in_one_line(kind, expected, tiny_model, tmp_path):
    model = model_with_template(tiny_model, tmp_path / "model", TEMPLATES[kind])
    # A generous bound on the whole command: without a bound on rendering, it runs for hours.
    proc = run_cmd([PYTHON, "chat_ner.py", f"--base_model={model}", "--prompt_style=chat_template", "--with_prompt",
                    "--interactive", "--only_cpu", "--max_new_tokens=4"], input="文本：北京\n\n", check=False,
                   timeout=240)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert str(model / "chat_template.jinja") in line and expected in line
    assert "Response:" not in proc.stdout


def test_template_prompts_are_the_rendered_template(tiny_model, tmp_path):
    """Spliced around the marker, the prompt is what the template itself renders for the text;
    a template that trims the user's text (as Gemma's and Llama-3's do) gets it trimmed."""
    from model_utils import load_tokenizer

    trimming = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    for name, template in (("verbatim", CHATML), ("trimming", trimming)):
        tokenizer = load_tokenizer(model_with_template(tiny_model, tmp_path / name, template))
        encoder = PromptEncoder({"prompt_style": "chat_template"}, tokenizer)
        for query in ("文本：北京大学", "文本：北京 "):
            rendered = tokenizer.apply_chat_template(
                [{"role": "system", "content": "You are a helpful assistant. 你是一个乐于助人的助手。"},
                 {"role": "user", "content": f"抽取实体\n{query}"}], tokenize=False, add_generation_prompt=True)
            assert encoder.prompt_ids("抽取实体", query) == tokenizer.encode(rendered, add_special_tokens=False)
