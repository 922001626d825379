"""What the console's pages and JSON API show, assembled from the run store and the deployment.

Pure functions of a :class:`~fedserver.store.RunStore` (and a deployment directory for the sites
page) returning JSON-ready dicts, so the API, the pages and the tests read the same figures.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Any

from fedserver.report import accuracy_name, privacy_per_site, run_summary, summary_metric_names
from fedserver.store import RunStore

FP32_BYTES = 4


def _iso(value) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def runs_overview(store: RunStore) -> list[dict[str, Any]]:
    """One row per run: status, strategy, progress, best accuracy, bytes moved, privacy spent."""
    rows = []
    for run in store.list_runs():
        rounds = store.rounds(run.id)
        accuracies = [r.central_accuracy for r in rounds if r.central_accuracy is not None]
        privacy = privacy_per_site(store.client_rounds(run.id)) if run.config.get("dp", "off") != "off" else []
        spent = [p["epsilon_spent"] for p in privacy if "epsilon_spent" in p]
        rows.append({
            "id": run.id, "name": run.name, "status": run.status, "task": run.task, "strategy": run.strategy,
            "codec": run.config.get("codec") or "none", "dp": run.config.get("dp", "off"),
            "rounds_done": len(rounds), "rounds_total": run.num_rounds, "clients": run.num_clients,
            "best_accuracy": max(accuracies) if accuracies else None,
            "bytes_moved": sum(r.bytes_up + r.bytes_down for r in rounds),
            "epsilon_spent": max(spent) if spent else None,
            "epsilon_budget": float(run.config["dp-epsilon"]) if privacy and "dp-epsilon" in run.config else None,
            "created_at": _iso(run.created_at), "finished_at": _iso(run.finished_at), "error": run.error,
        })
    return rows


@functools.lru_cache(maxsize=8)
def _trainable_parameters(task: str, train_layers: str) -> int:
    """Parameters FedAvg would exchange for ``task`` (its default or the given layers)."""
    from fedclient.tasks import get_task

    spec = get_task(task)
    model = spec.build_model()
    keys = set(spec.trainable_keys(model, [x for x in train_layers.split(",") if x] or None))
    return sum(p.numel() for name, p in model.named_parameters() if name in keys)


def fedavg_bytes_per_client(store: RunStore, run) -> int | None:
    """Bytes one client would move per round under FedAvg (fp32 weights down and up) for the same
    model: from the run's latest checkpoint when there is one, else from the task's model."""
    if run.strategy == "fedavg" and not run.config.get("codec"):
        return None  # it *is* FedAvg: the measured bytes are the reference
    size = store.checkpoint_size(run.id)
    if size is not None:
        return 2 * size
    try:
        return 2 * FP32_BYTES * _trainable_parameters(run.task, str(run.config.get("train-layers", "")))
    except (ValueError, ImportError, RuntimeError):
        return None


_LAYER_ORDER = re.compile(r"(\d+)")


def _layer_key(name: str) -> tuple:
    if name == "embeddings":
        return (0, 0)
    if name == "head":
        return (2, 0)
    number = _LAYER_ORDER.search(name)
    return (1, int(number.group(1)) if number else 0, name)


def layer_heatmap(selection: list[dict[str, Any]]) -> dict[str, Any] | None:
    """For selective-layer runs: how many rounds each site trained each layer."""
    if not selection:
        return None
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for entry in selection:
        for layer in entry["layers"]:
            counts[entry["site"], layer] += 1
    sites = sorted({site for site, _ in counts})
    layers = sorted({layer for _, layer in counts}, key=_layer_key)
    return {"sites": sites, "layers": layers, "rounds": [[counts.get((s, la), 0) for la in layers] for s in sites]}


def site_table(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    """Per site: participation, last seen, bytes, failures, ε spent vs budget, device."""
    rows = store.client_rounds(run_id)
    started = {r.round: r.started_at for r in store.rounds(run_id)}
    privacy = {p["site"]: p for p in privacy_per_site(rows)}
    sites: dict[str, dict[str, Any]] = {}
    for c in rows:
        entry = sites.setdefault(c.site or f"node-{c.node_id}", {
            "site": c.site or f"node-{c.node_id}", "node_id": c.node_id, "rounds_asked": 0, "rounds_ok": 0,
            "failures": 0, "bytes_up": 0, "bytes_down": 0, "last_seen": None, "last_error": None, "device": ""})
        if c.phase == "train":
            entry["rounds_asked"] += 1
        if c.status == "ok":
            entry["rounds_ok"] += c.phase == "train"
            seen = started.get(c.round)
            if seen is not None and (entry["last_seen"] is None or seen.isoformat() + "Z" > entry["last_seen"]):
                entry["last_seen"] = seen.isoformat() + "Z"
        else:
            entry["failures"] += 1
            entry["last_error"] = f"round {c.round} {c.phase}: {c.status}" + (f": {c.error}" if c.error else "")
        entry["bytes_up"] += c.bytes_up
        entry["bytes_down"] += c.bytes_down
        entry["device"] = (c.details or {}).get("device") or entry["device"]
    for name, entry in sites.items():
        account = privacy.get(name, {})
        entry["epsilon_spent"] = account.get("epsilon_spent")
        entry["epsilon_budget"] = account.get("epsilon_budget")
        entry["declined_round"] = account.get("declined_round")
    return sorted(sites.values(), key=lambda e: e["site"])


def run_detail(store: RunStore, run_ref: str) -> dict[str, Any]:
    """Everything the run page shows (raises StoreError for an unknown run)."""
    summary = run_summary(store, run_ref)
    run = store.get_run(summary["run_id"])
    per_client = fedavg_bytes_per_client(store, run)
    moved = summary["total_bytes_down"] + summary["total_bytes_up"]
    fedavg_rounds = [r["clients_sampled"] * per_client if per_client else None for r in summary["rounds"]]
    fedavg_total = sum(x for x in fedavg_rounds if x) if per_client else None
    names = summary_metric_names(summary)
    extra_metrics = sorted(k for k in names if k != "train-loss" and not k.startswith("central-"))
    central = sorted(k for k in names if k.startswith("central-"))
    return {
        "run": {k: summary[k] for k in ("run_id", "name", "task", "strategy", "status", "error", "created_at",
                                          "finished_at", "num_clients", "num_rounds", "rounds_completed",
                                          "best_central_accuracy", "final_central_accuracy", "initial_central_accuracy",
                                          "total_bytes_down", "total_bytes_up", "checkpoints", "config")},
        "rounds": summary["rounds"],
        "fedavg_bytes_per_round": fedavg_rounds,
        "fedavg_comparison": None if not fedavg_total else {
            "moved": moved, "fedavg": fedavg_total, "fraction": moved / fedavg_total,
            "text": f"you moved {100 * moved / fedavg_total:.3g}% of what FedAvg would "
                    f"({moved / 1e6:.2f} MB vs {fedavg_total / 1e6:.1f} MB for the same model and rounds)",
        },
        "sites": site_table(store, run.id),
        "privacy": summary["privacy"],
        "heatmap": layer_heatmap(summary["selection"]),
        "accuracy_label": accuracy_name(names),
        "evaluation_metrics": {  # the central evaluation beyond accuracy: macro-F1; exact match, perplexity
            k.removeprefix("central-"): [r["metrics"].get(k) for r in summary["rounds"]] for k in central
        } if central else None,
        "algorithm_metrics": {
            "title": "robustness metrics" if run.strategy == "frl" else "algorithm metrics",
            "series": {k: [r["metrics"].get(k) for r in summary["rounds"]] for k in extra_metrics},
        } if extra_metrics else None,
        "problems": summary["client_problems"][-50:],
    }


def sites_overview(deployment) -> list[dict[str, Any]]:
    """Enrolled sites with key fingerprints and what the SuperLink reports of them now."""
    from fedserver import deployment as dep

    enrolled = dep.enrolled_sites(deployment)
    live: dict[str, dict[str, Any]] = {}
    reachable = dep.running_pid(deployment) is not None
    if reachable:
        for node in dep.status(deployment)["nodes"]:
            live[str(node.get("node-id"))] = node
    rows = []
    for name, info in sorted(enrolled.items()):
        node = live.get(str(info.get("node-id")), {})
        online = node.get("status") == "online"
        # Flower 1.39's Control API reports when a node came online or went offline, not its heartbeat
        # times; a node is online while its 30 s heartbeats arrive (offline after two are missed)
        rows.append({"site": name, "node_id": info.get("node-id"), "fingerprint": info.get("fingerprint"),
                     "enrolled_at": info.get("enrolled-at"),
                     "status": node.get("status", "coordinator stopped" if not reachable else "never connected"),
                     "connected": online, "online_since": node.get("online-at") or None,
                     "offline_since": node.get("offline-at") or None,
                     "last_heartbeat": "within the last 60 s" if online else (node.get("offline-at") or None)})
    return rows
