"""Selective-layer fine-tuning vs. full FedAvg and the top / bottom / random baselines.

One invocation runs every arm on the same task, partition, seeds, rounds and (for the selective
arms) the same per-site layer budgets, through fedtune on Flower's simulation engine, and prints
final central accuracy, total uplink and downlink (bytes measured on the serialized messages)
and each arm's ratios against full FedAvg. Also times the P1 solver on 100 clients x 48 layers.

Usage::

    python bench/selective_layer.py                       # minilm-bbc, 10 clients, Dirichlet 0.3, 5 rounds
    python bench/selective_layer.py --rounds 3 --budget uniform:1:3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench.common import add_federation_arguments, run_arms, simulate_arm  # noqa: E402


def run_arm(name: str, overrides: dict, common: dict, clients: int, tmp: str) -> dict:
    store, run_id, wall = simulate_arm(name, {**common, **overrides}, clients, tmp)
    rows = store.client_rounds(run_id)
    rounds = store.rounds(run_id)
    trained = [len([layer for layer in c.details.get("layers", []) if layer != "head"]) for c in rows if c.phase == "train"]
    return {
        "arm": name,
        "accuracy": [r.central_accuracy for r in rounds],
        "up": sum(c.bytes_up for c in rows),
        "down": sum(c.bytes_down for c in rows),
        "layers_per_client": (sum(trained) / len(trained)) if trained and any(trained) else None,
        "wall": wall,
    }


def time_solver() -> str:
    import numpy as np

    from aggregators.layer_selection import solve_selection

    rng = np.random.default_rng(0)
    lines = []
    for lam in (0.001, 0.01):
        times, gaps, exact = [], [], 0
        for _ in range(5):
            scores = rng.random((100, 48)) ** 3
            scores /= scores.sum(axis=1, keepdims=True)
            budgets = rng.integers(1, 7, 100)
            t0 = time.perf_counter()
            selection = solve_selection(scores, budgets, lam)
            times.append(time.perf_counter() - t0)
            gaps.append(selection.gap / max(selection.objective, 1e-12))
            exact += selection.exact
            assert (selection.mask.sum(axis=1) <= budgets).all()
        lines.append(f"  lambda {lam}: median {1000 * sorted(times)[2]:.0f} ms, max {1000 * max(times):.0f} ms; "
                     f"proved optimal {exact}/5; certified gap <= {100 * max(gaps):.1f}% of the objective")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_federation_arguments(parser, rounds=5, alpha=0.3)
    parser.add_argument("--budget", default="uniform:1:3", help="per-site layer budgets for the selective arms")
    parser.add_argument("--selection-lambda", type=float, default=0.05)
    parser.add_argument("--arms", default="full,regulated,client-top,top,bottom,random")
    args = parser.parse_args()

    from fedclient.tasks import get_task

    task = get_task(args.task)
    all_layers = ",".join(task.layer_names()[1:])  # every layer above the embeddings
    common = {"task": args.task, "num-server-rounds": args.rounds, "partition": "dirichlet", "alpha": args.alpha,
              "seed": 0, "train-layers": all_layers}
    arms = {
        "full": {"strategy": "fedavg"},
        **{sel: {"strategy": "selective-layer", "selection": sel, "layer-budget": args.budget,
                 "selection-lambda": args.selection_lambda} for sel in ("regulated", "client-top", "top", "bottom", "random")},
    }
    print(f"{args.task}, {args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds, all clients every round; "
          f"trainable: {all_layers}; selective arms: budgets {args.budget}, lambda {args.selection_lambda}")
    results = run_arms(
        args.arms.split(","),
        lambda name, tmp: run_arm(name, arms[name], common, args.clients, tmp),
        lambda r: f"accuracy {r['accuracy'][-1]:.3f}, up {r['up'] / 1e6:.1f} MB, {r['wall']:.0f} s",
    )
    base = next((r for r in results if r["arm"] == "full"), results[0])
    print("\n| arm | layers/client | accuracy by round | final acc | Δ vs full (pts) | uplink MB | uplink vs full | downlink MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        label = "full FedAvg" if r["arm"] == "full" else ("proposed (regulated, P1)" if r["arm"] == "regulated" else r["arm"])
        lpc = "6 (all)" if r["arm"] == "full" else f"{r['layers_per_client']:.2f}"
        print(f"| {label} | {lpc} | {' '.join(f'{a:.3f}' for a in r['accuracy'])} | {r['accuracy'][-1]:.3f} | "
              f"{100 * (r['accuracy'][-1] - base['accuracy'][-1]):+.1f} | {r['up'] / 1e6:.1f} | "
              f"{100 * r['up'] / base['up']:.0f}% | {r['down'] / 1e6:.1f} | {r['wall']:.0f} |")
    print("\nP1 solver, 100 clients x 48 layers, budgets 1..6:")
    print(time_solver())
    return 0


if __name__ == "__main__":
    sys.exit(main())
