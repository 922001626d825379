"""``flower-supernode`` with shorter fixed waits: ``python -m fedclient.fast_supernode SECONDS ARGS...``.

Flower 1.39's SuperNode sleeps a hard-coded 3 s whenever its ``PullMessages`` finds nothing and polls
every 0.5 s for the ClientApp's reply (``flwr/supernode/start_client_internal.py``); neither is
configurable. On average that adds 1.5 s + 0.25 s to every message a site receives, a train +
evaluate round twice that. ``fedclient start --poll-interval S`` runs the SuperNode through this
launcher, which replaces those two waits with ``S`` (at most the originals) and changes nothing else:
same arguments, same code path. The price is an idle site calling ``PullMessages`` 1/S times per
second instead of 1/3: keep S ≥ 0.2 for federations of more than a few dozen sites. Measured in
``bench/deployment_latency.py``. Opt-in because it reaches into Flower's module internals; a Flower
upgrade that renames them makes this launcher refuse to start rather than silently do nothing.
"""

from __future__ import annotations

import sys
import time as _time
from typing import Any

IDLE_WAIT_S = 3.0  # the SuperNode's wait after an empty PullMessages
REPLY_WAIT_S = 0.5  # its poll for the ClientApp's reply


class _ShorterWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: the two fixed waits shrink
    to ``interval``; every other call goes to the real ``time`` module."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        if seconds in (IDLE_WAIT_S, REPLY_WAIT_S):
            seconds = min(seconds, self.interval)
        _time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def install(interval: float) -> None:
    """Shorten the SuperNode's fixed waits in this process."""
    if not 0.01 <= interval <= IDLE_WAIT_S:
        raise ValueError(f"poll interval must be in 0.01..{IDLE_WAIT_S} s, got {interval}")
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not _time:
        raise RuntimeError("this Flower version's SuperNode loop is not the one fedclient.fast_supernode patches "
                           "(flwr 1.39); start without --poll-interval")
    start_client_internal.time = _ShorterWaits(interval)  # type: ignore[assignment]


def main() -> None:
    interval, *arguments = sys.argv[1:]
    install(float(interval))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *arguments]
    flower_supernode()


if __name__ == "__main__":
    main()
