"""Site state files that concurrent processes cannot under-count and a crash cannot roll back.

A partner site keeps its privacy ledger, its query budget and its search records in small files.
Flower starts a new ClientApp process for every message, so two processes may update one file at
the same time, and any of them may be killed at any moment. Every update therefore:

1. takes an exclusive ``flock`` on ``FILE.lock`` for the whole read-modify-write (a second process
   waits, then reads what the first one wrote: nothing is counted twice or lost);
2. writes the new content to a temporary file in the same directory (mode 0600), ``fsync``\\ s it,
   renames it over ``FILE`` (atomic on POSIX) and ``fsync``\\ s the directory, so the rename itself
   survives a power cut. After :meth:`StateFile.write` returns, the new content is durable: a reader
   sees the old file or the new one, never a mix, and never the old one again.

Callers charge *before* a release leaves the site: write, then send.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import tempfile
from collections.abc import Iterator


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` durably: temp file, fsync, rename, fsync of the directory."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the directory entries (a rename, a new file) of ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateFile:
    """One state file, read and written while its lock is held (see :func:`locked`)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def read_text(self) -> str | None:
        """The current content, or None if the file does not exist yet."""
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, text: str) -> None:
        write_atomic(self.path, text.encode("utf-8"))


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[StateFile]:
    """Hold the exclusive lock of ``path`` (``path.lock``, created 0600) for a read-modify-write."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(target.parent / f"{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield StateFile(target)
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


__all__ = ["StateFile", "fsync_directory", "locked", "write_atomic"]
