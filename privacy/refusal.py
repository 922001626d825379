"""The one way a site says no because its own policy forbids something."""

from __future__ import annotations


class PolicyRefusal(Exception):
    """What was asked breaks the site's own policy. ``key`` names the policy setting (e.g.
    ``privacy.required``), so the reason the coordinator sees points at the rule, never at data."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"site policy {key}: {reason}")
        self.key = key
        self.reason = reason


__all__ = ["PolicyRefusal"]
