"""config_utils.ConfigParser: the command-line syntax, strict typing and the script error path.

Expected values are written by hand from the rules in the README's Config section and the
module docstring of config_utils.
"""
import pytest

from conftest import PYTHON, load_script, run_cmd
from config_utils import ConfigError, ConfigParser, run_cli

DEFAULTS = {
    "learning_rate": 1e-4,
    "lora_r": 8,
    "overwrite": False,
    "model_dir": None,
    "save_dir": "checkpoint/msra",
    "targets": ["q_proj", "v_proj"],
    "extra": {},  # an empty dict stays one key (only non-empty dicts are flattened)
    "optimizer": {"betas": {"beta1": 0.9}, "eps": 1e-8},
}


def parse(args, defaults=DEFAULTS):
    return ConfigParser(defaults).parse_main(args=list(args))


# --------------------------------------------------------------------------- syntax

@pytest.mark.parametrize("args", [
    ["--lora_r=16"],
    ["--lora_r", "16"],
    ["lora_r=16"],
])
def test_three_spellings_of_an_override(args):
    cfg = parse(args)
    assert cfg.lora_r == 16 and type(cfg.lora_r) is int
    assert cfg.learning_rate == 1e-4  # untouched keys keep their defaults


def test_several_spellings_mixed_in_one_command_line():
    cfg = parse(["--lora_r", "4", "learning_rate=2e-5", "--save_dir=out/x", "--overwrite", "true"])
    assert (cfg.lora_r, cfg.learning_rate, cfg.save_dir, cfg.overwrite) == (4, 2e-5, "out/x", True)


def test_no_arguments_gives_the_flattened_defaults():
    cfg = parse([])
    assert cfg.to_dict() == {
        "local_rank": -1, "learning_rate": 1e-4, "lora_r": 8, "overwrite": False, "model_dir": None,
        "save_dir": "checkpoint/msra", "targets": ["q_proj", "v_proj"], "extra": {},
        "optimizer_betas_beta1": 0.9, "optimizer_eps": 1e-8,
    }


def test_value_holding_an_equals_sign_is_kept_whole():
    assert parse(["--save_dir=a=b"]).save_dir == "a=b"


def test_hyphenated_key_means_the_underscored_one():
    assert parse(["--lora-r=2"]).lora_r == 2


# --------------------------------------------------------------------------- types

@pytest.mark.parametrize("text,expected", [
    ("True", True), ("true", True), ("TRUE", True), ("False", False), ("false", False),
])
def test_booleans_in_any_case(text, expected):
    assert parse([f"--overwrite={text}"]).overwrite is expected
    assert parse(["--overwrite", text]).overwrite is expected


def test_true_overrides_a_true_default_too():
    # The seed turned "True" into False; check both directions against each default.
    assert parse(["--flag=True"], {"flag": True}).flag is True
    assert parse(["--flag=False"], {"flag": True}).flag is False


def test_bare_flag_sets_a_boolean_key():
    assert parse(["--overwrite"]).overwrite is True
    assert parse(["--overwrite", "--lora_r=3"]).overwrite is True


@pytest.mark.parametrize("args", [["--lora_r=-1"], ["--lora_r", "-1"], ["lora_r=-1"]])
def test_negative_int_stays_int(args):
    cfg = parse(args)
    assert cfg.lora_r == -1 and type(cfg.lora_r) is int


def test_negative_float_after_a_space():
    cfg = parse(["--learning_rate", "-3e-4"])
    assert cfg.learning_rate == -0.0003 and type(cfg.learning_rate) is float


def test_scientific_notation_is_a_float():
    cfg = parse(["--learning_rate=3e-4"])
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 0.0003


def test_int_given_for_a_float_default_becomes_float():
    cfg = parse(["--learning_rate=1"])
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 1.0


def test_list_from_a_literal():
    assert parse(["--targets=[1,2]"]).targets == [1, 2]
    assert parse(["--targets=['k_proj']"]).targets == ["k_proj"]


def test_list_from_comma_text():
    cfg = parse(["--targets=q_proj,k_proj,v_proj"])
    assert cfg.targets == ["q_proj", "k_proj", "v_proj"]
    assert parse(["--targets", "a,b"]).targets == ["a", "b"]
    assert parse(["--targets=o_proj"]).targets == ["o_proj"]  # one name, no comma


def test_broken_list_literal_is_an_error():
    with pytest.raises(ConfigError, match="targets"):
        parse(["--targets=[1,2"])


def test_dict_from_a_literal():
    cfg = parse(["--extra={'a': 1, 'b': [2, 3]}"])
    assert cfg.extra == {"a": 1, "b": [2, 3]}


@pytest.mark.parametrize("text,expected", [
    # None-default keys are paths (or "path or True"): a folder named 2024 stays the text 2024.
    ("5", "5"), ("2.5", "2.5"), ("2024", "2024"), ("model_hub/tiny-llama", "model_hub/tiny-llama"),
    ("[1, 2]", [1, 2]), ("None", None),
])
def test_none_default_accepts_anything(text, expected):
    value = parse([f"--model_dir={text}"]).model_dir
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["True", "False", "true"])
def test_path_key_refuses_a_boolean(text):
    # `--output_dir=True` names no folder; only keys that take "True or a path" (resume) accept it.
    with pytest.raises(ConfigError, match="config key 'model_dir': .* is not a path"):
        parse([f"--model_dir={text}"])


@pytest.mark.parametrize("default", [None, "none"])
def test_none_is_a_value_of_quantization(default):
    # `--quantization=none` asks for full-precision base weights: the text, whatever the default.
    assert parse(["--quantization=none"], {**DEFAULTS, "quantization": default}).quantization == "none"
    assert parse(["--quantization=None"], {**DEFAULTS, "quantization": default}).quantization == "none"


@pytest.mark.parametrize("key,text", [("lora_r", "None"), ("save_dir", "None"), ("overwrite", "none")])
def test_typed_key_refuses_none(key, text):
    with pytest.raises(ConfigError, match=f"config key '{key}' needs a .* value, not None"):
        parse([f"--{key}={text}"])


@pytest.mark.parametrize("text", ["007", "10", "1e3", "1.50", "True", "[1,2]"])
def test_str_default_keeps_the_text_as_typed(text):
    value = parse([f"--save_dir={text}"]).save_dir
    assert value == text and type(value) is str


# --------------------------------------------------------------------------- nesting

def test_nested_dict_is_flattened_with_underscores():
    cfg = parse([], {"a": {"b": 1}})
    assert cfg.a_b == 1 and "a" not in cfg and cfg["a_b"] == 1
    assert parse(["--a_b=7"], {"a": {"b": 1}}).a_b == 7


def test_deeply_nested_override():
    cfg = parse(["--optimizer_betas_beta1=0.95", "--optimizer_eps=1e-6"])
    assert cfg.optimizer_betas_beta1 == 0.95 and cfg.optimizer_eps == 1e-6


def test_nested_parent_name_is_not_a_key():
    with pytest.raises(ConfigError) as e:
        parse(["--a=3"], {"a": {"b": 1}})
    assert "'a'" in str(e.value) and "a_b" in str(e.value)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("arg,key", [
    ("--lora_r=abc", "lora_r"),
    ("--lora_r=2.5", "lora_r"),  # a float is not an int
    ("--lora_r=True", "lora_r"),  # a bool is not an int
    ("--overwrite=3", "overwrite"),
    ("--overwrite=yes", "overwrite"),
    ("--learning_rate=fast", "learning_rate"),
    ("--learning_rate=True", "learning_rate"),
    ("--extra=[1]", "extra"),
])
def test_wrong_type_names_the_key(arg, key):
    with pytest.raises(ConfigError) as e:
        parse([arg])
    msg = str(e.value)
    assert f"'{key}'" in msg
    assert "\n" not in msg  # one line
    assert arg.split("=", 1)[1] in msg  # and the value that did not fit


def test_unknown_key_names_the_closest_keys():
    with pytest.raises(ConfigError) as e:
        parse(["--learnin_rate=3e-4"])
    msg = str(e.value)
    assert "learnin_rate" in msg and "learning_rate" in msg
    assert "\n" not in msg


def test_unknown_key_in_every_spelling():
    for args in (["--lora_rank=4"], ["--lora_rank", "4"], ["lora_rank=4"]):
        with pytest.raises(ConfigError, match="lora_r"):
            parse(args)


def test_missing_value_for_a_non_bool_key():
    with pytest.raises(ConfigError, match="lora_r"):
        parse(["--lora_r"])


def test_positional_argument_is_refused():
    with pytest.raises(ConfigError, match="stray"):
        parse(["stray"])


@pytest.mark.parametrize("args", [["--local_rank=3"], ["--local_rank", "3"]])
def test_local_rank_is_always_accepted(args):
    cfg = parse(args, {"x": 1})
    assert cfg.local_rank == 3 and cfg.x == 1


def test_local_rank_defaults_to_minus_one():
    assert parse([], {"x": 1}).local_rank == -1


# --------------------------------------------------------------------------- never eval

@pytest.mark.parametrize("key", ["save_dir", "model_dir"])
def test_values_are_never_evaluated(tmp_path, key):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    value = getattr(parse([f"--{key}={payload}"]), key)
    assert not marker.exists()
    assert value == payload  # a str (or None-default) key keeps the text itself


def test_evaluation_payload_for_an_int_key_is_a_type_error(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="lora_r"):
        parse([f"--lora_r=__import__('os').system('touch {marker}')"])
    assert not marker.exists()


# --------------------------------------------------------------------------- --help

def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--lora_r=3", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    expected = {"local_rank": -1, "learning_rate": 1e-4, "lora_r": 8, "overwrite": False, "model_dir": None,
                "save_dir": "checkpoint/msra", "targets": ["q_proj", "v_proj"], "extra": {},
                "optimizer_betas_beta1": 0.9, "optimizer_eps": 1e-8}
    for key, default in expected.items():
        matching = [ln for ln in lines if f"--{key} " in ln]
        assert len(matching) == 1, (key, out)
        assert repr(default) in matching[0], (key, matching[0])


def test_short_help_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["-h"])
    assert e.value.code == 0
    assert "--lora_r" in capsys.readouterr().out


# --------------------------------------------------------------------------- scripts

def test_script_with_a_bad_key_exits_2_with_one_line():
    proc = run_cmd([PYTHON, "process.py", "--bogus=1"], check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "bogus" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_script_with_a_misspelled_key_suggests_the_right_one():
    proc = run_cmd([PYTHON, "process.py", "--dev_sise", "10"], check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "dev_sise" in lines[0] and "dev_size" in lines[0]


def test_script_help_prints_its_defaults_and_exits_0():
    proc = run_cmd([PYTHON, "process.py", "--help"], check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # process.py's keys as documented in its module (read independently from the script text).
    for key, default in [("data_name", "'msra'"), ("data_root", "'data'"), ("dev_size", "1000"), ("seed", "42"),
                         ("format", "'auto'"), ("train_file", "''"), ("local_rank", "-1")]:
        line = [ln for ln in proc.stdout.splitlines() if f"--{key} " in ln]
        assert len(line) == 1 and line[0].rstrip().endswith(default), (key, proc.stdout)


def test_run_cli_turns_a_config_error_into_exit_2(capsys):
    def main():
        return ConfigParser({"x": 1}).parse_main(["--x=oops"])

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "'x'" in err


def test_script_main_takes_a_list_of_arguments():
    """process.main(argv) parses the same syntax as the command line (no argv patching)."""
    process = load_script("process")
    with pytest.raises(ConfigError, match="dev_size"):
        process.main(["--dev_size=many"])


def test_parse_config_takes_a_dict_of_python_values():
    from pathlib import Path

    from config_utils import parse_config

    cfg = parse_config({"path": "a", "n": 1, "lr": 0.1, "flag": False, "names": ["x"], "any": None},
                       {"path": Path("/data/x.txt"), "n": 3, "lr": 2, "flag": True, "names": ["p", "q"], "any": "t"})
    assert (cfg.path, cfg.n, cfg.lr, cfg.flag, cfg.names, cfg.any) == ("/data/x.txt", 3, 2.0, True, ["p", "q"], "t")
