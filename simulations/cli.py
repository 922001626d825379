"""``fedsim``: compare federated fine-tuning strategies on one machine with Flower's simulation engine.

Examples::

    fedsim run                                   # MiniLM on BBC News, 10 clients, FedAvg, 3 rounds
    fedsim run --task minilm-bbc --strategy fedavg --clients 10 --fraction 0.5 \\
               --rounds 5 --partition dirichlet --alpha 0.3 --seed 0
    fedsim run --task minilm-drugs --partition natural --clients 10
    fedsim list                                  # runs under ./runs
    fedsim show 20261123-1030                    # one run: per-round table, problems, files
    fedsim tasks                                 # tasks, strategies and partitions
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedclient.runconfig import DEFAULT_RUN_CONFIG, quiet_environment

quiet_environment()

console = Console()
err_console = Console(stderr=True)


class UsageError(Exception):
    """Bad command-line input; the message says what to do instead."""


METHOD_KEYS = (  # run-config keys set by one flag each, named alike (--zo-steps -> zo-steps)
    "server-lr", "hash-every", "ferret-bases", "ferret-block-size", "ferret-seeds",
    "seed-pool", "zo-steps", "zo-lr", "zo-eps", "frl-mode", "frl-sparsity", "frl-lr", "frl-vote",
    "codec", "sgd-lr", "scaffold-alpha", "scafcom-beta",
    "dp", "dp-epsilon", "dp-delta", "clip", "dp-noise-multiplier",
    "secagg", "secagg-threshold", "secagg-clip", "secagg-bits", "secagg-max-weight",
    "adapter", "lora-rank", "lora-alpha", "lora-dropout", "lora-targets",
    "max-length", "grad-accumulation", "warmup-steps", "lr-schedule", "precision", "gradient-checkpointing",
)


# ---- fedsim run ---------------------------------------------------------------------------------
def _validate_and_prepare(args: argparse.Namespace) -> tuple[dict[str, Any], pathlib.Path]:
    from fedclient.tasks import TASKS, MissingDataError, PartitionSpec
    from fedserver.run_config import unknown

    if args.model or args.data:
        from fedclient.tasks.model_dir import ModelDirectoryError, directory_task_name

        if not (args.model and args.data):
            raise UsageError("--model DIR and --data DIR go together (a model directory and the examples "
                             "it trains on)")
        try:
            args.task = directory_task_name(args.model, args.data)
            task = TASKS[args.task]
        except (ModelDirectoryError, ValueError) as err:
            raise UsageError(str(err)) from err
    task = TASKS.get(args.task)
    if task is None:
        raise UsageError(unknown("task", args.task, TASKS))
    if args.clients < 1:
        raise UsageError(f"--clients must be at least 1, got {args.clients}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    for flag, value in (("--fraction", args.fraction), ("--fraction-evaluate", args.fraction_evaluate)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag} must be between 0 and 1, got {value}")
    if args.fraction * args.clients < 1:
        raise UsageError(
            f"--fraction {args.fraction} of {args.clients} clients samples fewer than one client per round; "
            f"use at least {1 / args.clients:.2g}"
        )
    partition = args.partition or task.default_partition
    config = dict(DEFAULT_RUN_CONFIG)
    config.update(
        {
            "task": task.name,
            "strategy": args.strategy,
            "num-server-rounds": args.rounds,
            "fraction-train": args.fraction,
            "fraction-evaluate": args.fraction_evaluate,
            "partition": partition,
            "alpha": args.alpha,
            "seed": args.seed,
            "lr": args.lr,
            "local-steps": args.local_steps,
            "batch-size": args.batch_size,
            "train-layers": args.train_layers,
            "checkpoint-every": args.checkpoint_every,
            "round-timeout": args.round_timeout,
            "selection": args.selection,
            "selection-lambda": args.selection_lambda,
            "layer-scores": args.layer_scores,
            "score-batches": args.score_batches,
            "common-layers": args.common_layers,
            "layer-budget": args.layer_budget,
            **{key: getattr(args, key.replace("-", "_")) for key in METHOD_KEYS},
        }
    )
    from fedserver.run_config import RunConfigError, check_run_config

    try:
        check_run_config(config, num_clients=args.clients)  # what the ServerApp checks, before anything starts
    except RunConfigError as err:
        raise UsageError("\n".join(err.problems)) from err
    try:
        sizes = task.partition_sizes(PartitionSpec(partition, args.clients, args.alpha, args.seed))
    except MissingDataError as err:
        raise UsageError(f"data for task '{task.name}' is missing: {err}") from err
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.fraction_evaluate > 0 and min(sizes) < 10:
        console.print("[yellow]note:[/] clients with under 10 examples keep no local evaluation split")
    out = pathlib.Path(args.out) if args.out else _default_out(pathlib.Path(args.runs_dir))
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    config["store"] = args.store or f"sqlite:///{(out / 'store.db').resolve()}"
    config["run-name"] = args.name or out.name
    console.print(
        f"[bold]{task.name}[/] · {args.strategy} · {args.clients} clients ({partition}"
        + (f", alpha={args.alpha}" if partition == "dirichlet" else "")
        + f"; examples per client {min(sizes)}–{max(sizes)}) · {args.rounds} rounds · fraction {args.fraction}"
    )
    return config, out


def _default_out(root: pathlib.Path) -> pathlib.Path:
    from simulations.runner import default_out_dir

    return default_out_dir(root)


def cmd_run(args: argparse.Namespace) -> int:
    from fedserver.report import (
        accuracy_name,
        plot_run,
        plot_selection,
        run_summary,
        summary_metric_names,
        summary_tables,
        write_summary,
    )
    from fedserver.store import RunStore
    from simulations.runner import SimulationSpec, run_simulation_spec

    config, out = _validate_and_prepare(args)
    spec = SimulationSpec(
        config=config,
        num_clients=args.clients,
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        verbose=args.verbose,
    )
    error: BaseException | None = None
    run_id = None
    try:
        result = run_simulation_spec(spec, console)
        run_id = result.run_id
        wall = result.wall_seconds
    except (KeyboardInterrupt, Exception) as err:  # reported below with what the store kept
        error = err
    store = RunStore(config["store"])
    if run_id is None:
        runs = [r for r in store.list_runs() if r.name == config["run-name"]]
        run_id = runs[0].id if runs else None
    if run_id is None:
        err_console.print(f"[red]error:[/] the simulation failed before any round: {escape(str(error))}")
        return 1
    summary = run_summary(store, run_id)
    if error is None:
        summary["wall_seconds"] = wall
    write_summary(summary, out / "summary.json")
    if summary["rounds"]:
        plot_run(summary, out / "plot.png")
    has_selection = plot_selection(summary, out / "selection.png")
    for table in summary_tables(summary):
        console.print(table)
    for problem in summary["client_problems"][:10]:
        console.print(f"[yellow]round {problem['round']} {problem['phase']} client {problem['node_id']}: "
                      f"{problem['status']}[/] {escape(str(problem['error'] or ''))}")
    if error is not None:
        from fedserver.strategy import RunStopped

        stopped = isinstance(error, (KeyboardInterrupt, RunStopped))
        what = "was stopped" if stopped else f"failed: {escape(str(error))}"
        err_console.print(f"[red]run {run_id} {what}.[/] Completed rounds ({summary['rounds_completed']} of "
                          f"{summary['num_rounds']}) are in {escape(str(out))}/store.db, summary.json and plot.png")
        return 130 if stopped else 1
    console.print(
        f"final central {accuracy_name(summary_metric_names(summary))} "
        f"[bold]{100 * (summary['final_central_accuracy'] or 0):.1f}%[/] "
        f"in {wall:.0f} s wall · run [bold]{run_id}[/]\n"
        f"wrote {out}/store.db, {out}/summary.json, {out}/plot.png"
        + (f", {out}/selection.png (which site trained which layer)" if has_selection else "")
    )
    return 0


# ---- fedsim list / show ---------------------------------------------------------------------------
def _stores(args: argparse.Namespace) -> list[str]:
    urls = list(args.store or [])
    root = pathlib.Path(args.runs_dir)
    if root.is_dir():
        urls += [f"sqlite:///{p.resolve()}" for p in sorted(root.glob("*/store.db"))]
    return urls


def cmd_list(args: argparse.Namespace) -> int:
    from fedserver.report import runs_table
    from fedserver.store import RunStore, StoreError

    urls = _stores(args)
    if not urls:
        console.print(f"no runs yet under {args.runs_dir}/ (start one with `fedsim run`)")
        return 0
    rows, accuracies = [], {}
    for url in urls:
        try:
            store = RunStore(url)
        except StoreError as err:
            err_console.print(f"[yellow]skipping[/] {escape(str(err))}")
            continue
        for run in store.list_runs():
            rows.append((run, url.removeprefix("sqlite:///")))
            rounds = store.rounds(run.id)
            accuracies[run.id] = rounds[-1].central_accuracy if rounds else None
    rows.sort(key=lambda item: item[0].created_at, reverse=True)
    console.print(runs_table(rows, accuracies))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from fedserver.report import run_summary, summary_tables
    from fedserver.store import RunStore, StoreError

    ref = args.run
    path = pathlib.Path(ref)
    found = []
    if (path / "store.db").is_file():  # a run directory: its store holds that run
        store = RunStore(f"sqlite:///{(path / 'store.db').resolve()}")
        found = [(store, run) for run in store.list_runs()]
        urls = [store.url]
    else:
        urls = _stores(args)
        for url in urls:
            try:
                store = RunStore(url)
                found.append((store, store.get_run(ref)))
            except StoreError:
                continue
    if not found:
        raise UsageError(f"no run '{ref}' in {len(urls)} store(s) under {args.runs_dir}/; `fedsim list` shows the runs")
    if len(found) > 1:
        raise UsageError(f"'{ref}' matches runs in {len(found)} stores; give the full run id or the run directory")
    store, run = found[0]
    summary = run_summary(store, run.id)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    for table in summary_tables(summary):
        console.print(table)
    console.print(f"status {summary['status']}" + (f" ({escape(str(summary['error']))})" if summary["error"] else ""))
    console.print(f"checkpoints at rounds {summary['checkpoints']} · store {escape(store.url)}")
    for problem in summary["client_problems"]:
        console.print(f"[yellow]round {problem['round']} {problem['phase']} client {problem['node_id']}: "
                      f"{problem['status']}[/] {escape(str(problem['error'] or ''))}")
    return 0


def cmd_tasks(_args: argparse.Namespace) -> int:
    from rich.table import Table

    from aggregators import ALGORITHMS
    from fedclient.tasks import SCHEMES, TASKS

    table = Table(title="tasks")
    for column in ("task", "description", "default layers trained", "default partition", "data licence"):
        table.add_column(column)
    for task in TASKS.values():
        table.add_row(task.name, task.description, ", ".join(task.train_layers), task.default_partition, task.licence)
    console.print(table)
    console.print(f"strategies: {', '.join(sorted(ALGORITHMS))}")
    console.print(f"partitions: {', '.join(SCHEMES)}")
    return 0


# ---- argument parsing -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT_RUN_CONFIG
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description="Simulate federated fine-tuning of a pretrained model on one machine (Flower + Ray).",
        epilog="Run `fedsim run --help` for every knob of a simulation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run one simulation and write its run directory",
        description="Run a federation of virtual clients on Flower's simulation engine. Shows a progress bar "
        "per round, prints a summary table, and writes a run directory with the run store "
        "(store.db), summary.json and plot.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--task", default=d["task"], help="model + data; `fedsim tasks` lists them")
    run.add_argument("--model", default=None, metavar="DIR",
                     help="your own Hugging Face model directory (config.json, *.safetensors, tokenizer) instead "
                     "of --task: a causal LM (…ForCausalLM) or a BERT-style encoder (bert, roberta, electra, mpnet; "
                     "a …ForSequenceClassification checkpoint's encoder), which classifies; needs --data")
    run.add_argument("--data", default=None, metavar="DIR",
                     help="with --model: a directory of *.jsonl lines {\"prompt\": ..., \"completion\": ...} "
                     "(causal LM) or of *.csv / *.jsonl rows with text,label (either model), split across the "
                     "clients (--partition iid or dirichlet over the labels or distinct completions)")
    run.add_argument("--strategy", default=d["strategy"],
                     help="aggregation algorithm: fedavg, selective-layer, ferret, fedkseed, fedkseed-pro, "
                     "one-byte, frl, scallion or scafcom (`fedsim tasks` lists them)")
    run.add_argument("--clients", type=int, default=10, help="number of virtual clients (partitions)")
    run.add_argument("--fraction", type=float, default=d["fraction-train"], help="fraction of clients sampled to train each round")
    run.add_argument("--fraction-evaluate", type=float, default=d["fraction-evaluate"],
                     help="fraction of clients that also evaluate the global model on their local split (0: central evaluation only)")
    run.add_argument("--rounds", type=int, default=d["num-server-rounds"], help="federated rounds")
    run.add_argument("--partition", choices=("iid", "dirichlet", "natural"), default=None,
                     help="how the training set is split over clients (default: the task's own)")
    run.add_argument("--alpha", type=float, default=d["alpha"], help="Dirichlet concentration; smaller is more label skew")
    run.add_argument("--seed", type=int, default=d["seed"], help="seed for partitioning, sampling and local shuffling")
    run.add_argument("--lr", type=float, default=d["lr"], help="local AdamW learning rate")
    run.add_argument("--local-steps", type=int, default=d["local-steps"], help="local optimizer steps per round")
    run.add_argument("--batch-size", type=int, default=d["batch-size"], help="local mini-batch size")
    run.add_argument("--train-layers", default=d["train-layers"],
                     help="comma-separated layers to train and exchange, e.g. 'encoder.layer.5,head' (default: the task's)")
    peft = run.add_argument_group("adapters (PEFT; every strategy but frl)")
    peft.add_argument("--adapter", choices=("", "lora"), default=d["adapter"],
                      help="train a LoRA adapter (Hu et al. 2022) instead of the layers' weights: only the adapter "
                      "(and a classifier's head) trains and travels; the layers are the adapted blocks")
    peft.add_argument("--lora-rank", type=int, default=d["lora-rank"], help="LoRA rank r")
    peft.add_argument("--lora-alpha", type=float, default=d["lora-alpha"], help="LoRA scale alpha (update = alpha/r BA)")
    peft.add_argument("--lora-dropout", type=float, default=d["lora-dropout"], help="dropout on the adapter's input")
    peft.add_argument("--lora-targets", default=d["lora-targets"],
                      help="modules to adapt, comma-separated (default: attention q_proj,v_proj for causal LMs, "
                      "query,value for MiniLM)")
    trainer = run.add_argument_group("local trainer (fedavg, selective-layer, ferret)")
    trainer.add_argument("--max-length", type=int, default=d["max-length"], metavar="TOKENS",
                         help="cut (and pad) every example to this many tokens instead of the task's own "
                         "(0; `fedsim tasks` lists them); 16 up to the model's positions, at most 2048")
    trainer.add_argument("--grad-accumulation", type=int, default=d["grad-accumulation"], metavar="A",
                         help="average the gradients of A batches per optimizer step (an effective batch of "
                         "A x batch-size in the memory of one); 1-64")
    trainer.add_argument("--warmup-steps", type=int, default=d["warmup-steps"],
                         help="raise the learning rate linearly over the run's first N local steps")
    trainer.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d["lr-schedule"],
                         help="after warm-up: keep lr, or decay it along a half cosine over all rounds' steps")
    trainer.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=d["precision"],
                         help="autocast forward passes on CUDA (fp16 with a gradient scaler); weights and "
                         "updates stay fp32; ignored on a CPU")
    trainer.add_argument("--gradient-checkpointing", action="store_true", default=d["gradient-checkpointing"],
                         help="recompute activations in the backward pass: less memory, about a third more compute")
    sel = run.add_argument_group("selective-layer (--strategy selective-layer)")
    sel.add_argument("--selection", default=d["selection"],
                     choices=("regulated", "client-top", "top", "bottom", "random", "full"),
                     help="how layers are chosen: the paper's regulated problem P1, each client's own top layers, "
                     "output-side, input-side, random, or every layer")
    sel.add_argument("--selection-lambda", type=float, default=d["selection-lambda"],
                     help="weight of the cross-client consistency penalty (scores are normalised per client)")
    sel.add_argument("--layer-scores", choices=("fresh", "stale"), default=d["layer-scores"],
                     help="fresh: a scoring exchange every round; stale: reuse each client's last scores")
    sel.add_argument("--score-batches", type=int, default=d["score-batches"], help="batches per gradient score")
    sel.add_argument("--common-layers", default=d["common-layers"], help="layers every client always trains")
    sel.add_argument("--layer-budget", default=d["layer-budget"],
                     help="simulated per-site budgets: N, uniform:LOW:HIGH or truncnorm:LOW:HIGH (default: all layers)")
    seeds = run.add_argument_group("shared randomness (--strategy ferret, fedkseed, fedkseed-pro, one-byte)")
    seeds.add_argument("--hash-every", type=int, default=d["hash-every"],
                       help="compare every client's copy of the global weights with the server's every N rounds "
                       "(a mismatch stops the run)")
    seeds.add_argument("--ferret-bases", type=int, default=d["ferret-bases"],
                       help="Ferret: random bases K per client and round = fp32 coefficients uploaded (4 bytes each)")
    seeds.add_argument("--ferret-block-size", type=int, default=d["ferret-block-size"],
                       help="Ferret: weights per projection block; generation costs K x block size numbers")
    seeds.add_argument("--ferret-seeds", choices=("round", "client"), default=d["ferret-seeds"],
                       help="Ferret: bases shared by a round's clients (cheap replay) or one set per client (the paper)")
    seeds.add_argument("--server-lr", type=float, default=d["server-lr"],
                       help="Ferret, scallion, scafcom: server step on the aggregate")
    seeds.add_argument("--seed-pool", type=int, default=d["seed-pool"], help="FedKSeed/one-byte: seeds K in the pool")
    seeds.add_argument("--zo-steps", type=int, default=d["zo-steps"],
                       help="FedKSeed/one-byte: zeroth-order estimates (two forward passes each) per client and round")
    seeds.add_argument("--zo-lr", type=float, default=d["zo-lr"], help="FedKSeed/one-byte: SGD step on the estimates")
    seeds.add_argument("--zo-eps", type=float, default=d["zo-eps"], help="FedKSeed/one-byte: perturbation size epsilon")
    frl = run.add_argument_group("rank-based (--strategy frl)")
    frl.add_argument("--frl-mode", choices=("finetune", "original"), default=d["frl-mode"],
                     help="masks over the pretrained weights, or over FRL's random signed constants")
    frl.add_argument("--frl-sparsity", type=float, default=d["frl-sparsity"], help="fraction of edges each mask keeps")
    frl.add_argument("--frl-lr", type=float, default=d["frl-lr"], help="SGD learning rate of the scores (x 0.999 per round)")
    frl.add_argument("--frl-vote", choices=("clipped", "sum"), default=d["frl-vote"],
                     help="clipped: each site's deviation from the global ranking is scaled down to the round's "
                     "median (limits what rank-reversing sites can un-learn); sum: the paper's plain vote")
    comp = run.add_argument_group("compressed updates (fedavg, selective-layer; --strategy scallion, scafcom)")
    comp.add_argument("--codec", default=d["codec"],
                      help="uplink codec: none, topk:R, randk:R, q1/q2/q4/q8, sign, or sparsifier+quantizer such as "
                      "topk:0.01+q8 (biased codecs get error feedback). Empty: none for fedavg/selective-layer, "
                      "randk:0.05+q8 for scallion, topk:0.02+q8 for scafcom")
    comp.add_argument("--sgd-lr", type=float, default=d["sgd-lr"], help="scallion/scafcom: local SGD learning rate")
    comp.add_argument("--scaffold-alpha", type=float, default=d["scaffold-alpha"],
                      help="scallion/scafcom: control-variate step alpha (0: 1/(1+omega) for scallion, 1 for scafcom)")
    comp.add_argument("--scafcom-beta", type=float, default=d["scafcom-beta"], help="scafcom: local momentum beta")
    ldp = run.add_argument_group("differential privacy (local: every strategy but scallion/scafcom)")
    ldp.add_argument("--dp", choices=("off", "gaussian", "laplace", "distributed", "central"), default=d["dp"],
                     help="gaussian/laplace: local DP, each site privatizes everything it sends: clip + noise (dense "
                     "updates, Ferret coefficients, zeroth-order scalars, layer scores), randomized response (FRL "
                     "rankings). distributed: each site adds its share of discrete Gaussian noise and the sum is "
                     "securely aggregated (implies --secagg; the noise on the sum assumes a threshold of honest "
                     "sites). central: the coordinator clips each reply and noises the sum (the trusted-coordinator "
                     "reference)")
    ldp.add_argument("--dp-epsilon", type=float, default=d["dp-epsilon"],
                     help="each site's budget epsilon for the run (sites may set a smaller one); a site refuses "
                     "to train once its next release would exceed it")
    ldp.add_argument("--dp-delta", type=float, default=d["dp-delta"], help="each site's delta")
    ldp.add_argument("--clip", type=float, default=d["clip"],
                     help="norm bound C of what a site sends (L2 for Gaussian, L1 for Laplace)")
    ldp.add_argument("--dp-noise-multiplier", type=float, default=d["dp-noise-multiplier"],
                     help="noise std (or Laplace scale) / C; 0: each site calibrates it so the run spends its budget")
    secure = run.add_argument_group("secure aggregation (fedavg, selective-layer, ferret with --ferret-seeds round, fedkseed)")
    secure.add_argument("--secagg", action="store_true", default=d["secagg"],
                        help="the coordinator learns only the sum of the sites' updates (pairwise masks, Bonawitz et "
                        "al. 2017); four more message exchanges per round")
    secure.add_argument("--secagg-threshold", type=int, default=d["secagg-threshold"],
                        help="sites whose shares rebuild a dropped site's masks (0: a majority); up to sites - "
                        "threshold may drop after sharing their keys")
    secure.add_argument("--secagg-clip", type=float, default=d["secagg-clip"],
                        help="L2 bound of a site's update (without distributed DP; with it, --clip): it bounds what "
                        "one site can move the sum, and the fixed point's range (2^bits / this)")
    secure.add_argument("--secagg-bits", type=int, default=d["secagg-bits"],
                        help="modulus 2^bits of the masked sums (32: as many bytes as float32 weights)")
    secure.add_argument("--secagg-max-weight", type=int, default=d["secagg-max-weight"],
                        help="the largest example count a site's update is weighted by (each site's weight is public "
                        "and signed, as in FedAvg; --max-site-weight does not apply)")
    run.add_argument("--checkpoint-every", type=int, default=d["checkpoint-every"],
                     help="store the global model every N rounds (and after the last); 0 = never")
    run.add_argument("--round-timeout", type=float, default=d["round-timeout"], help="seconds to wait for replies per phase")
    run.add_argument("--out", default=None, help="run directory to create (default: a fresh one under --runs-dir)")
    run.add_argument("--runs-dir", default="runs", help="where fresh run directories go")
    run.add_argument("--store", default=None, help="SQLAlchemy URL of the run store (default: sqlite in the run directory)")
    run.add_argument("--name", default=None, help="a name for the run (default: the run directory's name)")
    run.add_argument("--cpus-per-client", type=float, default=1.0, help="CPU cores Ray reserves per running client")
    run.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share Ray reserves per running client")
    run.add_argument("--verbose", action="store_true", help="show Flower's and the clients' logs")
    run.set_defaults(func=cmd_run)

    for name, func, text in (("list", cmd_list, "list the runs in the run stores"), ("show", cmd_show, "show one run")):
        p = sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "show":
            p.add_argument("run", help="run id (or a unique prefix), run name, or run directory")
            p.add_argument("--json", action="store_true", help="print the JSON summary instead of tables")
        p.add_argument("--runs-dir", default="runs", help="directory whose */store.db files are read")
        p.add_argument("--store", action="append", help="an extra store URL to read (repeatable)")
        p.set_defaults(func=func)

    tasks = sub.add_parser("tasks", help="list tasks, strategies and partitions")
    tasks.set_defaults(func=cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedserver.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, StoreError) as err:
        err_console.print(f"[red]error:[/] {escape(str(err))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
