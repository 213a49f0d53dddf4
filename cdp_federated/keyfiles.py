"""Secret files on disk (signing keys, tokens): owner-only, refused when others can read them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["check_private_mode", "write_private"]


def check_private_mode(path: Path, error: Callable[[str, str, str], Exception]) -> None:
    """Raise ``error(message, value, fix)`` when ``path`` is readable by group or others (POSIX)."""
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & 0o077:
        raise error(
            "secret file is readable by group or others",
            f"{path} (mode {mode & 0o777:o})",
            f"chmod 600 {path}",
        )


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``data`` to a file created with mode 0600 (never briefly world-readable). Without
    ``replace`` an existing file is an error (``FileExistsError``)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # a key must survive a crash right after it was made
