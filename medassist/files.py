"""Writing files so that a reader or a kill at any moment finds the old content or the new, never a mix: adapter
directories, checkpoints, exports, imports and JSONL outputs. A failed write removes its temporary file or directory;
a finished one is renamed into place and the rename is made durable (fsync of the directory). No torch, no
Lightning: both sides use it."""
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ADAPTER_META = "medassist.json"  # written beside every adapter's peft files: base model, template, quantization


def fsync_dir(directory) -> None:
    """Make the renames inside `directory` survive a power loss (a rename lives in the directory's own blocks)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open a directory: there, the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (network, FUSE) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def replace_dir(new, target) -> None:
    """Put the finished directory `new` at `target` (same filesystem). A reader or a kill at any moment finds the old
    directory or the new one, never neither: on Linux one renameat2(RENAME_EXCHANGE) swaps them; elsewhere the old
    one is moved aside first (a moment without `target`). The old content is then deleted."""
    new, target = Path(new), Path(target)
    if target.exists():
        try:
            renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # not glibc/Linux
            renameat2 = None
        at_fdcwd, rename_exchange = -100, 2
        if renameat2 and renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(target), rename_exchange) == 0:
            fsync_dir(target.parent)
            shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / target.name)
        os.replace(new, target)
        fsync_dir(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, target)
        fsync_dir(target.parent)


@contextmanager
def atomic_dir(target) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; fill it, and on a clean exit it replaces `target`
    (replace_dir). On an exception `target` is untouched and the temporary directory is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace


def write_file_atomic(path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(f) on a temporary file beside `path`, sync it to disk, rename it over `path`, sync the directory.

    A failure (disk full, an exception in `write`) removes the temporary file and leaves `path` as it was. A kill
    cannot run that cleanup: it leaves `.<name>.<pid>.tmp` beside the untouched `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """All lines or nothing: a temporary file beside `path`, then renamed over it (write_file_atomic)."""
    def write(f):
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    write_file_atomic(path, write)
