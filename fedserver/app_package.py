"""The Flower App (FAB) that ``fedserver run`` submits: fedtune's package code and nothing else,
signed with the deployment's publisher key.

``flwr run DIR`` packages whatever Flower's default include patterns match under ``DIR``
(``**/*.py``, ``**/*.json``, ``**/*.jsonl``, ``**/*.md``...). Run from a checkout that also holds
deployment or site directories, that once shipped a site's private ``articles.jsonl``, a search
index's ``documents.json`` and the coordinator's ``sites.json`` to every site, and grew with each
run until Flower refused it. So the app is staged instead: the module files of fedtune's packages
(``*.py`` of package directories, i.e. directories with an ``__init__.py``, found from the
*installed* packages, so it does not matter where the operator runs from) plus a ``pyproject.toml``
generated from the installed distribution, with an explicit ``fab-include``. The staged directory
is content-addressed (``DIR/apps/<digest>/``) and built by Flower's own builder, which is
deterministic, so the hash signed here is the hash Flower gives the run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import pathlib
import shutil
import tempfile
from collections.abc import Mapping

import tomli_w

from fedclient.app_trust import fab_hash, sign_fab
from fedclient.runconfig import DEFAULT_RUN_CONFIG
from privacy.signing import load_or_create_private_key

PACKAGES = ("aggregators", "privacy", "fedclient", "fedserver")
"""The packages the ServerApp and the ClientApp import (``simulations`` and ``tests`` are not needed)."""


def package_files(roots: Mapping[str, pathlib.Path] | None = None) -> dict[str, pathlib.Path]:
    """App path -> file for every module of :data:`PACKAGES`: the ``*.py`` files of each package
    directory, recursing only into sub-directories that are packages themselves. ``roots`` maps a
    package name to its directory (default: where the installed package lives)."""
    if roots is None:
        roots = {name: pathlib.Path(importlib.import_module(name).__file__).parent for name in PACKAGES}
    files: dict[str, pathlib.Path] = {}

    def walk(directory: pathlib.Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.is_file() and entry.suffix == ".py":
                files[f"{prefix}/{entry.name}"] = entry
            elif entry.is_dir() and (entry / "__init__.py").is_file() and not entry.name.startswith("."):
                walk(entry, f"{prefix}/{entry.name}")

    for name, directory in roots.items():
        if not (directory / "__init__.py").is_file():
            raise ValueError(f"{directory} is not the {name} package")
        walk(directory, name)
    return files


def app_pyproject() -> bytes:
    """The app's ``pyproject.toml``: the installed distribution's name and version, the Flower App
    components, the run-config defaults, and an explicit ``fab-include`` of the packages' modules."""
    version = importlib.metadata.version("fedtune")
    return tomli_w.dumps({
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedtune", "version": version, "requires-python": ">=3.11,<3.12",
                    "description": "fedtune's ServerApp and ClientApp (code only)"},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "fab-include": [f"{name}/**/*.py" for name in PACKAGES],
            "components": {"serverapp": "fedserver.app:app", "clientapp": "fedclient.app:app"},
            "config": dict(DEFAULT_RUN_CONFIG),
        }}},
    }).encode()


def stage_app(apps_dir: pathlib.Path, files: Mapping[str, pathlib.Path] | None = None) -> pathlib.Path:
    """A directory holding exactly the app's files (``apps_dir/<digest>/``), made once per content."""
    files = dict(files) if files is not None else package_files()
    pyproject = app_pyproject()
    digest = hashlib.sha256(pyproject)
    contents = {}
    for path in sorted(files):
        contents[path] = files[path].read_bytes()
        digest.update(path.encode() + b"\0" + hashlib.sha256(contents[path]).digest())
    target = apps_dir / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    apps_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=apps_dir, prefix=".staging-"))
    (staging / "pyproject.toml").write_bytes(pyproject)
    for path, content in contents.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(content)
    try:
        staging.rename(target)
    except OSError:  # another submit staged the same content meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_fab(app: pathlib.Path) -> bytes:
    """The FAB Flower builds from ``app`` (``flwr run`` builds the same bytes)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app)


def signed_app(apps_dir: pathlib.Path, publisher_key: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    """Stage the app, build its FAB and sign its hash: (app directory, FAB hash, signature)."""
    app = stage_app(apps_dir)
    digest = fab_hash(build_fab(app))
    return app, digest, sign_fab(load_or_create_private_key(publisher_key), digest)


__all__ = ["PACKAGES", "app_pyproject", "build_fab", "package_files", "signed_app", "stage_app"]
