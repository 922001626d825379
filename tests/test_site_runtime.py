"""The site runtime (issue #20): a long-lived process that answers the messages Flower's per-message
ClientApp processes forward to it, keeps the model loaded, uses the site's own node config, and
recovers when it is killed mid-message. Real processes, a real Unix socket, the real ClientApp."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import signal
import stat
import threading
import time
import uuid

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedclient.app import build_client_app
from fedclient.runtime import NODE_CONFIG_KEY, Supervisor, forward, runtime_status
from fedclient.wire import ARRAYS, refusal_reason
from tests.test_hostile_coordinator import OPEN, _deliver, _policy, _train_content


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One site runtime for the module, supervised as `fedclient start` supervises it."""
    root = tmp_path_factory.mktemp("site")
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(root / "state"),
            "policy": _policy(root, OPEN)}
    supervisor = Supervisor(root / "state", node, root / "runtime.log", restart_delay=0.2)
    supervisor.start(ready_timeout=180)
    yield supervisor, node
    supervisor.stop()


def _train(supervisor: Supervisor, config: dict | None = None, node_config: dict | None = None,
           state: RecordDict | None = None):
    from flwr.app import Message

    content = _train_content(config)
    context = Context(run_id=7, node_id=1, node_config={**(node_config or {}), NODE_CONFIG_KEY: str(supervisor.socket)},
                      state=state or RecordDict(), run_config={"task": "tiny"})
    message = Message(content, dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return forward(str(supervisor.socket), message, context), context


def test_the_runtime_answers_messages_with_the_model_loaded_once(site, flower_identity, capsys) -> None:
    supervisor, _ = site
    assert stat.S_IMODE(supervisor.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(supervisor.socket.parent.stat().st_mode) == 0o700
    first, context = _train(supervisor, state=RecordDict({"kept": ConfigRecord({"rounds": 3})}))
    assert ARRAYS in first.content, first.error if first.has_error() else refusal_reason(first.content)
    assert context.state["kept"]["rounds"] == 3  # the state the SuperNode keeps went there and came back
    started = time.monotonic()
    second, _ = _train(supervisor)
    assert ARRAYS in second.content and time.monotonic() - started < 5
    status = runtime_status(str(supervisor.socket))
    assert status["model-loads"] == 1 and status["messages"] >= 2 and status["memory-mb"] > 0
    assert status["last-message"]["type"] == "train" and not status["last-message"]["failed"]
    from fedclient import cli as fedclient_cli

    assert fedclient_cli.main(["status", "--state-dir", str(supervisor.state_dir)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert re.search(r"models loaded\W+1 \(1 loads so far\)", shown) and "last message" in shown, shown
    assert fedclient_cli.main(["status", "--state-dir", str(supervisor.state_dir / "elsewhere")]) == 1


def test_the_runtime_uses_the_sites_node_config_not_the_forwarded_one(site, tmp_path, flower_identity) -> None:
    supervisor, _ = site
    strict = {"partition-id": 0, "num-partitions": 2, "policy": _policy(tmp_path, "[training]\nmax-local-steps = 1\n")}
    reply, _ = _train(supervisor, {"local-steps": 2, "schedule-steps": 2}, node_config=strict)
    assert ARRAYS in reply.content  # the forwarded policy (max 1 step) was not the site's: the site's OPEN one ran
    elsewhere = {"data-dir": str(tmp_path / "not-the-sites-data"), "state-dir": str(tmp_path / "not-its-state")}
    reply, _ = _train(supervisor, node_config=elsewhere)
    assert ARRAYS in reply.content and not (tmp_path / "not-its-state").exists()  # its own data and state
    reply, _ = _train(supervisor, {"local-steps": 10**6}, node_config={"policy": _policy(tmp_path, OPEN)})
    assert refusal_reason(reply.content).startswith("site policy training.max-local-steps")  # policy limits hold


def test_a_runtime_killed_mid_message_fails_that_reply_and_comes_back(site, flower_identity) -> None:
    supervisor, _ = site
    before = supervisor.starts
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(reply=_train(supervisor, {"local-steps": 400,
                                                                                    "schedule-steps": 400})[0]))
    worker.start()
    deadline = time.monotonic() + 60
    while runtime_status(str(supervisor.socket))["busy"] != "train":  # it is training now
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.05)
    os.kill(supervisor.process.pid, signal.SIGKILL)
    worker.join(timeout=60)
    reply = result["reply"]
    assert reply.has_error() and "runtime did not answer" in reply.error.reason
    supervisor.wait_ready(timeout=180)
    assert supervisor.starts == before + 1
    again, _ = _train(supervisor)
    assert ARRAYS in again.content  # the site trains again


def test_the_client_app_forwards_only_at_a_real_site(site, tmp_path, flower_identity) -> None:
    """In the SuperNode's ClientApp process the handlers forward to the runtime the node config
    names; a runtime that is not there is a clean failure, not a crash."""
    supervisor, node = site
    app = build_client_app({"task": "tiny"})
    answered = runtime_status(str(supervisor.socket))["messages"]
    reply = _deliver(app, "train", _train_content(), {**node, NODE_CONFIG_KEY: str(supervisor.socket)})
    assert ARRAYS in reply.content and runtime_status(str(supervisor.socket))["messages"] == answered + 1
    local = _deliver(app, "train", _train_content(), node)  # no runtime named: this process answers
    assert ARRAYS in local.content and runtime_status(str(supervisor.socket))["messages"] == answered + 1
    gone = _deliver(app, "train", _train_content(), {**node, NODE_CONFIG_KEY: str(tmp_path / "no.sock")})
    assert gone.has_error() and "runtime did not answer" in gone.error.reason


def _runtime_of_site_0(socket_path: str, node: dict) -> dict:
    """Simulated site 0's node config names the runtime (what `fedclient start` sets); Ray pickles it."""
    return {NODE_CONFIG_KEY: socket_path} if int(node.get("partition-id", -1)) == 0 else {}


@pytest.mark.simulation
def test_on_flower_a_killed_runtime_fails_one_reply_and_the_site_trains_again(site, tmp_path) -> None:
    """3 sites on Flower's engine, 3 rounds; site 0 answers through the site runtime, which is
    SIGKILLed while it trains round 1: that reply fails, every round completes with the others,
    and site 0 trains again once the supervisor has restarted its runtime."""
    from tests.test_simulation import _simulate

    supervisor, _ = site
    starts = supervisor.starts

    def kill_while_training() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if runtime_status(str(supervisor.socket))["busy"] == "train":
                    os.kill(supervisor.process.pid, signal.SIGKILL)
                    return
            except OSError:
                pass
            time.sleep(0.01)

    killer = threading.Thread(target=kill_while_training)
    killer.start()
    store, run_id = _simulate(tmp_path, lambda config: build_client_app(
        config, site_config=functools.partial(_runtime_of_site_0, str(supervisor.socket))),
                              rounds=3, clients=3, **{"fraction-evaluate": 0.0, "local-steps": 10})
    killer.join(timeout=5)
    assert store.get_run(run_id).status == "completed"
    rounds = store.rounds(run_id)
    assert [r.round for r in rounds] == [1, 2, 3] and all(r.num_accepted >= 2 for r in rounds)
    site_0 = {c.round: c.status for c in store.client_rounds(run_id) if c.phase == "train" and c.site == "partition-0"}
    failed = [r for r, status in site_0.items() if status != "ok"]
    assert failed and failed[0] == min(site_0), site_0  # the reply in flight when it was killed failed
    assert any(status == "ok" for r, status in site_0.items() if r > failed[0]), site_0  # and it trained again
    assert supervisor.starts == starts + 1


def test_one_runtime_per_state_directory(site, tmp_path) -> None:
    """A second `fedclient start` on the same state directory must not take the first site's socket."""
    from fedclient.runtime import RuntimeUnavailable

    supervisor, node = site
    second = Supervisor(supervisor.state_dir, {**node, "site-name": "other"}, tmp_path / "second.log")
    with pytest.raises(RuntimeUnavailable, match="another site runtime uses this state directory"):
        second.start(ready_timeout=None)
    assert runtime_status(str(supervisor.socket))["pid"] == supervisor.process.pid  # the first one still answers


def test_a_state_directory_too_deep_for_a_unix_socket_gets_a_private_short_one(tmp_path) -> None:
    from fedclient.runtime import lock_path, socket_path

    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    path = socket_path(deep)
    assert len(str(path)) < 100 and path.parent.name == f"fedtune-{os.geteuid()}"
    assert path == socket_path(deep) and path != socket_path(tmp_path / ("d" * 60) / ("e" * 60) / "other")
    assert lock_path(path).suffix == ".lock" and socket_path(tmp_path) == tmp_path.resolve() / "runtime.sock"


@pytest.fixture
def refusing_runtime_api():
    """An HTTP server on loopback that answers every call as a SuperNode's runtime API answers a
    task token it no longer knows (401), except ``/busy`` paths (503); counts the calls."""
    import http.server

    calls: list[str] = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            calls.append(self.path)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(401)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()


def test_a_task_the_supernode_dropped_fails_alone_without_signalling_the_process(tmp_path, refusing_runtime_api,
                                                                                 flower_identity) -> None:
    """Flower's retry policy and task heartbeat answer a 401 with SIGINT to their own process; the
    runtime's must fail that one call (a runtime answers many tasks), its heartbeat must stop
    asking, and ``fedclient start`` failing a dead runtime's tasks must not stop the site either.
    A claim record is private to the site's user and is not followed through a link."""
    import httpx
    from flwr.app import Message
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    from fedclient.runtime import _Claim, _task_client, _task_heartbeat, claims_directory, fail_orphaned_tasks

    address, calls = refusing_runtime_api
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: interrupted.append(signum))
    try:
        client = _task_client(address, "flwr-clientapp", "a-stale-token")
        started = time.monotonic()
        with pytest.raises(httpx.HTTPStatusError, match="401"):
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        assert time.monotonic() - started < 2 and len(calls) == 1  # not retried
        beat, beat_client = _task_heartbeat(address, "a-stale-token")
        assert beat() is True  # refused: logged once, not retried, no signal
        beat_client.close()
        assert len(calls) == 2
        state = tmp_path / "state"
        message = Message(RecordDict(), dst_node_id=1, message_type="train")
        message.metadata.__dict__["_message_id"] = "ab" * 32
        claim = _Claim(claims_directory(state), "a-stale-token")
        claim.record(message, Context(run_id=5, node_id=1, node_config={}, state=RecordDict(), run_config={}))
        assert stat.S_IMODE(claim.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(claim.path.parent.stat().st_mode) == 0o700
        assert [p.name for p in claims_directory(state).iterdir()] == [claim.path.name]  # no temporary left
        assert fail_orphaned_tasks(state, address) == 0  # the SuperNode no longer knows it: nothing answered
        assert not claim.path.exists() and len(calls) == 3
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "linked").symlink_to(elsewhere)
        with pytest.raises(PermissionError):  # a claims directory swapped for a link is not written through
            _Claim(tmp_path / "linked", "a-stale-token").record(
                message, Context(run_id=5, node_id=1, node_config={}, state=RecordDict(), run_config={}))
        assert not list(elsewhere.iterdir())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted == []


def test_a_loaded_model_is_reused_only_while_its_files_are_unchanged(tmp_path) -> None:
    """A site runtime keeps a task's model loaded across messages and runs; when the model's files
    change under it (a new version installed in place), the next message loads them again."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from fedclient import local
    from fedclient.tasks.model_dir import directory_task_name
    from fedclient.tasks.text import tokenizer

    encoder_dir, data_dir = tmp_path / "encoder", tmp_path / "data"
    config = BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(encoder_dir)
    data_dir.mkdir()
    (data_dir / "rows.csv").write_text("text,label\n" + "".join(f"Match {n} won,sports\nShares {n} fell,business\n"
                                                                for n in range(10)))
    name, cpu, key = directory_task_name(encoder_dir, data_dir), torch.device("cpu"), "bert.embeddings.word_embeddings.weight"
    before = dict(local.MODEL_LOADS)
    first = local._fresh_model(name, cpu, {}).state_dict()[key].clone()
    local._fresh_model(name, cpu, {})
    assert local.MODEL_LOADS["loads"] == before["loads"] + 1 and local.MODEL_LOADS["reloads"] == before["reloads"]
    digest = local.model_loads()["digests"][name]
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(encoder_dir)  # a new version, in place
    again = local._fresh_model(name, cpu, {}).state_dict()[key]
    assert local.MODEL_LOADS["loads"] == before["loads"] + 2 and local.MODEL_LOADS["reloads"] == before["reloads"] + 1
    assert local.model_loads()["digests"][name] != digest
    assert not torch.equal(again, first)
    assert torch.equal(again, BertModel.from_pretrained(encoder_dir).embeddings.word_embeddings.weight)
