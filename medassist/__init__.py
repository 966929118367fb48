"""medassist: fine-tune Gemma with LoRA into an educational medical assistant, and answer with a safety layer."""

__version__ = "0.1.0"


class UserError(ValueError):
    """A problem the user can fix (bad data, a missing model, a bad option): shown as one message, no traceback."""


def replace_dir(new, target) -> None:
    """Put the finished directory `new` at `target` (same filesystem). A reader or a kill at any moment finds the old
    directory or the new one, never neither: on Linux one renameat2(RENAME_EXCHANGE) swaps them; elsewhere the old
    one is moved aside first (a moment without `target`). The old content is then deleted."""
    import ctypes
    import os
    import shutil
    import tempfile
    from pathlib import Path

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
