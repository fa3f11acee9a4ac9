"""Outputs on disk: how the project writes a file or a folder so that readers see the old one or the
whole new one, never half of it, with the permissions any file the user creates gets.

Every script that writes an output (data, adapters, converted models, evaluations) goes through
here: atomic_write_text and commit_files for files, staged_folder for folders, share_files for
what a private temporary or safetensors' writer left 0600, and json_text/jsonl_text for the
project's JSON outputs (UTF-8, not escaped).
"""
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from config_utils import UserError, note_written


def jsonl_text(rows):
    """One JSON object per line (UTF-8, not escaped)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def json_text(data):
    """One JSON document (UTF-8, not escaped, indented)."""
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def write_jsonl(path, rows):
    """jsonl_text, written atomically."""
    atomic_write_text(path, jsonl_text(rows))


def write_json(path, data):
    """json_text, written atomically."""
    atomic_write_text(path, json_text(data))


def _staged_text(path, text):
    """`text` written whole to a temporary file beside `path` (hidden, same folder, so that a
    rename puts it in place); returns the temporary file's path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        share_files(tmp)  # mkstemp makes it private; outputs are meant to be read by others
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_text(path, text):
    """Write a file through a temporary name and a rename: readers see the old file or the whole
    new one, never a partial one, and a failure (disk full, Ctrl-C) leaves the old file as it was."""
    commit_files([(path, text)])


@contextmanager
def _signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C and kill (SIGTERM) wait until the block ends, then act as they would have: a few
    renames are not split by them. Only the main thread can set handlers; elsewhere as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, saved = [], {}
    for signum in signums:
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            saved[signum] = signal.signal(signum, lambda received, frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def commit_files(files):
    """Write several files as one output, [(path, text), ...], the last the mark of a complete
    set (test.py: metrics.json). Each is first written whole under a temporary name beside its
    place (the slow part, which an interruption or a full disk stops with nothing replaced);
    then, with Ctrl-C and SIGTERM held back, the earlier mark is moved aside, the files are
    renamed into place, the mark last, and the earlier mark removed. Where the mark stands, the
    files beside it are its run's; an interrupted run leaves the earlier files as they were."""
    files = [(Path(path), text) for path, text in files]
    staged = []
    try:
        for path, text in files:
            staged.append((_staged_text(path, text), path))
        with _signals_held():
            mark = staged[-1][1]
            aside = mark.with_name(f".{mark.name}-earlier-{os.getpid()}") if len(staged) > 1 and mark.exists() else None
            if aside is not None:
                os.replace(mark, aside)
            for tmp, path in staged:
                os.replace(tmp, path)
            note_written([path for _, path in staged])
            if aside is not None:
                aside.unlink()
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)  # a file not renamed because an earlier one failed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_files(path):
    """Give `path` (a file, or a folder and everything in it) the permissions any file the user
    creates gets: 0666 (folders 0777) less the umask. Private temporaries (mkstemp, mkdtemp) and
    safetensors' own writer make files 0600; every output is meant to be read like the rest."""
    path, mask = Path(path), _umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
    return path


def refuse_link(path, what, hint="point it at the real folder or remove the link"):
    """A folder that staged_folder will replace may not be a symbolic link: the rename would
    replace the link, not update what it points to. Refused in one line before any work."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{what} is a symbolic link (to {os.readlink(path)}); {hint}")


def staging_prefix(path, kind=""):
    """The name prefix of what a run stages beside `path`: hidden, and holding the run's process
    id, so that remove_leftovers can tell a killed run's leftovers from a running one's."""
    return f".{Path(path).name}-{kind}{os.getpid()}-"


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(path):
    """Remove what killed runs staged beside `path` (staging_prefix: a folder being written, an
    old one moved aside, a conversion's source): a kill -9 gives no run the chance to clean up,
    so the next one does, leaving alone what a running process stages."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}-(?:[a-z]+-)?(\d+)(?:-.*)?")
    for entry in path.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _running(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def staged_folder(path):
    """A temporary folder beside `path` to write a whole output folder into; when the block
    ends without error it replaces `path` (the old one, if any, moved aside, then removed), and
    on any error it is deleted: readers see the old folder or the complete new one, never a
    half-written one. What killed runs left beside `path` is removed first."""
    path = Path(path)
    refuse_link(path, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(path), dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(staging_prefix(path, "old-") + "folder")
            os.replace(path, old)
        share_files(tmp)  # mkdtemp and safetensors' writer make them private; the result is meant to be shared
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
