"""The ClientApp's training side: everything that needs torch, the task's model and the site's
data (train, probe, evaluate), imported by :mod:`fedclient.app` only for messages that need it, so a
search or identify message does not pay for the training stack in its fresh ClientApp process."""

from __future__ import annotations

import functools
import math
import pathlib
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from aggregators import Instruction, make_algorithm
from aggregators.shared_randomness import WeightsMismatchError
from fedclient.budget import draw_budget
from fedclient.device import best_device
from fedclient.policy import SitePolicy, evaluation_refused, in_flower_simulation
from fedclient.tasks import (
    ClientData,
    PartitionSpec,
    SiteDataError,
    TextTask,
    get_task,
    run_task,
)
from fedclient.tasks.adapters import AdapterSpec
from fedclient.tasks.model_dir import is_directory_task
from fedclient.tasks.text import forget_loaded_models
from fedclient.wire import (
    ARRAYS,
    CONFIG,
    array_record,
    fatal_record,
    from_recorddict,
    refusal_record,
    to_recorddict,
    unpack_array_record,
)
from privacy.accounting import PrivacyBudgetExceeded
from privacy.distributed_dp import DistributedGaussian
from privacy.secure_aggregation import SecAggRefusal
from privacy.ldp import LdpSettings, LocalPrivacy, calibrated_parameter, private_evaluation
from privacy.site_privacy import LOCAL_MECHANISMS
from privacy.refusal import PolicyRefusal, site_log

CLIENT_STATE_ARRAYS = "fedtune.client-state.arrays"
CLIENT_STATE_CONFIG = "fedtune.client-state.config"


@functools.lru_cache(maxsize=2)
def _model(task_name: str, device: str, adapter: AdapterSpec | None,
           digest: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The task model on ``device`` (built once per process and model digest) and its pristine
    state to reset to."""
    MODEL_LOADS["loads"] += 1
    model = get_task(task_name).build_model(adapter).to(device)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, pristine


MODEL_LOADS: dict[str, int] = {"loads": 0, "reloads": 0}  # what this process built (a site runtime's `status`)
_MODEL_DIGESTS: dict[str, str] = {}  # task name -> the model digest of what this process loaded for it


def _loaded_model(task_name: str, device: str, adapter: AdapterSpec | None
                  ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """:func:`_model`, reused only while the task's model digest (:meth:`TextTask.model_digest`:
    the task's definition and its model files' names, sizes and times) is the one it was loaded
    with; otherwise everything loaded from model files is dropped and loaded again."""
    digest = get_task(task_name).model_digest()
    loaded = _MODEL_DIGESTS.get(task_name)
    if loaded is not None and loaded != digest:
        site_log(f"the model of task '{task_name}' changed since this process loaded it (digest {loaded} -> "
                 f"{digest}); loading it again")
        _model.cache_clear()
        forget_loaded_models()
        MODEL_LOADS["reloads"] += 1
    _MODEL_DIGESTS[task_name] = digest
    return _model(task_name, device, adapter, digest)


def model_loads() -> dict[str, Any]:
    """How many task models this process built, how many it holds, how many times a changed model
    digest made it load again, and the digest per task (``fedclient status``)."""
    return {**MODEL_LOADS, "loaded": _model.cache_info().currsize, "digests": dict(_MODEL_DIGESTS)}


def _seconds_since_process_start() -> float | None:
    """Age of this process (Linux), or None where /proc cannot say."""
    import os

    try:
        fields = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()  # noqa: SIM115
        uptime = float(open("/proc/uptime", encoding="ascii").read().split()[0])  # noqa: SIM115
    except (OSError, ValueError, IndexError):
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _fresh_model(task_name: str, device: torch.device, config: Mapping[str, Any]) -> torch.nn.Module:
    model, pristine = _loaded_model(task_name, str(device), AdapterSpec.from_run_config(config))
    model.load_state_dict(pristine)  # no trace of what a previous message trained
    return model


def site_task(config: Mapping[str, Any]) -> TextTask:
    """The run's task as this site may train it: a task naming directories (``dir:…``, a
    simulation's ``--model``/``--data``) only on Flower's simulation engine, never at a real site,
    whatever its policy: a run config cannot point a site at directories of its disk."""
    name = str(config["task"])
    if is_directory_task(name) and not in_flower_simulation():
        raise PolicyRefusal("training.tasks", "a run config cannot point this site at model or data directories")
    return run_task(config)


def site_data(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientData:
    """This site's training and evaluation data: its own files when the node config names a
    ``data-dir`` (``fedclient start --data``), else its share of the task's built-in corpus."""
    if data_dir := node_config.get("data-dir"):
        return run_task(config).site_client_data(str(data_dir), int(config["seed"]))
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
    return run_task(config).client_data(spec, int(node_config["partition-id"]))


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
        state.update(unpack_array_record(context.state[CLIENT_STATE_ARRAYS]))
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
    in its state directory; None (the client state, which lasts one run) only for the virtual sites
    of Flower's simulation engine. A real site with neither (a SuperNode started by hand) is
    refused any private release: a ledger that restarts with every run caps nothing."""
    if policy.ledger:
        return policy.ledger
    if node_config.get("state-dir"):
        return str(pathlib.Path(str(node_config["state-dir"])) / "privacy-ledger.json")
    if in_flower_simulation():
        return None
    raise PolicyRefusal("privacy.ledger", "this site keeps no persistent privacy ledger; start it with `fedclient "
                        "start` (or give its node config a state-dir)")


def budget_refusal(err: PrivacyBudgetExceeded) -> RecordDict:
    """A refusal for a spent privacy budget naming the policy key; the figures (what this site has
    spent, for this and other runs) stay in the site's log."""
    site_log(f"privacy budget: {err}")
    key = "privacy.max-epsilon-per-run" if err.scope == "run" else "privacy.max-epsilon-lifetime"
    return refusal_record(str(PolicyRefusal(key, "the privacy budget allows no further release")))


def distributed_share(privacy: LdpSettings, ledger: str | None, client_state: dict[str, Any],
                      instruction: Instruction) -> DistributedGaussian:
    """This site's share of distributed DP for the round: the Gaussian multiplier its own budget
    (the run's ε capped by its policy, and what its lifetime budget leaves) allows, for at least the
    threshold of honest sites the round's settings name. PrivacyBudgetExceeded when none fits."""
    from privacy.secure_aggregation import SecureSumSettings

    settings = SecureSumSettings.from_config(instruction.config)  # validated before it sizes any noise
    threshold = settings.threshold or settings.sites // 2 + 1
    with privacy.ledger(ledger, client_state).transaction() as book:
        own = book.run_releases(privacy.run)
        multiplier = (privacy.noise_multiplier / 2 if privacy.noise_multiplier
                      else calibrated_parameter(client_state, privacy, book, "gaussian", 1))
        share = DistributedGaussian(privacy.clip, multiplier, threshold)
        book.check(privacy.run, [share.release()], privacy.epsilon if own else math.inf, privacy.delta)
    return share


def charge_distributed(privacy: LdpSettings, ledger: str | None, client_state: dict[str, Any],
                       instruction: Instruction, share: DistributedGaussian) -> dict[str, float]:
    """Charge the round's distributed-DP release to the site's ledger before anything is sent; the
    figures the site reports (its accounting for this run, as under local DP)."""
    server_round = int(instruction.config.get("server-round", 0))
    with privacy.ledger(ledger, client_state).transaction() as book:
        book.charge(server_round, privacy.run, [share.release()], privacy.epsilon, privacy.delta)
        spent = book.spent_in_run(privacy.run, privacy.delta)
    return {"dp-epsilon-spent": spent, "dp-epsilon-budget": privacy.epsilon, "dp-delta": privacy.delta,
            "dp-clip": privacy.clip, "dp-noise-multiplier": 2 * share.noise_multiplier,
            "dp-threshold": float(share.threshold)}


def train_reply(msg: Message, context: Context, node: Mapping[str, Any], config: Mapping[str, Any],
                policy: SitePolicy, probe: bool) -> Message:
    """Run this site's half of a round (``Algorithm.local`` or ``local_probe``) as its policy allows."""
    instruction = Instruction.from_record(from_recorddict(msg.content))
    secure = bool(instruction.config.get("secagg")) and not probe
    try:
        policy.check_training(str(config["task"]), str(instruction.config["strategy"]))
        policy.check_workload(instruction.config, config)
        site_task(config)
        privacy = LdpSettings.resolve(instruction.config, policy.privacy, run_key(context))
        ledger = ledger_path(policy, node) if privacy.enabled else None
        if policy.secure_aggregation.required and not secure and not probe:
            raise PolicyRefusal("secure-aggregation.required", "this site sends its update only securely aggregated")
        if privacy.mechanism == "distributed" and not secure:
            raise PolicyRefusal("privacy.mechanisms", "distributed DP needs secure aggregation, and this round has none")
        if secure:
            from fedclient.secure_aggregation import check_new_round

            check_new_round(context, instruction.config)  # before any training or privacy spending
            if policy.secure_aggregation.fresh_seeds:  # a repeated round must not train identically
                instruction.config["seed"] = secrets.randbits(31)
    except PolicyRefusal as err:
        return Message(refusal_record(str(err)), reply_to=msg)
    except SecAggRefusal as err:  # a replayed round
        return Message(refusal_record(f"site policy secure-aggregation: {str(err).removeprefix('secure aggregation: ')}"),
                       reply_to=msg)
    local_noise = privacy.mechanism in LOCAL_MECHANISMS
    wrap = functools.partial(LocalPrivacy, site=policy.privacy, ledger_path=ledger,
                             run=run_key(context)) if local_noise else None
    algorithm = make_algorithm(str(instruction.config["strategy"]), {"codec": instruction.config.get("codec", "")},
                               wrap=wrap)
    device = best_device(str(node.get("device", "auto")))
    try:
        data = site_data(config, node)
    except SiteDataError as err:  # this site cannot take part until its files are fixed
        site_log(f"its data does not fit task {config['task']}: {err}")
        return Message(refusal_record(f"site data: this site's files do not fit task '{config['task']}' "
                                      "(the site's log names the problems)"), reply_to=msg)
    model = _fresh_model(str(config["task"]), device, config)
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
        distributed = distributed_share(privacy, ledger, client_state, instruction) \
            if privacy.mechanism == "distributed" else None  # refuses before training when the budget is spent
        payload = run(model, data.train, instruction, client_state)
        if distributed is not None:
            payload.metrics = charge_distributed(privacy, ledger, client_state, instruction, distributed)
    except WeightsMismatchError as err:  # replaying would silently train a different model
        return Message(fatal_record(f"{type(err).__name__}: {err}"), reply_to=msg)
    except PrivacyBudgetExceeded as err:  # nothing leaves the site but the refusal
        _save_client_state(context, client_state)
        return Message(budget_refusal(err), reply_to=msg)
    _save_client_state(context, client_state)
    if secure:
        from fedclient.secure_aggregation import begin

        return begin(msg, context, node, policy, algorithm, payload, instruction,
                     {name for name, _ in model.named_parameters()}, run_key(context), distributed)
    if not privacy.enabled:  # timings and counts depend on the data: withheld under local DP
        payload.num_examples = policy.reported_examples(payload.num_examples)
        payload.metrics.setdefault("train-seconds" if not probe else "probe-seconds", time.perf_counter() - started)
        if startup is not None:
            payload.metrics["startup-seconds"] = startup
    if "partition-id" in node:
        payload.metrics["partition-id"] = int(node["partition-id"])
    return Message(to_recorddict(payload.to_record()), reply_to=msg)


def evaluate_reply(msg: Message, context: Context, node: Mapping[str, Any], config: Mapping[str, Any],
                   policy: SitePolicy) -> Message:
    """Loss and accuracy of the coordinator's weights on this site's evaluation split, as the
    policy's ``evaluation.mode`` allows (the caller refused ``refuse``): exact (example count
    capped), or noised (:func:`privacy.ldp.private_evaluation`) and charged to the ledger before it
    is sent."""
    mechanism = "gaussian" if "gaussian" in policy.privacy.mechanisms else "laplace"  # one the site accepts
    try:
        policy.check_training(str(config["task"]), "")
        policy.check_workload({}, config)
        site_task(config)
        settings = LdpSettings.resolve({"dp": mechanism, "dp-epsilon": 1e12, "dp-delta": 1e-5, "clip": 1.0},
                                       policy.privacy, run_key(context))
    except PolicyRefusal as err:
        return Message(refusal_record(str(err)), reply_to=msg)
    mode = policy.evaluation_mode
    try:
        data = site_data(config, node)
    except SiteDataError as err:
        site_log(f"its data does not fit task {config['task']}: {err}")
        return Message(refusal_record(f"site data: this site's files do not fit task '{config['task']}' "
                                      "(the site's log names the problems)"), reply_to=msg)
    device = best_device(str(node.get("device", "auto")))
    model = _fresh_model(str(config["task"]), device, config)
    if ARRAYS in msg.content:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in unpack_array_record(msg.content[ARRAYS]).items()},
                              strict=False)
    metrics = get_task(str(config["task"])).evaluate(model, data.evaluate)
    if mode == "exact":
        metrics["num-examples"] = policy.reported_examples(metrics["num-examples"]) if metrics["num-examples"] else 0
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    if not metrics["num-examples"]:  # nothing to noise: the same refusal as a site that does not evaluate
        site_log("no evaluation rows for noised evaluation")
        return Message(refusal_record(str(evaluation_refused())), reply_to=msg)
    noisy, release = private_evaluation(metrics, policy.evaluation_noise_multiplier, policy.evaluation_loss_bound,
                                        np.random.default_rng(), settings.mechanism)
    client_state = _load_client_state(context)
    try:
        with settings.ledger(ledger_path(policy, node), client_state).transaction() as ledger:
            server_round = int(msg.content[CONFIG].get("server-round", 0)) if CONFIG in msg.content else 0
            ledger.charge(server_round, settings.run, [release], settings.epsilon, settings.delta)
    except PrivacyBudgetExceeded as err:
        return Message(budget_refusal(err), reply_to=msg)
    except PolicyRefusal as err:
        return Message(refusal_record(str(err)), reply_to=msg)
    _save_client_state(context, client_state)
    noisy["num-examples"] = 1
    return Message(RecordDict({"metrics": MetricRecord(noisy)}), reply_to=msg)
