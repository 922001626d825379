"""``fedserver console``: the operator's web UI and JSON API over the run store (see app.py)."""

from fedserver.console.app import create_app

__all__ = ["create_app"]
