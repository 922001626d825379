"""Unix sockets only this user can use: the site runtime's (:mod:`fedclient.runtime`) and the
coordinator's search service (:mod:`fedserver.search_service`).

- **Where.** In a directory of this user that only it can enter (:func:`private_directory`: 0700,
  a real directory, not a link), the socket itself created 0600 (:func:`bind`). Where the natural
  path is too long for a Unix socket (108 bytes on Linux), :func:`socket_path` names it by its hash
  in this user's private directory under the system's temporary directory.
- **Who.** Both ends check the other's user id from the kernel (``SO_PEERCRED``,
  :func:`same_user`), so a socket or a listener another user managed to plant is refused too.
- **Frames.** An 8-byte big-endian length, then that many bytes (:func:`send_frames`,
  :func:`receive_frame`); a length over the caller's limit is refused before anything is
  allocated.

Standard library only: a short-lived command (``fedserver search``) imports it without torch.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import stat
import struct
import tempfile
import time

FRAME = struct.Struct(">Q")
MAX_SOCKET_PATH = 100  # bytes; Linux takes at most 107 for a Unix socket's path
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SocketClosed(ConnectionError):
    """The other end closed the connection mid-frame, or sent a frame over the limit."""


def send_frames(sock: socket.socket, *parts: bytes) -> None:
    """Send each of ``parts`` as one frame."""
    sock.sendall(b"".join(FRAME.pack(len(part)) + part for part in parts))


def _receive_exactly(sock: socket.socket, size: int, deadline: float | None = None) -> bytes:
    chunks, left = [], size
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError("the other end did not send its frame in time")
            sock.settimeout(wait)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise SocketClosed("the other end closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive_frame(sock: socket.socket, limit: int, deadline: float | None = None) -> bytes:
    """One frame's bytes; SocketClosed if its length is over ``limit``, TimeoutError if it has not
    all arrived by ``deadline`` (``time.monotonic()``; one bound for the whole frame, however the
    sender trickles it)."""
    (size,) = FRAME.unpack(_receive_exactly(sock, FRAME.size, deadline))
    if size > limit:
        raise SocketClosed(f"a frame of {size} bytes is over the {limit}-byte limit")
    return _receive_exactly(sock, size, deadline)


def private_directory(directory: pathlib.Path) -> None:
    """Make ``directory`` (0700) or accept an existing one only if it is a real directory (not a
    link) of this user, and make it 0700; PermissionError otherwise: another user's directory
    could be swapped under us."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{directory} is not a directory owned by this user")
    os.chmod(directory, 0o700, follow_symlinks=False)


def socket_path(directory: str | pathlib.Path, name: str) -> pathlib.Path:
    """``directory/name``, or, where that path is too long for a Unix socket, a socket named by its
    hash in this user's private directory under the system's temporary directory."""
    path = pathlib.Path(directory).resolve() / name
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:24]
    return pathlib.Path(tempfile.gettempdir()) / f"fedtune-{os.geteuid()}" / f"{digest}.sock"


def bind(path: pathlib.Path) -> socket.socket:
    """A listening socket at ``path`` (0600, in a :func:`private_directory`); a file already there
    is removed first, so call this only while holding whatever lock says no live listener has it."""
    private_directory(path.parent)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(previous)
    listener.listen(16)
    return listener


def _peer_uid(sock: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):  # not Linux: the 0600 socket in a 0700 directory is the guard
        return None
    _pid, uid, _gid = _PEER_CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
    return uid


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of ``sock`` runs as this user (the kernel's word; root
    is another user too)."""
    uid = _peer_uid(sock)
    return uid is None or uid == os.geteuid()


def connect(path: str | pathlib.Path, timeout: float) -> socket.socket:
    """A connection to the listener at ``path``, refused (PermissionError) unless it runs as this user."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        if not same_user(sock):
            raise PermissionError(f"the process listening at {path} is not this user's; refusing to talk to it")
    except BaseException:
        sock.close()
        raise
    return sock
