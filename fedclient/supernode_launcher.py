"""``flower-supernode`` that runs only signed apps, with adaptive (default), fixed or Flower's waits:
``python -m fedclient.supernode_launcher --trusted-publisher FILE [--poll-interval S | --flower-waits] -- ARGS...``.

**App verification** (:mod:`fedclient.app_trust`). Flower 1.39's SuperNode receives a run's FAB in
``_pull_and_store_message`` (``flwr/supernode/start_client_internal.py``): it asks the SuperLink for
the run (``get_run``) and the FAB (``get_fab``), stores both, and only later does a ClientApp
process install and import that FAB. This launcher wraps that function so the FAB is verified the
moment ``get_fab`` returns it, against the run's ``fab-signature`` and the site's trusted publisher
key. A FAB that fails is never stored: the SuperNode answers the message with an ``INVALID_FAB``
error (as Flower does for its own Hub verification) and no code of it runs. Flower's own
``--trusted-entities`` cannot serve here: it verifies only Hub records, which a FAB submitted with
``flwr run`` lacks, and it then refuses every such FAB.

**Shorter waits.** Flower's SuperNode sleeps a hard-coded 3 s whenever ``PullMessages`` finds nothing
and polls every 0.5 s for the ClientApp's reply; neither is configurable. By default (*adaptive*) a
site waits :data:`ACTIVE_POLL_S` between pulls for :data:`ACTIVE_WINDOW_S` after its last message
(the next round's message, a search's fetch after its query) and Flower's 3 s once idle, so an idle
site costs the SuperLink what Flower's does; ``--poll-interval S`` waits ``S`` always, at the price
of an idle site calling ``PullMessages`` 1/S times per second (keep S ≥ 0.2 beyond a few dozen
sites); ``--flower-waits`` keeps Flower's. Except with ``--flower-waits``, the poll for the reply
starts at :data:`FIRST_REPLY_WAIT_S` and doubles up to the pull wait (at most Flower's 0.5 s), so a
quick answer leaves at once (it is a look into the SuperNode's own memory, not a request), and the
backoff of the SuperNode's object pulls (Flower: 1 s, then 2 s, ... up to 10 s for each message part
the SuperLink does not hold yet; the coordinator pushes a message's head before its arrays) is S/4
first and S at most (adaptive: 0.05 s first, :data:`ADAPTIVE_PULL_BACKOFF_CAP_S` at most): requests
to the SuperLink only while a message is on its way. Measured in ``bench/deployment_latency.py``.

**Heartbeats.** A SuperNode tells the SuperLink it is alive every ~30 s (Flower's fixed
``HEARTBEAT_DEFAULT_INTERVAL``), and the SuperLink declares it gone after two missed intervals
(60 s), only then answering its messages in flight as failed. ``--heartbeat-interval S`` (10..1800,
the range the SuperLink accepts) announces and uses ``S`` instead, so a site that dies is noticed
within about 2·S, at the price of 30/S times the heartbeat calls.

**Lost replies.** After pulling a message the SuperNode waits for the ClientApp's reply before it
pulls the next one, and waits forever if none comes. Flower answers for a ClientApp process whose
heartbeat stops, but not for one that finished without a reply (its push to the SuperNode failed,
which a loaded machine can cause): such a site keeps heartbeating and answers nothing, and every
later run hangs on it. The launcher therefore answers such a message itself, with Flower's own
``CLIENT_APP_CRASHED`` error, once every ClientApp task has finished and no reply came within
:data:`LOST_REPLY_GRACE_S`.

All four reach into Flower's module internals, so the launcher refuses to start on any Flower but the
one it was written against (:data:`FLOWER_VERSION`) and checks the shape of what it wraps;
``tests/test_hostile_coordinator.py`` pins the wrapped source, so an upgrade fails a test first.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import pathlib
import sys
import time as _time
from typing import Any

FLOWER_VERSION = "1.39.0"
IDLE_WAIT_S = 3.0  # the SuperNode's wait after an empty PullMessages
REPLY_WAIT_S = 0.5  # its poll for the ClientApp's reply
ACTIVE_POLL_S = 0.2  # adaptive waits: between pulls while the site is active
ACTIVE_WINDOW_S = 60.0  # ... for this long after its last message
FIRST_REPLY_WAIT_S = 0.01  # the first poll for a reply; doubling from there
ADAPTIVE_PULL_BACKOFF_CAP_S = 1.0  # adaptive waits: longest wait for a message part (0.05 s first; Flower: 1 s .. 10 s)
LOST_REPLY_GRACE_S = 10.0  # after its last ClientApp task finished, a message with no reply is answered as crashed
PUSH_PARAMETERS = ("state", "object_store", "send", "push_object")
WRAPPED_PARAMETERS = ("state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
                      "confirm_message_received", "trusted_entities")


class _ShorterWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the wait after an empty pull
    becomes ``interval`` within ``active_window`` seconds of the last message, ``idle_interval``
    after; the reply poll starts at :data:`FIRST_REPLY_WAIT_S` and doubles up to ``interval`` (at most
    Flower's 0.5 s); every other call goes to the real ``time`` module."""

    def __init__(self, interval: float, idle_interval: float | None = None,
                 active_window: float = ACTIVE_WINDOW_S) -> None:
        self.interval, self.active_window = interval, active_window
        self.idle_interval = interval if idle_interval is None else idle_interval
        self.last_message = -float("inf")
        self.reply_wait = FIRST_REPLY_WAIT_S

    def message_seen(self) -> None:
        """A message was pulled: the site is active, and its reply is polled for quickly again."""
        self.last_message, self.reply_wait = _time.monotonic(), FIRST_REPLY_WAIT_S

    def wait_after_empty_pull(self) -> float:
        active = _time.monotonic() - self.last_message < self.active_window
        return min(IDLE_WAIT_S, self.interval if active else self.idle_interval)

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_WAIT_S:
            seconds = self.wait_after_empty_pull()
        elif seconds == REPLY_WAIT_S:
            self.last_message = _time.monotonic()  # a message is being answered
            seconds = min(REPLY_WAIT_S, self.interval, self.reply_wait)
            self.reply_wait = min(2 * self.reply_wait, REPLY_WAIT_S)
        _time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def _supernode_module() -> Any:
    import flwr
    from flwr.supernode import start_client_internal

    if flwr.__version__ != FLOWER_VERSION:
        raise RuntimeError(f"fedclient's SuperNode launcher is written for flwr {FLOWER_VERSION}, this is "
                           f"{flwr.__version__}: its app verification would not be where Flower installs apps")
    return start_client_internal


def install_shorter_waits(interval: float, idle_interval: float | None = None,
                          pull_backoff_cap: float | None = None) -> _ShorterWaits:
    """Shorten the SuperNode's fixed waits in this process (:class:`_ShorterWaits`; ``idle_interval``
    once idle, default ``interval``), and its backoff (1 s, 2 s, ... up to 10 s in Flower) for a
    message part the SuperLink does not have yet (the coordinator pushes a message's head before
    its arrays) to ``interval / 4`` first, ``pull_backoff_cap`` (default ``interval``) at most."""
    import functools

    for wait in (interval, interval if idle_interval is None else idle_interval):
        if not 0.01 <= wait <= IDLE_WAIT_S:
            raise ValueError(f"poll interval must be in 0.01..{IDLE_WAIT_S} s, got {wait}")
    module = _supernode_module()
    if getattr(module, "time", None) is not _time:
        raise RuntimeError("this Flower version's SuperNode loop is not the one fedclient patches; start with "
                           "--poll-interval flower")
    pull_objects = module.pull_objects
    if not {"initial_backoff", "backoff_cap"} <= set(inspect.signature(pull_objects).parameters):
        raise RuntimeError("this Flower version's pull_objects is not the one fedclient adjusts; start with "
                           "--poll-interval flower")
    waits = _ShorterWaits(interval, idle_interval)
    module.time = waits  # type: ignore[assignment]
    module.pull_objects = functools.partial(pull_objects, initial_backoff=interval / 4,
                                            backoff_cap=pull_backoff_cap or interval,
                                            max_tries_per_object=None)  # Flower's 2 h bound still holds
    return waits


HEARTBEAT_RANGE_S = (10.0, 1800.0)  # flwr.common.constant HEARTBEAT_MIN_INTERVAL..MAX_INTERVAL


def install_heartbeat_interval(interval: float) -> None:
    """Make this process's SuperNode announce, and send heartbeats at, ``interval`` seconds."""
    low, high = HEARTBEAT_RANGE_S
    if not low <= interval <= high:
        raise ValueError(f"heartbeat interval must be in {low:g}..{high:g} s (what the SuperLink accepts), got {interval}")
    _supernode_module()
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat

    for module in (connection, heartbeat):
        if getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None) != 30:
            raise RuntimeError("this Flower version's heartbeat is not the one fedclient adjusts; start without "
                               "--heartbeat-interval")
        module.HEARTBEAT_DEFAULT_INTERVAL = interval  # type: ignore[attr-defined]


def install_app_check(publisher: Any) -> None:
    """Make this process's SuperNode refuse every FAB not signed by ``publisher`` (an Ed25519
    public key), before the FAB is stored or any of its code runs."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log
    from flwr.supercore.constant import TaskType

    from fedclient.app_trust import SIGNATURE_KEY, UntrustedApp, verify_fab

    module = _supernode_module()
    original = module._pull_and_store_message
    if tuple(inspect.signature(original).parameters) != WRAPPED_PARAMETERS:
        raise RuntimeError("this Flower version's _pull_and_store_message is not the one fedclient wraps")

    def pull_and_store_verified(state, object_store, node_config, receive, get_run, get_fab, pull_object,
                                confirm_message_received, trusted_entities):
        received: dict[str, Any] = {}
        runs: dict[int, Any] = {}

        def receive_noting() -> Any:
            pulled = receive()
            if pulled is not None:
                received["message"] = pulled[0]
            return pulled

        def get_run_noting(run_id: int) -> Any:
            runs[run_id] = get_run(run_id)
            return runs[run_id]

        def get_fab_verified(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            run = runs.get(run_id) or get_run_noting(run_id)
            if getattr(run, "primary_task_type", "") == TaskType.AGENT_APP:  # no one here would claim its task
                raise UntrustedApp("a fedtune site runs ClientApps only, not agent apps")
            verify_fab(fab.content, fab_hash, str(run.override_config.get(SIGNATURE_KEY, "")), publisher)
            return fab

        try:
            run_id = original(state, object_store, node_config, receive_noting, get_run_noting, get_fab_verified,
                              pull_object, confirm_message_received, trusted_entities)
            if run_id is not None and isinstance(module.time, _ShorterWaits):
                module.time.message_seen()
            return run_id
        except UntrustedApp as err:
            message = received["message"]
            log(logging.ERROR, "fedtune: refusing the app of run %s: %s", message.metadata.run_id, err)
            reply = Message(Error(ErrorCode.INVALID_FAB, f"fedtune site refused the app: {err}"), reply_to=message)
            module._insert_message(reply, state, object_store)
            return message.metadata.run_id

    module._pull_and_store_message = pull_and_store_verified


def install_lost_reply_watchdog(grace: float = LOST_REPLY_GRACE_S) -> None:
    """Make this process's SuperNode answer a message whose ClientApp task finished without a reply
    (Flower's ``CLIENT_APP_CRASHED`` error), ``grace`` seconds after the last task finished,
    instead of waiting for that reply forever."""
    from flwr.common.constant import Status
    from flwr.supercore import log
    from flwr.supernode.nodestate.in_memory_nodestate import CLIENT_APP_CRASHED_ERROR, InMemoryNodeState

    module = _supernode_module()
    original = module._push_messages
    if tuple(inspect.signature(original).parameters) != PUSH_PARAMETERS:
        raise RuntimeError("this Flower version's _push_messages is not the one fedclient wraps")

    def reply_waiting(state: InMemoryNodeState) -> bool:  # get_messages would mark it retrieved
        with state.lock_msg_store:
            return any(entry.message.metadata.reply_to_message_id and not entry.is_retrieved
                       for entry in state.msg_store.values())

    def push_messages_or_answer_lost(state, object_store, send, push_object):
        if not isinstance(state, InMemoryNodeState):
            return original(state, object_store, send, push_object)
        all_finished_since: float | None = None
        while not reply_waiting(state):
            unfinished = state.get_tasks(statuses=[Status.PENDING, Status.STARTING, Status.RUNNING])
            if unfinished:
                all_finished_since = None
            elif all_finished_since is None:
                all_finished_since = _time.monotonic()
            elif _time.monotonic() - all_finished_since > grace:
                run_ids = {task.run_id for task in state.get_tasks()}
                log(logging.ERROR, "fedtune: a ClientApp finished without a reply; answering its message as crashed")
                state._store_error_replies(run_ids, CLIENT_APP_CRASHED_ERROR)
                all_finished_since = None
            module.time.sleep(REPLY_WAIT_S)
        if isinstance(module.time, _ShorterWaits):  # the reply's parts may still be on their way: look soon
            module.time.reply_wait = FIRST_REPLY_WAIT_S
        return original(state, object_store, send, push_object)

    module._push_messages = push_messages_or_answer_lost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedclient.supernode_launcher",
                                     description="flower-supernode that runs only signed fedtune apps")
    parser.add_argument("--trusted-publisher", required=True, help="the publisher's Ed25519 public key (PEM)")
    waits = parser.add_mutually_exclusive_group()
    waits.add_argument("--poll-interval", type=float, default=None, help="fixed shorter waits, in seconds "
                       "(default: adaptive, see the module docstring)")
    waits.add_argument("--flower-waits", action="store_true", help="keep Flower's own waits (3 s idle, 0.5 s reply)")
    parser.add_argument("--heartbeat-interval", type=float, default=None, help="seconds between heartbeats")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="-- then flower-supernode's arguments")
    args = parser.parse_args(argv)
    from fedclient.app_trust import load_publisher

    install_app_check(load_publisher(pathlib.Path(args.trusted_publisher)))
    install_lost_reply_watchdog()
    if args.poll_interval is not None:
        install_shorter_waits(args.poll_interval)
    elif not args.flower_waits:
        install_shorter_waits(ACTIVE_POLL_S, idle_interval=IDLE_WAIT_S, pull_backoff_cap=ADAPTIVE_PULL_BACKOFF_CAP_S)
    if args.heartbeat_interval is not None:
        install_heartbeat_interval(args.heartbeat_interval)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    sys.argv = ["flower-supernode", *arguments]
    flower_supernode()


if __name__ == "__main__":
    main()
