"""Flower's Deployment Engine on 127.0.0.1 with real TLS certificates and SuperNode authentication,
driven by the README's own deployment walk-through: its ``# step N`` blocks are read from
README.md and each command runs in a fresh ``bash`` in a directory outside the checkout, as an
operator and two sites would type them. Around them: a third site killed mid-round, a coordinator
killed mid-run and resumed, a site with the wrong CA, one whose key nobody enrolled, an encrypted
search whose text no file holds, and an app of another publisher refused by every site."""

from __future__ import annotations

import json
import re
import shlex
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fedclient.keys import check_private_key, create_site_keys, fingerprint
from fedserver import deployment as dep
from fedserver.store import RunStore

pytestmark = pytest.mark.deployment
ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ACTIVATE = ". /path/to/fedtune/.venv/bin/activate"
DEMO_DIR = "mkdir -p fedtune-demo && cd fedtune-demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _power_cut(site: subprocess.Popen, site_dir: pathlib.Path) -> int:
    """SIGKILL a site as a power cut would: its ``fedclient start`` and the session that launched
    the SuperNode (SuperNode, SuperExec, ClientApps), found by the site's absolute key path."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    groups = {os.getpgid(site.pid)}
    for line in table.splitlines():
        pid, _, args = line.strip().partition(" ")
        if str(site_dir) in args and "fedclient.supernode_launcher" in args:
            groups.add(os.getpgid(int(pid)))
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    return len(groups)


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


def _kill_runtime_answering_train(state_dir: pathlib.Path, pid: int, done: dict, timeout: float = 300) -> None:
    """SIGKILL the site runtime ``pid`` (only the runtime: its ``fedclient start`` and SuperNode go
    on) once it has claimed a train task, i.e. while it answers one (``claimed-tasks/``)."""
    from fedclient.runtime import claims_directory

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for claim in claims_directory(state_dir).glob("*.json"):
            try:
                if json.loads(claim.read_text())["message-type"] == "train":
                    os.kill(pid, signal.SIGKILL)
                    done["killed"] = claim.name
                    return
            except (OSError, ValueError, KeyError):
                pass  # written or removed just now
        time.sleep(0.005)


def _power_cut_at(site: subprocess.Popen, site_dir: pathlib.Path, line: str, count: int, done: dict,
                  timeout: float = 300) -> None:
    """:func:`_power_cut` the site as soon as its log holds ``line`` ``count`` times (read as it grows,
    every 5 ms: the SuperNode logs a message when it pulls it, before the site answers)."""
    deadline, seen, tail = time.monotonic() + timeout, 0, ""
    with open(site_dir / "site.log", errors="replace") as log:
        log.seek(0, os.SEEK_END)  # what the site logged before this scenario does not count
        while time.monotonic() < deadline:
            tail += log.read()
            seen += tail.count(line)
            tail = tail[tail.rfind(line) + len(line):] if line in tail else tail[-len(line):]
            if seen >= count:
                done["groups"] = _power_cut(site, site_dir)
                return
            time.sleep(0.005)


def _logs(directory: pathlib.Path) -> str:
    """The tails of every log under ``directory``, for a failure message."""
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in sorted(directory.rglob("*.log")))


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def readme_steps() -> dict[int, list[str]]:
    """The README's deployment walk-through: every ```bash block whose first line is ``# step N``,
    split into commands (a trailing backslash continues a line, a heredoc stays with its command,
    comments are dropped)."""
    steps: dict[int, list[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        lines = block.splitlines()
        header = re.match(r"# step (\d+) ", lines[0]) if lines else None
        if header is None:
            continue
        commands, pending, heredoc = [], "", None
        for line in lines[1:]:
            if heredoc is not None:
                commands[-1] += "\n" + line
                heredoc = None if line == heredoc else heredoc
                continue
            if not pending and (not line.strip() or line.strip().startswith("#")):
                continue
            line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment (none of the commands quotes a ' # ')
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            commands.append(pending + line)
            pending = ""
            if (opened := re.search(r"<<'?(\w+)'?", line)) is not None:
                heredoc = opened.group(1)
        steps[int(header.group(1))] = commands
    return steps


class Walkthrough:
    """Runs README commands as a reader would: each in a fresh ``bash`` in the demo directory that
    first runs the README's activation line (its placeholder path replaced by the virtual
    environment running the tests), with free ports for the README's 9092-9095. The shell starts
    without that environment on its PATH, without PYTHONPATH and without the Flower and Ray
    settings (the CLIs set those themselves); it keeps the session's cache directory (models and
    tokenized data are cached across tests; the commands do not depend on where it is)."""

    def __init__(self, demo: pathlib.Path, ports: dict[str, int], activate: str) -> None:
        self.demo = demo
        self.ports = ports
        bin_dir = pathlib.Path(sys.executable).parent
        assert (bin_dir / "activate").is_file(), "the tests must run in a virtual environment (make test makes one)"
        self.activate = activate.replace("/path/to/fedtune/.venv/bin/activate", str(bin_dir / "activate"))
        path = [p for p in os.environ["PATH"].split(os.pathsep) if pathlib.Path(p) != bin_dir]
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
                       and not k.startswith(("FLWR_", "RAY_"))}, "PATH": os.pathsep.join(path)}
        self.background: list[subprocess.Popen] = []

    def text(self, command: str) -> str:
        for default, port in self.ports.items():
            command = re.sub(rf"\b{default}\b", str(port), command)
        return command

    def run(self, command: str, *, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["bash", "-c", f"{self.activate} && {self.text(command)}"], cwd=self.demo,
                                  env=self.env, input=stdin, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as expired:  # say what it printed and what every log says
            printed = "".join(_text(o) for o in (expired.stdout, expired.stderr))
            raise AssertionError(f"`{command}` ran past {timeout:.0f} s:\n{printed[-3000:]}\n{_logs(self.demo)}") \
                from None

    def ok(self, command: str, **kwargs) -> str:
        result = self.run(command, **kwargs)
        assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                       f"{result.stderr[-3000:]}\n{_logs(self.demo)}"
        return result.stdout + result.stderr

    def start(self, command: str, log: pathlib.Path) -> subprocess.Popen:
        """A command in the background (its own session, so teardown stops all it started)."""
        command = self.text(command).rstrip().removesuffix("&").rstrip()
        with open(log, "a") as out:
            process = subprocess.Popen(["bash", "-c", f"{self.activate} && exec {command}"], cwd=self.demo, env=self.env,
                                       stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append(process)
        return process


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie no longer does)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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


def _site_line(start_lines: list[str], site: str) -> str:
    (line,) = [c for c in start_lines if f"--site-name {site} " in c]
    return line


def test_the_readme_walkthrough_survives_a_killed_site_and_a_killed_coordinator(tmp_path: pathlib.Path) -> None:
    """The README's steps 1-6, in order, from a directory outside the checkout. Around them: site c
    (site a's start line, renamed, no documents, 10 s heartbeats) is SIGKILLed while it trains
    round 1 of the README's run and comes back; right after round 1 the coordinator is killed, so
    `fedserver run` exits 1 naming the run; `fedserver start` and the README's run command with
    ``resume`` finish it (exit 0, round 1 not repeated, c trains round 2). A site with another
    deployment's CA and one whose key nobody enrolled are told which of the two is wrong; the
    README's search finds the rates document and no file the deployment wrote holds the query; an
    app of another publisher is refused by every site and `fedserver run` exits 1 saying so."""
    steps = readme_steps()
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], sorted(steps)
    assert steps[1][:2] == [ACTIVATE, DEMO_DIR]  # run before every command; the directory is made here
    demo = tmp_path / "fedtune-demo"  # outside the checkout; what `mkdir -p ... && cd ...` makes
    demo.mkdir()
    assert ROOT not in demo.parents
    ports = {str(default): _free_port() for default in (9092, 9093, 9094, 9095)}
    ports.update({"9096": _free_port(), "9097": _free_port()})  # site c's and the rogue site's runtime ports
    shell = Walkthrough(demo, ports, steps[1][0])
    (init, start_coordinator) = steps[1][2:]
    assert init.startswith("fedserver init coord ") and start_coordinator.startswith("fedserver start coord")
    coord = demo / "coord"
    try:
        # step 1, with the test's own ports (README: the defaults 9092/9093)
        shell.ok(f"{init} --fleet-port 9092 --control-port 9093")
        shell.ok(start_coordinator)
        deployment = dep.Deployment.load(coord)
        # step 2, and keys for site c and for a rogue site nobody enrols
        for command in steps[2]:
            shell.ok(command)
        assert (demo / "site-a" / "site.key").stat().st_mode & 0o777 == 0o600
        keys = [c for c in steps[2] if c.startswith("fedclient keys site-a/")]
        for name in ("site-c", "rogue"):
            shell.ok(keys[0].replace("site-a", name))
        # step 3, and site c's enrolment like site a's
        for command in steps[3]:
            shell.ok(command)
        shell.ok(next(c for c in steps[3] if " site-a " in c).replace("site-a", "site-c"))
        # step 4: doctor, then the two sites in the background
        doctor, *starts = steps[4]
        assert "coordinator" in shell.ok(doctor).lower()
        for command in starts:
            site = re.search(r"--site-name (\S+)", command).group(1)
            (demo / site).mkdir(exist_ok=True)
            shell.start(command, demo / site / "site.log")
        line_a = _site_line(starts, "site-a")
        without_search = re.sub(r" --search-index \S+ --querier-key \S+", "", line_a)
        line_c = (without_search.replace("site-a", "site-c").replace("--partition-id 0", "--partition-id 1")
                  .replace("--port 9094", "--port 9096").rstrip(" &") + " --heartbeat-interval 10")
        site_c = shell.start(line_c, demo / "site-c" / "site.log")
        # which of CA and enrolment is wrong, said apart
        shell.ok("fedserver init other --host 127.0.0.1 --listen 127.0.0.1 --fleet-port 1 --control-port 2")
        wrong_ca = shell.run(without_search.replace("coord/tls/ca.crt", "other/tls/ca.crt").rstrip(" &"))
        assert wrong_ca.returncode == 2, wrong_ca.stdout
        assert "does not verify with other/tls/ca.crt" in " ".join(wrong_ca.stdout.split()), wrong_ca.stdout
        rogue = shell.run(without_search.replace("site-a", "rogue").replace("--port 9094", "--port 9097")
                          .rstrip(" &") + " --max-retries 3", timeout=120)
        said = " ".join(rogue.stdout.split())
        assert rogue.returncode == 3 and "has not enrolled this site's key" in said, rogue.stdout[-2000:]
        assert "the CA is right" in said and "fedserver enrol DIR rogue --public-key" in said
        deadline = time.monotonic() + 90
        while len(online := [n for n in dep.status(deployment)["nodes"] if n["status"] == "online"]) < 3:
            assert time.monotonic() < deadline, _logs(demo)
            time.sleep(1)
        assert sorted(n["site"] for n in online) == ["site-a", "site-b", "site-c"]
        from fedclient.keys import fingerprint

        assert all(n["fingerprint"] == fingerprint(demo / n["site"] / "site.key.pub") for n in online)
        from fedserver.console.views import sites_overview

        shown = {s["site"]: s for s in sites_overview(deployment)}  # the console's Sites page
        assert sorted(shown) == ["site-a", "site-b", "site-c"] and all(s["connected"] for s in shown.values())
        # step 5: status, then the run: c is killed in round 1, the coordinator right after it
        status, run_command, runs_command, site_status = steps[5]
        assert "site-c" in shell.ok(status)
        from fedclient.runtime import runtime_status, socket_path

        state_b = demo / "site-b" / "home" / "state"  # site b's runtime alone is killed while it trains round 1
        runtime_b, killed_b = runtime_status(str(socket_path(state_b)))["pid"], {}
        killer = threading.Thread(target=_kill_runtime_answering_train, args=(state_b, runtime_b, killed_b), daemon=True)
        killer.start()
        first = shell.start(run_command, demo / "run.log")
        deadline = time.monotonic() + 180
        while "Receiving: train message" not in (demo / "site-c" / "site.log").read_text():
            assert time.monotonic() < deadline, _logs(demo)
            time.sleep(0.2)
        assert _power_cut(site_c, demo / "site-c") == 2  # mid-round: c is training round 1
        site_c.wait(timeout=10)
        store = RunStore(deployment.store_url)
        deadline = time.monotonic() + 150  # the SuperLink drops c after 2 missed 10 s heartbeats
        while not (store.list_runs() and store.rounds(store.list_runs()[0].id)):
            assert time.monotonic() < deadline, _logs(demo)
            time.sleep(0.5)
        dep.stop(deployment, grace=3)  # the coordinator dies mid-run
        assert first.wait(timeout=60) == 1  # `fedserver run` says the run did not complete
        (run,) = store.list_runs()
        assert run.id in (demo / "run.log").read_text()
        done = {r.round: r.started_at for r in store.rounds(run.id)}
        assert done and run.status in ("running", "failed"), (run.status, run.error)  # SIGKILL or SIGTERM first
        # the coordinator comes back, so does c; the README's run command with resume finishes the run
        shell.ok(start_coordinator)
        site_c = shell.start(line_c, demo / "site-c" / "site.log")
        resumed = shell.ok(run_command.replace('run-name="first run"', f'run-name="first run" resume="{run.id}"'),
                           timeout=400)
        run = store.get_run(run.id)
        assert run.status == "completed", run.error
        flower_id = run.config["flower-run-id"]
        assert f"run {run.id} (Flower run {flower_id}) completed: 2 rounds" in " ".join(resumed.split())
        assert "train-loss withheld (local DP)" in resumed and "train-loss nan" not in resumed
        rounds = store.rounds(run.id)
        assert [r.round for r in rounds] == [1, 2] and len(store.list_runs()) == 1
        assert all(r.started_at == done[r.round] for r in rounds if r.round in done)  # not repeated
        status = {(r.round, c.site): c for r in rounds for c in store.client_rounds(run.id, r.round)
                  if c.phase == "train"}
        assert status[1, "site-a"].status == "ok" and status[1, "site-c"].status == "failed", status
        assert killed_b and status[1, "site-b"].status == "failed", (killed_b, status[1, "site-b"])  # its runtime died
        assert "runtime stopped while answering" in status[1, "site-b"].error, status[1, "site-b"].error
        assert "answered 1 task(s) the stopped runtime was answering" in (demo / "site-b" / "home" / "runtime.log").read_text()
        assert runtime_status(str(socket_path(state_b)))["pid"] != runtime_b  # restarted; b trained round 2 (below)
        assert all(status[2, s].status == "ok" for s in ("site-a", "site-b", "site-c")), status
        assert all(0 < c.bytes_up < 200_000 for c in status.values() if c.status == "ok")  # compressed, not 7 MB
        assert rounds[-1].central_accuracy > 0
        runtime = " ".join(shell.ok(site_status).split())  # site a's runtime answered the rounds, model kept loaded
        assert "site runtime" in runtime and re.search(r"models loaded\W+1 \(1 loads so far\)", runtime), runtime
        assert not re.search(r"messages answered\W+[01]\W", runtime), runtime
        listed = shell.ok(runs_command)
        assert run.id in listed and "completed" in listed
        by_flower_id = shell.ok(f"fedserver --store sqlite:///coord/store.db show {flower_id}")
        assert run.id in by_flower_id  # the Flower id `fedserver run` printed finds the run
        missing = shell.run("fedserver --store sqlite:///coord/store.db show 1517")
        assert missing.returncode == 2 and "`fedserver --store sqlite:///coord/store.db runs` lists the runs" in \
            " ".join(missing.stderr.split()) and "fedsim" not in missing.stderr
        installed = [p for n in ("site-a", "site-b", "site-c") for p in (demo / n / "home").rglob("*")
                     if p.is_file() and "apps" in p.parts]  # the site runtimes claimed every task: no site
        assert installed == [], installed  # unpacked the run's app (they answer with their installed fedtune)

        # step 6: one encrypted search; its text never reaches a site, the SuperLink, a log or the store
        search, stop = steps[6]
        query = shlex.split(search.split("|")[0])[1]
        found = shell.ok(search)
        assert "rates" in found and "site-a" in found, found
        # that search started the deployment's search service; the next one is answered by it, in seconds
        from fedserver.search_service import ServiceUnavailable, ask

        service = ask(coord, {"op": "ping"}, timeout=10)
        started = time.monotonic()
        second_query = "central bank raises interest rates"
        again = shell.ok(search.replace(query, second_query))
        assert "rates" in again and time.monotonic() - started < 60, again
        assert ask(coord, {"op": "ping"}, timeout=10) == {**service, "queries": 2}  # same process, no new run
        shell.ok("fedserver search coord --stop-service")
        deadline = time.monotonic() + 30
        while _alive(service["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(service["pid"])
        with pytest.raises(ServiceUnavailable):
            ask(coord, {"op": "ping"}, timeout=10)
        from fedclient.tasks.cache import cache_dir

        store.engine.dispose()  # reading the database file below must not drop this process's SQLite locks
        for root in [tmp_path, *([cache_dir()] if cache_dir() else [])]:
            for text in (query, second_query):
                assert _files_holding(root, text.encode()) == [], "a query text was written down"
        store = RunStore(deployment.store_url)
        answered = {r.site: r.status for r in store.searches()}
        assert answered["site-a"] == answered["site-b"] == "ok" and "search.index" in answered["site-c"], answered
        assert query not in json.dumps(store.get_run(run.id).config)

        # an app the publisher did not sign is refused by every site before any of its code runs
        forged = shell.run(run_command.replace("--rounds 2", "--rounds 1 --signature AAAA"), timeout=300)
        assert forged.returncode == 1, forged.stdout[-2000:] + forged.stderr[-2000:]
        assert "not signed by the publisher" in " ".join(forged.stderr.split()), forged.stderr[-2000:]
        refused = [r for r in store.list_runs() if r.id != run.id]
        assert len(refused) == 1 and refused[0].status == "stopped" and not store.rounds(refused[0].id)
        # secure aggregation over TLS: c is cut off right after it sent its masked update (when the
        # survivors reach it to confirm); a and b confirm, their shares remove its masks, the round completes
        cut = {}
        watcher = threading.Thread(target=_power_cut_at, daemon=True, args=(
            site_c, demo / "site-c", "Receiving: query.secagg message", 3, cut))
        watcher.start()
        secure = shell.ok("fedserver run coord --task tiny --strategy fedavg --rounds 1 --run-config "
                          "'local-steps=2 dp=\"gaussian\" dp-epsilon=4 secagg=true run-name=\"secure run\"'",
                          timeout=400)
        assert cut.get("groups") == 2, (cut, _logs(demo))
        runs = [(r.name, r.status, r.error) for r in store.list_runs()]
        secure_run = store.get_run(store.list_runs()[0].id)  # the newest run (created after the refused one)
        assert secure_run.id not in {run.id, *(r.id for r in refused)}, (runs, secure[-3000:])
        assert secure_run.status == "completed", (secure_run.name, secure_run.error, runs, secure[-2000:])
        trained = {c.site: c for c in store.client_rounds(secure_run.id, 1) if c.phase == "train"}
        shown = {site: (c.status, c.error, c.details) for site, c in trained.items()}
        assert all(c.status == "ok" and c.details.get("secagg-survivors") == 3 for c in trained.values()), shown
        assert "did not finish the confirm and unmask" in trained["site-c"].details.get("secagg-note", ""), shown
        assert store.rounds(secure_run.id)[0].central_accuracy > 0
        shell.ok(stop)
    finally:
        _stop_sites(shell.background)
        if coord.is_dir():
            dep.stop(dep.Deployment.load(coord))
    assert dep.running_pid(dep.Deployment.load(coord)) is None
