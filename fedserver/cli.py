"""``fedserver``: the coordinator's command line (the web console comes with issue #9).

Deployment (Flower's Deployment Engine: SuperLink here, one SuperNode per site, gRPC with TLS
and SuperNode authentication)::

    fedserver init coord --host coordinator.example.org      # CA, server certificate, run store
    fedserver start coord                                     # the SuperLink, detached
    fedserver enrol coord hospital-a --public-key site.key.pub
    fedserver run coord --strategy fedavg --rounds 5 --run-config 'codec="topk:0.02+q8"'
    fedserver status coord
    fedserver stop coord

Run store::

    fedserver runs --store sqlite:///fedtune-runs.db
    fedserver show 20261123-1030 --store sqlite:///fedtune-runs.db
    fedserver export 20261123-1030 --round 3 --out global.safetensors
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from rich.console import Console
from rich.markup import escape

from fedclient.runconfig import DEFAULT_RUN_CONFIG, quiet_environment

quiet_environment()
console = Console()
err_console = Console(stderr=True)


def deployment_command(args: argparse.Namespace) -> int:
    from fedserver import deployment as dep

    directory = pathlib.Path(args.directory)
    if args.command == "init":
        made = dep.init(directory, args.host, fleet_port=args.fleet_port, control_port=args.control_port,
                        fleet_host=args.listen)
        console.print(f"created {directory}: CA {made.tls / 'ca.crt'} (give it to every site), server certificate "
                      f"for {', '.join(made.hosts)}, store {made.store_url}")
        console.print(f"sites will dial {made.hosts[0]}:{args.fleet_port}; next: `fedserver start {directory}`")
        return 0
    deployment = dep.Deployment.load(directory)
    if args.command == "start":
        pid = dep.start(deployment)
        console.print(f"SuperLink running (pid {pid}): Fleet API (gRPC, TLS, node auth) on {deployment.fleet_address}, "
                      f"Control API on 127.0.0.1:{deployment.control_port}; log {deployment.log_file}")
    elif args.command == "stop":
        console.print("stopped" if dep.stop(deployment) else "no SuperLink was running")
    elif args.command == "enrol":
        node = dep.enrol(deployment, args.site, pathlib.Path(args.public_key))
        console.print(f"enrolled site '{args.site}' as node {node}")
    elif args.command == "status":
        info = dep.status(deployment)
        if args.format == "json":
            print(json.dumps(info, indent=2))
        else:
            from rich.table import Table

            nodes = Table(title="sites (SuperNodes)")
            for column in ("site", "node id", "key fingerprint", "status", "online since", "last offline"):
                nodes.add_column(column)
            for n in info["nodes"]:
                nodes.add_row(n["site"] or "?", str(n.get("node-id")), n["fingerprint"], str(n.get("status")),
                              str(n.get("online-at")), str(n.get("offline-at")))
            runs = Table(title="runs")
            for column in ("run id", "app", "status", "elapsed"):
                runs.add_column(column)
            for r in info["runs"]:
                runs.add_row(str(r.get("run-id")), str(r.get("fab-id", r.get("app", ""))), str(r.get("status")),
                             str(r.get("elapsed", "")))
            console.print(nodes)
            console.print(runs)
    elif args.command == "app-hash":
        from fedclient.app_trust import fab_hash
        from fedserver.app_package import build_fab, stage_app

        app = stage_app(deployment.directory / "apps")
        digest = fab_hash(build_fab(app))
        console.print(f"app {app}\nFAB sha256 {digest}\n"
                      f"review the files in {app}, then sign: `fedserver sign-app KEY {digest}`", soft_wrap=True)
    elif args.command == "run":
        return run_command(args, deployment)
    return 0


def run_command(args: argparse.Namespace, deployment) -> int:
    """``fedserver run``: check the whole run config as the ServerApp will (nothing is submitted
    when it would refuse it), submit, stream Flower's log, then report the run as the store has it
    and exit 0 only if it completed (1 if it failed or stopped, 2 for bad input)."""
    from fedserver import deployment as dep
    from fedserver.run_config import RunConfigError, check_run_config, parse_run_config_args
    from fedserver.store import RunStore, StoreError

    from aggregators import make_algorithm
    from fedserver.run_config import resume_problems

    config = {"task": args.task, "strategy": args.strategy, "num-server-rounds": args.rounds}
    try:
        config.update(parse_run_config_args(args.run_config))
        merged = check_run_config(config, deployment=True)
        if config.get("resume"):
            run = RunStore(deployment.store_url).get_run(str(config["resume"]))
            problems = resume_problems(run.id, run.task, run.strategy, merged["task"],
                                       make_algorithm(merged["strategy"], merged))
            if problems:
                raise RunConfigError(problems)
        dep.run_config_text(config)
    except (RunConfigError, dep.DeploymentError) as err:
        for problem in getattr(err, "problems", [str(err)]):
            err_console.print(f"[red]error:[/] {escape(problem)}")
        err_console.print("nothing was submitted")
        return 2
    except StoreError as err:
        err_console.print(f"[red]error:[/] resume: {escape(str(err))}; `fedserver --store {deployment.store_url} runs` "
                          "lists the runs; nothing was submitted")
        return 2
    try:
        result = dep.submit(deployment, config, stream=True, signature=args.signature or None,
                            echo=lambda line: print(line, end="", flush=True))
        outcome = dep.run_outcome(deployment, result)
    except KeyboardInterrupt:
        err_console.print("interrupted: a run already submitted goes on at the coordinator; `fedserver status "
                          f"{escape(str(deployment.directory))}` lists it, `flwr stop RUN-ID` stops it")
        return 130
    flower = f" (Flower run {outcome.flower_run_id})" if outcome.flower_run_id else ""
    if outcome.ok:
        accuracy = f", final central accuracy {100 * outcome.accuracy:.1f}%" if outcome.accuracy is not None else ""
        console.print(f"run [bold]{outcome.run_id}[/]{flower} completed: {outcome.rounds} rounds{accuracy}; "
                      f"`fedserver --store {deployment.store_url} show {outcome.run_id}`", soft_wrap=True)
        return 0
    what = f"run {outcome.run_id}{flower} {outcome.status}" if outcome.run_id else f"the run{flower} did not start"
    err_console.print(f"[red]error:[/] {escape(what)}: {escape(outcome.reason or 'no reason recorded')}",
                      soft_wrap=True)
    return 1


def search_command(args: argparse.Namespace) -> int:
    """One encrypted query on the deployment (see :func:`fedserver.deployment.search`)."""
    from rich.table import Table
    from rich.text import Text

    from fedserver import deployment as dep
    from privacy.vector_search import SearchError

    if args.stop_service:
        stopped = dep.stop_search_service(dep.Deployment.load(args.directory))
        console.print("the search service is ending its run" if stopped else "no search service was running")
        return 0
    try:
        if args.query_file:
            text = pathlib.Path(args.query_file).read_text(encoding="utf-8")
        else:  # stdin, so the text never sits on a command line other users can read with `ps`
            if sys.stdin.isatty():
                err_console.print("query (end with Enter, then Ctrl-D):")
            text = sys.stdin.read()
        result = dep.search(dep.Deployment.load(args.directory), text, k=args.k, backend=args.backend,
                            row_bound=args.row_bound, service=not args.no_service, service_idle=args.service_idle)
    except OSError as err:
        err_console.print(f"[red]error:[/] cannot read the query ({escape(str(err))})")
        return 2
    except (dep.DeploymentError, SearchError) as err:
        err_console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    table = Table(title=f"top {args.k} for query {result['query_id']}")
    for column in ("rank", "score", "site", "document"):
        table.add_column(column)
    for rank, hit in enumerate(result["hits"], start=1):
        table.add_row(str(rank), f"{hit['score']:.4f}", Text(str(hit["site"])), Text(str(hit["document_id"])))  # sites' text, not markup
    console.print(table)
    for site, reason in result["refusals"].items():
        console.print(f"[yellow]site '{escape(str(site))}' did not answer:[/] {escape(str(reason))}")
    return 0


def console_command(args: argparse.Namespace) -> int:
    import secrets

    import uvicorn

    from fedserver.console import create_app
    from fedserver.console.app import LOOPBACK_HOSTS
    from fedserver.deployment import Deployment, DeploymentError
    from fedserver.store import StoreError

    deployment = None
    try:
        if args.directory:
            deployment = Deployment.load(args.directory)
        store_url = deployment.store_url if deployment else args.store
        token = args.token or secrets.token_urlsafe(24)
        hosts = list(dict.fromkeys([args.host, *LOOPBACK_HOSTS, *(deployment.hosts if deployment else []),
                                    *args.allowed_host]))
        tls = {}
        if args.tls:
            if deployment is None:
                raise DeploymentError("--tls serves the deployment's certificate: give the deployment DIR")
            tls = {"ssl_certfile": str(deployment.tls / "server.pem"), "ssl_keyfile": str(deployment.tls / "server.key")}
        elif args.host not in LOOPBACK_HOSTS:
            raise DeploymentError(f"--host {args.host} is not loopback: the token and session would cross the network "
                                  "in clear; add --tls (the deployment's certificate), or keep 127.0.0.1 and reach "
                                  "it through an SSH tunnel")
        app = create_app(store_url, deployment=deployment, token=token, hosts=hosts,
                         log_dir=(deployment.directory if deployment else pathlib.Path.cwd()) / "console-logs")
    except (DeploymentError, StoreError, RuntimeError) as err:
        err_console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    scheme = "https" if tls else "http"
    host = args.host if args.host != "0.0.0.0" else "127.0.0.1"
    console.print(f"fedtune console on {scheme}://{host}:{args.port}/ over {store_url}"
                  + (f" (deployment {deployment.directory})" if deployment else " (runs start on the simulation engine)"))
    console.print(f"log in once with: {scheme}://{host}:{args.port}/login?token={token}\n"
                  "  (API clients send 'Authorization: Bearer TOKEN'; the token is printed only here)", soft_wrap=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **tls)
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedserver.deployment import DeploymentError
    from fedserver.report import run_summary, runs_table, summary_tables
    from fedserver.store import RunStore, StoreError

    parser = argparse.ArgumentParser(prog="fedserver", description="The fedtune coordinator.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--store", default=DEFAULT_RUN_CONFIG["store"], help="SQLAlchemy URL of the run store")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("runs", help="list the runs")
    show = sub.add_parser("show", help="per-round table of one run")
    show.add_argument("run", help="run id, unique id prefix, name, or the Flower run id `fedserver run` printed")
    show.add_argument("--json", action="store_true", help="print the JSON summary")
    export = sub.add_parser("export", help="write a checkpoint of the global model as safetensors")
    export.add_argument("run", help="run id, unique id prefix or name")
    export.add_argument("--round", type=int, default=None, help="round of the checkpoint (default: the latest)")
    export.add_argument("--out", required=True, help="file to write (.safetensors); for a run that trained an "
                        "adapter, a directory: a PEFT adapter directory (adapter_config.json, "
                        "adapter_model.safetensors, task_head.safetensors for a classifier's head)")
    export.add_argument("--merged", action="store_true", help="(adapter runs) also write the base model with the "
                        "adapter merged in, to OUT/merged, a plain Hugging Face model directory")
    init = sub.add_parser("init", help="create a deployment directory: CA, server certificate, run store")
    init.add_argument("directory")
    init.add_argument("--host", action="append", default=[],
                      help="name or IP the sites dial (repeatable; becomes the certificate's SANs)")
    init.add_argument("--fleet-port", type=int, default=9092, help="gRPC Fleet API port the sites connect to")
    init.add_argument("--control-port", type=int, default=9093, help="local Control/Runtime API port (127.0.0.1)")
    init.add_argument("--listen", default="0.0.0.0", help="address the Fleet API binds (127.0.0.1 for one machine)")
    for name, text in (("start", "start the SuperLink (TLS, SuperNode authentication)"), ("stop", "stop it"),
                       ("status", "list runs and sites")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("directory")
        if name == "status":
            cmd.add_argument("--format", choices=("table", "json"), default="table")
    enrol = sub.add_parser("enrol", help="register a site's public key")
    enrol.add_argument("directory")
    enrol.add_argument("site", help="the site's name")
    enrol.add_argument("--public-key", required=True, help="the site's PATH.pub from `fedclient keys`")
    run = sub.add_parser("run", help="submit the fedtune app to the SuperLink and stream its log")
    run.add_argument("directory")
    run.add_argument("--strategy", default=DEFAULT_RUN_CONFIG["strategy"])
    run.add_argument("--rounds", type=int, default=DEFAULT_RUN_CONFIG["num-server-rounds"])
    run.add_argument("--task", default=DEFAULT_RUN_CONFIG["task"])
    run.add_argument("--run-config", action="append", default=[],
                     help="more run-config keys, in `flwr run`'s syntax: key=value pairs separated by spaces, strings "
                     "in quotes, e.g. 'codec=\"topk:0.02+q8\" local-steps=2 run-name=\"my first run\"'; every key is "
                     "checked before anything is submitted")
    run.add_argument("--signature", default="", help="a publisher's signature over the app's FAB hash, made offline "
                     "(`fedserver sign-app`); default: signed with DIR/publisher.key")
    app_hash = sub.add_parser("app-hash", help="stage the app (code only) and print its FAB hash, to review and "
                              "sign it offline")
    app_hash.add_argument("directory")
    sign = sub.add_parser("sign-app", help="sign a FAB hash with a publisher key (Ed25519 PEM); prints the signature",
                          description="Sign the FAB hash `fedserver app-hash` printed. Whoever holds KEY vouches "
                          "for that exact app; sites pin KEY.pub with `fedclient start --trusted-publisher`.")
    sign.add_argument("key", help="the publisher's private key (created if absent, with KEY.pub)")
    sign.add_argument("fab_hash", help="the SHA-256 `fedserver app-hash` printed")
    find = sub.add_parser("search", help="one encrypted top-k query across the sites' document stores",
                          description="Read the query from standard input (or --query-file; never from the command "
                          "line, which other users of this host can read), embed it with MiniLM and encrypt it under "
                          "the deployment's current CKKS key epoch (made on the first search and reused until it "
                          "expires; the secret key stays here), and ask every site of the deployment; sites score "
                          "all their rows under encryption; the global top-k and the winning documents' ids are "
                          "printed. Sites must trust DIR/querier.key.pub (fedclient start --querier-key). The first "
                          "search starts the deployment's search service, a Flower run that keeps MiniLM and the keys "
                          "loaded and answers later searches in seconds; it ends after --service-idle seconds without "
                          "a query (or with --stop-service). Only this user's processes can reach it (a 0600 Unix "
                          "socket in DIR/search-service/); the text is never stored, only its keyed hash.")
    find.add_argument("directory", help="the deployment directory")
    find.add_argument("--query-file", default="", help="read the query text from this file instead of stdin")
    find.add_argument("--k", type=int, default=10, help="how many documents to return")
    find.add_argument("--backend", default="auto", choices=("auto", "pyfhel", "tenseal"), help="CKKS library")
    find.add_argument("--row-bound", type=int, default=10_000, help="public bound on rows per site (results are "
                      "padded to it so their size does not reveal a site's row count)")
    find.add_argument("--no-service", action="store_true", help="answer this query with a Flower run of its own "
                      "(about 10 s more) instead of the search service")
    find.add_argument("--service-idle", type=float, default=None, metavar="SECONDS",
                      help="when this search starts the service: how long it stays up after its last query "
                      "(default: the run config's search-idle-timeout, 1800)")
    find.add_argument("--stop-service", action="store_true", help="end the search service's run and exit")
    web = sub.add_parser("console", help="serve the web console (runs, rounds, sites; start and stop runs)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Serve the operator console. Given a deployment DIR it shows that deployment's "
                         "store and sites and starts runs on its SuperLink; without one it serves --store and starts "
                         "runs on the simulation engine. Binds 127.0.0.1. Every client needs the console's token "
                         "(generated and printed once with a login URL unless --token is given); requests for other "
                         "Host names are refused (DNS rebinding), and state-changing requests need the CSRF header "
                         "the pages send.")
    web.add_argument("directory", nargs="?", default="", help="a deployment directory (from `fedserver init`)")
    web.add_argument("--host", default="127.0.0.1", help="address to bind")
    web.add_argument("--port", type=int, default=8080, help="port to bind")
    web.add_argument("--token", default=None, help="token required from browsers and API clients (at least 16 "
                     "characters; default: a random one, printed)")
    web.add_argument("--allowed-host", action="append", default=[], help="another Host name clients use to reach "
                     "the console (e.g. its DNS name behind a proxy); repeatable")
    web.add_argument("--tls", action="store_true", help="serve HTTPS with the deployment's server certificate "
                     "(DIR/tls/server.pem; browsers trust DIR/tls/ca.crt)")
    args = parser.parse_args(argv)
    if args.command == "console":
        return console_command(args)
    if args.command == "search":
        return search_command(args)
    if args.command == "sign-app":
        from fedclient.app_trust import sign_fab
        from privacy.signing import KeyFileError, load_or_create_private_key

        if len(args.fab_hash) != 64 or any(c not in "0123456789abcdef" for c in args.fab_hash):
            err_console.print(f"[red]error:[/] '{escape(str(args.fab_hash))}' is not a SHA-256 hex digest")
            return 2
        try:
            key = load_or_create_private_key(pathlib.Path(args.key))
        except KeyFileError as err:
            err_console.print(f"[red]error:[/] {escape(str(err))}")
            return 2
        print(sign_fab(key, args.fab_hash))
        return 0
    if args.command in ("init", "start", "stop", "status", "enrol", "run", "app-hash"):
        try:
            return deployment_command(args)
        except DeploymentError as err:
            err_console.print(f"[red]error:[/] {escape(str(err))}")
            return 2
    try:
        store = RunStore(args.store)
        if args.command == "runs":
            runs = store.list_runs()
            accuracies = {r.id: (store.rounds(r.id) or [None])[-1] for r in runs}
            console.print(runs_table([(r, store.url) for r in runs],
                                     {k: (v.central_accuracy if v else None) for k, v in accuracies.items()}))
        elif args.command == "show":
            summary = run_summary(store, args.run)
            if args.json:
                print(json.dumps(summary, indent=2, default=str))
            else:
                for table in summary_tables(summary):
                    console.print(table)
        else:
            from safetensors.torch import save_file

            run = store.get_run(args.run)
            rnd, state = store.load_checkpoint(run.id, args.round)
            out = pathlib.Path(args.out)
            if out.exists():
                raise StoreError(f"{out} exists; choose another --out")
            if run.config.get("adapter"):
                written = export_adapter_run(run, state, out, merged=args.merged)
                console.print(escape(f"wrote round {rnd} of run {run.id}'s adapter to {out}/: {', '.join(written)} "
                                     "(load it with peft.PeftModel.from_pretrained(base_model, DIR))"), soft_wrap=True)
                return 0
            if args.merged:
                raise StoreError(f"run {run.id} trained no adapter: its export is already the whole trained state")
            save_file(state, str(out), metadata={"run": run.id, "round": str(rnd), "task": run.task})
            console.print(escape(f"wrote round {rnd} of run {run.id} ({len(state)} tensors) to {out}"))
    except StoreError as err:
        hint = f"; `fedserver --store {args.store} runs` lists the runs" if str(err).startswith("no run") else ""
        err_console.print(f"[red]error:[/] {escape(str(err))}{hint}")
        return 2
    return 0


def export_adapter_run(run, state, out: pathlib.Path, *, merged: bool) -> list[str]:
    """The task model of ``run`` with its adapter (as the run config built it) holding ``state``,
    written by :func:`fedclient.tasks.adapters.export_adapter`."""
    from fedclient.tasks import get_task
    from fedclient.tasks.adapters import AdapterSpec, export_adapter

    task = get_task(run.task)
    model = task.build_model(AdapterSpec.from_run_config(run.config))
    unexpected = set(state) - set(model.state_dict())
    if unexpected:
        raise StoreError(f"run {run.id}'s checkpoint does not fit its task's adapter model: {sorted(unexpected)[:3]}")
    model.load_state_dict(state, strict=False)
    tokenizer = task.tokenizer() if merged and hasattr(task, "tokenizer") else None
    return export_adapter(model, out, merged=merged, tokenizer=tokenizer)


if __name__ == "__main__":
    sys.exit(main())
