"""The run config a coordinator accepts, checked in one place.

``fedserver run``, the console's start form and the ServerApp itself call :func:`check_run_config`,
so a mistake is reported before anything is submitted, with every problem at once and what to do
about each: an unknown key (with the nearest valid name), a value of the wrong type, an unknown
task, strategy, partition, codec or layer, and values the algorithm, the privacy settings or the
sampling settings refuse. :func:`parse_run_config_args` reads ``--run-config`` text with Flower's
own parser (``flwr run``'s syntax: ``key=value`` pairs, quoted strings may hold spaces).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedclient.runconfig import DEFAULT_RUN_CONFIG, csv_list

MODES = ("train", "search", "search-service")
DEPLOYMENT_OWNED = ("store", "fab-signature")
"""Keys a deployment sets itself (its own store; the publisher's signature): never the operator's."""


class RunConfigError(ValueError):
    """A run config the coordinator would refuse; ``problems`` lists each, saying what to do."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid run config: " + "; ".join(self.problems))


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word`` (``_`` read as ``-``), if one is close."""
    match = difflib.get_close_matches(str(word).replace("_", "-").lower(), list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown(kind: str, word: str, choices: Iterable[str]) -> str:
    """"unknown KIND 'word'; did you mean 'x'? choose one of: ..." """
    choices = sorted(choices)
    guess = nearest(word, choices)
    return (f"unknown {kind} '{word}'; " + (f"did you mean '{guess}'? " if guess else "")
            + f"choose one of: {', '.join(choices)}")


def parse_run_config_args(items: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` values as ``flwr run`` reads them (Flower's parser: TOML values, so strings
    are quoted and may hold spaces: ``run-name="my first run" local-steps=2``); RunConfigError
    naming the text Flower cannot read."""
    import click
    from flwr.common.config import parse_config_args

    config: dict[str, Any] = {}
    for item in items:
        if item.strip().endswith(".toml"):
            raise RunConfigError([f"--run-config '{item}': give key=value pairs (a TOML file goes to `flwr run`)"])
        try:
            parsed = parse_config_args([item])
        except (click.ClickException, ValueError) as err:
            raise RunConfigError([f"--run-config '{item}' cannot be read: use key=value pairs separated by spaces, "
                                  'strings in quotes (e.g. codec="topk:0.02+q8" run-name="my first run" local-steps=2)'
                                  ]) from err
        if item.strip() and not parsed:
            raise RunConfigError([f"--run-config '{item}' holds no key=value pair"])
        stray = _stray_text(item)
        if stray:
            raise RunConfigError([f"--run-config '{item}': {stray!r} is not a key=value pair (Flower would drop it "
                                  "silently); write it as key=value, strings in quotes"])
        config.update(parsed)
    return config


FLWR_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")  # flwr 1.39's parse_config_args pattern


def _stray_text(item: str) -> str:
    """What Flower's ``--run-config`` parser skips in ``item``: the text between its key=value pairs."""
    return FLWR_PAIR.sub(" ", item).strip()


def _type_problem(key: str, value: Any) -> str | None:
    expected = type(DEFAULT_RUN_CONFIG[key])
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isfinite(value) else f"{key} must be a finite number, got {value}"
    if expected is bool:
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r} (e.g. {key}=true)"
    if isinstance(value, expected) and not isinstance(value, bool):
        return None
    kind = {int: "a whole number", float: "a number", str: "a string in quotes"}[expected]
    example = f'{key}="{value}"' if expected is str else f"{key}={DEFAULT_RUN_CONFIG[key]}"
    return f"{key} must be {kind}, got {value!r} (e.g. {example})"


def check_run_config(config: Mapping[str, Any], *, deployment: bool = False,
                     num_clients: int = 0) -> dict[str, Any]:
    """``config`` (the operator's keys, or a whole run config) merged over the defaults, once every
    check the ServerApp makes at start passes; RunConfigError listing every problem otherwise.
    ``deployment``: the keys a deployment sets itself are refused too."""
    problems = []
    for key, value in config.items():
        if key not in DEFAULT_RUN_CONFIG:
            guess = nearest(key, DEFAULT_RUN_CONFIG)
            problems.append(f"unknown key '{key}'; " + (f"did you mean '{guess}'?" if guess else
                            f"the keys are: {', '.join(sorted(DEFAULT_RUN_CONFIG))}"))
        elif deployment and key in DEPLOYMENT_OWNED:
            problems.append(f"{key} is the deployment's own (its store; the publisher's signature): drop it "
                            "(`fedserver run --signature` passes a signature)")
        elif (problem := _type_problem(key, value)) is not None:
            problems.append(problem)
    if problems:
        raise RunConfigError(problems)
    merged = {**DEFAULT_RUN_CONFIG, **config}

    def check(action) -> Any:
        try:
            return action()
        except (ValueError, TypeError) as err:
            problems.append(str(err))
            return None

    from aggregators import ALGORITHMS, Codec, make_algorithm
    from fedclient.tasks import SCHEMES, TASKS
    from fedclient.tasks.model_dir import is_directory_task

    if merged["mode"] not in MODES:
        problems.append(unknown("mode", merged["mode"], MODES))
    if not 1 <= merged["search-idle-timeout"] <= 7 * 86400:
        problems.append(f"search-idle-timeout must be 1..604800 seconds, got {merged['search-idle-timeout']}")
    if merged["seed"] < 0:
        problems.append(f"seed must be a whole number >= 0, got {merged['seed']}")
    if merged["num-server-rounds"] < 1:
        problems.append(f"num-server-rounds must be at least 1, got {merged['num-server-rounds']}")
    task = check(lambda: TASKS.get(merged["task"]))  # a dir:… task's directories are checked here too
    if task is None and not is_directory_task(merged["task"]):
        problems.append(unknown("task", merged["task"], TASKS))
    if task is not None and merged["max-length"]:
        task = check(lambda: task.with_max_length(merged["max-length"])) or task
    if merged["partition"] not in SCHEMES:
        problems.append(unknown("partition", merged["partition"], SCHEMES))
    check(lambda: Codec.parse(merged["codec"]))
    algorithm = None
    if merged["strategy"] not in ALGORITHMS:
        problems.append(unknown("strategy", merged["strategy"], ALGORITHMS))
    else:
        algorithm = check(lambda: make_algorithm(merged["strategy"], merged))
    privacy = check(lambda: privacy_settings(merged, algorithm)) if algorithm is not None else None
    check(lambda: strategy_settings(merged, num_clients, privacy or {}, algorithm))
    if task is not None:
        strangers = [layer for layer in csv_list(merged["train-layers"]) if layer not in task.layer_names()]
        if strangers:
            problems.append(f"train-layers names unknown layer(s) {strangers}; {task.name} has: "
                            f"{', '.join(task.layer_names())}")
    from fedclient.tasks.adapters import AdapterSpec

    adapter = check(lambda: AdapterSpec.from_run_config(merged))
    if adapter is not None and algorithm is not None and algorithm.adapter_incompatibility:
        problems.append(f"strategy {algorithm.name} cannot train adapter={adapter.kind}: "
                        f"{algorithm.adapter_incompatibility}")
    from aggregators import takes_trainer_options
    from aggregators.local_training import TRAINER_CONFIG_KEYS, TrainerOptions

    trainer = check(lambda: TrainerOptions.from_config(merged))
    if (trainer is not None and trainer != TrainerOptions() and merged["strategy"] in ALGORITHMS
            and not takes_trainer_options(merged["strategy"])):
        problems.append(f"strategy {merged['strategy']} does not train with gradient steps that take "
                        f"{', '.join(TRAINER_CONFIG_KEYS)}: leave them at their defaults or use "
                        + ", ".join(name for name in ALGORITHMS if takes_trainer_options(name)))
    if merged["layer-budget"]:
        from fedclient.budget import draw_budget

        check(lambda: draw_budget(merged["layer-budget"], merged["seed"], 0))
    if problems:
        raise RunConfigError(problems)
    return merged


def strategy_settings(config: Mapping[str, Any], num_clients: int, message_config: Mapping[str, Any],
                      algorithm=None):
    """The sampling and waiting settings of a run (:class:`fedserver.strategy.StrategySettings`),
    with its secure-aggregation and central-DP settings when ``algorithm`` is given."""
    from fedserver.strategy import StrategySettings

    secure, central = aggregation_settings(config, algorithm) if algorithm is not None else ({}, {})
    return StrategySettings(
        secure_aggregation=secure,
        central_dp=central,
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        min_train_nodes=int(config["min-train-nodes"]),
        min_available_nodes=max(1, num_clients),
        round_timeout=float(config["round-timeout"]),
        checkpoint_every=int(config["checkpoint-every"]),
        keep_checkpoints=int(config["keep-checkpoints"]),
        seed=int(config["seed"]),
        message_config=dict(message_config),
    )


def run_noise_multiplier(config: Mapping[str, Any], algorithm) -> float:
    """The Gaussian noise multiplier z (noise std over the sensitivity 2C) that spends the run's ε
    at its δ over its planned releases: what the coordinator expects sites to calibrate to
    (distributed DP) or adds itself (central DP)."""
    from privacy.accounting import calibrate

    fixed = float(config["dp-noise-multiplier"])
    if fixed:
        return fixed / 2
    releases = int(config["num-server-rounds"]) * algorithm.releases_per_round
    return calibrate("gaussian", float(config["dp-epsilon"]), float(config["dp-delta"]), releases)


def aggregation_settings(config: Mapping[str, Any], algorithm) -> tuple[dict[str, Any], dict[str, float]]:
    """Secure aggregation's settings ({} when off) and central DP's ({} when off); ValueError when
    the run asks for what the algorithm cannot do. ``dp = distributed`` implies ``secagg``."""
    mechanism = str(config.get("dp", "off"))
    secure = bool(config.get("secagg")) or mechanism == "distributed"
    if mechanism == "central":
        if secure:
            raise ValueError("dp = central is the trusted-coordinator reference (the coordinator sees each update); "
                             "with secure aggregation use dp = distributed")
        if algorithm.secure_aggregation_incompatibility:
            raise ValueError(f"dp = central noises a sum of replies, and {algorithm.name}'s are not summed: "
                             f"{algorithm.secure_aggregation_incompatibility}")
        return {}, {"clip": float(config["clip"]), "noise-multiplier": run_noise_multiplier(config, algorithm),
                    "delta": float(config["dp-delta"])}
    if not secure:
        return {}, {}
    if algorithm.secure_aggregation_incompatibility:
        raise ValueError(f"secure aggregation cannot apply to {algorithm.name}: "
                         f"{algorithm.secure_aggregation_incompatibility}")
    from privacy.secure_aggregation import SecureSumSettings

    settings: dict[str, Any] = {"bits": int(config["secagg-bits"]), "threshold": int(config["secagg-threshold"]),
                                "clip": float(config["secagg-clip"]), "max_weight": int(config["secagg-max-weight"]),
                                "noise": 0.0}
    if mechanism == "distributed":  # unweighted, clipped to the DP clip, room for the summed noise
        settings.update(clip=float(config["clip"]), max_weight=1, weighted=False,
                        noise=2 * run_noise_multiplier(config, algorithm) * float(config["clip"]))
    SecureSumSettings(sites=max(2, settings["threshold"]), **settings)  # validates (the modulus must fit)
    return settings, {}


def privacy_settings(config: Mapping[str, Any], algorithm) -> dict[str, Any]:
    """The local-DP settings every message carries ({} when ``dp`` is off); ValueError on a bad one.

    ``dp-releases`` is the number of privatized messages a site sends if sampled every round,
    for sites that calibrate their noise to their budget.
    """
    from privacy.ldp import LdpSettings

    mechanism = str(config.get("dp", "off"))
    if mechanism in ("off", "central"):  # central DP asks nothing of the sites
        return {}
    if float(config["fraction-evaluate"]) > 0:
        raise ValueError("local evaluation sends data-dependent metrics that local DP does not cover; "
                         "with dp on, use central evaluation only (fraction-evaluate 0)")
    if not algorithm.supports_local_dp and mechanism != "distributed":
        raise ValueError(f"local DP is not available for {algorithm.name}: its uplink is a compressed "
                         "control-variate difference; use fedavg or selective-layer with a codec")
    settings = {
        "dp": mechanism, "dp-epsilon": float(config["dp-epsilon"]), "dp-delta": float(config["dp-delta"]),
        "clip": float(config["clip"]), "dp-noise-multiplier": float(config["dp-noise-multiplier"]),
        "dp-releases": int(config["num-server-rounds"]) * algorithm.releases_per_round,
    }
    LdpSettings.resolve(settings)  # validates
    return settings


__all__ = ["DEPLOYMENT_OWNED", "MODES", "RunConfigError", "check_run_config", "nearest", "parse_run_config_args",
           "privacy_settings", "strategy_settings", "unknown"]


def resume_problems(run_id: str, run_task: str, run_strategy: str, task: str, algorithm) -> list[str]:
    """Why run ``run_id`` (``run_strategy`` on ``run_task``) cannot be resumed as ``algorithm`` on
    ``task``: the ServerApp's check, which ``fedserver run`` makes before submitting."""
    problems = []
    if (run_task, run_strategy) != (task, algorithm.name):
        problems.append(f"run '{run_id}' is {run_strategy} on {run_task}; resume it with the same task and strategy")
    if not algorithm.resumable:
        problems.append(f"{algorithm.name} keeps server state beyond the global weights (ledgers, control variates "
                        "or rankings) that the store does not hold yet; it cannot resume")
    return problems
