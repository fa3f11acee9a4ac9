"""A tokenizer's chat template (prompt_style=chat_template), rendered once, bounded, around a marker.

A chat template is a small Jinja program that travels with a model (tokenizer_config.json,
chat_template.jinja, a GGUF's metadata). transformers renders it in jinja2's sandbox, which
stops access to Python's internals but bounds each range, not the total work or memory:
nested loops run for hours, a string doubled forty times fills memory. So the template is
never run in this process and never sees the user's text: a separate Python process renders
it once per template, under a CPU-time and an address-space limit, with a marker in place of
the user's turn; every prompt is then the text before the marker, the user's text, and the
text after it. The template must write the marker exactly once, verbatim (or trimmed of
surrounding spaces, as Gemma's and Llama-3's templates do); one that drops or rewrites the
user's text would make prompts that hold neither the instruction nor the sentence, and is
refused. Every refusal is one line naming the file the template came from.
"""
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = "\ue000user-text\ue000"  # private-use characters: no template writes them of its own
RENDER_CPU_SECONDS = 5  # CPU time the render may take, after the renderer is imported (a real template: ~1 ms)
RENDER_WALL_SECONDS = 120  # the whole process, start and import included, on a busy machine
RENDER_MEMORY_BYTES = 1 << 30  # memory the render may add to the process
MAX_TEMPLATE_TEXT = 100_000  # characters a template may write around the user's text


@dataclass(frozen=True)
class ChatParts:
    before: str  # the template's text up to the user's text
    after: str  # from the user's text to where the answer starts
    trims: bool  # the template strips spaces around the user's text (`content | trim`)

    def around(self, text):
        return self.before + (text.strip() if self.trims else text) + self.after


_PARTS = {}  # (template, special tokens) -> ChatParts


def template_source(tokenizer):
    """Where a tokenizer's chat template was read from, for messages."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"the tokenizer of {folder}"


def chat_parts(tokenizer, system):
    """The tokenizer's chat template rendered around the user's turn (with `system` as the system
    turn, or without one where the template has no system role): ChatParts, or a PromptError."""
    return check_template(tokenizer.chat_template, system, tokenizer.special_tokens_map, template_source(tokenizer))


def check_template(template, system, special_tokens, source):
    """ChatParts of `template` (special_tokens: the tokenizer's map, which templates read as
    bos_token, eos_token, ...), or a PromptError naming `source`; rendered once per template."""
    tokens = {k: v for k, v in special_tokens.items() if isinstance(v, (str, list))}
    key = (template, system, json.dumps(tokens, sort_keys=True), str(source))
    if key not in _PARTS:
        _PARTS[key] = _split(render_bounded(template, system, tokens), source)
    return _PARTS[key]


def render_bounded(template, system, tokens):
    """{"plain": text, "spaced": text} (the user's turn being MARKER, then " MARKER ") rendered by
    transformers' own renderer in a child process, or {"error": what stopped it}."""
    from dataset import PromptError  # the project's error for a prompt that cannot be built

    request = json.dumps({"template": template, "system": system, "tokens": tokens, "marker": MARKER,
                          "cpu_seconds": RENDER_CPU_SECONDS, "memory_bytes": RENDER_MEMORY_BYTES})
    try:
        done = subprocess.run([sys.executable, "-I", __file__], input=request, capture_output=True, text=True,
                              encoding="utf-8", timeout=RENDER_WALL_SECONDS)
    except subprocess.TimeoutExpired:
        return {"error": f"took more than {RENDER_WALL_SECONDS} s to render"}
    if done.returncode != 0 or not done.stdout.strip():
        if done.returncode in (-9, -24, 128 + 9, 128 + 24):  # SIGKILL, SIGXCPU: the CPU limit
            return {"error": f"took more than {RENDER_CPU_SECONDS} s of CPU to render"}
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise PromptError(f"the chat template could not be rendered: the process rendering it failed ({last[:200]})")
    return json.loads(done.stdout)


def _split(rendered, source):
    from dataset import PromptError

    advice = "use prompt_style alpaca or llama2_chat, or a tokenizer whose template you trust"
    if "error" in rendered:
        raise PromptError(f"the chat template in {source} cannot be used: {rendered['error']}; {advice}")
    plain, spaced = rendered["plain"], rendered["spaced"]
    if plain.count(MARKER) != 1:
        raise PromptError(f"the chat template in {source} does not write the user's text once, verbatim (it "
                          f"appears {plain.count(MARKER)} times): its prompts would not hold the instruction and "
                          f"the sentence as written; {advice}")
    if len(plain) - len(MARKER) > MAX_TEMPLATE_TEXT:
        raise PromptError(f"the chat template in {source} writes {len(plain) - len(MARKER):,} characters around "
                          f"the user's text (more than {MAX_TEMPLATE_TEXT:,}); {advice}")
    before, after = plain.split(MARKER)
    if spaced == plain.replace(MARKER, f" {MARKER} "):
        return ChatParts(before, after, trims=False)
    if spaced == plain:
        return ChatParts(before, after, trims=True)
    raise PromptError(f"the chat template in {source} rewrites the user's text (more than trimming spaces): its "
                      f"prompts would not hold the instruction and the sentence as written; {advice}")


def _limit_self(cpu_seconds, memory_bytes):
    """This (child) process's own limits, set once the renderer is imported: CPU time (the
    kernel stops it at the limit) and address space (an allocation past it is a MemoryError)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds + int(resource.getrusage(resource.RUSAGE_SELF).ru_utime)
                                             + 1,) * 2)
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + memory_bytes,) * 2)
    except (OSError, ValueError):
        pass  # no /proc (not Linux): the CPU limit still bounds the render


def _child():
    """Read a request on stdin, render the template twice (the user's turn MARKER, then
    " MARKER "), print {"plain", "spaced"} or {"error"} as JSON."""
    request = json.loads(sys.stdin.read())
    from jinja2.exceptions import SecurityError
    from transformers.utils.chat_template_utils import render_jinja_template

    _limit_self(request["cpu_seconds"], request["memory_bytes"])
    marker, tokens = request["marker"], request["tokens"]

    def render(content):
        user = {"role": "user", "content": content}
        chats = [[{"role": "system", "content": request["system"]}, user], [user]]
        first = None
        for chat in chats:  # a template without a system role (Mistral's) raises on one: the user turn alone
            try:
                return render_jinja_template(conversations=[chat], chat_template=request["template"],
                                             add_generation_prompt=True, **tokens)[0][0]
            except SecurityError as e:
                raise e
            except Exception as e:  # noqa: BLE001 (any failure of the template is reported, not raised)
                first = first or e
        raise first

    try:
        result = {"plain": render(marker), "spaced": render(f" {marker} ")}
    except SecurityError as e:
        result = {"error": f"the sandbox refused it ({e})"}
    except MemoryError:
        result = {"error": f"it needed more than {request['memory_bytes'] >> 20} MB to render"}
    except RecursionError:
        result = {"error": "it recursed without end"}
    except Exception as e:  # noqa: BLE001
        result = {"error": f"it raised {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    _child()
