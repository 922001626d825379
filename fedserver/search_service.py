"""The search service: one long-lived ServerApp run (``mode="search-service"``) on the coordinator
host that answers encrypted queries as they come, so that a steady query costs its two message
rounds to the sites, not a Flower run of its own (``flwr run``, a new ``flwr-serverapp`` process
importing torch, loading MiniLM and the key epoch: about 10 s a query).

- **Who may ask.** ``fedserver search`` and the console hand the query text to the service over a
  Unix socket in ``DIR/search-service/`` (0700; the socket 0600; :mod:`fedclient.owner_socket`), and
  each end checks the other's user id from the kernel: only the operator's own processes can ask,
  and they answer only to a service of the operator's. The text goes no further than a one-off
  search lets it: the service is the querier process (it holds the querier key and the epoch's
  secret key, as the one-off ServerApp does), embeds, encrypts and signs the query there, and
  nothing is written but the store's HMAC of the text and the hits. No request is persisted, so
  nothing of the text outlives the query in the SuperLink, a command line, a log or the store.
- **What a request may be.** One frame of at most :data:`MAX_REQUEST` bytes of JSON: ``{"op":
  "search", "text", "k", "backend", "row-bound"}``, ``{"op": "ping"}`` or ``{"op": "stop"}``. Anything
  else, a slow sender (:data:`REQUEST_WAIT_S`), or a query the querier refuses is answered with an
  error naming it, and the service goes on.
- **Lifetime.** :func:`ensure_started` starts it on the first search (``flwr run`` with
  ``mode="search-service"``; a lock serialises two first searches), the service holds
  ``service.lock`` for as long as it runs (a second one exits at once), and it ends its run after
  ``search-idle-timeout`` seconds without a request, on ``{"op": "stop"}`` (``fedserver search
  --stop-service``) or with the SuperLink. A later search starts a new one.
- **What it keeps.** MiniLM, the querier identity and the current key epoch (reloaded when it comes
  within the renewal margin of expiring, or when its files are gone): the per-query work is embedding
  (milliseconds), encrypting, the sites' query and fetch rounds, and decrypting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from logging import INFO, WARNING
from typing import Any

from fedclient.owner_socket import (
    SocketClosed,
    bind,
    connect,
    private_directory,
    receive_frame,
    same_user,
    send_frames,
    socket_path,
)

SERVICE_DIR = "search-service"
SOCKET_NAME = "search.sock"
MAX_REQUEST = 64 << 10  # bytes of JSON; a query's text is short
MAX_ANSWER = 16 << 20
MAX_WAITING = 32  # queries queued behind the one in progress
REQUEST_WAIT_S = 5.0  # how long a connection may take to send its request
RUN_CHECK_S = 3.0  # how often a first search asks Flower whether the service's run has ended
START_WAIT_S = 300.0  # how long a first search waits for the service it started (a ServerApp start, MiniLM)
EPOCH_RENEWAL_MARGIN_S = 600.0  # KeyEpoch.current's margin: an epoch this close to expiry is renewed


class ServiceUnavailable(ConnectionError):
    """No search service answers for this deployment directory."""


class ServiceLost(ConnectionError):
    """The service took the request but its answer did not come back whole (it ended, or sent
    more than :data:`MAX_ANSWER`): the query may have reached the sites, so it is not sent again."""


def service_directory(base: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(base) / SERVICE_DIR


def service_socket(base: pathlib.Path) -> pathlib.Path:
    return socket_path(service_directory(base), SOCKET_NAME)


# ---- the asking side (fedserver search, the console) ---------------------------------------------
def ask(base: pathlib.Path, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``request`` to the search service of the deployment in ``base`` and return its answer;
    ServiceUnavailable when none runs."""
    path = service_socket(base)
    try:
        sock = connect(path, timeout=5.0)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise ServiceUnavailable(f"no search service answers at {path}") from err
    with sock:
        sock.settimeout(timeout)
        try:
            send_frames(sock, json.dumps(dict(request)).encode())
            answer = json.loads(receive_frame(sock, MAX_ANSWER))
        except TimeoutError as err:
            raise TimeoutError(f"the search service at {path} did not answer within {timeout:.0f} s") from err
        except (SocketClosed, BrokenPipeError, ConnectionResetError) as err:
            raise ServiceLost(f"the search service at {path} did not answer the request whole ({err}); the "
                              "service's log (`flwr log RUN`) says why") from err
    if not isinstance(answer, dict):
        raise ServiceUnavailable(f"the search service at {path} answered something that is not an object")
    return answer


def ensure_started(base: pathlib.Path, start: Callable[[], str], *, wait: float = START_WAIT_S,
                   failed: Callable[[str], str | None] = lambda _run: None) -> bool:
    """Make sure a search service answers for ``base``: if none does, call ``start`` (which submits
    the service's run and returns its Flower run id) and wait until it answers. ``failed(run_id)``
    returns why the run ended, if it has, to stop waiting early. A lock makes concurrent callers
    start one service. Returns whether this call started it."""
    directory = service_directory(base)
    private_directory(directory)
    with open(directory / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deadline = time.monotonic() + wait
        while True:  # a service that is stopping holds its lock until its last query is answered
            try:
                ask(base, {"op": "ping"}, timeout=10.0)
                return False
            except (ServiceUnavailable, ServiceLost):
                pass
            with _held(directory / "service.lock") as free:
                if free:
                    break
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the search service for {base} is ending and did not finish within {wait:.0f} s")
            time.sleep(0.25)
        run_id = start()
        checked, deadline = time.monotonic(), time.monotonic() + wait
        while True:
            try:
                ask(base, {"op": "ping"}, timeout=10.0)
                return True
            except (ServiceUnavailable, ServiceLost):
                pass
            if time.monotonic() - checked > RUN_CHECK_S:  # asking Flower is a process of its own: not often
                checked = time.monotonic()
                reason = failed(run_id)
                if reason:
                    raise ServiceUnavailable(f"the search service's run {run_id} ended before it answered: {reason}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the search service's run {run_id} did not answer within {wait:.0f} s; "
                                         f"`flwr log {run_id}` shows what it did")
            time.sleep(0.25)


# ---- the service (the ServerApp run) -------------------------------------------------------------
@contextlib.contextmanager
def _held(lock_file: pathlib.Path) -> Iterator[bool]:
    with open(lock_file, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


class SearchService:
    """Answers requests on the service socket with :func:`fedserver.search.answer_query` over
    ``grid``; the querier's state is kept between queries (module docstring)."""

    def __init__(self, grid: Any, store: Any, *, names: Callable[[], Mapping[int, str] | None],
                 exchange_timeout: float = 600.0, embed: Callable[[list[str]], Any] | None = None) -> None:
        from fedserver.search import coordinator_directory

        self.grid, self.store, self.names, self.exchange_timeout = grid, store, names, exchange_timeout
        self.base = coordinator_directory(store.url)
        if embed is None:
            from fedclient.tasks.embedding import Embedder

            embed = Embedder()
        self.embed = embed
        self.epochs: dict[str, Any] = {}  # backend name -> the KeyEpoch in use
        self.queries = 0
        self.started = time.time()
        self.stopping = threading.Event()

    def _epoch(self, backend: str) -> tuple[Any, bool]:
        from fedserver.search import EPOCHS, current_epoch

        epoch = self.epochs.get(backend)
        if (epoch is not None and epoch.bundle.expires_at > time.time() + EPOCH_RENEWAL_MARGIN_S
                and (self.base / EPOCHS / f"{epoch.bundle.epoch}.secret").exists()):
            return epoch, False
        epoch, new = current_epoch(self.base, backend)
        self.epochs[backend] = epoch
        return epoch, new

    def search(self, request: Mapping[str, Any]) -> dict[str, Any]:
        from fedserver.search import answer_query, check_query, encrypt_query, text_digest
        from privacy.vector_search import DEFAULT_ROW_BOUND, SearchError

        text, k = request.get("text"), request.get("k", 10)
        backend, row_bound = request.get("backend", "auto"), request.get("row-bound", DEFAULT_ROW_BOUND)
        if not isinstance(text, str):
            raise SearchError("the request holds no query text")
        if type(k) is not int or type(row_bound) is not int or backend not in ("auto", "pyfhel", "tenseal"):
            raise SearchError("k and row-bound must be whole numbers and backend one of auto, pyfhel, tenseal")
        text = check_query(text, k, row_bound)
        epoch, new = self._epoch(backend)
        query = encrypt_query(self.base, epoch, text, self.embed, k=k, row_bound=row_bound)
        outcome = answer_query(self.grid, self.store, epoch, query, text_digest(self.base, text),
                               names=self.names(), timeout=self.exchange_timeout)
        self.queries += 1
        return {"ok": True, "query-id": outcome.query_id, "new-key-epoch": new, "seconds": outcome.seconds,
                "hits": [hit.__dict__ for hit in outcome.hits], "refusals": outcome.refusals,
                "bytes-up": outcome.bytes_up, "bytes-down": outcome.bytes_down,
                "exchange-seconds": outcome.exchange_seconds}

    def answer_search(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The answer to a search request: its query id, or the error that stopped it."""
        from privacy.vector_search import SearchError

        try:
            return self.search(request)
        except SearchError as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # noqa: BLE001 (one bad query must not end the service)
            from flwr.common import log

            log(WARNING, "search service: a query failed (%s; its text is not logged)", type(err).__name__)
            return {"ok": False, "error": f"the query failed: {str(err)[:500]}"}

    def serve(self, idle_seconds: float) -> None:
        """Answer requests until ``idle_seconds`` pass with no query asked or in progress, or a
        ``stop`` request. Queries run one at a time in a worker thread (in their order of arrival);
        pings and ``stop`` are answered at once, also while a query runs."""
        from flwr.common import log

        directory = service_directory(self.base)
        private_directory(directory)
        with _held(directory / "service.lock") as mine:
            if not mine:
                log(INFO, "search service: another one already answers for %s; this run ends", self.base)
                return
            path = service_socket(self.base)
            listener = bind(path)
            log(INFO, "search service ready at %s (ends after %.0f s without a query)", path, idle_seconds)
            pending: queue.Queue[tuple[socket.socket, dict[str, Any]] | None] = queue.Queue()
            busy = threading.Event()
            self.last = time.monotonic()
            worker = threading.Thread(target=self._work, args=(pending, busy), name="search-queries", daemon=True)
            worker.start()
            try:
                while worker.is_alive():
                    if not busy.is_set() and pending.empty() and time.monotonic() - self.last > idle_seconds:
                        log(INFO, "search service: %.0f s without a query; ending", idle_seconds)
                        break
                    listener.settimeout(1.0)
                    try:
                        conn, _ = listener.accept()
                    except TimeoutError:
                        continue
                    try:
                        if self._take(conn, pending, busy):
                            break
                    except Exception as err:  # noqa: BLE001 (one request must not end the service)
                        log(WARNING, "search service: a request failed (%s)", type(err).__name__)
            finally:
                self.stopping.set()
                listener.close()
                path.unlink(missing_ok=True)
                while True:  # queued queries are not started once the service ends
                    try:
                        item = pending.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        _answer_and_close(item[0], {"ok": False, "error": "the search service is ending; ask again"})
                pending.put(None)
                worker.join()

    def _take(self, conn: socket.socket, pending: queue.Queue, busy: threading.Event) -> bool:
        """Read one request from ``conn``: answer a ping or stop (True) at once; queue a search."""
        answer: dict[str, Any] | None = None
        stop = False
        try:
            if not same_user(conn):
                return False
            try:
                request = json.loads(receive_frame(conn, MAX_REQUEST, deadline=time.monotonic() + REQUEST_WAIT_S))
            except (OSError, SocketClosed):
                return False
            except (ValueError, RecursionError):
                request = None
            if not isinstance(request, dict):
                request = None
            op = request.get("op") if request is not None else None
            if op == "ping":
                answer = {"ok": True, "pid": os.getpid(), "queries": self.queries, "since": self.started,
                          "busy": busy.is_set(), "waiting": pending.qsize()}
            elif op == "stop":
                answer, stop = {"ok": True, "stopping": True}, True
            elif op == "search" and pending.qsize() >= MAX_WAITING:
                answer = {"ok": False, "error": f"{MAX_WAITING} queries are waiting already; ask again later"}
            elif op == "search":
                self.last = time.monotonic()
                pending.put((conn, request))
                conn = None  # the worker answers and closes it
            elif request is None:
                answer = {"ok": False, "error": "the request is not a JSON object"}
            else:
                answer = {"ok": False, "error": f"unknown request {str(op)[:40]!r}; send op search, ping or stop"}
            if answer is not None:
                _answer_and_close(conn, answer)
                conn = None
        finally:
            if conn is not None:
                conn.close()
        return stop

    def _work(self, pending: queue.Queue, busy: threading.Event) -> None:
        while (item := pending.get()) is not None:
            busy.set()
            try:
                if self.stopping.is_set():  # taken from the queue just as the service began to end
                    _answer_and_close(item[0], {"ok": False, "error": "the search service is ending; ask again"})
                    continue
                _answer_and_close(item[0], self.answer_search(item[1]))
            finally:
                del item  # the query's text goes with its request
                self.last = time.monotonic()
                busy.clear()


def _answer_and_close(conn: socket.socket, answer: Mapping[str, Any]) -> None:
    try:
        conn.settimeout(REQUEST_WAIT_S)
        send_frames(conn, json.dumps(answer).encode())
    except OSError:
        pass  # the asker went away; the query is recorded in the store all the same
    finally:
        conn.close()


def serve_searches(grid: Any, config: Mapping[str, Any], names: Callable[[Any], Mapping[int, str] | None]) -> None:
    """The ServerApp's ``mode="search-service"``; ``names(store)``: node id -> enrolled site name."""
    from fedserver.store import RunStore

    store = RunStore(str(config["store"]))
    SearchService(grid, store, names=lambda: names(store)).serve(float(config["search-idle-timeout"]))
