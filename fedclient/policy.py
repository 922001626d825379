"""A partner site's own policy: what it accepts, whatever the coordinator asks.

``fedclient start --policy FILE`` (TOML) makes every decision the site takes come from this file and
the site's node config, never from a run config or an instruction, which the coordinator writes.
``fedclient policy init FILE`` writes the commented default below; ``fedclient policy check FILE``
validates one. A run that asks for something the policy forbids is declined with a reason naming
the policy key (``site policy privacy.required: ...``), never the site's data.

``fedclient start`` without ``--policy`` enforces :data:`DEFAULT_POLICY` itself (local DP required,
ε ≤ 4 per run and 16 over the site's life, evaluation refused), and so does a SuperNode started by
hand with no ``policy`` in its node config; a key a policy file leaves out keeps the default's
value. A site opts out of a guarantee only by writing a policy that says so. Only the virtual
sites of Flower's simulation engine (:func:`in_flower_simulation`) take the run's own settings. The flags ``fedclient start --dp-epsilon/--dp-delta/
--clip/--dp-noise-multiplier`` only tighten (any of them makes local DP required; ``--dp-epsilon``
caps the run and the site's lifetime), ``--dp-ledger`` names the ledger file and
``--search-index/--querier-key/--query-budget`` fill the ``[search]`` table (a budget flag can only
lower the policy's).
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from privacy.site_privacy import DP_MECHANISMS, SitePrivacy
from privacy.refusal import PolicyRefusal
from privacy.vector_search import SearchLimits

EVALUATION_MODES = ("refuse", "noised", "exact")
WORKLOAD_LIMITS = {  # what an instruction (or the run's max-length) asks -> the policy key bounding it
    "local-steps": "max-local-steps", "zo-steps": "max-local-steps", "score-batches": "max-local-steps",
    "batch-size": "max-batch-size", "grad-accumulation": "max-grad-accumulation",
    "max-length": "max-sequence-length",
}

DEFAULT_POLICY = """\
# fedtune site policy. The coordinator cannot override anything here: a run that asks for more is
# declined, and the reason it sees names the key below that declined it (never your data).
# Check this file with `fedclient policy check FILE`; use it with `fedclient start --policy FILE`.

[training]
# Tasks and strategies this site trains; [] accepts any.
tasks = []
strategies = []
# The largest example count this site reports (the weight of its update in a weighted mean).
max-num-examples = 100000
# What one round may make this site compute: a run asking for more is declined.
max-local-steps = 500          # optimizer (or zeroth-order) steps per round
max-batch-size = 64            # examples per batch
max-grad-accumulation = 16     # batches summed per optimizer step
max-sequence-length = 512      # tokens per example a run's max-length may ask for

[privacy]
# true: decline every run without local differential privacy on what this site sends.
required = true
# Mechanisms accepted: "gaussian" and "laplace" (local noise, the guarantee holds whatever anyone
# else does), "distributed" (this site's share of discrete Gaussian noise under secure aggregation:
# the guarantee assumes at least secure-aggregation.min-threshold sites add theirs).
mechanisms = ["gaussian", "laplace"]
# epsilon caps: for one run, and over every run this site's ledger ever recorded (at max-delta).
max-epsilon-per-run = 4.0
max-epsilon-lifetime = 16.0
max-delta = 1e-6
# The largest clip norm and the least noise multiplier (0: calibrate to the budget).
max-clip = 1.0
min-noise-multiplier = 0.0
# The ledger file ("": privacy-ledger.json in the site's state directory).
ledger = ""

[evaluation]
# Federated evaluation of weights the coordinator sends: "refuse"; "noised" (loss and accuracy get
# Gaussian noise, Laplace at a site whose privacy.mechanisms has only "laplace", and are charged
# to the privacy ledger); "exact" (only without required privacy:
# exact metrics on private data answer any question the coordinator encodes in the weights).
mode = "refuse"
noise-multiplier = 4.0
loss-bound = 5.0

[secure-aggregation]
# true: decline every training round the coordinator would see this site's own update in (it must
# be securely aggregated: the coordinator learns only the sum over the sites).
required = false
# Mask only among at least this many sites, and only with a recovery threshold of at least this many
# (the coordinator rebuilds a dropped site's masks from that many sites' shares).
min-sites = 3
min-threshold = 2
# How many of the other sites may collude with the coordinator: the threshold must exceed
# (sites + max-colluders) / 2, so no two survivor sets can both be confirmed (more tolerance of
# colluders leaves less of dropped sites).
max-colluders = 0
# The identity keys of the sites this site masks with, as `fedclient keys` prints their
# fingerprints ("SHA256:..."); [] trusts the roster the coordinator relays.
peers = []
# true: train with a seed of this site's own in securely aggregated rounds, so a coordinator that
# repeats a round with the same model and seed over another set of sites cannot subtract the sums.
fresh-seeds = true

[search]
# Encrypted search over a document store built with `fedclient index DIR` ("": not offered).
index = ""
# The querier public key this site trusts (the coordinator's querier.key.pub).
querier-key = ""
# Per querier, over the life of the data: queries answered (each reveals every score) and
# document ids revealed.
query-budget = 64
fetch-budget = 640
# The largest row bound a query may ask results to be padded to, and the most rows one fetch asks.
max-rows-per-query = 10000
max-k = 50
# The longest a querier's key bundle may stay valid (days from its arrival); expired ones are deleted.
max-key-days = 7.0
"""


@dataclass(frozen=True)
class SecureAggregationPolicy:
    """The ``[secure-aggregation]`` table: whether the site demands it, and with whom it masks."""

    required: bool = False
    min_sites: int = 2
    min_threshold: int = 2
    max_colluders: int = 0
    peers: tuple[str, ...] = ()
    fresh_seeds: bool = False  # a simulation's virtual sites keep the run's seeds (reproducible runs)

    def __post_init__(self) -> None:
        for name, least in (("min_sites", 2), ("min_threshold", 2), ("max_colluders", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"secure-aggregation.{name.replace('_', '-')} must be a whole number >= {least}, "
                                 f"got {value!r}")
        bad = [peer for peer in self.peers if not peer.startswith("SHA256:")]
        if bad:
            raise ValueError(f"secure-aggregation.peers holds SHA256 fingerprints (as `fedclient keys` prints "
                             f"them), not {bad[:2]}")


@dataclass(frozen=True)
class SearchPolicy:
    """The ``[search]`` table: where the store is, whom it trusts, and the limits it grants."""

    index: str = ""
    querier_key: str = ""
    limits: SearchLimits = field(default_factory=SearchLimits)


@dataclass(frozen=True)
class SitePolicy:
    """Everything a site decides (see the module docstring and :data:`DEFAULT_POLICY`)."""

    tasks: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()
    max_num_examples: int = 100_000
    # a round's workload (the built-in policy file tightens these; a simulation's virtual sites keep them)
    max_local_steps: int = 100_000
    max_batch_size: int = 4096
    max_grad_accumulation: int = 64
    max_sequence_length: int = 2048
    privacy: SitePrivacy = field(default_factory=SitePrivacy)
    ledger: str = ""
    evaluation: str = ""  # "": exact unless privacy is required, then refuse
    evaluation_noise_multiplier: float = 4.0
    evaluation_loss_bound: float = 5.0
    search: SearchPolicy = field(default_factory=SearchPolicy)
    secure_aggregation: SecureAggregationPolicy = field(default_factory=SecureAggregationPolicy)
    source: str = ""  # the file it came from ("" for the built-in default)

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_examples, int) or self.max_num_examples < 1:
            raise ValueError(f"training.max-num-examples must be a whole number >= 1, got {self.max_num_examples!r}")
        for key in WORKLOAD_LIMITS.values():
            value = getattr(self, key.replace("-", "_"))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"training.{key} must be a whole number >= 1, got {value!r}")
        if self.evaluation and self.evaluation not in EVALUATION_MODES:
            raise ValueError(f"evaluation.mode must be one of {', '.join(EVALUATION_MODES)}, got '{self.evaluation}'")
        if self.privacy.required and self.evaluation == "exact":
            raise ValueError("evaluation.mode = \"exact\" with privacy.required = true: exact metrics on private data "
                             "are an oracle outside the privacy guarantee; use \"noised\" or \"refuse\", or set "
                             "privacy.required = false (a key the file leaves out keeps the built-in default)")
        if not (self.evaluation_noise_multiplier > 0 and math.isfinite(self.evaluation_noise_multiplier)):
            raise ValueError(f"evaluation.noise-multiplier must be positive, got {self.evaluation_noise_multiplier}")
        if not (self.evaluation_loss_bound > 0 and math.isfinite(self.evaluation_loss_bound)):
            raise ValueError(f"evaluation.loss-bound must be positive and finite, got {self.evaluation_loss_bound}")

    @property
    def evaluation_mode(self) -> str:
        return self.evaluation or ("refuse" if self.privacy.required else "exact")

    # ---- decisions -------------------------------------------------------------------------
    def check_training(self, task: str, strategy: str) -> None:
        """PolicyRefusal unless this site trains ``task`` with ``strategy`` ("" checks the task only)."""
        if self.tasks and task not in self.tasks:
            raise PolicyRefusal("training.tasks", f"this site does not train task '{task}'")
        if strategy and self.strategies and strategy not in self.strategies:
            raise PolicyRefusal("training.strategies", f"this site does not train with strategy '{strategy}'")

    def check_workload(self, instruction: Mapping[str, Any], run_config: Mapping[str, Any]) -> None:
        """PolicyRefusal (naming the ``training.max-*`` key) when an instruction's steps, batch size
        or accumulation, or the run's ``max-length``, ask this site for more than its policy allows;
        checked before the site loads a model or reads its data."""
        asked = {**{k: instruction[k] for k in WORKLOAD_LIMITS if k in instruction and k != "max-length"},
                 "max-length": run_config.get("max-length", 0)}
        for key, limit_key in WORKLOAD_LIMITS.items():
            try:
                value = int(asked.get(key) or 0)
            except (TypeError, ValueError):
                raise PolicyRefusal(f"training.{limit_key}", f"{key} is not a whole number") from None
            limit = getattr(self, limit_key.replace("-", "_"))
            if value > limit:
                raise PolicyRefusal(f"training.{limit_key}", f"{key} {value} is more than this site allows ({limit})")

    def reported_examples(self, count: int) -> int:
        """The example count this site reports: its own, capped by ``training.max-num-examples``."""
        return max(1, min(int(count), self.max_num_examples))

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, text: str, source: str = "") -> SitePolicy:
        """Parse and validate a policy; ValueError naming every unknown or bad key."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{source or 'policy'} is not valid TOML ({err})") from err
        known = {name: set(table) for name, table in _default_tables().items()}  # every key init writes
        problems = [f"unknown table [{name}]" for name in data if name not in known]
        for name, keys in known.items():
            table = data.get(name, {})
            if not isinstance(table, dict):
                problems.append(f"[{name}] must be a table")
                continue
            problems += [f"unknown key {name}.{key}" for key in table if key not in keys]
        if problems:
            raise ValueError(f"{source or 'policy'}: " + "; ".join(problems) + " (see `fedclient policy init`)")
        defaults = _default_tables()  # a key the file leaves out keeps the built-in policy's value: fail closed
        training, private, evaluation, search, secure = (
            {**defaults[n], **data.get(n, {})}
            for n in ("training", "privacy", "evaluation", "search", "secure-aggregation"))

        def typed(table: Mapping[str, Any], key: str, kind: type, section: str) -> Any:
            value = table[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is tuple:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{section}.{key} must be a list of strings, got {value!r}")
                return tuple(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{section}.{key} must be a {kind.__name__}, got {value!r}")
            return value

        try:
            privacy = SitePrivacy(
                required=typed(private, "required", bool, "privacy"),
                mechanisms=typed(private, "mechanisms", tuple, "privacy"),
                max_epsilon_per_run=typed(private, "max-epsilon-per-run", float, "privacy"),
                max_epsilon_lifetime=typed(private, "max-epsilon-lifetime", float, "privacy"),
                max_delta=typed(private, "max-delta", float, "privacy"),
                max_clip=typed(private, "max-clip", float, "privacy"),
                min_noise_multiplier=typed(private, "min-noise-multiplier", float, "privacy"),
            )
            limits = SearchLimits(
                query_budget=typed(search, "query-budget", int, "search"),
                fetch_budget=typed(search, "fetch-budget", int, "search"),
                max_rows_per_query=typed(search, "max-rows-per-query", int, "search"),
                max_k=typed(search, "max-k", int, "search"),
                max_key_days=typed(search, "max-key-days", float, "search"),
            )
            return cls(
                tasks=typed(training, "tasks", tuple, "training"),
                strategies=typed(training, "strategies", tuple, "training"),
                max_num_examples=typed(training, "max-num-examples", int, "training"),
                **{key.replace("-", "_"): typed(training, key, int, "training")
                   for key in dict.fromkeys(WORKLOAD_LIMITS.values())},
                privacy=privacy,
                ledger=typed(private, "ledger", str, "privacy"),
                evaluation=typed(evaluation, "mode", str, "evaluation"),
                evaluation_noise_multiplier=typed(evaluation, "noise-multiplier", float, "evaluation"),
                evaluation_loss_bound=typed(evaluation, "loss-bound", float, "evaluation"),
                search=SearchPolicy(typed(search, "index", str, "search"), typed(search, "querier-key", str, "search"),
                                    limits),
                secure_aggregation=SecureAggregationPolicy(
                    required=typed(secure, "required", bool, "secure-aggregation"),
                    min_sites=typed(secure, "min-sites", int, "secure-aggregation"),
                    min_threshold=typed(secure, "min-threshold", int, "secure-aggregation"),
                    max_colluders=typed(secure, "max-colluders", int, "secure-aggregation"),
                    peers=typed(secure, "peers", tuple, "secure-aggregation"),
                    fresh_seeds=typed(secure, "fresh-seeds", bool, "secure-aggregation")),
                source=source,
            )
        except ValueError as err:
            raise ValueError(f"{source or 'policy'}: {err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> SitePolicy:
        target = pathlib.Path(path).expanduser()
        try:
            text = target.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read the site policy {target} ({err}); write one with "
                             "`fedclient policy init FILE`") from err
        policy = cls.from_toml(text, str(target))
        base = target.resolve().parent  # relative paths in the file are relative to it

        def absolute(value: str) -> str:
            return str((base / value).resolve()) if value and not os.path.isabs(value) else value

        return replace(policy, ledger=absolute(policy.ledger),
                       search=replace(policy.search, index=absolute(policy.search.index),
                                      querier_key=absolute(policy.search.querier_key)))

    def with_node_config(self, node_config: Mapping[str, Any]) -> SitePolicy:
        """This policy with the site's ``fedclient start`` flags applied: the DP flags only tighten
        (and make DP required), the others set what they name."""
        privacy, changes = self.privacy, {}
        tightened = {}
        if "dp-epsilon" in node_config:  # one budget for this site's whole ledger, as before policies existed
            budget = float(node_config["dp-epsilon"])
            tightened["max_epsilon_per_run"] = min(privacy.max_epsilon_per_run, budget)
            tightened["max_epsilon_lifetime"] = min(privacy.max_epsilon_lifetime, budget)
        if "dp-delta" in node_config:
            tightened["max_delta"] = min(privacy.max_delta, float(node_config["dp-delta"]))
        if "clip" in node_config:
            tightened["max_clip"] = min(privacy.max_clip, float(node_config["clip"]))
        if "dp-noise-multiplier" in node_config:
            tightened["min_noise_multiplier"] = max(privacy.min_noise_multiplier, float(node_config["dp-noise-multiplier"]))
        if tightened:
            changes["privacy"] = replace(privacy, required=True, **tightened)
            if not self.evaluation:
                changes["evaluation"] = "refuse"
        if node_config.get("dp-ledger"):
            changes["ledger"] = str(node_config["dp-ledger"])
        search = self.search
        if node_config.get("search-index"):
            search = replace(search, index=str(node_config["search-index"]))
        if node_config.get("search-querier-key"):
            search = replace(search, querier_key=str(node_config["search-querier-key"]))
        if "query-budget" in node_config:
            budget = int(node_config["query-budget"])
            search = replace(search, limits=replace(search.limits, query_budget=min(budget, search.limits.query_budget)
                                                    if self.source else budget))  # a file's budget only drops
        if search is not self.search:
            changes["search"] = search
        return replace(self, **changes) if changes else self

    def describe(self) -> list[tuple[str, str]]:
        """(setting, value) rows for ``fedclient policy check``."""
        p, s = self.privacy, self.search
        rows = [("training.tasks", ", ".join(self.tasks) or "any"),
                ("training.strategies", ", ".join(self.strategies) or "any"),
                ("training.max-num-examples", str(self.max_num_examples)),
                *((f"training.{key}", str(getattr(self, key.replace("-", "_"))))
                  for key in dict.fromkeys(WORKLOAD_LIMITS.values())),
                ("privacy.required", str(p.required).lower()),
                ("privacy.mechanisms", ", ".join(p.mechanisms))]
        rows += [(f"privacy.{f.name.replace('_', '-')}", f"{getattr(p, f.name):g}") for f in fields(p)
                 if f.name not in ("required", "mechanisms")]
        rows += [("privacy.ledger", self.ledger or "STATE/privacy-ledger.json"),
                 ("evaluation.mode", self.evaluation_mode),
                 ("search.index", s.index or "(no search)"), ("search.querier-key", s.querier_key or "-")]
        rows += [(f"search.{f.name.replace('_', '-')}", str(getattr(s.limits, f.name))) for f in fields(s.limits)]
        secure = self.secure_aggregation
        rows += [("secure-aggregation.required", str(secure.required).lower()),
                 ("secure-aggregation.min-sites", str(secure.min_sites)),
                 ("secure-aggregation.min-threshold", str(secure.min_threshold)),
                 ("secure-aggregation.max-colluders", str(secure.max_colluders)),
                 ("secure-aggregation.fresh-seeds", str(secure.fresh_seeds).lower()),
                 ("secure-aggregation.peers", ", ".join(secure.peers) or "the coordinator's roster")]
        return rows


@functools.lru_cache(maxsize=1)
def _default_tables() -> dict[str, dict[str, Any]]:
    return tomllib.loads(DEFAULT_POLICY)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, _version: tuple[int, ...]) -> SitePolicy:
    return SitePolicy.load(path)


BUILT_IN = "built-in"
"""The node config's ``policy`` when ``fedclient start`` got no ``--policy``: :data:`DEFAULT_POLICY`."""


def evaluation_refused() -> PolicyRefusal:
    """The refusal of federated evaluation (``evaluation.mode = "refuse"``, or nothing to noise)."""
    return PolicyRefusal("evaluation.mode", "this site does not evaluate the coordinator's weights on its data")


def in_flower_simulation() -> bool:
    """Whether this process is an actor of Flower's simulation engine (Ray), where every site is a
    virtual one of the same experiment. A SuperNode's ClientApp (a process Flower starts at the site)
    never is, whatever the coordinator sends: this is a fact about the site's own process."""
    ray = sys.modules.get("ray")
    if ray is None or "flwr.simulation.ray_transport.ray_actor" not in sys.modules:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 (any doubt: not a simulation, the stricter answer)
        return False


def site_policy(node_config: Mapping[str, Any]) -> SitePolicy:
    """The policy a ClientApp enforces: the file named by the node config's ``policy`` (``fedclient
    start --policy``; ``built-in`` without one: :data:`DEFAULT_POLICY`, local DP required), with the
    node config's flags applied. A node config without ``policy`` gets the built-in policy too (a
    SuperNode started by hand is protected like one ``fedclient start`` launched), except in Flower's
    simulation engine, whose virtual sites get :class:`SitePolicy`'s defaults: the run's own settings."""
    path = str(node_config.get("policy", "") or "")
    if path == BUILT_IN or (not path and not in_flower_simulation()):
        policy = _built_in()
    elif path:
        try:
            stat = os.stat(path)
            policy = _load_cached(path, (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns))
        except OSError as err:
            raise ValueError(f"cannot read the site policy {path} ({err})") from err
    else:
        policy = SitePolicy()
    return policy.with_node_config(node_config)


@functools.lru_cache(maxsize=1)
def _built_in() -> SitePolicy:
    return SitePolicy.from_toml(DEFAULT_POLICY, "the built-in default policy")


def write_default(path: str | os.PathLike) -> pathlib.Path:
    """Write :data:`DEFAULT_POLICY` to ``path`` (refuses to overwrite a file)."""
    target = pathlib.Path(path).expanduser()
    if target.exists():
        raise FileExistsError(f"{target} exists; a site's policy is never overwritten (edit it, or choose another path)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(DEFAULT_POLICY, encoding="utf-8")
    return target


__all__ = ["BUILT_IN", "DEFAULT_POLICY", "DP_MECHANISMS", "EVALUATION_MODES", "SearchPolicy", "SitePolicy",
           "evaluation_refused", "in_flower_simulation", "site_policy", "write_default"]
