"""Reports on runs read from the run store: tables, a JSON summary and a plot."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from fedserver.store import RunRow, RunStore


def run_summary(store: RunStore, run_ref: str) -> dict[str, Any]:
    """Everything worth knowing about one run, as JSON-ready data."""
    run = store.get_run(run_ref)
    rounds = store.rounds(run.id)
    clients = store.client_rounds(run.id)
    per_round = []
    cumulative = 0
    for r in rounds:
        cumulative += r.bytes_down + r.bytes_up
        per_round.append(
            {
                "round": r.round,
                "central_accuracy": r.central_accuracy,
                "central_loss": r.central_loss,
                "federated_accuracy": r.federated_accuracy,
                "federated_loss": r.federated_loss,
                "train_loss": r.train_loss,
                "clients_sampled": r.num_sampled,
                "clients_accepted": r.num_accepted,
                "clients_rejected": r.num_rejected,
                "clients_failed": r.num_failed,
                "bytes_down": r.bytes_down,
                "bytes_up": r.bytes_up,
                "cumulative_bytes": cumulative,
                "seconds": r.seconds,
                "metrics": r.metrics,
            }
        )
    selection = [
        {"round": c.round, "site": c.site, "layers": c.details["layers"]}
        for c in clients
        if c.phase == "train" and c.status == "ok" and (c.details or {}).get("layers") is not None
    ]
    problems = [
        {"round": c.round, "phase": c.phase, "node_id": c.node_id, "status": c.status, "error": c.error}
        for c in clients
        if c.status != "ok"
    ]
    accuracies = [r["central_accuracy"] for r in per_round if r["central_accuracy"] is not None]
    return {
        "privacy": privacy_per_site(clients),
        "run_id": run.id,
        "name": run.name,
        "task": run.task,
        "strategy": run.strategy,
        "status": run.status,
        "error": run.error,
        "created_at": run.created_at.isoformat() + "Z",
        "finished_at": run.finished_at.isoformat() + "Z" if run.finished_at else None,
        "num_clients": run.num_clients,
        "num_rounds": run.num_rounds,
        "rounds_completed": len(rounds),
        "initial_central_accuracy": (run.initial_metrics or {}).get("accuracy"),
        "initial_central_loss": (run.initial_metrics or {}).get("loss"),
        "initial_central": dict(run.initial_metrics or {}),
        "final_central_accuracy": accuracies[-1] if accuracies else None,
        "best_central_accuracy": max(accuracies) if accuracies else None,
        "total_bytes_down": sum(r["bytes_down"] for r in per_round),
        "total_bytes_up": sum(r["bytes_up"] for r in per_round),
        "round_seconds": sum(r["seconds"] for r in per_round),
        "checkpoints": store.checkpoint_rounds(run.id),
        "rounds": per_round,
        "client_problems": problems,
        "selection": selection,
        "config": run.config,
        "local_dp": str((run.config or {}).get("dp", "off")) != "off",  # sites withhold their training loss
        "store": store.url,
    }


def privacy_per_site(clients) -> list[dict[str, Any]]:
    """Each site's local-DP account as its replies reported it: ε spent after its last release,
    budget, δ, noise, releases made, and the round it declined (if it did)."""
    sites: dict[str, dict[str, Any]] = {}
    for c in sorted(clients, key=lambda c: (c.round, c.phase)):
        metrics = c.metrics or {}
        if c.status == "refused" and "privacy budget" in (c.error or ""):
            entry = sites.setdefault(c.site, {"site": c.site, "releases": 0})
            entry.setdefault("declined_round", c.round)
        if "dp-epsilon-spent" not in metrics:
            continue
        entry = sites.setdefault(c.site, {"site": c.site, "releases": 0})
        entry["releases"] += 1
        entry["epsilon_spent"] = max(entry.get("epsilon_spent", 0.0), float(metrics["dp-epsilon-spent"]))
        entry["epsilon_budget"] = float(metrics["dp-epsilon-budget"])
        entry["delta"] = float(metrics["dp-delta"])
        for key, name in (("dp-noise-multiplier", "noise_multiplier"), ("dp-flip-probability", "flip_probability")):
            if key in metrics:
                entry[name] = float(metrics[key])
    return sorted(sites.values(), key=lambda e: e["site"])


def privacy_table(summary: dict[str, Any]) -> Table | None:
    """Per-site privacy spending, or None for a run without local DP."""
    if not summary.get("privacy"):
        return None
    table = Table(title="local differential privacy, per site")
    for column in ("site", "ε spent", "ε budget", "δ", "noise σ / flip p", "releases", "declined in round"):
        table.add_column(column, justify="right")
    for e in summary["privacy"]:
        noise = e.get("noise_multiplier", e.get("flip_probability"))
        table.add_row(e["site"], _num(e.get("epsilon_spent"), 3), _num(e.get("epsilon_budget"), 3),
                      f"{e['delta']:g}" if "delta" in e else "-", _num(noise, 4), str(e["releases"]),
                      str(e.get("declined_round", "-")))
    return table


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """The tables ``show`` prints for a run: per round, and per site's privacy when LDP was on."""
    return [t for t in (rounds_table(summary), privacy_table(summary)) if t is not None]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rounds_table(summary: dict[str, Any]) -> Table:
    """Per-round table: accuracy, loss, clients, MB down/up, wall time (and the layer-selection
    objective and layers trained per client, for selective strategies)."""
    selective = any("selection-objective" in (r.get("metrics") or {}) for r in summary["rounds"])
    layers_per_round: dict[int, list[int]] = {}
    for entry in summary.get("selection", []):
        layers_per_round.setdefault(entry["round"], []).append(len([x for x in entry["layers"] if x != "head"]))
    table = Table(title=f"run {summary['run_id']} · {summary['task']} · {summary['strategy']} · {summary['status']}")
    em = accuracy_name(summary_metric_names(summary)) == "exact match"
    columns = ["round", "central EM" if em else "central acc", "central loss", "train loss", "clients ok", "MB down",
               "MB up", "seconds"]
    if selective:
        columns = ["round", "EM" if em else "acc", "loss", "train loss", "ok", "MB down", "MB up", "s", "objective",
                   "layers"]
    extras = central_extra_metrics(summary)  # macro-F1; perplexity for a causal LM
    columns[3:3] = [name for name, _ in extras]
    for column in columns:
        table.add_column(column, justify="right")
    blank = [""] * (len(columns) - 3 - len(extras))
    if summary["initial_central_accuracy"] is not None:
        initial = summary.get("initial_central", {})
        table.add_row("0", _pct(summary["initial_central_accuracy"]), _num(summary["initial_central_loss"]),
                      *(show(initial.get(key)) for _, key, show in _with_format(extras)), *blank)
    for r in summary["rounds"]:
        row = [
            str(r["round"]),
            _pct(r["central_accuracy"]),
            _num(r["central_loss"]),
            *(show((r.get("metrics") or {}).get(f"central-{key}")) for _, key, show in _with_format(extras)),
            _num(r["train_loss"]) if r["train_loss"] is not None or not summary.get("local_dp") else "withheld",
            f"{r['clients_accepted']}/{r['clients_sampled']}",
            f"{r['bytes_down'] / 1e6:.2f}",
            f"{r['bytes_up'] / 1e6:.2f}",
            f"{r['seconds']:.1f}",
        ]
        if selective:
            counts = layers_per_round.get(r["round"], [])
            row += [_num((r.get("metrics") or {}).get("selection-objective")),
                    f"{sum(counts) / len(counts):.2f}" if counts else "-"]
        table.add_row(*row)
    table.add_section()
    totals = ["total", _pct(summary["final_central_accuracy"]), "", *([""] * len(extras)), "", "",
              f"{summary['total_bytes_down'] / 1e6:.2f}", f"{summary['total_bytes_up'] / 1e6:.2f}",
              f"{summary['round_seconds']:.1f}"]
    table.add_row(*totals, *([""] * (len(columns) - len(totals))))
    return table


EXTRA_CENTRAL = {"macro-f1": "macro-F1", "perplexity": "perplexity"}  # metric -> column (exact match = acc)


def accuracy_name(metric_names: Iterable[str]) -> str:
    """What a run's ``accuracy`` is: ``exact match`` where the evaluation reports ``exact-match``
    (a causal LM's greedy answers), else ``accuracy``."""
    return "exact match" if any(name.removeprefix("central-") == "exact-match" for name in metric_names) else "accuracy"


def central_metrics_text(central: Mapping[str, float]) -> str:
    """One line of a central evaluation: ``EM 59.4% · perplexity 1.50`` or ``acc 85.0% · macro-F1 80.1%``."""
    parts = []
    if central.get("accuracy") is not None:
        parts.append(f"{'EM' if accuracy_name(central) == 'exact match' else 'acc'} {100 * central['accuracy']:.1f}%")
    if central.get("macro-f1") is not None:
        parts.append(f"macro-F1 {100 * central['macro-f1']:.1f}%")
    if central.get("perplexity") is not None:
        parts.append(f"perplexity {central['perplexity']:.2f}")
    return " · ".join(parts)


def summary_metric_names(summary: dict[str, Any]) -> set[str]:
    return {key for r in summary["rounds"] for key in (r.get("metrics") or {})}


def central_extra_metrics(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(column, metric) for the central metrics beyond accuracy and loss that this run recorded."""
    seen = {key.removeprefix("central-") for key in summary_metric_names(summary) if key.startswith("central-")}
    return [(column, key) for key, column in EXTRA_CENTRAL.items() if key in seen]


def _with_format(extras: list[tuple[str, str]]):
    return [(column, key, _pct if key == "macro-f1" else _num) for column, key in extras]


def runs_table(runs: list[tuple[RunRow, str]], accuracies: dict[str, float | None]) -> Table:
    """One row per run: id, name, task, strategy, status, rounds, final accuracy, store."""
    table = Table(title="fedtune runs")
    whole = {"run id": max((len(run.id) for run, _ in runs), default=6), "status": 9}  # what users copy or scan
    for column in ("run id", "name", "task", "strategy", "status", "rounds", "final acc", "created (UTC)", "store"):
        table.add_column(column, no_wrap=column in whole, min_width=whole.get(column))
    for run, url in runs:
        table.add_row(
            run.id,
            Text(run.name if run.name != run.id else ""),  # the operator's words, never markup
            run.task,
            run.strategy,
            run.status,
            str(run.num_rounds),
            _pct(accuracies.get(run.id)),
            run.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            Text(url),
        )
    return table


def write_summary(summary: dict[str, Any], path: pathlib.Path) -> None:
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")


def plot_selection(summary: dict[str, Any], path: pathlib.Path) -> bool:
    """Heat maps of which layers were trained: clients per (round, layer), and per (site, layer)
    the fraction of that site's rounds. Returns False (and writes nothing) if no run data says."""
    if not summary.get("selection"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = []
    for entry in summary["selection"]:
        layers.extend(layer for layer in entry["layers"] if layer not in layers)
    layers.sort(key=lambda name: (name == "head", name))
    rounds = sorted({e["round"] for e in summary["selection"]})
    sites = sorted({e["site"] for e in summary["selection"]}, key=lambda n: (len(n), n))
    per_round = np.zeros((len(rounds), len(layers)))
    per_site = np.zeros((len(sites), len(layers)))
    site_rounds = np.zeros(len(sites))
    for e in summary["selection"]:
        r, i = rounds.index(e["round"]), sites.index(e["site"])
        site_rounds[i] += 1
        for layer in e["layers"]:
            per_round[r, layers.index(layer)] += 1
            per_site[i, layers.index(layer)] += 1
    per_site /= np.maximum(site_rounds, 1)[:, None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.4 * max(len(rounds), len(sites)) + 3))
    for ax, matrix, rows, title, label in (
        (ax1, per_round, [str(r) for r in rounds], "clients training each layer, per round", "clients"),
        (ax2, per_site, sites, "share of a site's rounds it trained each layer", "share of rounds"),
    ):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(layers)), [layer.replace("encoder.layer.", "L") for layer in layers], rotation=45)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label=label)
    ax1.set_ylabel("round")
    ax2.set_ylabel("site")
    fig.suptitle(f"layer selection · {summary['strategy']} · run {summary['run_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_run(summary: dict[str, Any], path: pathlib.Path) -> None:
    """PNG with central accuracy and cumulative MB per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in summary["rounds"]]
    accuracy = [summary["initial_central_accuracy"]] + [r["central_accuracy"] for r in summary["rounds"]]
    megabytes = [0.0] + [r["cumulative_bytes"] / 1e6 for r in summary["rounds"]]
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, [a if a is not None else float("nan") for a in accuracy], marker="o")
    ax_acc.set(xlabel="round", ylabel="central test accuracy", title="Accuracy", ylim=(0, 1))
    ax_acc.grid(alpha=0.3)
    ax_bytes.plot(rounds, megabytes, marker="o", color="tab:orange")
    ax_bytes.set(xlabel="round", ylabel="MB (down + up, cumulative)", title="Communication")
    ax_bytes.grid(alpha=0.3)
    for ax in (ax_acc, ax_bytes):
        ax.set_xticks(rounds)
    fig.suptitle(f"{summary['task']} · {summary['strategy']} · {summary['num_clients']} clients · run {summary['run_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
