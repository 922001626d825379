"""Starting and stopping runs from the console.

A console over a deployment (``fedserver console DIR``) submits runs to its SuperLink with
``flwr run`` (as ``fedserver run`` does); a console over a bare store (``--store URL``) starts them
on the simulation engine with ``fedsim run --store URL``. Stopping asks the run's coordinator through
the store (``RunStore.request_stop``: it ends at its next wait, keeping every finished round and
recording ``stopped``); on a deployment, if the ServerApp has not ended within
``FLOWER_STOP_AFTER_S``, Flower's own ``flwr stop`` ends it.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from fedserver.store import FLOWER_RUN_ID, RunStore, StoreError

DP_MECHANISMS = ("off", "gaussian", "laplace", "distributed", "central")
FLOWER_STOP_AFTER_S = 20.0


class FormError(ValueError):
    """A field of the new-run form is invalid; the message names it and what is allowed."""


@dataclass(frozen=True)
class RunRequest:
    """The new-run form, validated."""

    task: str = "tiny"
    strategy: str = "fedavg"
    rounds: int = 3
    clients: int = 3
    codec: str = ""
    dp: str = "off"
    dp_epsilon: float = 8.0
    secagg: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        """The form's own bounds, then the run config checked as `fedserver run` and the ServerApp check it."""
        from fedserver.run_config import RunConfigError, check_run_config

        if not 1 <= self.rounds <= 10_000:
            raise FormError(f"rounds must be between 1 and 10000, got {self.rounds}")
        if not 1 <= self.clients <= 1_000:
            raise FormError(f"clients must be between 1 and 1000, got {self.clients}")
        if len(self.name) > 100 or any(ch in self.name for ch in "\"'\\\n"):
            raise FormError("name must be at most 100 characters without quotes, backslashes or newlines")
        try:
            check_run_config(self.run_config(), num_clients=self.clients)
        except RunConfigError as err:
            raise FormError("; ".join(err.problems)) from err

    def run_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"task": self.task, "strategy": self.strategy, "num-server-rounds": self.rounds,
                                  "dp": self.dp, "dp-epsilon": self.dp_epsilon}
        if self.codec:
            config["codec"] = self.codec
        if self.secagg:
            config["secagg"] = True
        if self.name:
            config["run-name"] = self.name
        return config


class RunControl:
    """Starts runs (deployment or simulation) and stops them; keeps a log file per launch."""

    def __init__(self, store: RunStore, deployment=None, log_dir: pathlib.Path | None = None) -> None:
        self.store = store
        self.deployment = deployment
        self.log_dir = log_dir or pathlib.Path.cwd() / "console-logs"

    @property
    def engine(self) -> str:
        return "deployment" if self.deployment is not None else "simulation"

    def start(self, request: RunRequest) -> dict[str, Any]:
        """Launch the run in the background; it appears in the store once its coordinator starts."""
        name = request.name or f"console-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
        request = RunRequest(**{**request.__dict__, "name": name})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        if self.deployment is not None:
            from fedserver import deployment as dep

            command = dep.run_command(self.deployment, {**request.run_config(), "min-train-nodes": 1})
            env, cwd = dep.environment(self.deployment.flwr_home), self.deployment.directory
        else:
            command = [sys.executable, "-m", "simulations.cli", "run", "--task", request.task, "--strategy",
                       request.strategy, "--rounds", str(request.rounds), "--clients", str(request.clients),
                       "--store", self.store.url, "--name", name, "--dp", request.dp,
                       "--dp-epsilon", str(request.dp_epsilon), "--out", str(self.log_dir / name)]
            if request.codec:
                command += ["--codec", request.codec]
            env, cwd = None, None
        with open(log_path, "w") as log:  # the run goes on by itself; the store records it
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                       start_new_session=True)
        return {"name": name, "engine": self.engine, "log": str(log_path), "pid": process.pid}

    def stop(self, run_ref: str, requested_by: str = "console") -> dict[str, Any]:
        """Ask a running run to stop, named by its exact id (StoreError if unknown or not running)."""
        run = self.store.request_stop(run_ref, requested_by=requested_by, exact=True)
        flower_run = run.config.get(FLOWER_RUN_ID)
        if self.deployment is not None and flower_run:
            threading.Thread(target=self._flower_stop_if_still_running, args=(run.id, str(flower_run)),
                             daemon=True).start()
        return {"id": run.id, "status": "stopping"}

    def _flower_stop_if_still_running(self, run_id: str, flower_run: str) -> None:
        from fedserver import deployment as dep

        deadline = time.monotonic() + FLOWER_STOP_AFTER_S
        while time.monotonic() < deadline:
            if self.store.get_run(run_id).status != "running":
                return
            time.sleep(1)
        dep.flwr_cli(self.deployment, "stop", flower_run, dep.CONNECTION)
        try:
            if self.store.get_run(run_id).status == "running":
                self.store.finish_run(run_id, "stopped", "stopped by the console with `flwr stop`")
        except StoreError:
            pass
