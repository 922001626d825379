"""The app package ``fedserver run`` submits holds fedtune's code and nothing else, wherever the
operator runs it from, and its signature is over the exact FAB Flower builds."""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import zipfile

import pytest

from fedclient.app_trust import UntrustedApp, fab_hash, load_publisher, verify_fab
from fedserver import deployment as dep
from fedserver.app_package import PACKAGES, build_fab, package_files, signed_app, stage_app

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_fab_holds_the_package_code_only_even_from_a_tree_full_of_deployments(tmp_path: pathlib.Path) -> None:
    tree = tmp_path / "checkout"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    coord = dep.init(tree / "coord", ["127.0.0.1"])  # as the README's deployment sections leave a checkout
    (coord.directory / "sites.json").write_text(json.dumps({"site-a": {"node-id": "1"}}))
    planted = {
        tree / "site-b" / "data" / "articles.jsonl": '{"text": "private note", "label": "business"}\n',
        tree / "site-a" / "docs" / ".fedtune-index" / "documents.json": '["doc-1"]',
        tree / "fedclient" / "site-x" / "documents.json": '["inside a package directory"]',
        tree / "fedclient" / "site-x" / "notes.py": "SECRET = 1\n",  # a .py in a non-package directory
        tree / "fedserver" / "leak.json": '{"secret": true}',
        tree / "coord" / "apps" / "old" / "fedclient" / "app.py": "# an earlier staged app\n",
    }
    for path, text in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    files = package_files({name: tree / name for name in PACKAGES})
    fab = build_fab(stage_app(tree / "coord" / "apps", files))
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert names == {"pyproject.toml", ".info/CONTENT"} | set(files)
    assert all(n.endswith(".py") for n in names - {"pyproject.toml", ".info/CONTENT"})
    assert {n.split("/")[0] for n in names - {"pyproject.toml", ".info/CONTENT"}} == set(PACKAGES)
    for path in planted:
        assert str(path.relative_to(tree)) not in names
    assert not any("coord" in n or "site-" in n or "store.db" in n or n.endswith((".json", ".jsonl")) for n in names)
    assert len(fab) < 2_000_000
    installed = package_files()  # the default: found from the installed packages, wherever we run from
    assert installed and {path.split("/")[0] for path in installed} == set(PACKAGES)
    assert all(path.endswith(".py") and file.is_file() for path, file in installed.items())


def test_the_signature_covers_the_fab_flower_builds(tmp_path: pathlib.Path) -> None:
    coord = dep.init(tmp_path / "coord", ["127.0.0.1"])
    app, digest, signature = signed_app(coord.directory / "apps", coord.directory / "publisher.key")
    assert fab_hash(build_fab(app)) == digest  # deterministic: `flwr run` submits these very bytes
    assert signed_app(coord.directory / "apps", coord.directory / "publisher.key")[0] == app  # staged once
    publisher = load_publisher(coord.directory / "publisher.key.pub")
    verify_fab(build_fab(app), digest, signature, publisher)
    assert (coord.directory / "publisher.key").stat().st_mode & 0o777 == 0o600
    other = dep.init(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises(UntrustedApp, match="not signed by the publisher"):
        verify_fab(build_fab(app), digest, signature, load_publisher(other.directory / "publisher.key.pub"))
    with pytest.raises(UntrustedApp, match="does not hash"):
        verify_fab(build_fab(app) + b"x", digest, signature, publisher)
    command = dep.run_command(coord, {"num-server-rounds": 1})
    assert command[2] == str(app) and "fab-signature=" in command[-1] and "store=" not in command[-1]
    with pytest.raises(dep.DeploymentError, match="own store"):
        dep.run_command(coord, {"store": "sqlite:////tmp/elsewhere.db"})
    assert (coord.directory / "store.db").stat().st_mode & 0o777 == 0o600


def test_a_reviewer_signs_the_app_offline_and_sites_pin_the_reviewers_key(tmp_path, capsys) -> None:
    """The coordinator's operator need not hold the key sites trust: `fedserver app-hash` prints the
    FAB hash of the staged app, `fedserver sign-app` signs it with the reviewer's key, and
    `fedserver run --signature` submits exactly that signature."""
    from fedserver.cli import main

    coord = dep.init(tmp_path / "coord", ["127.0.0.1"])
    assert main(["app-hash", str(coord.directory)]) == 0
    digest = capsys.readouterr().out.split("FAB sha256 ")[1].split()[0]
    reviewer = tmp_path / "reviewer" / "publisher.key"
    assert main(["sign-app", str(reviewer), digest]) == 0
    signature = capsys.readouterr().out.strip()
    app = stage_app(coord.directory / "apps")
    verify_fab(build_fab(app), digest, signature, load_publisher(reviewer.with_name("publisher.key.pub")))
    command = dep.run_command(coord, {"num-server-rounds": 1}, signature=signature)
    assert f'fab-signature="{signature}"' in command[-1] and command[2] == str(app)
    with pytest.raises(UntrustedApp):  # the coordinator's own key is not the reviewer's
        verify_fab(build_fab(app), digest, signature, load_publisher(coord.directory / "publisher.key.pub"))
    assert main(["sign-app", str(reviewer), "not-a-hash"]) == 2
