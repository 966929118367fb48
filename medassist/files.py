"""Writing files so that a reader or a kill at any moment finds the old content or the new, never a mix: adapter
directories, exports, imports and JSONL outputs. No torch, no Lightning: both sides use it."""
import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path

ADAPTER_META = "medassist.json"  # written beside every adapter's peft files: base model, template, quantization


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
            shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / target.name)
        os.replace(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, target)


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """All lines or nothing: write a temporary file beside `path`, then rename it over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
