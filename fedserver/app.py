"""The fedtune ServerApp: builds the task's initial model, the algorithm and the run store, then
runs :class:`~fedserver.strategy.AlgorithmStrategy` for the configured number of rounds."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from aggregators import Algorithm, make_algorithm
from fedclient.runconfig import csv_list, quiet_environment, resolve_run_config
from fedclient.tasks import run_task
from fedclient.tasks.adapters import AdapterSpec
from fedserver.grid_waits import shorten_reply_pull_backoff
from fedserver.run_config import check_run_config, privacy_settings, resume_problems, strategy_settings
from fedserver.store import FLOWER_RUN_ID, RunStore
from fedserver.strategy import AlgorithmStrategy, RoundObserver, RunStopped

quiet_environment()


@dataclass
class ServerRun:
    """What the coordinator left behind: the run's id in the store and the final global state."""

    run_id: str
    store_url: str
    state: dict[str, torch.Tensor]
    strategy: AlgorithmStrategy


def run_federation(
    grid: Grid,
    config: Mapping[str, Any],
    *,
    num_clients: int = 0,
    observer: RoundObserver | None = None,
    on_run_created: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
    flower_run_id: int | None = None,
) -> ServerRun:
    """Run one federated fine-tuning job on ``grid`` as ``config`` (a resolved run config) says."""
    task = run_task(config)
    algorithm = make_algorithm(str(config["strategy"]), config)
    settings = strategy_settings(config, num_clients, privacy_settings(config, algorithm), algorithm)
    model = task.build_model(AdapterSpec.from_run_config(config))
    defaults = {"task": task.default_layers(model), "above-embeddings": task.layer_names()[1:],
                "output": task.layer_names()[-1:]}
    layer_names = csv_list(config["train-layers"]) or defaults[algorithm.default_layers]
    layers = {name: task.trainable_keys(model, [name]) for name in layer_names}
    keys = {k for layer_keys in layers.values() for k in layer_keys}
    initial = ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items() if k in keys})
    test_set = task.load_data().test
    store = RunStore(str(config["store"]))
    resume = str(config.get("resume", ""))
    first_round = 1
    if resume:
        run_id, first_round, initial = _resume(store, resume, config, algorithm, task.name, keys)
        first_round += 1

    def central_evaluate(_round: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(state, strict=False)
        metrics = task.evaluate(model, test_set)
        return {key: value for key, value in metrics.items() if key != "num-examples"}

    if not resume:
        run_id = store.create_run(
            task=task.name,
            strategy=algorithm.name,
            num_rounds=int(config["num-server-rounds"]),
            config=dict(config),
            name=str(config["run-name"]),
            num_clients=num_clients,
        )
    if flower_run_id is not None:  # the console stops a deployment's run with `flwr stop <this id>`
        store.annotate_run(run_id, {FLOWER_RUN_ID: str(flower_run_id)})
    if on_run_created:
        on_run_created(run_id)
    strategy = AlgorithmStrategy(
        algorithm, settings, store=store, run_id=run_id, central_evaluate=central_evaluate, observer=observer,
        layers=layers, enrolled=enrolled_names(store),
    )
    if stop_event is not None:
        strategy.stop_event = stop_event
    try:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=int(config["num-server-rounds"]),
            timeout=settings.round_timeout,
            first_round=first_round,
        )
    except RunStopped as err:
        store.finish_run(run_id, "stopped", str(err))
        raise
    except BaseException as err:
        store.finish_run(run_id, "failed", "".join(traceback.format_exception_only(type(err), err)).strip())
        raise
    if strategy.ended_early:
        store.finish_run(run_id, "stopped", strategy.ended_early)
    else:
        store.finish_run(run_id, "completed")
    return ServerRun(run_id, store.url, strategy.state, strategy)


def enrolled_names(store: RunStore) -> dict[int, str] | None:
    """Node id -> enrolled site name from the store's registry (``fedserver enrol``); None where
    nobody was enrolled (a simulation: sites name themselves)."""
    return {int(row.node_id): row.name for row in store.enrolled_sites()} or None


def coordinator_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with this coordinator's own store: a ServerApp started by a deployment's SuperLink
    (``FEDTUNE_DEPLOYMENT``, set by ``fedserver start``) always uses that deployment's store, so no
    path of the coordinator's has to travel in the run config that every site receives."""
    config = dict(config)
    if os.environ.get("FEDTUNE_DEPLOYMENT"):
        from fedserver.deployment import Deployment, enrolled_sites

        deployment = Deployment.load(os.environ["FEDTUNE_DEPLOYMENT"])
        enrolled_sites(deployment)  # moves enrolments an older fedtune kept in sites.json into the store
        config["store"] = deployment.store_url
    return config


def _resume(store: RunStore, run_ref: str, config: Mapping[str, Any], algorithm: Algorithm, task: str,
            keys: set[str]) -> tuple[str, int, ArrayRecord]:
    """Reopen ``run_ref`` in ``store`` at its latest checkpoint; ValueError when it cannot continue."""
    run = store.get_run(run_ref)
    problems = resume_problems(run.id, run.task, run.strategy, task, algorithm)
    if problems:
        raise ValueError("; ".join(problems))
    done, state = store.resume_run(run.id, int(config["num-server-rounds"]))
    if set(state) != keys:
        raise ValueError(f"run '{run.id}' checkpoint holds other tensors than this run trains; same train-layers?")
    return run.id, done, ArrayRecord(state)


def build_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    num_clients: int = 0,
    observer: RoundObserver | None = None,
    on_run_created: Callable[[str], None] | None = None,
    stop_event: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp; ``overrides`` stand in for the run config where Flower passes none (fedsim)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = check_run_config(coordinator_config(resolve_run_config(context.run_config, overrides)),
                                  num_clients=num_clients)
        shorten_reply_pull_backoff(float(config["round-timeout"]))
        if str(config["mode"]) == "search":
            from fedserver.search import run_search

            run_search(grid, config, names=enrolled_names(RunStore(str(config["store"]))),
                       min_sites=max(1, num_clients))
            return
        if str(config["mode"]) == "search-service":
            from fedserver.search_service import serve_searches

            serve_searches(grid, config, names=enrolled_names)
            return
        run_federation(
            grid, config, num_clients=num_clients, observer=observer, on_run_created=on_run_created,
            stop_event=stop_event, flower_run_id=context.run_id,
        )

    return app


app = build_server_app()
