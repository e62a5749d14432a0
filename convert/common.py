"""What every conversion direction shares: one error type, the write-to-temp-then-rename
guard, and copying the tokenizer next to the weights."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import warnings
from pathlib import Path

# Everything a transformers or mlx-lm tokenizer may be saved as (SentencePiece, BPE, tiktoken),
# plus the generation defaults mlx-lm reads the EOS ids from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
TOKENIZER_GLOBS = ("*.tiktoken",)


class ConvertError(RuntimeError):
    """A conversion that cannot go on; the message names the problem and the fix."""


PARTIAL_MARK = ".regla-partial"  # inside every staging folder: what may be swept as stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove staging folders that earlier conversions left in ``parent`` when they were killed
    (SIGKILL, power loss): ours by their mark, and only when their process is gone."""
    removed = []
    for p in Path(parent).glob(".*.tmp-*"):
        pid = p.name.rpartition(".tmp-")[2]
        if p.is_dir() and pid.isdigit() and (p / PARTIAL_MARK).exists() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM and SIGHUP end the process without running ``finally`` blocks; while a folder is
    being written they raise SystemExit instead, so the cleanup below still runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, stop) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def staged_output(dst: Path):
    """Yield a temporary folder next to ``dst``; rename it to ``dst`` only when the body succeeds.

    Written beside ``dst`` (same file system) so the final rename is atomic, and removed on any
    failure, Ctrl-C or SIGTERM so a crash or a full disk never leaves a half-written checkpoint
    behind; what a SIGKILL leaves is swept by the next conversion into the same parent folder.
    """
    dst = Path(dst).expanduser().absolute()
    if dst.exists():
        raise ConvertError(f"{dst} already exists: choose a new output folder or remove it first")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst.parent} does not exist: create the parent folder first")
    remove_stale(dst.parent)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with _terminate_as_exit():
        tmp.mkdir()
        try:
            (tmp / PARTIAL_MARK).touch()
            try:
                yield tmp
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ConvertError(f"no space left on the disk while writing {dst}: free some space "
                                       "or pick an output folder on another disk") from None
                raise
            except RuntimeError as e:
                # MLX reports a failed write as a RuntimeError carrying the C library's message.
                if "No space left" in str(e):
                    raise ConvertError(f"no space left on the disk while writing {dst}: free some space "
                                       "or pick an output folder on another disk") from None
                raise
            if dst.exists():
                raise ConvertError(f"{dst} appeared while converting: remove it or choose another folder")
            (tmp / PARTIAL_MARK).unlink()
            os.rename(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files; warn (not fail) when there are none, since the weights alone
    are still a valid checkpoint to which a tokenizer can be added later."""
    copied = []
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        names += [p.name for p in src.glob(pattern)]
    for n in names:
        shutil.copy2(src / n, dst / n)
        copied.append(n)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")) \
            and not any(n.endswith(".tiktoken") for n in copied):
        warnings.warn(f"{src} has no tokenizer files: the converted model has none either; copy "
                      "tokenizer.json / tokenizer.model into it before chatting", stacklevel=2)
    return copied
