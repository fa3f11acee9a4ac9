"""What make demo runs with: demo.mk's settings, read the way make reads that file.

demo.mk holds `NAME ?= value` lines under comment lines (the Makefile includes it); a benchmark
that times the demo's path reads its values from here instead of writing them again.
"""
import re
from pathlib import Path

DEMO_SETTINGS = Path(__file__).resolve().parent.parent / "demo.mk"
_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(\?=|:=|=)\s*(.*)")


def read_demo_settings(path=DEMO_SETTINGS):
    """{NAME: value} of every assignment in `path`; comment and blank lines are passed over. Any
    other line (make syntax this reader does not follow) is refused, naming it, rather than read
    differently from make."""
    settings = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line.strip())
        if m is None or "#" in m.group(3) or "$" in m.group(3):
            raise ValueError(f"{path}:{lineno}: not a plain `NAME ?= value` line: {line.strip()!r}")
        settings[m.group(1)] = m.group(3)
    return settings
