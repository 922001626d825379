"""The fedtune ClientApp: a thin Flower adapter around an algorithm's client half.

``train`` decodes the :class:`~aggregators.base.Instruction`, runs ``Algorithm.local`` on this
site's data on the best device present, and replies with the encoded Payload. ``evaluate`` scores
the global model on the site's held-out local split, if the site's policy allows it.

``query.identify`` tells the coordinator this site's name. ``query.probe`` runs an algorithm's
probe (e.g. layer scores); ``query.search`` answers encrypted search (:mod:`fedclient.search`).

**What this site decides comes from the site alone**: its policy (:mod:`fedclient.policy`, the file
``fedclient start --policy`` names) and its node config (``partition-id``, ``num-partitions``,
``data-dir``, ``site-name``, ``device``, ``layer-budget``, ``state-dir``, the DP and search flags).
The run config and the instruction say what the coordinator *asks*; a request the policy forbids
is declined with a refusal naming the policy key, and refusals never quote the site's data (the
details go to the site's own log). The privacy ledger and the search ledger live in the site's
state directory (``state-dir``), so no new run and no resume starts with a fresh budget.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from aggregators import Instruction, make_algorithm
from aggregators.shared_randomness import WeightsMismatchError
from fedclient.budget import draw_budget
from fedclient.device import best_device
from fedclient.policy import SitePolicy, site_policy
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
    CONFIG,
    array_record,
    fatal_record,
    from_recorddict,
    refusal_record,
    to_recorddict,
)
from privacy.accounting import PrivacyBudgetExceeded
from privacy.ldp import LdpSettings, LocalPrivacy, private_evaluation
from privacy.refusal import PolicyRefusal

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


def run_key(context: Context) -> str:
    """What this site's ledger records a run's spending under: Flower's run id, which the
    coordinator cannot vary from one message to the next (the instruction's ``run-id`` it can)."""
    return f"flower-run-{context.run_id}"


def ledger_path(policy: SitePolicy, node_config: Mapping[str, Any]) -> str | None:
    """The site's privacy ledger file: the policy's ``privacy.ledger``, else ``privacy-ledger.json``
    in its state directory; None (the client state, one run) only for a simulation's virtual sites
    that have neither."""
    if policy.ledger:
        return policy.ledger
    if node_config.get("state-dir"):
        return str(pathlib.Path(str(node_config["state-dir"])) / "privacy-ledger.json")
    return None


def _site_log(text: str) -> None:
    """Details that stay at the site (its SuperNode log), never in a reply."""
    print(f"fedtune site: {text}", file=sys.stderr, flush=True)


def build_client_app(overrides: Mapping[str, Any] | None = None, *,
                     site_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> ClientApp:
    """A ClientApp. ``overrides`` stand in for the run config where Flower passes none (fedsim);
    ``site_config(node_config)`` adds a simulated site's own node config (what a real site passes
    to ``fedclient start``: its policy, state directory, search index...)."""
    app = ClientApp()

    def node_config(context: Context) -> dict[str, Any]:
        node = dict(context.node_config)
        if site_config is not None:
            node.update(site_config(node))
        return node

    def policy_of(node: Mapping[str, Any]) -> SitePolicy:
        """The site's policy; PolicyRefusal (details in the site's log) if its file cannot be used."""
        try:
            return site_policy(node)
        except ValueError as err:
            _site_log(str(err))
            raise PolicyRefusal("file", "the site's policy cannot be used (its log says why)") from None

    def run_local(msg: Message, context: Context, probe: bool) -> Message:
        node = node_config(context)
        config = resolve_run_config(context.run_config, overrides)
        instruction = Instruction.from_record(from_recorddict(msg.content))
        try:
            policy = policy_of(node)
            policy.check_training(str(config["task"]), str(instruction.config["strategy"]))
            privacy = LdpSettings.resolve(instruction.config, policy.privacy, run_key(context))
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        wrap = functools.partial(LocalPrivacy, site=policy.privacy, ledger_path=ledger_path(policy, node),
                                 run=run_key(context)) if privacy.enabled else None
        algorithm = make_algorithm(str(instruction.config["strategy"]), {"codec": instruction.config.get("codec", "")},
                                   wrap=wrap)
        device = best_device(str(node.get("device", "auto")))
        try:
            data = site_data(config, node)
        except SiteDataError as err:  # this site cannot take part until its files are fixed
            _site_log(f"its data does not fit task {config['task']}: {err}")
            return Message(refusal_record(f"site data: this site's files do not fit task '{config['task']}' "
                                          "(the site's log names the problems)"), reply_to=msg)
        model = _fresh_model(str(config["task"]), device)
        client_state = _load_client_state(context)
        budget = site_layer_budget(config, node)
        if budget is not None:
            client_state["site.layer-budget"] = budget
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
        if not privacy.enabled:  # timings and counts depend on the data: withheld under local DP
            payload.num_examples = policy.reported_examples(payload.num_examples)
            payload.metrics.setdefault("train-seconds" if not probe else "probe-seconds", time.perf_counter() - started)
            if startup is not None:
                payload.metrics["startup-seconds"] = startup
        if "partition-id" in node:
            payload.metrics["partition-id"] = int(node["partition-id"])
        return Message(to_recorddict(payload.to_record()), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=False)

    @app.query("probe")
    def probe(msg: Message, context: Context) -> Message:
        return run_local(msg, context, probe=True)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Loss and accuracy of the coordinator's weights on this site's evaluation split, as the
        policy's ``evaluation.mode`` allows: refused, exact (example count capped), or noised
        (:func:`privacy.ldp.private_evaluation`) and charged to the ledger before it is sent."""
        node = node_config(context)
        try:
            policy = policy_of(node)
            policy.check_training(str(resolve_run_config(context.run_config, overrides)["task"]), "")
            if policy.evaluation_mode == "refuse":
                raise PolicyRefusal("evaluation.mode", "this site does not evaluate the coordinator's weights on "
                                    "its data")
            settings = LdpSettings.resolve({"dp": "gaussian", "dp-epsilon": 1e12, "dp-delta": 1e-5, "clip": 1.0},
                                           policy.privacy, run_key(context))
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        mode = policy.evaluation_mode
        config = resolve_run_config(context.run_config, overrides)
        try:
            data = site_data(config, node)
        except SiteDataError as err:
            _site_log(f"its data does not fit task {config['task']}: {err}")
            return Message(refusal_record(f"site data: this site's files do not fit task '{config['task']}' "
                                          "(the site's log names the problems)"), reply_to=msg)
        device = best_device(str(node.get("device", "auto")))
        model = _fresh_model(str(config["task"]), device)
        if ARRAYS in msg.content:
            model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict(), strict=False)
        metrics = evaluate_model(model, data.evaluate)
        if mode == "exact":
            metrics["num-examples"] = policy.reported_examples(metrics["num-examples"]) if metrics["num-examples"] else 0
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        if not metrics["num-examples"]:
            return Message(refusal_record("this site holds no evaluation rows"), reply_to=msg)
        noisy, release = private_evaluation(metrics, policy.evaluation_noise_multiplier, policy.evaluation_loss_bound,
                                            np.random.default_rng())
        client_state = _load_client_state(context)
        try:
            with settings.ledger(ledger_path(policy, node), client_state).transaction() as ledger:
                server_round = int(msg.content[CONFIG].get("server-round", 0)) if CONFIG in msg.content else 0
                ledger.charge(server_round, settings.run, [release], settings.epsilon, settings.delta)
        except PrivacyBudgetExceeded as err:
            return Message(refusal_record(f"privacy budget: {err}"), reply_to=msg)
        _save_client_state(context, client_state)
        noisy["num-examples"] = 1
        return Message(RecordDict({"metrics": MetricRecord(noisy)}), reply_to=msg)

    @app.query("search")
    def search(msg: Message, context: Context) -> Message:
        from fedclient.search import answer

        node = node_config(context)
        try:
            policy = policy_of(node)
        except PolicyRefusal as err:
            return Message(refusal_record(str(err)), reply_to=msg)
        return answer(msg, policy, node.get("state-dir") or None)

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        node = node_config(context)
        device = best_device(str(node.get("device", "auto")))
        described = f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda" else str(device)
        return Message(RecordDict({"site": ConfigRecord({"name": site_name(node), "device": described})}),
                       reply_to=msg)

    return app


app = build_client_app()
