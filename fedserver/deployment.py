"""The coordinator's deployment directory and the Flower processes it runs.

``fedserver init`` lays out a directory::

    DIR/deployment.json     hosts and ports (the Fleet API sites dial, the local Control API)
    DIR/tls/                the CA (ca.crt: give it to every site) and the server certificate
    DIR/flwr-home/          FLWR_HOME for the SuperLink and for Flower's CLI (config.toml names
                            the connection "fedtune", with the CA as root certificate)
    DIR/store.db            the run store (SQLite, 0600), enrolled sites included
    DIR/publisher.key       the Ed25519 key that signs every app submitted (0600); sites pin
                            publisher.key.pub (``fedclient start --trusted-publisher``)
    DIR/querier.key         the encrypted-search querier identity (0600); sites trust querier.key.pub
    DIR/apps/               the code-only app packages ``fedserver run`` staged
    DIR/logs/               SuperLink log; DIR/superlink.pid its process

Everything else wraps Flower's own commands (``flower-superlink``, ``flwr supernode register``,
``flwr run``, ``flwr ls``) with Flower's conventions; nothing here reimplements them. The Fleet API
(gRPC, ``grpc-rere``) always runs with TLS and SuperNode authentication; the Control/Runtime API
stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedclient.keys import fingerprint
from fedclient.runconfig import QUIET_ENVIRONMENT
from fedserver.pki import create_tls
from privacy.signing import load_or_create_private_key
from privacy.vector_search import SearchError

CONNECTION = "fedtune"


class DeploymentError(RuntimeError):
    """Something the operator must fix; the message says what."""


@dataclass
class Deployment:
    directory: pathlib.Path
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    fleet_address: str = "127.0.0.1:9092"
    control_port: int = 9093

    @property
    def tls(self) -> pathlib.Path:
        return self.directory / "tls"

    @property
    def flwr_home(self) -> pathlib.Path:
        return self.directory / "flwr-home"

    @property
    def store_url(self) -> str:
        return f"sqlite:///{(self.directory / 'store.db').resolve()}"

    @property
    def pid_file(self) -> pathlib.Path:
        return self.directory / "superlink.pid"

    @property
    def log_file(self) -> pathlib.Path:
        return self.directory / "logs" / "superlink.log"

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "directory"}
        (self.directory / "deployment.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Deployment:
        path = pathlib.Path(directory).resolve()
        meta = path / "deployment.json"
        if not meta.is_file():
            raise DeploymentError(f"{path} is not a deployment directory; create one with `fedserver init {path}`")
        return cls(path, **json.loads(meta.read_text()))


def environment(flwr_home: pathlib.Path) -> dict[str, str]:
    """The environment for Flower processes: quiet, offline, this deployment's FLWR_HOME, and the
    interpreter's bin directory first on PATH (the SuperLink spawns ``flower-superexec`` by name)."""
    env = {**os.environ, **QUIET_ENVIRONMENT, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    return env


def flower_command(name: str) -> str:
    """The path of one of Flower's console scripts next to this interpreter."""
    candidate = pathlib.Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"'{name}' not found; is flwr==1.39.0 installed in this environment?")
    return found


def init(directory: pathlib.Path, hosts: Sequence[str], fleet_port: int = 9092, control_port: int = 9093,
         fleet_host: str = "0.0.0.0") -> Deployment:
    """Create a deployment directory (refuses to overwrite one)."""
    directory = directory.resolve()
    if (directory / "deployment.json").exists():
        raise DeploymentError(f"{directory} already holds a deployment; its CA signs the sites' trust, so it is "
                              "never overwritten. Use another directory")
    deployment = Deployment(directory, list(hosts) or ["127.0.0.1"], f"{fleet_host}:{fleet_port}", control_port)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "logs").mkdir(exist_ok=True)
    create_tls(deployment.tls, deployment.hosts)
    from privacy.vector_search import QuerierIdentity

    QuerierIdentity.load_or_create(directory / "querier.key")  # encrypted search; sites trust querier.key.pub
    load_or_create_private_key(directory / "publisher.key")  # signs the apps; sites pin publisher.key.pub
    from fedserver.store import RunStore

    RunStore(deployment.store_url)  # created now, owner-only
    deployment.flwr_home.mkdir(exist_ok=True)
    (deployment.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{control_port}"\nroot-certificates = "{(deployment.tls / "ca.crt").resolve()}"\n'
    )
    deployment.save()
    return deployment


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def running_pid(deployment: Deployment) -> int | None:
    if not deployment.pid_file.exists():
        return None
    pid = int(deployment.pid_file.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    return pid


def start(deployment: Deployment, wait: float = 60.0) -> int:
    """Start the SuperLink (TLS, SuperNode authentication, grpc-rere) detached; return its PID."""
    if running_pid(deployment):
        raise DeploymentError(f"the SuperLink of {deployment.directory} is already running "
                              f"(pid {running_pid(deployment)}); `fedserver stop` first")
    fleet_host, fleet_port = deployment.fleet_address.rsplit(":", 1)
    for host, port in ((fleet_host if fleet_host != "0.0.0.0" else "127.0.0.1", int(fleet_port)),
                       ("127.0.0.1", deployment.control_port)):
        free_by = time.monotonic() + 10  # a just-stopped SuperLink may still be releasing its ports
        while _port_open(host, port) and time.monotonic() < free_by:
            time.sleep(0.5)
        if _port_open(host, port):
            raise DeploymentError(f"port {port} is already in use; choose others with `fedserver init --fleet-port/--control-port`")
    tls = deployment.tls
    command = [
        flower_command("flower-superlink"),
        "--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "server.pem"),
        "--ssl-keyfile", str(tls / "server.key"), "--enable-supernode-auth",
        "--host", "127.0.0.1", "--port", str(deployment.control_port),
        "--fleet-api-type", "grpc-rere", "--fleet-api-address", deployment.fleet_address,
        "--disable-runtime-dependency-installation",
        "--database", str((deployment.flwr_home / "superlink-state.db").resolve()),
    ]
    deployment.log_file.parent.mkdir(exist_ok=True)
    # the ServerApps this SuperLink spawns find their deployment (store, registry, querier keys) here,
    # so none of the coordinator's paths has to travel in a run config every site receives
    env = {**environment(deployment.flwr_home), "FEDTUNE_DEPLOYMENT": str(deployment.directory)}
    with open(deployment.log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=deployment.directory)
    deployment.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"the SuperLink exited with code {process.returncode}; see {deployment.log_file}")
        if _port_open("127.0.0.1", deployment.control_port) and _port_open(
                "127.0.0.1" if fleet_host == "0.0.0.0" else fleet_host, int(fleet_port)):
            return process.pid
        time.sleep(0.3)
    stop(deployment)
    raise DeploymentError(f"the SuperLink did not open its ports within {wait:.0f} s; see {deployment.log_file}")


def stop(deployment: Deployment, grace: float = 10.0) -> bool:
    """Stop the SuperLink and everything it started (its process group); False if none ran."""
    pid = running_pid(deployment)
    if pid is None:
        return False
    # the SuperExec the SuperLink spawns, and the ServerApp that one spawns, run in sessions of their
    # own; Flower names each one's parent with --parent-pid (sites' SuperNodes on this machine do not
    # descend from the SuperLink and are left alone)
    spawned = _spawned_by(pid)
    stop_group(pid, grace)
    for child in spawned:
        stop_group(child, grace)
    deployment.pid_file.unlink(missing_ok=True)
    return True


def _spawned_by(pid: int) -> list[int]:
    """Processes Flower started on behalf of ``pid`` (``--parent-pid PID``), transitively."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    parents: dict[int, int] = {}
    for line in table.splitlines():
        child, _, args = line.strip().partition(" ")
        words = args.split()
        if child.isdigit() and "--parent-pid" in words[:-1]:
            parent = words[words.index("--parent-pid") + 1]
            if parent.isdigit():
                parents[int(child)] = int(parent)
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in found}
        found.extend(sorted(frontier))
    return found


def stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``grace`` s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def flwr_cli(deployment: Deployment, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run Flower's CLI against this deployment's SuperLink connection."""
    return subprocess.run([flower_command("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment(deployment.flwr_home), cwd=deployment.directory, check=False)


def _json_reply(result: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    try:
        reply = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        raise DeploymentError(f"{what} failed: {(result.stderr or result.stdout).strip()[-500:]}") from None
    if not reply.get("success", False):
        raise DeploymentError(f"{what} failed: {reply.get('error-message', reply)}")
    return reply


def enrol(deployment: Deployment, site: str, public_key: pathlib.Path) -> int:
    """Register a site's public key with the SuperLink (``flwr supernode register``) and bind the
    site's name to that key and the node id Flower gave it, in the run store; returns the node id.
    From then on the coordinator names that node by its key, whatever the node calls itself."""
    from fedserver.store import RunStore, StoreError

    if not public_key.is_file():
        raise DeploymentError(f"no public key at {public_key}; the site creates it with `fedclient keys`")
    if not public_key.read_text().startswith("ecdsa-sha2-nistp"):
        raise DeploymentError(f"{public_key} is not an OpenSSH ECDSA public key (Flower's node auth needs one)")
    if not site or len(site) > 100 or not all(c.isalnum() or c in "-_." for c in site):
        raise DeploymentError(f"site name '{site}' must be 1-100 letters, digits, '-', '_' or '.'")
    sites = enrolled_sites(deployment)
    if site in sites:
        raise DeploymentError(f"a site named '{site}' is already enrolled (node {sites[site]['node-id']})")
    result = flwr_cli(deployment, "supernode", "register", str(public_key.resolve()), CONNECTION,
                      "--name", site, "--format", "json")
    node_id = int(_json_reply(result, f"registering {site}")["node-id"])
    try:
        RunStore(deployment.store_url).enrol_site(site, node_id, fingerprint(public_key), public_key.read_text().strip())
    except StoreError as err:
        raise DeploymentError(str(err)) from err
    return node_id


def enrolled_sites(deployment: Deployment) -> dict[str, dict[str, str]]:
    """Sites enrolled through ``fedserver enrol``: name → node id, key fingerprint, date."""
    from fedserver.store import RunStore

    store = RunStore(deployment.store_url)
    legacy = deployment.directory / "sites.json"  # where enrolments lived before the store held them
    if legacy.is_file():
        for name, info in json.loads(legacy.read_text()).items():
            if name not in {row.name for row in store.enrolled_sites()}:
                store.enrol_site(name, int(info["node-id"]), str(info.get("fingerprint", "")), "")
        legacy.rename(legacy.with_name("sites.json.migrated"))
    return {row.name: {"node-id": row.node_id, "fingerprint": row.fingerprint,
                       "enrolled-at": row.enrolled_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
            for row in store.enrolled_sites()}


def status(deployment: Deployment) -> dict[str, Any]:
    """Runs and SuperNodes as the SuperLink reports them (``flwr ls``, ``flwr supernode list``)."""
    runs = _json_reply(flwr_cli(deployment, "ls", CONNECTION, "--format", "json"), "listing runs")
    nodes = _json_reply(flwr_cli(deployment, "supernode", "list", CONNECTION, "--format", "json"), "listing sites")
    names = {info["node-id"]: (name, info["fingerprint"]) for name, info in enrolled_sites(deployment).items()}
    listed = []
    for node in nodes.get("nodes", []):
        name, key = names.get(str(node.get("node-id")), ("", ""))
        listed.append({**node, "site": name, "fingerprint": key})
    return {"runs": runs.get("runs", []), "nodes": listed}


def run_config_text(config: Mapping[str, Any]) -> str:
    """``--run-config`` text as ``flwr run`` parses it: strings quoted (they may hold spaces),
    numbers and booleans bare. DeploymentError for a string holding both kinds of quote, which
    Flower's parser cannot read."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if any(ord(char) < 32 or ord(char) == 127 for char in text):
                raise DeploymentError(f"{key}: a value cannot hold control characters (tabs, newlines)")
            literal = '"' in text or "\\" in text  # TOML reads \ as an escape only inside "..."
            if literal and "'" in text:
                raise DeploymentError(f"{key}: a value cannot hold ' together with \" or \\ (Flower's --run-config "
                                      "syntax)")
            quote = "'" if literal else '"'
            parts.append(f"{key}={quote}{text}{quote}")
    text = " ".join(parts)
    from flwr.common.config import parse_config_args

    if parse_config_args([text]) != dict(config):
        raise DeploymentError(f"--run-config text {text!r} would not reach Flower as checked")
    return text


def submit(deployment: Deployment, config: Mapping[str, Any], *, stream: bool = True,
           timeout: float | None = None, signature: str | None = None,
           echo: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """``flwr run`` the fedtune app on this deployment with ``config`` (the ServerApp uses the
    deployment's store: :func:`fedserver.app.coordinator_config`). ``echo`` gets each line of
    Flower's output as it comes (stdout and stderr together, all returned as ``stdout``)."""
    command = run_command(deployment, config, signature) + (["--stream"] if stream else [])
    env = environment(deployment.flwr_home)
    if echo is None:
        return subprocess.run(command, env=env, cwd=deployment.directory, timeout=timeout, text=True,
                              capture_output=True, check=False)
    lines = []
    with subprocess.Popen(command, env=env, cwd=deployment.directory, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as process:
        for line in process.stdout:
            lines.append(line)
            echo(line)
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended, as the run store recorded it."""

    flower_run_id: str | None
    run_id: str | None  # the store's id: the one `fedserver runs/show` and the console use
    status: str  # completed / failed / stopped / running, or "not started"
    reason: str
    rounds: int = 0
    accuracy: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def flower_run_status(deployment: Deployment, flower_run_id: str, *, wait: bool = True,
                      poll_seconds: float = 2.0, max_wait: float = 300.0) -> str:
    """The SuperLink's status of a Flower run (``flwr ls --run-id``), with ``wait`` once it has
    finished (``finished:completed``, ``finished:failed``, ...) or ``max_wait`` seconds have passed
    (then the last status, e.g. ``running``); "" when the SuperLink cannot be asked (it is down)."""
    deadline = time.monotonic() + max_wait
    while True:
        try:
            runs = _json_reply(flwr_cli(deployment, "ls", CONNECTION, "--run-id", str(flower_run_id), "--format",
                                        "json"), "reading the run's status").get("runs", [])
        except (DeploymentError, subprocess.TimeoutExpired):
            return ""
        status = str(runs[0].get("status", "")) if runs else ""
        if not wait or status.startswith("finished") or not status or time.monotonic() > deadline:
            return status
        time.sleep(poll_seconds)


def run_outcome(deployment: Deployment, result: subprocess.CompletedProcess) -> RunOutcome:
    """The store's record of the run ``result`` (a finished :func:`submit`) started. Flower's own
    exit code says little: ``flwr run --stream`` ends 0 when the ServerApp fails, and its log
    stream can end before the run does, so this first waits for the SuperLink to call the run
    finished (unless the SuperLink is gone)."""
    from fedserver.store import RunStore

    output = (result.stdout or "") + (result.stderr or "")
    started = re.search(r"Successfully started run (\d+)", output)
    if started is None:
        return RunOutcome(None, None, "not started", _tail(output) or f"flwr run exited with {result.returncode}")
    flower_run_id = started.group(1)
    flower_status = flower_run_status(deployment, flower_run_id)
    store = RunStore(deployment.store_url)
    run = store.run_of_flower_run(flower_run_id)
    if run is None:
        return RunOutcome(flower_run_id, None, "not started",
                          f"the ServerApp ended ({flower_status or 'SuperLink unreachable'}) before it created a run: "
                          + (_tail(output) or "no output") + f" (the SuperLink's log: {deployment.log_file})")
    rounds = store.rounds(run.id)
    accuracy = rounds[-1].central_accuracy if rounds else None
    reason = run.error or ""
    if run.status == "running":
        reason = reason or (f"Flower still reports the run {flower_status} after its log stream ended; "
                            f"`flwr stop {flower_run_id}` stops it" if flower_status else
                            "the SuperLink stopped answering while the run was in progress")
    return RunOutcome(flower_run_id, run.id, run.status, reason, len(rounds), accuracy)


def _tail(output: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in output.strip().splitlines()[-lines:] if line.strip())


def run_command(deployment: Deployment, config: Mapping[str, Any], signature: str | None = None) -> list[str]:
    """The ``flwr run`` command line submitting the fedtune app (code only, staged in ``DIR/apps``)
    with ``config`` and a publisher's signature over the app's FAB hash (``fab-signature``): the one
    given (made offline by whoever reviews releases: ``fedserver app-hash`` / ``fedserver sign-app``),
    else this deployment's ``publisher.key``'s."""
    from fedclient.app_trust import SIGNATURE_KEY
    from fedserver.app_package import signed_app, stage_app

    if "store" in config or SIGNATURE_KEY in config:
        raise DeploymentError("a deployment's runs use its own store and signature; drop 'store' and "
                              f"'{SIGNATURE_KEY}' from the run config (`fedserver run --signature` passes one)")
    if signature:
        app = stage_app(deployment.directory / "apps")
    else:
        app, _, signature = signed_app(deployment.directory / "apps", deployment.directory / "publisher.key")
    return [flower_command("flwr"), "run", str(app), CONNECTION,
            "--run-config", run_config_text({**config, SIGNATURE_KEY: signature})]


def search(deployment: Deployment, query: str, *, k: int = 10, backend: str = "auto",
           row_bound: int = 10_000, timeout: float = 900, service: bool = True,
           service_idle: float | None = None) -> dict[str, Any]:
    """One encrypted top-k query across this deployment's sites; returns the hits and the sites'
    refusals as the run store recorded them. The console calls this.

    With ``service`` (the default) the query goes to the deployment's search service
    (:mod:`fedserver.search_service`), started here if none runs (it then stays up for
    ``service_idle`` seconds after its last query); the service embeds, encrypts and signs it. Without,
    the query is embedded, encrypted and signed here (:func:`fedserver.search.prepare_search`) and
    a one-off ``flwr run`` names only the stored request's id."""
    started = time.perf_counter()
    if service:  # the service records the query in the store and answers with what it recorded
        answer = _search_with_service(deployment, query, k=k, backend=backend, row_bound=row_bound, timeout=timeout,
                                      idle=service_idle)
        return {"query_id": answer["query-id"], "hits": answer["hits"], "new_key_epoch": answer["new-key-epoch"],
                "refusals": answer["refusals"], "bytes_up": answer["bytes-up"], "bytes_down": answer["bytes-down"],
                "seconds": answer["seconds"], "exchange_seconds": answer["exchange-seconds"],
                "wall_seconds": time.perf_counter() - started}
    from fedserver.search import prepare_search
    from fedserver.store import RunStore

    store = RunStore(deployment.store_url)  # DIR/store.db: the querier's keys are in DIR too
    request_id, new_epoch = prepare_search(store, query, k=k, backend=backend, row_bound=row_bound)
    result = submit(deployment, {"mode": "search", "search-request": request_id}, stream=True, timeout=timeout)
    launched = re.search(r"Successfully started run (\d+)", result.stdout + result.stderr)
    if launched is not None:  # the log stream can end before the run does
        flower_run_status(deployment, launched.group(1))
    rows = store.searches(request_id)
    if result.returncode != 0 or not rows:
        tail = (result.stderr or result.stdout)[-2000:]
        raise SearchError(f"the search run failed (exit {result.returncode}):\n{tail}")
    hits = sorted((h for row in rows for h in row.hits), key=lambda h: -h["score"])
    return {"query_id": request_id, "hits": hits, "new_key_epoch": new_epoch,
            "refusals": {row.site: row.status for row in rows if row.status != "ok"},
            "bytes_up": rows[0].bytes_up, "bytes_down": rows[0].bytes_down, "seconds": rows[0].seconds,
            "wall_seconds": time.perf_counter() - started}


def start_search_service(deployment: Deployment, idle: float | None = None) -> str:
    """Submit the deployment's search service run (``mode="search-service"``); its Flower run id."""
    config: dict[str, Any] = {"mode": "search-service"}
    if idle is not None:
        if not 1 <= idle <= 7 * 86400:
            raise SearchError(f"the search service's idle time must be 1..604800 seconds, got {idle:g}")
        config["search-idle-timeout"] = float(idle)
    result = submit(deployment, config, stream=False, timeout=120)
    launched = re.search(r"Successfully started run (\d+)", result.stdout + result.stderr)
    if launched is None:
        raise SearchError("the search service's run could not be started: "
                          + (_tail(result.stdout + result.stderr) or f"flwr run exited with {result.returncode}"))
    return launched.group(1)


def stop_search_service(deployment: Deployment) -> bool:
    """Ask the deployment's search service to end its run; whether one was running."""
    from fedserver.search_service import ServiceUnavailable, ask

    try:
        ask(deployment.directory, {"op": "stop"}, timeout=30)
    except ServiceUnavailable:
        return False
    except OSError as err:
        raise SearchError(f"cannot reach the search service: {err}") from err
    return True


def _search_with_service(deployment: Deployment, query: str, *, k: int, backend: str, row_bound: int,
                         timeout: float, idle: float | None) -> dict[str, Any]:
    from fedserver.search_service import ServiceLost, ServiceUnavailable, ask, ensure_started

    def ended(run_id: str) -> str | None:
        status = flower_run_status(deployment, run_id, wait=False)
        return status if status.startswith("finished") else None

    request = {"op": "search", "text": query, "k": k, "backend": backend, "row-bound": row_bound}
    for attempt in (1, 2):  # a service that ends (idle) just as we ask is started again once
        try:
            ensure_started(deployment.directory, lambda: start_search_service(deployment, idle), failed=ended)
            answer = ask(deployment.directory, request, timeout=timeout)
            break
        except (TimeoutError, ServiceLost) as err:  # the query may have reached the sites: not sent again
            raise SearchError(str(err)) from err
        except ServiceUnavailable as err:
            if attempt == 2:
                raise SearchError(f"{err} (the SuperLink's log: {deployment.log_file})") from err
        except OSError as err:  # e.g. DIR/search-service is not this user's, or its socket answers as another user
            raise SearchError(f"cannot reach the search service: {err}") from err
    if not answer.get("ok"):
        raise SearchError(str(answer.get("error", "the search service refused the query")))
    return answer
