"""FRL (rank-based) vs FedAvg and Flower's robust rules, clean and under poisoning.

One invocation, one process: a federation on a real dataset (default ``minilm-bbc``, 10 clients,
Dirichlet 0.5, every client every round; ``--per-round K`` samples K per round instead, as the
paper does) is run for each arm with the same partition, seeds and rounds. Honest clients run
fedtune's client halves; a fixed, seeded subset of clients is malicious:

* against FRL (``frl-sum``: the paper's sum vote; ``frl``: fedtune's clipped vote), the paper's
  rank-reversal attack (the attackers train honestly, sum their edge positions and all submit
  that aggregate ranking reversed) and an adaptive ``anti-learning`` attack aimed at the clipped
  vote (see :func:`frl_attack`);
* against dense updates, the scaling attack (send w + 1e5·Δ, Δ the attacker's honest update) and
  sign flipping (send w − 10·Δ).

Dense updates are aggregated by fedtune's FedAvg or by Flower's own robust strategies
(``FedMedian``, ``Krum``, ``FedTrimmedAvg`` from ``flwr.serverapp.strategy``, called on real
Flower ``Message`` replies). Prints, per arm and attacker fraction, central accuracy by round and
each class's final recall (which classes an attack hurts), then a table of the final accuracy
(with the mean of the last 5 rounds) and the uplink bytes per client per round (the arrays each
honest client sends).

Usage::

    python bench/rank_based.py                               # 5 rounds, 0/10/20 % attackers
    python bench/rank_based.py --rules fedavg,fedmedian,frl-sum,frl --attacks scaling --rounds 10
    python bench/rank_based.py --rules frl --fractions 0,0.2 --clients 30 --per-round 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from bench.common import add_federation_arguments, size_text
from fedclient.runconfig import DEFAULT_RUN_CONFIG

SCALE, FLIP = 1e5, 10.0
FRL_RULES = {"frl": "clipped", "frl-sum": "sum"}  # bench rule → frl-vote
DENSE_ATTACKS, FRL_ATTACKS = ("scaling", "sign-flip"), ("rank-reversal", "anti-learning")
LAST_ROUNDS = 5  # rounds averaged next to the final accuracy: single rounds swing by 3-5 points


def flower_rule(name: str, malicious: int):
    """One of Flower's robust strategies, configured for ``malicious`` attackers."""
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

    if name == "fedmedian":
        return FedMedian()
    if name == "krum":
        return Krum(num_malicious_nodes=max(malicious, 1))
    if name == "trimmed-mean":
        return FedTrimmedAvg(beta=0.2)
    raise ValueError(name)


def aggregate_with_flower(rule, server_round: int, updates: list[tuple[dict, int]]):
    """Call a Flower strategy's ``aggregate_train`` on real reply Messages built from ``updates``."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    replies = []
    for node, (arrays, examples) in enumerate(updates, start=1):
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples}),
        })
        query = Message(RecordDict(), dst_node_id=node, message_type="train", group_id=str(server_round))
        replies.append(Message(content, reply_to=query))
    record, _ = rule.aggregate_train(server_round, replies)
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32)) for k, v in record.items()}


def accuracy_by_class(model, test) -> tuple[float, list[float]]:
    """Central accuracy and the recall of each class on the test set."""
    import torch

    model.eval()
    predicted, truth = [], []
    with torch.no_grad():
        for inputs, labels in test.in_order(64):
            predicted.append(model(**inputs).argmax(dim=1))
            truth.append(labels)
    predicted, truth = torch.cat(predicted), torch.cat(truth)
    recall = [float((predicted[truth == c] == c).float().mean()) for c in range(int(truth.max()) + 1)]
    return float((predicted == truth).float().mean()), recall


def frl_attack(attack: str, server, attacker_payloads: list) -> dict:
    """The ranking every FRL attacker submits this round (packed, per layer).

    ``rank-reversal`` (the paper's): the attackers' summed honest positions, sorted descending.
    ``anti-learning`` (adaptive, against the clipped vote): the attackers know the global ranking
    they started from (it is broadcast) and their own honest deviations from it; they submit the
    ranking of ``p_g - λ·δ̄`` (δ̄ their mean deviation), λ chosen so that its deviation norm equals
    their median honest one, their estimate of the vote's clipping bound: the full budget spent
    against what their data teaches, in the direction the clip leaves intact.
    """
    import numpy as np

    from aggregators.rank_based import (
        RANK_PREFIX,
        deviation_norm,
        pack_ranking,
        positions,
        unpack_ranking,
        vote,
    )

    sizes = {key: int(np.prod(shape)) for key, shape in server.shapes.items()}
    honest = [{key: positions(unpack_ranking(p.arrays[RANK_PREFIX + key], size)) for key, size in sizes.items()}
              for _, p in attacker_payloads]
    if attack == "rank-reversal":
        return {RANK_PREFIX + key: pack_ranking(vote(sum(h[key] for h in honest))[::-1].copy(), size)
                for key, size in sizes.items()}
    if attack != "anti-learning":
        raise ValueError(f"unknown FRL attack '{attack}'")
    global_positions = server.global_positions
    mean_deviation = {key: np.mean([h[key] for h in honest], axis=0) - global_positions[key] for key in sizes}
    budget = float(np.median([deviation_norm(h, global_positions) for h in honest]))

    def crafted(strength: float) -> dict:
        return {key: positions(vote(global_positions[key] - strength * mean_deviation[key])) for key in sizes}

    low, high = 0.0, 1.0
    while deviation_norm(crafted(high), global_positions) < budget and high < 1e6:
        high *= 2
    for _ in range(40):  # the deviation norm grows with λ
        middle = (low + high) / 2
        low, high = (middle, high) if deviation_norm(crafted(middle), global_positions) < budget else (low, middle)
    return {RANK_PREFIX + key: pack_ranking(np.argsort(p, kind="stable"), sizes[key])
            for key, p in crafted(high).items()}


def run_arm(rule: str, attack: str, attack_fraction: float, args, shared) -> dict:
    """One federation; return its accuracy per round and the honest uplink per client-round."""
    import numpy as np
    import torch

    from aggregators import make_algorithm
    from aggregators.base import Payload, Reply
    datas, test, model, keys, pristine = shared
    n = args.clients
    malicious = set(np.random.default_rng(7).permutation(n)[: round(attack_fraction * n)].tolist())
    strategy = "frl" if rule in FRL_RULES else "fedavg"
    server = make_algorithm(strategy, {"local-steps": args.local_steps, "seed": 0, "frl-mode": args.frl_mode,
                                       "frl-lr": args.frl_lr, "frl-sparsity": args.frl_sparsity,
                                       "frl-vote": FRL_RULES.get(rule, "sum")})
    keys = keys[strategy]
    initial = {k: v.clone() for k, v in pristine.items() if k in keys}  # never the previous arm's model
    state = server.init_state(initial)
    accuracy, uplink = [], []
    sampler = np.random.default_rng(11)  # the same participants per round in every arm
    for server_round in range(1, args.rounds + 1):
        participants = sorted(sampler.choice(n, args.per_round, replace=False).tolist()) if args.per_round else list(range(n))
        plan = server.plan(server_round, participants, state)
        honest_replies, attacker_payloads = [], []
        for client in participants:
            model.load_state_dict(pristine)
            payload = make_algorithm(strategy).local(model, datas[client], plan[client], {})
            (attacker_payloads if client in malicious else honest_replies).append((client, payload))
            if client not in malicious:
                uplink.append(sum(a.nbytes for a in payload.arrays.values()))
        replies = [Reply(c, p) for c, p in honest_replies]
        if attacker_payloads and strategy == "frl":
            crafted = frl_attack(attack, server, attacker_payloads)
            replies += [Reply(c, Payload(dict(crafted), p.num_examples)) for c, p in attacker_payloads]
        elif attacker_payloads:
            for client, p in attacker_payloads:
                poisoned = {}
                for key, value in p.arrays.items():
                    current = state[key].numpy()
                    delta = value - current
                    poisoned[key] = current + SCALE * delta if attack == "scaling" else current - FLIP * delta
                replies.append(Reply(client, Payload({k: v.astype(np.float32) for k, v in poisoned.items()},
                                                     p.num_examples)))
        if rule in ("fedavg", *FRL_RULES):
            state = server.aggregate(server_round, state, iter(replies)).state
        else:
            updates = [(r.payload.arrays, r.payload.num_examples) for r in replies]
            state = {**state, **aggregate_with_flower(flower_rule(rule, len(attacker_payloads)), server_round, updates)}
        model.load_state_dict(pristine)
        model.load_state_dict({k: torch.nan_to_num(v, nan=0.0, posinf=1e30, neginf=-1e30) for k, v in state.items()},
                              strict=False)
        central, recall = accuracy_by_class(model, test)
        accuracy.append(central)
    return {"accuracy": accuracy, "recall": recall, "uplink": sum(uplink) / len(uplink),
            "malicious": sorted(malicious)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_federation_arguments(parser, rounds=5, alpha=0.5)
    parser.add_argument("--per-round", type=int, default=0,
                        help="clients sampled per round from the --clients population (0: all, every round)")
    parser.add_argument("--rules", default="fedavg,fedmedian,krum,trimmed-mean,frl-sum,frl",
                        help="frl-sum: FRL with the paper's sum vote; frl: with fedtune's clipped vote")
    parser.add_argument("--fractions", default="0,0.1,0.2", help="attacker fractions")
    parser.add_argument("--attacks", default="scaling,sign-flip",
                        help="attacks on dense updates: scaling, sign-flip")
    parser.add_argument("--frl-attacks", default="rank-reversal,anti-learning",
                        help="attacks on FRL: rank-reversal (the paper's), anti-learning (adaptive, norm-matched)")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--frl-layers", default="head", help="layers whose weight matrices FRL masks")
    parser.add_argument("--frl-mode", choices=("finetune", "original"), default=DEFAULT_RUN_CONFIG["frl-mode"])
    parser.add_argument("--frl-lr", type=float, default=DEFAULT_RUN_CONFIG["frl-lr"])
    parser.add_argument("--frl-sparsity", type=float, default=DEFAULT_RUN_CONFIG["frl-sparsity"])
    args = parser.parse_args()
    choices = {
        "--rules": (args.rules, {"fedavg", "fedmedian", "krum", "trimmed-mean", *FRL_RULES}),
        "--attacks": (args.attacks, DENSE_ATTACKS),
        "--frl-attacks": (args.frl_attacks, FRL_ATTACKS),
    }
    for option, (given, known) in choices.items():
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"{option}: unknown {sorted(unknown)}; choose from {', '.join(sorted(known))}")
    if not 0 <= args.per_round <= args.clients:
        parser.error(f"--per-round must be between 0 and --clients ({args.clients}), got {args.per_round}")

    import torch

    from fedclient.tasks import PartitionSpec, get_task

    torch.set_num_threads(os.cpu_count() or 1)
    task = get_task(args.task)
    model = task.build_model()
    keys = {"fedavg": task.trainable_keys(model), "frl": task.trainable_keys(model, args.frl_layers.split(","))}
    datas = [task.client_data(PartitionSpec("dirichlet", args.clients, args.alpha, 0), i).train
             for i in range(args.clients)]
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shared = (datas, task.load_data().test, model, keys, pristine)
    fractions = [float(f) for f in args.fractions.split(",")]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    sampled = f", {args.per_round} sampled per round" if args.per_round else ""
    print(f"{args.task}, {args.clients} clients{sampled}, Dirichlet({args.alpha}), {args.rounds} rounds, {args.local_steps} local "
          f"steps; dense rules train {', '.join(task.train_layers)}; FRL masks {args.frl_layers} ({args.frl_mode}, "
          f"keeps {args.frl_sparsity:.0%}, lr {args.frl_lr}); dense attacks: {args.attacks}")
    rows = []
    for rule in args.rules.split(","):
        attacks = (args.frl_attacks if rule in FRL_RULES else args.attacks).split(",")
        for attack in attacks:
            for fraction in fractions:
                if fraction == 0 and attack != attacks[0]:
                    continue  # the clean run is the same for every attack
                started = time.perf_counter()
                result = run_arm(rule, attack, fraction, args, shared)
                rows.append((rule, attack, fraction, result))
                print(f"  done {rule}, {attack}, {100 * fraction:.0f}% attackers {result['malicious']}: accuracy by "
                      f"round {' '.join(f'{a:.3f}' for a in result['accuracy'])}; final recall by class "
                      f"{' '.join(f'{r:.2f}' for r in result['recall'])} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    tail = min(LAST_ROUNDS, args.rounds)
    print(f"\nfinal central accuracy (mean over the last {tail} rounds)")

    def cell(result: dict) -> str:
        return f"{result['accuracy'][-1]:.3f} ({sum(result['accuracy'][-tail:]) / tail:.3f})"

    clean = {rule: r for rule, _, fraction, r in rows if fraction == 0}
    attacked = [f for f in fractions if f > 0]
    print(f"| rule | attack | clean | {' | '.join(f'{100 * f:.0f}% attackers' for f in attacked)} "
          f"| uplink per client-round |")
    print(f"|---|---|---|{'---|' * len(attacked)}---|")
    for rule in args.rules.split(","):
        for attack in sorted({a for name, a, _, _ in rows if name == rule}):
            cells = [cell(r) for name, a, f, r in rows if name == rule and a == attack and f > 0]
            base = clean.get(rule)
            print(f"| {rule} | {attack} | {cell(base)} | {' | '.join(cells)} | {size_text(base['uplink'])} |"
                  if base else f"| {rule} | {attack} | | {' | '.join(cells)} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
