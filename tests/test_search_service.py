"""The coordinator's search service (fedserver/search_service.py) at its socket: who can reach it,
what it refuses and how it starts and ends. Queries that reach the sites are exercised over the
TLS deployment (tests/test_deployment.py's walk-through); here every request is refused or
answered before any site would be asked, so no federation runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import threading
import time

import pytest

from fedclient.owner_socket import connect, receive_frame, send_frames
from fedserver import search_service
from fedserver.search_service import SearchService, ServiceUnavailable, ask, ensure_started, service_socket


@pytest.fixture(scope="module")
def embedder():
    from fedclient.tasks.embedding import Embedder

    return Embedder()


def _service(base: pathlib.Path, embedder) -> SearchService:
    from fedserver.store import RunStore

    base.mkdir(parents=True, exist_ok=True)
    return SearchService(None, RunStore(f"sqlite:///{base / 'store.db'}"), names=lambda: None, embed=embedder)


def _serving(service: SearchService, idle: float) -> threading.Thread:
    thread = threading.Thread(target=service.serve, args=(idle,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert ask(service.base, {"op": "ping"}, timeout=5)["ok"]
            return thread
        except ServiceUnavailable:
            assert time.monotonic() < deadline and thread.is_alive(), "the service did not come up"
            time.sleep(0.05)


def _raw(base: pathlib.Path, frame_bytes: bytes) -> dict | None:
    """Send ``frame_bytes`` as they are (not necessarily a well-formed frame); the answer or None."""
    with connect(service_socket(base), timeout=10) as sock:
        sock.sendall(frame_bytes)
        try:
            return json.loads(receive_frame(sock, 1 << 20))
        except ConnectionError:
            return None


def test_the_service_refuses_bad_requests_by_name_and_keeps_answering(tmp_path, embedder, monkeypatch) -> None:
    monkeypatch.setattr(search_service, "REQUEST_WAIT_S", 0.5)
    base = tmp_path / "coord"
    service = _service(base, embedder)
    thread = _serving(service, idle=120)
    path = service_socket(base)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"

    def refused(request: dict) -> str:
        answer = ask(base, request, timeout=30)
        assert answer["ok"] is False, answer
        return answer["error"]

    assert "empty" in refused({"op": "search", "text": "   "})
    assert "whole numbers" in refused({"op": "search", "text": "rates", "k": "5"})
    assert "whole numbers" in refused({"op": "search", "text": "rates", "k": True})
    assert "k must be in 1..1000" in refused({"op": "search", "text": "rates", "k": 0})
    assert "row bound" in refused({"op": "search", "text": "rates", "row-bound": 10**9})
    assert "backend" in refused({"op": "search", "text": "rates", "backend": "../../etc"})
    assert "no query text" in refused({"op": "search", "text": ["rates"]})
    assert "unknown request 'drop-tables'" in refused({"op": "drop-tables"})
    assert "not a JSON object" in _raw(base, send_frame(b"{not json"))["error"]
    assert "not a JSON object" in _raw(base, send_frame(b"[1, 2]"))["error"]
    assert "not a JSON object" in _raw(base, send_frame(b"[" * 60_000))["error"]  # too deep for json: refused
    assert _raw(base, (1 << 30).to_bytes(8, "big")) is None  # a 1 GiB frame is refused unread
    with connect(path, timeout=10) as silent:  # a connection that never sends is dropped, not waited for
        started = time.monotonic()
        assert silent.recv(1) == b"" and time.monotonic() - started < 5
    with connect(path, timeout=10) as trickle:  # nor one that sends a byte now and then: one deadline per request
        started = time.monotonic()
        frame, closed = send_frame(json.dumps({"op": "ping"}).encode()), False
        for byte in frame[:-1]:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed or trickle.recv(1) == b""
        assert time.monotonic() - started < 3
    assert not any(base.rglob("*.secret"))  # nothing refused got as far as making a key epoch
    assert ask(base, {"op": "ping"}, timeout=5)["queries"] == 0

    assert ask(base, {"op": "stop"}, timeout=5) == {"ok": True, "stopping": True}
    thread.join(10)
    assert not thread.is_alive() and not path.exists()
    with pytest.raises(ServiceUnavailable):
        ask(base, {"op": "ping"}, timeout=5)


@pytest.fixture
def open_to_all():
    """A directory every local user may enter (pytest's own base directory is 0700)."""
    import tempfile

    directory = pathlib.Path(tempfile.mkdtemp(prefix="fedtune-svc-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_only_this_user_reaches_the_service_and_only_its_service_gets_the_text(open_to_all, embedder,
                                                                               monkeypatch) -> None:
    from fedclient import owner_socket

    base = open_to_all / "coord"
    thread = _serving(_service(base, embedder), idle=120)
    path = service_socket(base)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    if os.geteuid() == 0:  # another local user cannot even reach the socket
        child = os.fork()
        if child == 0:
            os.setgid(65534)
            os.setuid(65534)
            try:
                socket.socket(socket.AF_UNIX).connect(str(path))
                os._exit(1)
            except PermissionError:
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(2)
        assert os.waitpid(child, 0)[1] == 0
    # the kernel's word on the other end: as if each end ran as another user, both refuse
    monkeypatch.setattr(owner_socket, "_peer_uid", lambda sock: os.geteuid() + 1)
    with pytest.raises(PermissionError, match="not this user's"):  # the asker does not send its text
        ask(base, {"op": "search", "text": "interest rates"}, timeout=5)
    with socket.socket(socket.AF_UNIX) as sock:  # the service answers nothing to another user
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(send_frame(json.dumps({"op": "ping"}).encode()))
            assert sock.recv(1) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before or with the request unread: no answer either
    monkeypatch.undo()
    assert ask(base, {"op": "stop"}, timeout=5)["ok"]
    thread.join(10)
    assert not thread.is_alive()


def send_frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def test_one_service_per_deployment_and_it_ends_after_its_idle_time(tmp_path, embedder) -> None:
    base = tmp_path / "coord"
    first = _serving(_service(base, embedder), idle=2.0)
    pid = ask(base, {"op": "ping"}, timeout=5)["pid"]
    second = threading.Thread(target=_service(base, embedder).serve, args=(60,), daemon=True)
    second.start()
    second.join(10)
    assert not second.is_alive()  # found the first one's lock and ended at once
    assert ask(base, {"op": "ping"}, timeout=5)["pid"] == pid and first.is_alive()
    first.join(15)
    assert not first.is_alive() and not service_socket(base).exists()


def test_concurrent_first_searches_start_one_service_and_a_failed_start_is_named(tmp_path, embedder) -> None:
    base = tmp_path / "coord"
    starts: list[threading.Thread] = []

    def start() -> str:
        starts.append(threading.Thread(target=_service(base, embedder).serve, args=(60,), daemon=True))
        starts[-1].start()
        return str(len(starts))

    results: list[bool] = []
    askers = [threading.Thread(target=lambda: results.append(ensure_started(base, start))) for _ in range(3)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(60)
    assert len(starts) == 1 and sorted(results) == [False, False, True]
    ask(base, {"op": "stop"}, timeout=5)
    starts[0].join(10)

    with pytest.raises(ServiceUnavailable, match="run 7 ended before it answered: finished:failed"):
        ensure_started(base, lambda: "7", failed=lambda run: "finished:failed", wait=30)


def test_what_a_site_writes_into_a_search_reply_is_cut_to_a_bound(flower_identity) -> None:
    """A hostile site's error text or refusal is recorded and answered at most MAX_SITE_TEXT long."""
    from flwr.app import Error, Message, RecordDict

    from fedclient.wire import refusal_record
    from fedserver.search import MAX_SITE_TEXT, _reason

    asked = Message(RecordDict(), dst_node_id=5, message_type="query.search")
    assert _reason(Message(refusal_record("x" * 100_000), reply_to=asked)) == "x" * MAX_SITE_TEXT
    failed = _reason(Message(Error(0, "y" * 100_000), reply_to=asked))
    assert failed.startswith("0: y") and len(failed) == MAX_SITE_TEXT
