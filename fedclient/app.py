"""The fedtune ClientApp: a thin Flower adapter around an algorithm's client half.

``train`` decodes the :class:`~aggregators.base.Instruction`, runs ``Algorithm.local`` on this
site's data on the best device present, and replies with the encoded Payload. ``evaluate`` scores
the global model on the site's held-out local split.

``query.identify`` tells the coordinator this site's stable name. ``query.probe`` runs an
algorithm's probe (e.g. layer scores). Site settings come from ``--node-config`` (``partition-id``,
``num-partitions``, optional ``site-name``, ``device`` and ``layer-budget``);
the task and partitioning come from the run config.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aggregators import Instruction, make_algorithm
from aggregators.shared_randomness import WeightsMismatchError
from fedclient.budget import draw_budget
from fedclient.device import best_device
from fedclient.runconfig import quiet_environment, resolve_run_config
from fedclient.tasks import (
    ClientData,
    PartitionSpec,
    SiteDataError,
    evaluate_model,
    get_task,
)
from fedclient.wire import (
    ARRAYS,
    array_record,
    fatal_record,
    from_recorddict,
    refusal_record,
    to_recorddict,
)
from privacy.accounting import PrivacyBudgetExceeded
from privacy.ldp import SITE_KEYS, SITE_PREFIX, LocalPrivacy

quiet_environment()

CLIENT_STATE_ARRAYS = "fedtune.client-state.arrays"
CLIENT_STATE_CONFIG = "fedtune.client-state.config"


@functools.lru_cache(maxsize=2)
def _model(task_name: str, device: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The task model on ``device`` (built once per process) and its pristine state to reset to."""
    model = get_task(task_name).build_model().to(device)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, pristine


def _seconds_since_process_start() -> float | None:
    """Age of this process (Linux), or None where /proc cannot say."""
    import os

    try:
        fields = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()  # noqa: SIM115
        uptime = float(open("/proc/uptime", encoding="ascii").read().split()[0])  # noqa: SIM115
    except (OSError, ValueError, IndexError):
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _fresh_model(task_name: str, device: torch.device) -> torch.nn.Module:
    model, pristine = _model(task_name, str(device))
    model.load_state_dict(pristine)  # no trace of what a previous message trained
    return model


def site_data(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientData:
    """This site's training and evaluation data: its own files when the node config names a
    ``data-dir`` (``fedclient start --data``), else its share of the task's built-in corpus."""
    if data_dir := node_config.get("data-dir"):
        return get_task(str(config["task"])).site_client_data(str(data_dir), int(config["seed"]))
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ValueError(
            f"node config lacks {missing}; start the SuperNode with "
            "--node-config 'partition-id=0 num-partitions=N'"
        )
    spec = PartitionSpec(
        scheme=str(config["partition"]),
        num_partitions=int(node_config["num-partitions"]),
        alpha=float(config["alpha"]),
        seed=int(config["seed"]),
    )
    return get_task(str(config["task"])).client_data(spec, int(node_config["partition-id"]))


def site_name(node_config: Mapping[str, Any]) -> str:
    """How this site names itself to the coordinator: ``site-name``, else ``partition-<id>``."""
    if node_config.get("site-name"):
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"
    return ""


def site_layer_budget(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> int | None:
    """How many layers this site can train: ``layer-budget`` from the node config, else drawn
    from the run config's simulated budget distribution (see :func:`fedclient.budget.draw_budget`)."""
    if "layer-budget" in node_config:
        budget = node_config["layer-budget"]
        if not isinstance(budget, int) or budget < 0:
            raise ValueError(f"node config layer-budget must be a whole number >= 0, got {budget!r}")
        return budget
    spec = str(config.get("layer-budget", ""))
    if not spec:
        return None
    return draw_budget(spec, int(config["seed"]), int(node_config.get("partition-id", 0)))


def _load_client_state(context: Context) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if CLIENT_STATE_ARRAYS in context.state:
        state.update({k: a.numpy() for k, a in context.state[CLIENT_STATE_ARRAYS].items()})
    if CLIENT_STATE_CONFIG in context.state:
        state.update(dict(context.state[CLIENT_STATE_CONFIG]))
    return state


def _save_client_state(context: Context, state: Mapping[str, Any]) -> None:
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    if arrays:
        context.state[CLIENT_STATE_ARRAYS] = array_record(arrays)
    if scalars:
        context.state[CLIENT_STATE_CONFIG] = ConfigRecord(scalars)


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` stand in for the run config where Flower passes none (fedsim)."""
    app = ClientApp()

    def run_local(msg: Message, context: Context, probe: bool) -> Message:
        config = resolve_run_config(context.run_config, overrides)
        instruction = Instruction.from_record(from_recorddict(msg.content))
        private = str(instruction.config.get("dp", "off")) != "off"
        algorithm = make_algorithm(str(instruction.config["strategy"]), {"codec": instruction.config.get("codec", "")},
                                   wrap=LocalPrivacy if private else None)
        device = best_device(str(context.node_config.get("device", "auto")))
        try:
            data = site_data(config, context.node_config)
        except SiteDataError as err:  # this site cannot take part until its files are fixed
            return Message(refusal_record(f"site data: {err}"), reply_to=msg)
        model = _fresh_model(str(config["task"]), device)
        client_state = _load_client_state(context)
        budget = site_layer_budget(config, context.node_config)
        if budget is not None:
            client_state["site.layer-budget"] = budget
        client_state.update({SITE_PREFIX + k: context.node_config[k] for k in SITE_KEYS if k in context.node_config})
        started = time.perf_counter()
        # In deployment every message gets a new ClientApp process: its age now is the start-up cost
        # (interpreter, imports, data, model) that bench/deployment_latency.py reports
        startup = _seconds_since_process_start() if sys.argv[0].endswith("flwr-clientapp") else None
        run = algorithm.local_probe if probe else algorithm.local
        try:
            payload = run(model, data.train, instruction, client_state)
        except WeightsMismatchError as err:  # replaying would silently train a different model
            return Message(fatal_record(f"{type(err).__name__}: {err}"), reply_to=msg)
        except PrivacyBudgetExceeded as err:  # nothing leaves the site but the refusal
            _save_client_state(context, client_state)
            return Message(refusal_record(f"privacy budget: {err}"), reply_to=msg)
        _save_client_state(context, client_state)
        if not private:  # timings depend on the data: withheld under local DP
            payload.metrics.setdefault("train-seconds" if not probe else "probe-seconds", time.perf_counter() - started)
            if startup is not None:
                payload.metrics["startup-seconds"] = startup
        if "partition-id" in context.node_config:
            payload.metrics["partition-id"] = int(context.node_config["partition-id"])
        return Message(to_recorddict(payload.to_record()), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=False)

    @app.query("probe")
    def probe(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=True)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        config = resolve_run_config(context.run_config, overrides)
        device = best_device(str(context.node_config.get("device", "auto")))
        model = _fresh_model(str(config["task"]), device)
        if ARRAYS in msg.content:
            arrays = msg.content[ARRAYS].to_torch_state_dict()
            model.load_state_dict(arrays, strict=False)
        data = site_data(config, context.node_config)
        metrics = evaluate_model(model, data.evaluate)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.query("search")
    def search(msg: Message, context: Context) -> Message:
        from fedclient.search import answer

        return answer(msg, context.node_config, resolve_run_config(context.run_config, overrides))

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        device = best_device(str(context.node_config.get("device", "auto")))
        described = f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)
        return Message(RecordDict({"site": ConfigRecord({"name": site_name(context.node_config), "device": described})}),
                       reply_to=msg)

    return app


app = build_client_app()
