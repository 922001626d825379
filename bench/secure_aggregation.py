"""Secure aggregation and distributed DP against local and central DP, and what secure aggregation costs.

Every arm runs through fedtune on Flower's simulation engine (the path ``fedsim run`` takes) with
the same task, partition, seeds and rounds:

* ``plain``: no DP, no secure aggregation (the baseline of the overhead ratios);
* ``secagg``: no DP, secure aggregation (``--secagg``): uplink bytes and round time against ``plain``;
* ``local@ε``: local DP, each site clips and adds Gaussian noise for its budget ε (``--dp gaussian``);
* ``distributed@ε``: each site adds its share of discrete Gaussian noise, the sum is securely
  aggregated (``--dp distributed``, threshold a majority: the noise on the sum assumes that many
  honest sites);
* ``central@ε``: the coordinator clips each reply and noises the sum (``--dp central``).

All DP arms use clip C = 1, δ = 1e-5, replace-one neighbouring (sensitivity 2C) and calibrate the
Gaussian noise so that the run's releases spend exactly ε. Round time is the mean of rounds 2..R
(round 1 includes the actors' start-up); bytes are the mean per site and round as serialized,
over all of a round's messages (secure aggregation's five exchanges included).

Usage::

    python bench/secure_aggregation.py                         # minilm-bbc, 10 clients, 5 rounds
    python bench/secure_aggregation.py --methods fedavg --epsilons 4 --rounds 3
    python bench/secure_aggregation.py --methods fedavg --epsilons none --repeats 3   # overhead only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench.common import add_federation_arguments, arm_summary, run_arms, simulate_arm  # noqa: E402

METHODS = {
    "fedavg": {"strategy": "fedavg"},
    "ferret": {"strategy": "ferret"},
    "fedavg-head": {"strategy": "fedavg", "train-layers": "head"},
}
MECHANISMS = {
    "plain": {"dp": "off"},
    "secagg": {"dp": "off", "secagg": True},
    "local": {"dp": "gaussian"},
    "distributed": {"dp": "distributed"},
    "central": {"dp": "central"},
}


def run_arm(name: str, common: dict, clients: int, tmp: str) -> dict:
    method, mechanism, budget = name.split("/")
    privacy = dict(MECHANISMS[mechanism])
    if budget and not budget.startswith("#"):  # "#r": the r-th repeat of an arm without DP
        privacy["dp-epsilon"] = float(budget)
    overrides = {**common, **METHODS[method], **privacy}
    store, run_id, wall = simulate_arm(name.replace("/", "-").replace("#", "r").strip("-"), overrides, clients, tmp)
    summary = arm_summary(name, store, run_id, wall)
    rounds = store.rounds(run_id)
    later = [r.seconds for r in rounds[1:]] or [rounds[0].seconds]
    summary.update(method=method, mechanism=mechanism, epsilon=float(budget) if budget and budget[0] != "#" else None,
                   status=store.get_run(run_id).status, steady_seconds=statistics.fmean(later),
                   failed=sum(1 for c in store.client_rounds(run_id) if c.phase == "train" and c.status != "ok"))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_federation_arguments(parser, rounds=5, alpha=0.5)
    parser.add_argument("--methods", default="fedavg,ferret", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--epsilons", default="1,4,8", help="per-site budgets ('none': only the overhead arms)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the plain and secagg arms this many times, alternating (mean ± sd of the ratios)")
    parser.add_argument("--clip", type=float, default=1.0, help="L2 bound C of each site's update under DP")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    epsilons = [] if args.epsilons == "none" else [e.strip() for e in args.epsilons.split(",")]
    common = {"task": args.task, "num-server-rounds": args.rounds, "partition": "dirichlet", "alpha": args.alpha,
              "seed": 0, "clip": args.clip, "dp-delta": 1e-5, "fraction-evaluate": 0.0,
              "max-site-weight": 1.0}  # secure aggregation does not cap shares: for like with like, no arm does
    print(f"{args.task}, {args.clients} clients, Dirichlet({args.alpha}), {args.rounds} rounds, all clients every "
          f"round; DP: clip C = {args.clip}, δ = 1e-5, Gaussian noise calibrated to each ε")
    names = [f"{m}/{k}/{'' if r == 0 else f'#{r}'}" for m in methods for r in range(args.repeats)
             for k in ("plain", "secagg")]
    names += [f"{m}/{k}/{e}" for m in methods for e in epsilons for k in ("local", "distributed", "central")]
    results = run_arms(
        names,
        lambda name, tmp: run_arm(name, common, args.clients, tmp),
        lambda r: f"accuracy {r['accuracy'][-1]:.3f}, {r['status']}, {r['steady_seconds']:.1f} s/round, "
                  f"{r['up'] / 1e6:.2f} MB up, {r['wall']:.0f} s",
    )
    by = {r["arm"]: r for r in results}

    def ratios(method: str, key: str) -> list[float]:
        return [by[f"{method}/secagg/{s}"][key] / by[f"{method}/plain/{s}"][key]
                for s in [""] + [f"#{r}" for r in range(1, args.repeats)]]

    def spread(values: list[float]) -> str:
        return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    print("\n| method | ε per site | local DP | secure aggregation + distributed DP | central DP |")
    print("|---|---|---|---|---|")
    for m in methods if epsilons else []:
        for e in epsilons:
            cells = [by[f"{m}/{k}/{e}"] for k in ("local", "distributed", "central")]
            print(f"| {m} | {e} | " + " | ".join(
                f"{c['accuracy'][-1]:.3f}" + ("" if c["status"] == "completed" else f" ({c['status']})")
                for c in cells) + " |")
        print(f"| {m} | ∞ (no DP) | plain {by[f'{m}/plain/']['accuracy'][-1]:.3f} | "
              f"secure aggregation {by[f'{m}/secagg/']['accuracy'][-1]:.3f} | – |")
    print(f"\n| method | uplink per site-round, plain (MB) | secagg | × plain | round time, rounds 2.., plain (s) "
          f"| secagg | × plain ({args.repeats} run(s) each{', mean ± sd' if args.repeats > 1 else ''}) |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        plain = [r for r in results if r["arm"].startswith(f"{m}/plain/")]
        secure = [r for r in results if r["arm"].startswith(f"{m}/secagg/")]
        print(f"| {m} | {spread([r['up'] / 1e6 for r in plain])} | {spread([r['up'] / 1e6 for r in secure])} | "
              f"{spread(ratios(m, 'up'))} | {spread([r['steady_seconds'] for r in plain])} | "
              f"{spread([r['steady_seconds'] for r in secure])} | {spread(ratios(m, 'steady_seconds'))} |")
    first = methods[0]
    overhead = f"overhead bytes {spread(ratios(first, 'up'))}×, time {spread(ratios(first, 'steady_seconds'))}×"
    if not epsilons:
        print(f"\nsecagg ({first}): {overhead}")
        return 0
    middle = epsilons[len(epsilons) // 2]
    print(f"\n({first}; ε = {middle} is the middle budget; accuracies are final central accuracy)")
    print(f"secagg: eps={middle} distributed {by[f'{first}/distributed/{middle}']['accuracy'][-1]:.3f}, "
          f"central {by[f'{first}/central/{middle}']['accuracy'][-1]:.3f}, "
          f"local {by[f'{first}/local/{middle}']['accuracy'][-1]:.3f}; {overhead}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
