"""What a site says and what it keeps: the one way it says no because its own policy forbids
something (:class:`PolicyRefusal`, naming the policy key), and :func:`site_log` for the details
(figures, paths, file names, tracebacks) that stay in the site's own log."""

from __future__ import annotations

import sys


class PolicyRefusal(Exception):
    """What was asked breaks the site's own policy. ``key`` names the policy setting (e.g.
    ``privacy.required``), so the reason the coordinator sees points at the rule, never at data."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"site policy {key}: {reason}")
        self.key = key
        self.reason = reason


def site_log(text: str) -> None:
    """Details that stay at the site (its SuperNode log, stderr), never in a reply."""
    print(f"fedtune site: {text}", file=sys.stderr, flush=True)


__all__ = ["PolicyRefusal", "site_log"]
