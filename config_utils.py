"""Dict configs overridable from the command line.

Each script defines its defaults as a (possibly nested) dict. Nested keys are flattened with
`_` ({"optimizer": {"lr": 1e-4}} becomes `optimizer_lr`) and any key can be overridden:

    python train_trainer.py --learning_rate=3e-4 --lora_r 16 num_train_epochs=2

Values are parsed with `ast.literal_eval` (never `eval`) and must fit the default's type.
"""
import ast
import difflib
import errno
import io
import logging
import math
import os
import re
import sys
import tokenize
from pathlib import Path

# On CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional 4-bit kernel from the model hub at
# import and logs a warning when it cannot (never reachable offline); its own CPU kernel is used
# instead. Every script imports this module first, so errors stay the one line they are meant to be.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# DeepSpeed warns at import, in every script that reaches it through transformers or PEFT, that it
# found no GPU and uses the CPU: on a CPU machine that is the expected case, so that one line goes.
logging.getLogger("DeepSpeed").addFilter(lambda record: not str(record.msg).startswith("Setting accelerator to CPU"))


class UserError(Exception):
    """A mistake in what the user gave (config, data, paths): reported in one line, exit 2."""


class ConfigError(UserError):
    pass


# Keys every script accepts: the DeepSpeed launcher appends --local_rank=N to the command line.
ALWAYS_ACCEPTED = {
    "local_rank": -1,  # set by the DeepSpeed launcher; nothing to set by hand
}
_BOOLS = {"true": True, "false": False}
_NONE = {"none", "null"}


def flatten(config, prefix=""):
    flat = {}
    for key, value in config.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


class Config:
    """Flat config: attribute access (`cfg.lora_r`) plus `cfg["lora_r"]`, `cfg.get`, `cfg.to_dict()`."""

    def __init__(self, values):
        self.__dict__.update(values)

    def __getitem__(self, key):
        return self.__dict__[key]

    def __contains__(self, key):
        return key in self.__dict__

    def get(self, key, default=None):
        return self.__dict__.get(key, default)

    def to_dict(self):
        return dict(self.__dict__)

    def __repr__(self):
        return f"Config({self.__dict__!r})"


def parse_value(text):
    """Command-line text -> a Python value: bools in any case, None, numbers, lists/dicts; else str."""
    low = text.strip().lower()
    if low in _BOOLS:
        return _BOOLS[low]
    if low in _NONE:
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a plain string such as a path


# Keys without a typed default are paths; these few also take True (resume: the latest checkpoint).
PATH_OR_TRUE = {"resume"}


# Keys for which `none` is one of the values (quantization=none), not Python's None.
NONE_IS_A_VALUE = {"quantization"}


def _coerce(key, value, default, raw):
    if value is None and key in NONE_IS_A_VALUE and raw.strip().lower() == "none":
        return "none"
    if value is None:
        if default is None:
            return value
        raise ConfigError(f"config key '{key}' needs a {type(default).__name__} value, not None (default {default!r})")
    if default is None:
        # Keys without a typed default are paths (model_dir, output_dir) or "path or True"
        # (resume): `--output_dir=2024` means the folder 2024, not the number.
        if isinstance(value, bool):
            if key in PATH_OR_TRUE and value:
                return value
            raise ConfigError(f"config key '{key}': {raw!r} is not a path" +
                              (" (True or a path)" if key in PATH_OR_TRUE else ""))
        return raw.strip() if isinstance(value, (int, float)) else value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float's range
                number = math.inf
            if not math.isfinite(number):  # 1e999 reads as inf: no setting means that
                raise ConfigError(f"config key '{key}': {raw!r} is not a finite number")
            return number
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        # A path or name that happens to look like a number stays the string the user typed.
        return raw if not isinstance(value, str) else value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        if isinstance(value, str) and not value.lstrip().startswith(("[", "(", "{")):  # `--targets=q_proj,v_proj`
            return type(default)(v.strip() for v in value.split(",") if v.strip())
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise ConfigError(
        f"config key '{key}': {raw!r} is not a {type(default).__name__} (default {default!r})"
    )


class ConfigParser:
    """`ConfigParser(defaults).parse_main(args=None)` -> Config of the flattened, overridden keys."""

    def __init__(self, config_dict):
        self.defaults = {**ALWAYS_ACCEPTED, **flatten(config_dict)}

    def _split(self, args):
        pairs, i = [], 0
        while i < len(args):
            arg = args[i]
            if arg in ("-h", "--help"):
                pairs.append(("help", None))
                i += 1
                continue
            body = arg[2:] if arg.startswith("--") else arg
            if "=" in body:
                key, raw = body.split("=", 1)
            elif arg.startswith("--"):
                key = body
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or (nxt.startswith("--") and len(nxt) > 2 and not _is_number(nxt)):
                    # A bare flag: `--overwrite` means True, only for boolean keys.
                    if isinstance(self.defaults.get(key.replace("-", "_")), bool):
                        raw = "True"
                    else:
                        raise ConfigError(f"config key '{key}' needs a value (--{key}=VALUE)")
                else:
                    raw = nxt
                    i += 1
            else:
                raise ConfigError(f"cannot read argument {arg!r}: use --key=value, --key value or key=value")
            pairs.append((key.replace("-", "_"), raw))
            i += 1
        return pairs

    def parse_main(self, args=None):
        args = sys.argv[1:] if args is None else list(args)
        values = dict(self.defaults)
        for key, raw in self._split(args):
            if key == "help":
                try:
                    print(self.help_text())
                except BrokenPipeError:  # `--help | head`
                    pass
                raise SystemExit(0)
            if key not in self.defaults:
                close = difflib.get_close_matches(key, list(self.defaults), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see --help"
                raise ConfigError(f"unknown config key '{key}'{hint}")
            values[key] = _coerce(key, parse_value(raw), self.defaults[key], raw)
        return Config(values)

    def help_text(self):
        """Every key with its default, and under it the comment written beside its default."""
        width = max(len(k) for k in self.defaults)
        meanings = key_comments(self.defaults)
        lines = ["Config keys (override with --key=value):"]
        for key, value in self.defaults.items():
            lines.append(f"  --{key:<{width}}  {value!r}")
            if meanings.get(key):
                lines.append(f"      {meanings[key]}")
        return "\n".join(lines)


_KEY_LINE = re.compile(r'^(\s*)"(\w+)":\s*(.*)$')
_UNREADABLE = object()


def _file_key_comments(path):
    """[(flattened key, default value or _UNREADABLE, comment)] for the dict literals of a file.

    A key whose value opens a dict on the same line prefixes the keys inside it, as `flatten`
    joins them (`"lora": {"r": 8}` gives `lora_r`).
    """
    try:
        source = Path(path).read_text(encoding="utf-8")
        comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    except (OSError, UnicodeDecodeError, tokenize.TokenError, SyntaxError):
        return []
    found, stack = [], []  # stack: (indent, key) of the dicts we are inside
    lines = source.splitlines()
    for lineno, line in enumerate(lines, 1):
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if rest.startswith("{") and "}" not in rest:
            stack.append((indent, key))
        elif lineno in comments:
            column, text = comments[lineno]
            value_text = line[:column][m.start(3):].strip().rstrip(",")
            try:
                value = ast.literal_eval(value_text)
            except (ValueError, SyntaxError):
                value = _UNREADABLE
            found.append(("_".join([k for _, k in stack] + [key]), value, text))
    return found


def key_comments(defaults):
    """{key: the comment beside its default}, looked up in the running script, then the project's
    modules it imported, then the others; a candidate whose literal value is the key's default
    wins over one that is not (the same key name can mean different things in two scripts)."""
    root = Path(__file__).resolve().parent
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    loaded = set()
    for module in list(sys.modules.values()):
        path = Path(getattr(module, "__file__", None) or "/").resolve()
        if root in path.parents and "site-packages" not in path.parts and path.suffix == ".py":
            loaded.add(str(path))  # the project's own modules (model_hub/ scripts included)
    files = ([str(Path(main).resolve())] if main else []) + sorted(loaded) + sorted(
        str(p) for p in root.glob("*.py") if str(p) not in loaded)
    candidates, score = {}, {}
    for path in dict.fromkeys(files):
        for key, value, text in _file_key_comments(path):
            candidates.setdefault(key, []).append((value, text, path))
            # The file that defines this defaults dict holds the most of its keys.
            score[path] = score.get(path, 0) + (key in defaults)
    meanings = {}
    for key, default in defaults.items():
        options = sorted(candidates.get(key, []), key=lambda c: -score[c[2]])
        options = [(v, t) for v, t, _ in options]
        exact = [t for v, t in options if v is not _UNREADABLE and v == default]
        unreadable = [t for v, t in options if v is _UNREADABLE]
        pick = exact or unreadable or [t for _, t in options]
        if pick:
            meanings[key] = pick[0]
    return meanings


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_config(defaults, argv=None):
    """Defaults dict or ready Config/dict of overrides -> Config. Tests pass a dict of overrides."""
    if isinstance(argv, dict):
        # Python values travel as literals; anything else (str, Path) as its text.
        literal = (bool, int, float, list, tuple, dict, type(None))
        argv = [f"--{k}={v!r}" if isinstance(v, literal) else f"--{k}={v}" for k, v in argv.items()]
    return ConfigParser(defaults).parse_main(argv)


# How a failed write shows up: OSError from Python, the OS message inside safetensors' and
# torch.save's own exceptions (torch says only "file write failed").
_WRITE_FAILURES = ("No space left on device", "StorageFull", "Disk quota exceeded", "File too large",
                   "FileTooLarge", "file write failed")


def _write_failure(error):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(text in str(error) for text in _WRITE_FAILURES)


def check_writable(path, key, folder=True):
    """An output location that can be written, checked before any long work: a folder (made if
    missing) or a file whose folder exists; a probe file is created and removed. One line naming
    the key otherwise."""
    import tempfile

    path = Path(path)
    where = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"config key '{key}': {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise ConfigError(f"config key '{key}': {path} is a folder; give a file name")
    try:
        if folder:
            path.mkdir(parents=True, exist_ok=True)
        elif not where.is_dir():
            raise ConfigError(f"config key '{key}': folder {where} does not exist")
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"config key '{key}': cannot write in {where} ({e.strerror or e})") from None
    return path


def require_keys(cfg, *keys):
    """Keys a script cannot run without (their default is ""): one line naming the first missing."""
    for key in keys:
        if not cfg[key]:
            raise ConfigError(f"config key '{key}' is required (--{key}=...); see --help")
    return cfg


# The outputs this process has put in place (files.commit_files notes them), so that an
# interrupted run can say truthfully what it wrote.
_WRITTEN = []


def note_written(paths):
    _WRITTEN.extend(str(p) for p in paths)


def interrupted_message():
    """What an interrupted run says: outputs are written whole or not at all, so either none of
    this run's replaced anything, or those it names are whole."""
    if not _WRITTEN:
        return "interrupted: no output of this run was written (files from before are as they were)"
    shown = ", ".join(dict.fromkeys(_WRITTEN[-4:]))
    return (f"interrupted: this run had written {len(set(_WRITTEN))} output file(s) whole before it stopped "
            f"(last: {shown}); nothing else was replaced")


def run_cli(main):
    """Run `main()` for a script: a UserError becomes one line on stderr and exit status 2, and so
    does a write that failed for lack of space (outputs are written atomically, so the files
    that were there before are intact)."""
    _WRITTEN.clear()  # this run's outputs only (tests run several scripts in one process)
    try:
        return main()
    except KeyboardInterrupt:
        print("\n" + interrupted_message(), file=sys.stderr)
        raise SystemExit(130) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        if not _write_failure(e):
            raise
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        # A write fails mid-run, usually under a progress bar: start the error on a line of its own.
        print(f"\nerror: a file could not be written{where}: the disk is full or a size limit was reached "
              f"({str(e).splitlines()[0][:200]}); free space and run again (training: --resume=True continues "
              f"from the last complete checkpoint)", file=sys.stderr)
        raise SystemExit(2) from None
