"""Flower's Deployment Engine on 127.0.0.1 with real TLS certificates and SuperNode authentication:
`fedserver init/start/enrol/run/status/stop` and `fedclient keys/start`, as an operator and three
sites would run them, plus a site whose key was never enrolled, a site killed mid-round and a
coordinator killed mid-run."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fedclient.keys import check_private_key, create_site_keys, fingerprint
from fedserver import deployment as dep
from fedserver.store import RunStore

pytestmark = pytest.mark.deployment
ROOT = pathlib.Path(__file__).resolve().parents[1]
QUERY = "central bank lifts interest rates again amid inflation fears"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fedclient(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedclient.cli", *args]


def test_site_keys_are_private_and_checked(tmp_path: pathlib.Path) -> None:
    private, public = create_site_keys(tmp_path / "site.key")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert fingerprint(public).startswith("SHA256:")
    check_private_key(private)
    with pytest.raises(FileExistsError, match="--force"):
        create_site_keys(tmp_path / "site.key")
    os.chmod(private, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        check_private_key(private)


def test_init_refuses_to_overwrite_and_certificates_name_the_hosts(tmp_path: pathlib.Path) -> None:
    from cryptography import x509

    made = dep.init(tmp_path / "coord", ["coordinator.example.org", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate((made.tls / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert (made.tls / "ca.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(dep.DeploymentError, match="never overwritten"):
        dep.init(tmp_path / "coord", ["127.0.0.1"])


def _kill_site(needle: str) -> int:
    """SIGKILL every Flower process of one site (SuperNode, SuperExec, ClientApp) and its wrapper:
    what a power cut does, no graceful deactivation."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    killed = 0
    for line in table.splitlines():
        pid, _, args = line.strip().partition(" ")
        if needle in args and any(name in args for name in ("flower-", "flwr-", "fedclient.cli", "fedclient.supernode_launcher")):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def _stop_sites(processes) -> None:
    """SIGTERM every site's process group at once (as Ctrl-C would), wait for the ``fedclient start``
    processes to end, then SIGKILL whatever their groups left behind."""
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        dep.stop_group(process.pid, grace=0)


def _logs(directory: pathlib.Path) -> str:
    """The tails of every log under ``directory``, for a failure message."""
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in sorted(directory.rglob("*.log")))


def _submit_in_background(coord: dep.Deployment, config: dict, log: pathlib.Path) -> subprocess.Popen:
    """``fedserver run`` as an operator would, in a process of its own; its log goes to ``log``."""
    script = ("import sys, json; from fedserver import deployment as d; "
              f"r = d.submit(d.Deployment.load({str(coord.directory)!r}), json.loads(sys.argv[1])); "
              "print(r.stdout[-3000:], r.stderr[-3000:]); sys.exit(r.returncode)")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", script, json.dumps(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


def _write_documents(directory: pathlib.Path, offset: int, count: int = 12) -> None:
    """A site's documents for encrypted search: BBC articles, one text file each."""
    from fedclient.tasks.data import load_bbc_news

    corpus = load_bbc_news()
    directory.mkdir(parents=True)
    for row in range(offset, offset + count):
        (directory / f"article-{row}.txt").write_text(corpus.texts[row][:600])


def _files_holding(root: pathlib.Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (databases, logs, caches, stores)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    return found


def _write_site_data(directory: pathlib.Path, rows: int) -> None:
    """A site's own export in the documented CSV format: BBC articles under their class names."""
    from fedclient.tasks.data import load_bbc_news

    corpus = load_bbc_news()
    order = np.random.default_rng(7).permutation(len(corpus))[:rows]
    directory.mkdir(parents=True)
    with (directory / "articles.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        for row in order:
            writer.writerow([int(row), corpus.texts[row][:400], corpus.classes[corpus.labels[row]]])


def test_a_tls_deployment_survives_a_killed_site_and_a_killed_coordinator(tmp_path: pathlib.Path) -> None:
    """Sites a and b (b with its own CSV data via ``--data``) and c train 3 rounds of ``tiny`` with a
    compressed FedAvg over TLS with node authentication; a fourth site whose key was never enrolled is
    refused. c's SuperNode is SIGKILLed while it trains round 1 and restarted: round 1 completes with a
    and b (c's reply recorded as failed, within 2 heartbeats of 10 s) and c is used again later. Right
    after round 1 the coordinator is killed, restarted and the run resubmitted with ``resume``: the
    sites reconnect by themselves, the remaining rounds complete and finished rounds are not
    repeated. Then one encrypted search, and an app of another publisher refused by every site.
    (One scenario: each deployment costs minutes.)"""
    fleet, control = _free_port(), _free_port()
    coord = dep.init(tmp_path / "coord", ["127.0.0.1"], fleet_port=fleet, control_port=control, fleet_host="127.0.0.1")
    names = ("site-a", "site-b", "site-c", "rogue")
    sites = {name: create_site_keys(tmp_path / name / "site.key") for name in names}
    _write_site_data(tmp_path / "site-b" / "data", rows=80)
    processes: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    from fedclient.cli import index

    policy = tmp_path / "no-dp-policy.toml"  # these sites opt out of the built-in policy's required DP
    policy.write_text('[privacy]\nrequired = false\n[evaluation]\nmode = "exact"\n')
    for number, name in enumerate(names[:3]):  # each site's private document store for encrypted search
        _write_documents(tmp_path / name / "docs", offset=40 * number)
        assert index(str(tmp_path / name / "docs"), "", row_bound=1000) == 0

    def start_site(name: str, port: int) -> None:
        data = ["--data", str(tmp_path / name / "data")] if name == "site-b" else [
            "--partition-id", str(names.index(name) % 2), "--num-partitions", "2"]
        command = _fedclient(
            "start", "--superlink", f"127.0.0.1:{fleet}", "--ca", str(coord.tls / "ca.crt"),
            "--trusted-publisher", str(coord.directory / "publisher.key.pub"), "--policy", str(policy),
            *(["--search-index", str(tmp_path / name / "docs"), "--querier-key", str(coord.directory / "querier.key.pub")]
              if name != "rogue" else []),
            "--key", str(sites[name][0]), *data, "--site-name", name, "--port", str(port),
            "--home", str(tmp_path / name / "home"), "--poll-interval", "0.2", "--heartbeat-interval", "10",
            *(["--max-retries", "3"] if name == "rogue" else []),  # the others wait out a coordinator restart
        )
        log = open(tmp_path / name / "site.log", "a")  # noqa: SIM115 (closed with the process)
        processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)

    ports = {name: _free_port() for name in names}
    run_process = None
    try:
        dep.start(coord)
        from fedclient.supernode import check_tls

        assert check_tls(f"127.0.0.1:{fleet}", coord.tls / "ca.crt") == "127.0.0.1"  # fedclient doctor's check
        other = dep.init(tmp_path / "other", ["127.0.0.1"])
        with pytest.raises(ValueError, match="does not verify"):
            check_tls(f"127.0.0.1:{fleet}", other.tls / "ca.crt")  # a wrong CA is named as such
        for name in ("site-a", "site-b", "site-c"):
            assert dep.enrol(coord, name, sites[name][1]) > 0
        with pytest.raises(dep.DeploymentError, match="not an OpenSSH ECDSA"):
            dep.enrol(coord, "bad", sites["site-a"][0])  # the private key by mistake
        for name in names:
            start_site(name, ports[name])
        assert processes["rogue"].wait(timeout=90) != 0  # refused: its key was never enrolled
        assert "refused" in (tmp_path / "rogue" / "site.log").read_text()
        with pytest.raises(dep.DeploymentError, match="already enrolled"):
            dep.enrol(coord, "site-a", sites["site-a"][1])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            online = [n for n in dep.status(coord)["nodes"] if n["status"] == "online"]
            if len(online) == 3:
                break
            time.sleep(1)
        assert sorted(n["site"] for n in online) == ["site-a", "site-b", "site-c"], _logs(tmp_path)
        assert all(n["fingerprint"] == fingerprint(sites[n["site"]][1]) for n in online)
        from fedserver.console.views import sites_overview

        shown = {s["site"]: s for s in sites_overview(coord)}  # the console's Sites page
        assert sorted(shown) == ["site-a", "site-b", "site-c"] and all(s["connected"] for s in shown.values())
        assert shown["site-a"]["fingerprint"] == fingerprint(sites["site-a"][1])
        assert shown["site-a"]["online_since"] and shown["site-a"]["last_heartbeat"] == "within the last 60 s"
        config = {"task": "tiny", "strategy": "fedavg", "num-server-rounds": 3, "local-steps": 2,
                  "codec": "topk:0.01+q8", "min-train-nodes": 2}
        run_process = _submit_in_background(coord, config, tmp_path / "run.log")
        deadline = time.monotonic() + 180
        while "Receiving: train message" not in (tmp_path / "site-c" / "site.log").read_text():
            assert time.monotonic() < deadline, _logs(tmp_path)
            time.sleep(0.2)
        assert _kill_site(str(tmp_path / "site-c")) >= 2  # mid-round: c is training round 1
        store = RunStore(coord.store_url)

        def wait_for_rounds(count: int, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not (store.list_runs() and len(store.rounds(store.list_runs()[0].id)) >= count):
                assert time.monotonic() < deadline, _logs(tmp_path)
                time.sleep(0.5)

        wait_for_rounds(1, 150)  # the SuperLink declares c offline after 2 missed 10 s heartbeats
        start_site("site-c", ports["site-c"])  # c comes back (and waits for the coordinator)
        dep.stop(coord, grace=3)  # the coordinator dies mid-run
        run_process.kill()
        (run,) = store.list_runs()
        done = {r.round: r.started_at for r in store.rounds(run.id)}
        # SIGKILL leaves it "running"; a SIGTERM reaching the ServerApp first records "failed": both resume
        assert len(done) >= 1 and run.status in ("running", "failed"), (run.status, run.error)
        dep.start(coord)
        try:
            result = dep.submit(coord, {**config, "resume": run.id}, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the resumed run did not finish within 300 s\n" + _logs(tmp_path))
        assert result.returncode == 0, result.stderr[-2000:] + _logs(tmp_path)
        run = store.get_run(run.id)
        assert run.status == "completed", run.error
        rounds = store.rounds(run.id)
        assert [r.round for r in rounds] == [1, 2, 3] and len(store.list_runs()) == 1
        for r in rounds[:len(done)]:
            assert r.started_at == done[r.round]  # finished rounds were not repeated
        status = {(r.round, c.site): c for r in rounds for c in store.client_rounds(run.id, r.round)
                  if c.phase == "train"}
        assert status[1, "site-a"].status == status[1, "site-b"].status == "ok"
        assert status[1, "site-c"].status == "failed", status[1, "site-c"]
        assert any(status.get((r, "site-c")) and status[r, "site-c"].status == "ok" for r in (2, 3)), status
        assert all(status[r, s].status == "ok" for r in (2, 3) for s in ("site-a", "site-b")), status
        for c in status.values():
            if c.status == "ok":
                assert 0 < c.bytes_up < 200_000  # compressed, not 7 MB
        assert rounds[-1].central_accuracy > 0
        assert any(r["status"].startswith("finished") for r in dep.status(coord)["runs"])

        # the app each site installed is code only: no site's data, no coordinator file
        installed = [p for n in ("site-a", "site-b", "site-c") for p in (tmp_path / n / "home").rglob("*")
                     if p.is_file() and "apps" in p.parts]
        assert installed and all(p.suffix in (".py", ".toml") or p.name == "CONTENT" for p in installed), \
            sorted({p.name for p in installed if p.suffix not in (".py", ".toml")})

        # one encrypted search: the query text never reaches a site, the SuperLink, a log or the store
        found = dep.search(coord, QUERY, k=3, row_bound=1000, timeout=300)
        assert found["refusals"] == {} and len(found["hits"]) == 3, found
        assert {h["site"] for h in found["hits"]} <= {"site-a", "site-b", "site-c"}
        assert all(h["document_id"].startswith("article-") for h in found["hits"])
        from fedclient.tasks.cache import cache_dir

        store.engine.dispose()  # reading the database file below must not drop this process's SQLite locks
        for root in [tmp_path, *([cache_dir()] if cache_dir() else [])]:
            assert _files_holding(root, QUERY.encode()) == [], "the query text was written down"
        store = RunStore(coord.store_url)
        (row,) = [r for r in store.searches() if r.site == "site-a"]
        assert row.status == "ok" and QUERY not in json.dumps(store.get_run(run.id).config)

        # an app the publisher did not sign is refused by every site before any of its code runs
        from fedserver.app_package import stage_app

        app = stage_app(coord.directory / "apps")
        forged = dep.flwr_cli(coord, "run", str(app), dep.CONNECTION, "--stream", "--run-config",
                              dep.run_config_text({**config, "num-server-rounds": 1, "fab-signature": "AAAA"}),
                              timeout=240)
        refused = [r for r in store.list_runs() if r.id != run.id]
        assert len(refused) == 1 and refused[0].status == "stopped", (forged.stdout[-2000:], _logs(tmp_path))
        assert "not signed by the publisher" in refused[0].error and not store.rounds(refused[0].id)
    finally:
        if run_process is not None and run_process.poll() is None:
            run_process.kill()
        _stop_sites(processes.values())
        dep.stop(coord)
    assert dep.running_pid(coord) is None
