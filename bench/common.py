"""Helpers shared by the benchmarks that compare arms on Flower's simulation engine."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
from fedclient.runconfig import quiet_environment  # noqa: E402

quiet_environment()


def add_federation_arguments(parser: argparse.ArgumentParser, *, rounds: int, alpha: float) -> None:
    """``--task``, ``--clients``, ``--rounds``, ``--alpha`` with this benchmark's defaults."""
    parser.add_argument("--task", default="minilm-bbc")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--alpha", type=float, default=alpha)


def simulate_arm(name: str, overrides: dict, clients: int, tmp: str):
    """Run one arm through fedtune's simulation runner; return (store, run id, wall seconds)."""
    from rich.console import Console

    from fedclient.runconfig import resolve_run_config
    from fedserver.store import RunStore
    from simulations.runner import SimulationSpec, run_simulation_spec

    config = resolve_run_config({}, {**overrides, "store": f"sqlite:///{tmp}/{name}.db", "checkpoint-every": 0})
    result = run_simulation_spec(SimulationSpec(config=config, num_clients=clients), Console(quiet=True))
    return RunStore(config["store"]), result.run_id, result.wall_seconds


def arm_summary(name: str, store, run_id: str, wall: float) -> dict:
    """Central accuracy by round, mean measured bytes up/down per client-round, mean round seconds."""
    train = [c for c in store.client_rounds(run_id) if c.phase == "train" and c.status == "ok"]
    rounds = store.rounds(run_id)
    return {
        "arm": name,
        "accuracy": [r.central_accuracy for r in rounds],
        "up": sum(c.bytes_up for c in train) / len(train),
        "down": sum(c.bytes_down for c in train) / len(train),
        "round_seconds": sum(r.seconds for r in rounds) / len(rounds),
        "wall": wall,
        "train": train,
    }


def run_arms(names: list[str], run_one, describe) -> list[dict]:
    """``run_one(name, tmp)`` for every arm in a shared temporary directory, printing
    ``describe(result)`` as each finishes; return the results in order."""
    import tempfile

    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results.append(run_one(name, tmp))
            print(f"  done {name}: {describe(results[-1])}", flush=True)
    return results


def size_text(num_bytes: float) -> str:
    """Bytes as MB from 1 MB up, else KB."""
    return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.1f} KB"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackDeployment:
    """A real deployment on 127.0.0.1, as the README's sections run it: ``fedserver init/start/enrol``
    and one ``fedclient start`` per site (TLS, node authentication, the publisher key pinned).
    ``site_arguments(index)`` gives each site's own ``fedclient start`` flags. Stops everything on exit."""

    def __init__(self, root, sites: int, site_arguments, env: dict | None = None) -> None:
        import pathlib

        self.root, self.count, self.site_arguments = pathlib.Path(root), sites, site_arguments
        self.env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), **(env or {})}
        self.processes: list = []
        self.coord = None

    def __enter__(self) -> LoopbackDeployment:
        import subprocess
        import sys
        import time

        from fedclient.keys import create_site_keys
        from fedserver import deployment as dep

        self.coord = dep.init(self.root / "coord", ["127.0.0.1"], fleet_port=free_port(), control_port=free_port(),
                              fleet_host="127.0.0.1")
        try:
            dep.start(self.coord)
            for index in range(self.count):
                name = f"site-{index}"
                private, public = create_site_keys(self.root / name / "site.key")
                dep.enrol(self.coord, name, public)
                command = [sys.executable, "-m", "fedclient.cli", "start", "--superlink", self.coord.fleet_address,
                           "--ca", str(self.coord.tls / "ca.crt"), "--key", str(private),
                           "--trusted-publisher", str(self.coord.directory / "publisher.key.pub"),
                           "--site-name", name, "--port", str(free_port()), "--home", str(self.root / name / "home"),
                           *self.site_arguments(index)]
                with open(self.root / f"{name}.log", "w") as log:
                    self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                           env=self.env, start_new_session=True))
            deadline = time.monotonic() + 120
            while sum(n["status"] == "online" for n in dep.status(self.coord)["nodes"]) < self.count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sites did not come online; see {self.root}/site-*.log")
                time.sleep(1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        from fedserver import deployment as dep

        for process in self.processes:
            dep.stop_group(process.pid, grace=5)
        if self.coord is not None:
            dep.stop(self.coord)
