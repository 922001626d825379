"""The coordinator's deployment directory and the Flower processes it runs.

``fedserver init`` lays out a directory::

    DIR/deployment.json     hosts and ports (the Fleet API sites dial, the local Control API)
    DIR/tls/                the CA (ca.crt: give it to every site) and the server certificate
    DIR/flwr-home/          FLWR_HOME for the SuperLink and for Flower's CLI (config.toml names
                            the connection "fedtune", with the CA as root certificate)
    DIR/store.db            the run store (SQLite)
    DIR/logs/               SuperLink log; DIR/superlink.pid its process

Everything else wraps Flower's own commands (``flower-superlink``, ``flwr supernode register``,
``flwr run``, ``flwr ls``) with Flower's conventions; nothing here reimplements them. The Fleet API
(gRPC, ``grpc-rere``) always runs with TLS and SuperNode authentication; the Control/Runtime API
stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedclient.keys import fingerprint
from fedclient.runconfig import QUIET_ENVIRONMENT
from fedserver.pki import create_tls

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
    with open(deployment.log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment(deployment.flwr_home),
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
    """Register a site's public key with the SuperLink (``flwr supernode register``); its node id."""
    if not public_key.is_file():
        raise DeploymentError(f"no public key at {public_key}; the site creates it with `fedclient keys`")
    if not public_key.read_text().startswith("ecdsa-sha2-nistp"):
        raise DeploymentError(f"{public_key} is not an OpenSSH ECDSA public key (Flower's node auth needs one)")
    sites = enrolled_sites(deployment)
    if site in sites:
        raise DeploymentError(f"a site named '{site}' is already enrolled (node {sites[site]['node-id']})")
    result = flwr_cli(deployment, "supernode", "register", str(public_key.resolve()), CONNECTION,
                      "--name", site, "--format", "json")
    node_id = int(_json_reply(result, f"registering {site}")["node-id"])
    sites[site] = {"node-id": str(node_id), "fingerprint": fingerprint(public_key),
                   "enrolled-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (deployment.directory / "sites.json").write_text(json.dumps(sites, indent=2))
    return node_id


def enrolled_sites(deployment: Deployment) -> dict[str, dict[str, str]]:
    """Sites enrolled through ``fedserver enrol``: name → node id, key fingerprint, date."""
    path = deployment.directory / "sites.json"
    return json.loads(path.read_text()) if path.exists() else {}


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


def app_directory() -> pathlib.Path:
    """The fedtune Flower App (the source tree holding pyproject.toml's [tool.flwr.app])."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise DeploymentError("`fedserver run` submits the fedtune source tree as the Flower App; "
                              "run it from a checkout of fedtune")
    return root


def run_config_text(config: Mapping[str, Any]) -> str:
    """``--run-config`` text: strings quoted, numbers and booleans bare."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            parts.append(f'{key}="{value}"')
    return " ".join(parts)


def submit(deployment: Deployment, config: Mapping[str, Any], *, stream: bool = True,
           timeout: float | None = None) -> subprocess.CompletedProcess:
    """``flwr run`` the fedtune app on this deployment with ``config`` (store = the deployment's)."""
    command = run_command(deployment, config) + (["--stream"] if stream else [])
    return subprocess.run(command, env=environment(deployment.flwr_home), cwd=deployment.directory,
                          timeout=timeout, text=True, capture_output=True, check=False)


def run_command(deployment: Deployment, config: Mapping[str, Any]) -> list[str]:
    """The ``flwr run`` command line submitting the fedtune app with ``config`` and this deployment's store."""
    return [flower_command("flwr"), "run", str(app_directory()), CONNECTION,
            "--run-config", run_config_text({"store": deployment.store_url, **config})]


def search(deployment: Deployment, query: str, *, k: int = 10, backend: str = "auto",
           row_bound: int = 10_000, timeout: float = 900) -> dict[str, Any]:
    """One encrypted top-k query across this deployment's sites (a ``flwr run`` in search mode);
    returns the hits and the sites' refusals as the run store recorded them. The console calls this."""
    from privacy.vector_search import QuerierIdentity, SearchError

    if not query.strip():
        raise SearchError("the query is empty")
    if not 1 <= k <= 1000:
        raise SearchError(f"k must be in 1..1000, got {k}")
    identity = deployment.directory / "querier.key"
    QuerierIdentity.load_or_create(identity)  # sites trust identity.pub (fedclient start --querier-key)
    from fedserver.store import RunStore

    store = RunStore(deployment.store_url)
    before = {row.id for row in store.searches()}
    config = {"mode": "search", "query": query.replace('"', "'"), "k": k, "he-backend": backend,
              "search-row-bound": row_bound, "search-identity": str(identity.resolve())}
    result = submit(deployment, config, stream=True, timeout=timeout)
    rows = [row for row in store.searches() if row.id not in before]
    if result.returncode != 0 or not rows:
        tail = (result.stderr or result.stdout)[-2000:]
        raise SearchError(f"the search run failed (exit {result.returncode}):\n{tail}")
    hits = sorted((h for row in rows for h in row.hits), key=lambda h: -h["score"])
    return {"query_id": rows[0].query_id, "hits": hits,
            "refusals": {row.site: row.status for row in rows if row.status != "ok"},
            "bytes_up": rows[0].bytes_up, "bytes_down": rows[0].bytes_down, "seconds": rows[0].seconds}
