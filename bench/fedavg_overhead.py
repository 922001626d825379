"""FedAvg through fedtune vs. the same work without a framework, and server memory while aggregating.

Two measurements, each against a baseline run by this script in the same invocation:

1. **Framework overhead.** ``--rounds`` rounds of FedAvg on ``--task`` with ``--clients`` clients
   through fedtune on Flower's simulation engine (Ray, one CPU per client) versus the same local
   training (same partitions, same seeds, same AdamW steps, same averaging) in a plain PyTorch loop
   in this process. Reported: mean steady-state round time (round 2 on; round 1 carries Ray actor
   start-up and model loading) and the ratio fedtune / plain, plus each run's total wall time.
2. **Server memory.** Peak resident memory above the starting point while aggregating
   ``--replies`` replies that each carry the full MiniLM model (22.7 M fp32 parameters), fed as
   real Flower reply messages. fedtune folds replies as they arrive; the baseline is what Flower's
   ``Grid.send_and_receive`` + built-in ``FedAvg.aggregate_train`` do (all replies held in a list).
   Each variant runs in a fresh subprocess so peaks do not mix.

Usage::

    python bench/fedavg_overhead.py                      # defaults: minilm-bbc, 10 clients, 3 rounds, 50 replies
    python bench/fedavg_overhead.py --skip-overhead      # memory only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
from fedclient.runconfig import quiet_environment  # noqa: E402

quiet_environment()


# ---- 1. framework overhead ---------------------------------------------------------------------
def fedtune_rounds(task: str, clients: int, rounds: int, store: str) -> tuple[list[float], float, list[float]]:
    from rich.console import Console

    from fedclient.runconfig import resolve_run_config
    from simulations.runner import SimulationSpec, run_simulation_spec

    config = resolve_run_config({}, {"task": task, "num-server-rounds": rounds, "store": store, "checkpoint-every": 0})
    result = run_simulation_spec(SimulationSpec(config=config, num_clients=clients), Console(quiet=True))
    seconds = [r.seconds for r in result.records]
    accuracy = [r.central.get("accuracy", float("nan")) for r in result.records]
    return seconds, result.wall_seconds, accuracy


def plain_rounds(task_name: str, clients: int, rounds: int) -> tuple[list[float], float, list[float]]:
    """The same FedAvg rounds as fedtune runs, in a plain PyTorch loop (no Flower, no serialization)."""
    import torch
    import torch.nn.functional as F

    from aggregators.fedavg import FedAvgConfig, derive_seed
    from fedclient.runconfig import DEFAULT_RUN_CONFIG as D
    from fedclient.tasks import PartitionSpec, evaluate_model, get_task
    from fedserver.strategy import stable_client_id

    started = time.perf_counter()
    cfg = FedAvgConfig(lr=D["lr"], local_steps=D["local-steps"], batch_size=D["batch-size"], seed=D["seed"])
    task = get_task(task_name)
    spec = PartitionSpec(task.default_partition, clients, D["alpha"], D["seed"])
    data = [task.client_data(spec, i).train for i in range(clients)]
    test = task.load_data().test
    model = task.build_model()
    keys = task.trainable_keys(model)
    params = dict(model.named_parameters())
    global_state = {k: params[k].detach().clone() for k in keys}
    for name, p in model.named_parameters():
        p.requires_grad_(name in keys)
    seconds, accuracy = [], []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for client in range(clients):
            with torch.no_grad():
                for k in keys:
                    params[k].copy_(global_state[k])
            optimizer = torch.optim.AdamW([params[k] for k in keys], lr=cfg.lr, weight_decay=0.0)
            model.train()
            seed = derive_seed(cfg.seed, rnd, stable_client_id(f"partition-{client}"))  # as fedtune seeds it
            batches = data[client].batches(cfg.batch_size, seed)
            torch.manual_seed(seed)  # dropout masks
            for _ in range(cfg.local_steps):
                inputs, labels = next(batches)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(**inputs), labels).backward()
                optimizer.step()
            n = data[client].num_examples
            total += n
            for k in keys:
                sums[k] += n * params[k].detach().to(torch.float64)
        global_state = {k: (s / total).to(torch.float32) for k, s in sums.items()}
        with torch.no_grad():
            for k in keys:
                params[k].copy_(global_state[k])
        accuracy.append(evaluate_model(model, test)["accuracy"])
        seconds.append(time.perf_counter() - t0)
    return seconds, time.perf_counter() - started, accuracy


# ---- 2. server memory ------------------------------------------------------------------------------
def _rss_mb() -> tuple[float, float]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def memory_child(variant: str, replies: int) -> dict:
    """Aggregate ``replies`` full-model replies; report the peak RSS above the starting RSS."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from aggregators.base import Payload
    from aggregators.fedavg import FedAvg
    from fedclient.tasks import get_task
    from fedclient.wire import to_recorddict
    from fedserver.strategy import AlgorithmStrategy
    from tests.grids import IdentifyingGrid

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    model = get_task("minilm-bbc").build_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    model_mb = sum(v.numel() * 4 for v in state.values()) / 1e6
    del model
    base = {k: v.numpy() for k, v in state.items()}

    initial = ArrayRecord(state)
    strategy = AlgorithmStrategy(FedAvg())
    strategy.state = strategy.algorithm.init_state(state)
    instructions = list(strategy.configure_train(1, initial, ConfigRecord(), IdentifyingGrid(range(1, replies + 1))))
    del initial

    def reply(i: int, instruction: Message) -> Message:
        arrays = {k: v + np.float32(1e-4 * i) for k, v in base.items()}  # a client's distinct update
        return Message(to_recorddict(Payload(arrays, num_examples=10 + i).to_record()), reply_to=instruction)

    def stream():
        for i, instruction in enumerate(instructions):
            yield reply(i, instruction)

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    start_rss, _ = _rss_mb()
    t0 = time.perf_counter()
    if variant == "fedtune":
        arrays, _ = strategy.aggregate_train(1, stream())
        result = arrays["head.bias"].numpy()
    else:  # Flower: send_and_receive returns a list of all replies, then FedAvg.aggregate_train
        held = list(stream())
        for message in held:  # Flower's FedAvg wants ArrayRecord "arrays" + MetricRecord "metrics"
            assert "arrays" in message.content and "metrics" in message.content
        arrays, _ = FlowerFedAvg().aggregate_train(1, held)
        result = arrays["head.bias"].numpy()
    seconds = time.perf_counter() - t0
    _, peak = _rss_mb()
    expected = np.mean([1e-4 * i for i in range(replies)])  # weights differ; just a sanity bound
    assert np.isfinite(result).all() and abs(float((result - base["head.bias"]).mean()) - expected) < 5e-3
    return {"variant": variant, "replies": replies, "model_mb": model_mb, "peak_extra_mb": peak - start_rss,
            "seconds": seconds}


def run_memory(variant: str, replies: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", variant, "--replies", str(replies)],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory child {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="minilm-bbc")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replies", type=int, default=50)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=("fedtune", "flower"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.replies)))
        return 0

    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    if not args.skip_overhead:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fed_s, fed_wall, fed_acc = fedtune_rounds(args.task, args.clients, args.rounds, f"sqlite:///{tmp}/b.db")
        plain_s, plain_wall, plain_acc = plain_rounds(args.task, args.clients, args.rounds)
        steady_fed = sum(fed_s[1:]) / max(1, len(fed_s) - 1)
        steady_plain = sum(plain_s[1:]) / max(1, len(plain_s) - 1)
        print(f"\n[overhead] {args.task}, {args.clients} clients, {args.rounds} rounds of FedAvg")
        print(f"  fedtune (Flower simulation, 1 CPU per client): rounds {', '.join(f'{s:.1f}' for s in fed_s)} s;"
              f" total wall {fed_wall:.1f} s; accuracy {', '.join(f'{a:.3f}' for a in fed_acc)}")
        print(f"  plain PyTorch loop (this process):             rounds {', '.join(f'{s:.1f}' for s in plain_s)} s;"
              f" total wall {plain_wall:.1f} s; accuracy {', '.join(f'{a:.3f}' for a in plain_acc)}")
        print(f"  steady-state round: fedtune {steady_fed:.2f} s vs plain {steady_plain:.2f} s -> "
              f"overhead ratio {steady_fed / steady_plain:.2f}x")
        print(f"  whole run incl. start-up: ratio {fed_wall / plain_wall:.2f}x")
    if not args.skip_memory:
        few = max(2, args.replies // 5)
        ours_few = run_memory("fedtune", few)
        ours = run_memory("fedtune", args.replies)
        theirs = run_memory("flower", args.replies)
        print(f"\n[memory] aggregating replies of the full MiniLM model ({ours['model_mb']:.0f} MB each)")
        for r in (ours_few, ours, theirs):
            label = "fedtune (streamed fold)" if r["variant"] == "fedtune" else "Flower list + FedAvg"
            print(f"  {label:24s} {r['replies']:3d} replies: peak +{r['peak_extra_mb']:.0f} MB"
                  f" = {r['peak_extra_mb'] / r['model_mb']:.1f}x model; {r['seconds']:.1f} s")
        print(f"  fedtune peak, {args.replies} vs {few} replies: {ours['peak_extra_mb'] / ours_few['peak_extra_mb']:.2f}x"
              " (O(model): does not grow with the number of replies)")
        print(f"  fedtune peak / Flower peak at {args.replies} replies: {ours['peak_extra_mb'] / theirs['peak_extra_mb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
