"""Federated LoRA and zeroth-order full-parameter tuning of a causal LM (issue #19).

One invocation, on ``smollm2-drugs`` (SmolLM2-135M-Instruct answering a drug review's sentiment;
the 10 medical conditions dealt whole to ``--sites`` sites), prints:

- **zero-shot**: the pretrained model's exact match (greedy answer, token for token, ending the
  turn) and answer perplexity on the held-out test set (the federated run's round 0);
- **federated LoRA**: FedAvg over a PEFT LoRA adapter (r, alpha, q_proj/v_proj), through fedtune on
  Flower's simulation engine (the path ``fedsim run`` takes), ``--rounds`` rounds of
  ``--local-steps`` steps of ``--batch-size`` per site;
- **centralized LoRA**: the same adapter trained in this process on the pooled training data of
  all sites with the same number of optimizer steps as one site (rounds × local steps) and a
  batch ``sites`` times larger (the same examples processed as the federation);
- **FedKSeed**: zeroth-order, full parameters (every layer, the tied LM head included), through
  Flower as well.

For each: exact match and perplexity after, uplink per site and round measured on the serialized
messages, and that uplink against the full model's fp32 size. The last line reads
``llm: zero-shot EM X, federated-lora EM Y, centralized EM Z, fedkseed EM W``.

Usage::

    python bench/llm_adapters.py                      # smollm2-drugs, 4 sites (minutes to an hour on 2 cores)
    python bench/llm_adapters.py --task tiny-lm --rounds 1 --local-steps 2 --zo-steps 4   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench.common import arm_summary, simulate_arm, size_text  # noqa: E402


def centralized_lora(task, common: dict, sites: int) -> dict:
    """The adapter trained on the pooled data of every site, in this process."""
    import numpy as np
    import torch

    from aggregators.local_training import train_steps
    from fedclient.tasks import PartitionSpec
    from fedclient.tasks.adapters import AdapterSpec

    spec = PartitionSpec(common["partition"], sites, common["alpha"], common["seed"])
    shares = [task.client_data(spec, site) for site in range(sites)]
    pooled = type(shares[0].train)(*(torch.cat(parts) for parts in zip(*(s.train.tensors() for s in shares))))
    model = task.build_model(AdapterSpec.from_run_config(common))
    steps = common["num-server-rounds"] * common["local-steps"]
    started = time.perf_counter()
    train_steps(model, pooled, trainable=task.trainable_keys(model), steps=steps,
                batch_size=common["batch-size"] * sites, lr=common["lr"], seed=common["seed"])
    seconds = time.perf_counter() - started
    metrics = task.evaluate(model, task.load_data().test)
    return {"arm": "centralized-lora", "em": metrics["exact-match"], "ppl": metrics["perplexity"], "up": float("nan"),
            "seconds": seconds, "examples": int(np.sum([s.train.num_examples for s in shares]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="smollm2-drugs")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA AdamW learning rate")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--zo-steps", type=int, default=20, help="FedKSeed steps per site and round")
    parser.add_argument("--zo-lr", type=float, default=1e-5)
    parser.add_argument("--zo-batch-size", type=int, default=4)
    parser.add_argument("--arms", default="federated-lora,centralized-lora,fedkseed")
    args = parser.parse_args(argv)

    import torch

    from fedclient.runconfig import resolve_run_config
    from fedclient.tasks import get_task
    from fedserver.store import RunStore

    task = get_task(args.task)
    common = resolve_run_config({}, {
        "task": task.name, "partition": task.default_partition, "num-server-rounds": args.rounds,
        "local-steps": args.local_steps, "batch-size": args.batch_size, "lr": args.lr, "fraction-evaluate": 0.0,
        "adapter": "lora", "lora-rank": args.lora_rank, "lora-alpha": 2.0 * args.lora_rank,
    })
    full_bytes = 4 * sum(p.numel() for p in task.build_model().parameters())  # tied weights counted once
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"task {task.name}: {task.description}; {args.sites} sites; full model {size_text(full_bytes)} fp32")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    rows: dict[str, dict] = {}
    zero_shot: dict | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            started = time.perf_counter()
            if arm == "centralized-lora":
                rows[arm] = centralized_lora(task, common, args.sites)
            else:
                if arm == "federated-lora":
                    overrides = dict(common)
                elif arm == "fedkseed":
                    overrides = {**common, "strategy": "fedkseed", "adapter": "", "zo-steps": args.zo_steps,
                                 "zo-lr": args.zo_lr, "batch-size": args.zo_batch_size, "seed-pool": 1024}
                else:
                    raise SystemExit(f"unknown arm {arm}")
                summary = arm_summary(arm, *simulate_arm(arm, overrides, args.sites, tmp))
                store = RunStore(f"sqlite:///{tmp}/{arm}.db")
                (run,) = store.list_runs()
                last = store.rounds(run.id)[-1]
                initial = run.initial_metrics or {}
                if zero_shot is None:
                    zero_shot = {"em": initial.get("accuracy"), "ppl": initial.get("perplexity")}
                rows[arm] = {"arm": arm, "em": last.central_accuracy, "ppl": last.metrics.get("central-perplexity"),
                             "up": summary["up"], "seconds": summary["wall"]}
            row = rows[arm]
            print(f"  done {arm} in {time.perf_counter() - started:.0f} s: EM {100 * row['em']:.1f}%, "
                  f"perplexity {row['ppl']:.2f}, uplink/site/round "
                  + ("-" if row["up"] != row["up"] else f"{size_text(row['up'])} ({100 * row['up'] / full_bytes:.3f}% "
                     "of the full model)"), flush=True)
    if zero_shot is None:
        print("no federated arm ran: zero-shot comes from a federated run's round 0")
        return 0
    print(f"zero-shot: EM {100 * zero_shot['em']:.1f}%, perplexity {zero_shot['ppl']:.2f}")
    em = {arm: f"{100 * row['em']:.1f}" for arm, row in rows.items()}
    print(f"llm: zero-shot EM {100 * zero_shot['em']:.1f}, federated-lora EM {em.get('federated-lora', '-')}, "
          f"centralized EM {em.get('centralized-lora', '-')}, fedkseed EM {em.get('fedkseed', '-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
