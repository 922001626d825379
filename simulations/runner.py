"""Running a fedtune federation on Flower's simulation engine (Ray), with live progress."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedclient.runconfig import quiet_environment, resolve_run_config
from fedserver.report import central_metrics_text
from fedserver.store import RoundRecord

quiet_environment()


@dataclass
class SimulationSpec:
    """One simulation: a resolved run config plus how many virtual clients and their resources."""

    config: dict[str, Any]
    num_clients: int
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    verbose: bool = False


class ProgressObserver:
    """Shows one bar for the rounds and one for the clients of the current round."""

    def __init__(self, console: Console, num_rounds: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.rounds = self.progress.add_task("rounds", total=num_rounds, info="")
        self.clients = self.progress.add_task("clients", total=1, info="", visible=False)
        self.records: list[RoundRecord] = []
        self._lock = threading.Lock()

    def round_started(self, server_round: int, num_rounds: int) -> None:
        with self._lock:
            self.progress.update(self.clients, description=f"round {server_round} train", completed=0, visible=True)

    def phase_progress(self, server_round: int, phase: str, done: int, total: int) -> None:
        with self._lock:
            self.progress.update(self.clients, description=f"round {server_round} {phase}", completed=done, total=total)

    def round_finished(self, record: RoundRecord) -> None:
        self.records.append(record)
        info = central_metrics_text(record.central)
        with self._lock:
            self.progress.update(self.rounds, advance=1, info=info)


@dataclass
class SimulationResult:
    run_id: str
    wall_seconds: float
    records: list[RoundRecord] = field(default_factory=list)


def run_simulation_spec(spec: SimulationSpec, console: Console | None = None) -> SimulationResult:
    """Run ``spec`` on Ray; return the run's id in the store. Raises if the ServerApp failed."""
    from flwr.simulation import run_simulation

    from fedclient.app import build_client_app
    from fedserver.app import build_server_app

    console = console or Console()
    config = resolve_run_config({}, spec.config)
    observer = ProgressObserver(console, int(config["num-server-rounds"]))
    created: dict[str, str] = {}
    stop = threading.Event()
    server_app = build_server_app(
        config,
        num_clients=spec.num_clients,
        observer=observer,
        on_run_created=lambda rid: created.setdefault("id", rid),
        stop_event=stop,
    )
    client_app = build_client_app(config)
    flwr_logger = logging.getLogger("flwr")
    previous_level = flwr_logger.level
    if not spec.verbose:
        flwr_logger.setLevel(logging.ERROR)
    backend_config = {
        "client_resources": {"num_cpus": spec.cpus_per_client, "num_gpus": spec.gpus_per_client},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "include_dashboard": False,
            "log_to_driver": spec.verbose,
            "logging_level": logging.INFO if spec.verbose else logging.ERROR,
        },
    }
    def on_interrupt(_signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: stop waiting for the coordinator to wind down
            raise KeyboardInterrupt
        stop.set()  # the coordinator ends at its next wait; finished rounds stay in the store
        console.print("[yellow]stopping: finishing the bookkeeping (Ctrl-C again to abort)[/]")

    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    started = time.perf_counter()
    try:
        with observer.progress:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=spec.num_clients,
                backend_config=backend_config,
                verbose_logging=spec.verbose,
            )
    except BaseException:
        stop.set()  # whatever ended the simulation, the coordinator thread must not wait on
        raise
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        flwr_logger.setLevel(previous_level)
    if "id" not in created:
        raise RuntimeError("the simulation ended before the coordinator created its run; rerun with --verbose")
    return SimulationResult(created["id"], time.perf_counter() - started, observer.records)


def default_out_dir(root: pathlib.Path) -> pathlib.Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate

