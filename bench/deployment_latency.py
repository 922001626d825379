"""Round wall time of ``tiny`` over Flower's Deployment Engine on loopback vs the same rounds in
simulation, where the deployment's extra time goes, and what fedtune's settings change.

One invocation runs, in order, with the same run config (``tiny``, FedAvg, N sites, every site
trains every round, central evaluation on the coordinator):

- ``simulation``: fedtune on Flower's simulation engine (Ray; ClientApps stay warm in actors);
- ``stock``: the Deployment Engine as Flower ships it (TLS + node auth on 127.0.0.1): SuperExec task
  poll 1 s, SuperNode idle wait 3 s, and no fedtune cache, so each message's new ClientApp process
  re-tokenizes the corpus and re-partitions it;
- ``cached``: the ClientApp's on-disk cache (fedclient/tasks/cache.py, warm) and ``fedclient
  start``'s SuperExec task poll of 0.1 s, with Flower's own SuperNode waits (``--poll-interval flower``);
- ``fast-poll``: ``cached`` plus ``fedclient start --poll-interval 0.2`` (the SuperNode's 3 s idle
  wait fixed at 0.2 s, its 0.5 s reply poll from 10 ms up to 0.2 s; fedclient/supernode_launcher.py);
- ``runtime``: ``fedclient start``'s defaults: the site runtime (fedclient/runtime.py), which
  answers every message in one long-lived process per site that keeps imports, model and data
  loaded, and adaptive SuperNode waits (0.2 s between pulls for a minute after a message, Flower's
  3 s when idle; a reply polled for from 10 ms up). The three arms before it pass ``--no-runtime``.

The ``runtime`` arm also reports how many times each site's runtime loaded a model (its own
``model-loads`` metric, read with ``fedclient status``'s call after the run). The last line compares
the last deployment arm with simulation:
``deployment/simulation round ratio: X (deployment Y s, simulation Z s)``.

All the sites run on this one machine, so each site's torch gets ``cores / sites`` threads
(:func:`site_threads`), as each simulated ClientApp gets one CPU from Ray; a real site has its
machine to itself and uses all of its cores.

Per arm it prints the mean round time over rounds 2..N (round 1 also pays the FAB install), the
ClientApp start-up measured inside each ClientApp (process start to first training step:
interpreter, imports, data, model), the training time itself, and the remainder of the round beyond
simulation, i.e. time spent waiting in Flower's polling and transport. Ratios are against the
simulation arm of the same invocation.

Usage::

    python bench/deployment_latency.py                 # 2 sites, 4 rounds, all arms
    python bench/deployment_latency.py --arms simulation,cached --rounds 3
    python bench/deployment_latency.py --arms simulation,runtime --task tiny-lm --adapter lora
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench.common import LoopbackDeployment, simulate_arm

ARMS = ("simulation", "stock", "cached", "fast-poll", "runtime")
SETTINGS = {
    "stock": {"FEDTUNE_CACHE_DIR": "off", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"},
    "cached": {},
    "fast-poll": {},
    "runtime": {},
}


def _config(args: argparse.Namespace) -> dict:
    return {"task": args.task, "strategy": "fedavg", "num-server-rounds": args.rounds, "local-steps": args.local_steps,
            "min-train-nodes": args.sites, "checkpoint-every": 0, **({"adapter": args.adapter} if args.adapter else {})}


def _rounds_summary(arm: str, store, run_id: str) -> dict:
    rounds = store.rounds(run_id)
    clients = [c for c in store.client_rounds(run_id) if c.phase == "train" and c.status == "ok"]
    steady = [r.seconds for r in rounds[1:]] or [rounds[0].seconds]

    def metric(name: str, rows) -> float:
        values = [c.metrics.get(name) for c in rows if c.metrics.get(name) is not None]
        return statistics.mean(values) if values else float("nan")

    later = [c for c in clients if c.round > 1] or clients
    return {"arm": arm, "first": rounds[0].seconds, "steady": statistics.mean(steady),
            "startup": metric("startup-seconds", later), "train": metric("train-seconds", later),
            "accuracy": rounds[-1].central_accuracy}


def site_threads(sites: int) -> int:
    """Torch threads per site: the machine's cores shared out, as the simulation arm's Ray actors
    get one CPU each (Ray sets their ``OMP_NUM_THREADS``). Sites on one machine that each started
    a thread per core would oversubscribe it: 2 sites on 2 cores trained 3-5x slower."""
    return max(1, (os.cpu_count() or 1) // sites)


def simulation_arm(args: argparse.Namespace, tmp: str) -> dict:
    store, run_id, _wall = simulate_arm("simulation", _config(args), args.sites, tmp)
    return _rounds_summary("simulation", store, run_id)


def deployment_arm(arm: str, args: argparse.Namespace, tmp: str) -> dict:
    from fedserver import deployment as dep
    from fedserver.store import RunStore

    root = pathlib.Path(tmp) / arm
    env = {**SETTINGS[arm], "OMP_NUM_THREADS": str(site_threads(args.sites))}
    if arm != "stock":  # warm the site cache as the site's first message of any run would
        env.setdefault("FEDTUNE_CACHE_DIR", str(pathlib.Path(tmp) / "site-cache"))
        warm = ("from fedclient.tasks import PartitionSpec, get_task; "
                f"t = get_task({args.task!r}); t.client_data(PartitionSpec(t.default_partition, {args.sites}, 0.5, 0), 0)")
        subprocess.run([sys.executable, "-c", warm], env={**os.environ, **env}, check=True)

    policy = root / "no-dp-policy.toml"  # this bench trains without DP: the sites opt out of the built-in policy
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text('[privacy]\nrequired = false\n[evaluation]\nmode = "exact"\n')

    def site_arguments(index: int) -> list[str]:
        return ["--policy", str(policy), "--partition-id", str(index), "--num-partitions", str(args.sites),
                *({"stock": ["--poll-interval", "flower"], "cached": ["--poll-interval", "flower"],
                   "fast-poll": ["--poll-interval", "0.2"]}.get(arm, [])),
                *(["--no-runtime"] if arm != "runtime" else [])]

    with LoopbackDeployment(root, args.sites, site_arguments, env) as deployment:
        result = dep.submit(deployment.coord, _config(args), timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{arm}: flwr run failed:\n{result.stderr[-2000:]}")
        store = RunStore(deployment.coord.store_url)
        (run,) = store.list_runs()
        summary = _rounds_summary(arm, store, run.id)
        if arm == "runtime":  # each site runtime's own count of model loads
            from fedclient.runtime import runtime_status, socket_path

            summary["model-loads"] = [runtime_status(str(socket_path(root / f"site-{i}" / "home" / "state")))
                                      ["model-loads"] for i in range(args.sites)]
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--task", default="tiny", help="tiny (default) or tiny-lm, the 2-block causal LM")
    parser.add_argument("--adapter", default="", help="train an adapter (lora) instead of the task's layers; "
                        "what a causal LM run sends (tiny-lm's full layers include its 28M-parameter embeddings)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; "
          f"{args.task}{' + ' + args.adapter if args.adapter else ''}, FedAvg, {args.sites} sites ({site_threads(args.sites)} torch threads each), {args.rounds} rounds, "
          f"{args.local_steps} local steps")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            started = time.perf_counter()
            results.append(simulation_arm(args, tmp) if arm == "simulation" else deployment_arm(arm, args, tmp))
            print(f"  done {arm} in {time.perf_counter() - started:.0f} s", flush=True)
    baseline = next((r["steady"] for r in results if r["arm"] == "simulation"), None)
    print("\n| arm | round 1 (s) | rounds 2.. mean (s) | × simulation | ClientApp start-up (s) | training (s) | "
          "waiting in Flower (s) | share waiting | central acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['steady'] / baseline:.1f}×" if baseline else "–"
        if r["arm"] == "simulation" or baseline is None:
            waiting = share = "–"
        else:
            startup = r["startup"] if r["startup"] == r["startup"] else 0.0
            extra = max(r["steady"] - baseline - startup, 0.0)
            waiting, share = f"{extra:.1f}", f"{extra / r['steady']:.0%}"
        startup_text = f"{r['startup']:.1f}" if r["startup"] == r["startup"] else "–"
        print(f"| {r['arm']} | {r['first']:.1f} | {r['steady']:.1f} | {ratio} | {startup_text} | {r['train']:.2f} | "
              f"{waiting} | {share} | {r['accuracy']:.3f} |")
    for r in results:
        if "model-loads" in r:
            print(f"\nmodel loads per site runtime over the whole run: {r['model-loads']}")
    deployed = [r for r in results if r["arm"] != "simulation"]
    if deployed and baseline:
        last = deployed[-1]
        print(f"\ndeployment/simulation round ratio: {last['steady'] / baseline:.1f} "
              f"(deployment {last['steady']:.2f} s, simulation {baseline:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
