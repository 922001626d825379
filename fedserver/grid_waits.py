"""How long the ServerApp's grid waits for the parts of a reply (Flower 1.39's ``HttpGrid``).

A SuperNode pushes a reply's head before its arrays, and Flower's grid pulls a reply's parts with
a backoff of 1 s, 2 s, ... (``PULL_INITIAL_BACKOFF``) for up to 2 h (``PULL_MAX_TIME``), inside one
blocking ``pull_messages`` call where the strategy's round timeout cannot reach: the first reply
of every round was read a second late, and a site that pushes a head and withholds its arrays
held the round for hours. Flower has no setting for either, so :func:`shorten_reply_pull_backoff`
rebinds the ``pull_objects`` its grid module calls (``tests/test_hostile_coordinator.py`` pins the
Flower code this relies on): 20-250 ms waits, and never past the deadline of the exchange in
progress (:func:`replies_due_by`, set by the strategy's and the search's exchanges) or
``max_seconds``. A reply not complete by then becomes an error reply for its site.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator
from typing import Any

REPLY_PULL_BACKOFF_S = (0.02, 0.25)  # first and longest wait for a reply part the SuperLink does not have yet
_DUE: list[float | None] = [None]  # monotonic time by which the exchange in progress ends


@contextlib.contextmanager
def replies_due_by(deadline: float) -> Iterator[None]:
    """Within this block, pulling a reply's parts waits at most until ``deadline`` (``time.monotonic()``)."""
    previous, _DUE[0] = _DUE[0], deadline
    try:
        yield
    finally:
        _DUE[0] = previous


def shorten_reply_pull_backoff(max_seconds: float) -> None:
    """Make this ServerApp process's grid wait as the module docstring says (idempotent)."""
    from flwr.superlink.grid import http_grid

    pull_objects = getattr(http_grid.pull_objects, "flower_pull_objects", http_grid.pull_objects)
    if not {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"} <= set(
            inspect.signature(pull_objects).parameters):
        raise RuntimeError("this Flower version's grid pulls replies differently; fedserver's ServerApp is written "
                           "for flwr 1.39")
    first, longest = REPLY_PULL_BACKOFF_S

    def pull_within_the_exchange(*args: Any, **kwargs: Any) -> Any:
        due = _DUE[0]
        left = max_seconds if due is None else min(max_seconds, max(0.0, due - time.monotonic()))
        return pull_objects(*args, **{**kwargs, "initial_backoff": first, "backoff_cap": longest,
                                      "max_tries_per_object": None, "max_time": left})

    pull_within_the_exchange.flower_pull_objects = pull_objects  # type: ignore[attr-defined]
    http_grid.pull_objects = pull_within_the_exchange
