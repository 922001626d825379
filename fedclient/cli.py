"""``fedclient``: the partner site's command line.

``fedclient check-data DIR --task T`` validates a site's own data (CSV/JSONL with ``text`` and ``label``,
or for a language-model task JSONL with ``prompt`` and ``completion``) before ``fedclient start --data DIR``.
``fedclient keys PATH`` creates this site's key pair (send PATH.pub to the coordinator's operator;
the private key never leaves the site). ``fedclient start`` starts this site's SuperNode against a
coordinator (TLS + node authentication over gRPC). ``fedclient doctor`` checks this site can take
part: Python and library versions, the device the client will train on (CUDA when present), and
that each task's model and data load offline; with ``--superlink``/``--ca`` also that the
coordinator is reachable.

Examples::

    fedclient keys site/site.key
    fedclient start --superlink coordinator.example.org:9092 --ca ca.crt --key site/site.key \
        --data site/data --device cuda:0
    fedclient check-data site/data --task minilm-bbc
    fedclient doctor --superlink coordinator.example.org:9092 --ca ca.crt --key site/site.key --data site/data
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedclient.runconfig import quiet_environment

quiet_environment()
console = Console()


def doctor(task_names: list[str], superlink: str = "", ca: str = "", key: str = "", data: str = "",
           time_server: str = "") -> int:
    import flwr
    import torch
    import transformers

    from fedclient.device import best_device
    from fedclient.tasks import TASKS, MissingDataError, get_task

    table = Table(title="fedclient doctor")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    ok = True
    table.add_row("python", "ok", platform.python_version())
    table.add_row("flwr", "ok" if flwr.__version__ == "1.39.0" else "warn", flwr.__version__ + " (fedtune pins 1.39.0)")
    table.add_row("torch / transformers", "ok", f"{torch.__version__} / {transformers.__version__}")
    device = best_device()
    if device.type == "cuda":
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        table.add_row("device", "ok", f"CUDA: {names}")
    else:
        table.add_row("device", "ok", f"CPU ({torch.get_num_threads()} threads); no CUDA device found")
    for index in range(torch.cuda.device_count() if device.type == "cuda" else 0):
        free, total = torch.cuda.mem_get_info(index)
        table.add_row(f"cuda:{index} memory", "ok" if free > 1 << 30 else "warn",
                      f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    available = _available_memory()
    if available is not None:
        table.add_row("memory", "ok" if available > 2 << 30 else "warn", f"{available / 2**30:.1f} GiB available")
    ok &= _check_clock(table, time_server, ca)
    if superlink:
        import pathlib

        from fedclient.supernode import check_reachable, check_tls

        try:
            check_reachable(superlink)
            table.add_row("coordinator", "ok", escape(f"{superlink} reachable"))
            if ca:
                table.add_row("TLS", "ok", escape(f"certificate '{check_tls(superlink, pathlib.Path(ca))}' verifies with {ca}"))
        except ValueError as err:
            ok = False
            table.add_row("coordinator", "[red]fail[/]", escape(str(err)))
    if key:
        import pathlib

        from fedclient.keys import check_private_key

        try:
            check_private_key(pathlib.Path(key))
            table.add_row("site key", "ok", f"{key}: OpenSSH ECDSA, owner-only")
        except ValueError as err:
            ok = False
            table.add_row("site key", "[red]fail[/]", escape(str(err)))
    if data:
        from fedclient.tasks import SiteDataError

        for name in task_names or ["minilm-bbc"]:
            try:
                task = get_task(name)
                corpus = task.read_site_data(data)
                task.encode_site_corpus(corpus)  # what training will tokenize: answers that do not fit show here
                kind = "prompt/completion pairs" if corpus.completions else "labelled rows"
                table.add_row(f"data for {name}", "ok",
                              escape(f"{data}: {len(corpus)} {kind} in {len(corpus.rows_per_file)} file(s)"))
            except (SiteDataError, MissingDataError) as err:
                ok = False
                table.add_row(f"data for {name}", "[red]fail[/]", escape(str(err)))
    for name in task_names or list(TASKS):
        started = time.perf_counter()
        try:
            task = get_task(name)
            data = task.load_data()
            model = task.build_model().to(device)
            n_params = sum(p.numel() for p in model.parameters())
            detail = (f"{len(data.train)} train / {len(data.test)} test docs, {n_params / 1e6:.1f} M params, "
                      f"{time.perf_counter() - started:.1f} s")
            table.add_row(f"task {name}", "ok", detail)
        except (MissingDataError, ValueError, OSError) as err:
            ok = False
            table.add_row(f"task {name}", "[red]fail[/]", escape(str(err)))
    console.print(table)
    return 0 if ok else 1


def _available_memory() -> int | None:
    try:
        lines = pathlib.Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def _check_clock(table: Table, time_server: str, ca: str) -> bool:
    """Rows for the clock checks of :mod:`fedclient.clock`; False if one fails."""
    import pathlib

    from fedclient.clock import (
        certificate_window_problem,
        judge_offset,
        kernel_clock_synchronised,
        time_server_offset,
    )

    ok = True
    synchronised = kernel_clock_synchronised()
    table.add_row("clock", "ok" if synchronised else "warn",
                  {True: "synchronised (NTP)", False: "not synchronised by NTP/chrony: authentication fails if it "
                   "drifts > 5 s ahead of the coordinator", None: "synchronisation status unknown"}[synchronised])
    if time_server:
        try:
            offset = time_server_offset(time_server)
            problem = judge_offset(offset)
            table.add_row("clock offset", "[red]fail[/]" if problem else "ok",
                          problem or f"{offset:+.3f} s against {time_server}")
            ok = problem is None
        except ValueError as err:
            table.add_row("clock offset", "warn", escape(str(err)))
    if ca:
        problem = certificate_window_problem(pathlib.Path(ca))
        if problem:
            table.add_row("clock vs CA", "[red]fail[/]", escape(problem))
            ok = False
    return ok


def runtime_status_command(home: str, state_dir: str) -> int:
    """Print what the site runtime ``fedclient start`` runs reports of itself."""
    import pathlib

    from fedclient.runtime import RuntimeUnavailable, runtime_status, socket_path

    directory = pathlib.Path(state_dir).expanduser() if state_dir else pathlib.Path(home).expanduser() / "state"
    try:
        status = runtime_status(str(socket_path(directory)))
    except RuntimeUnavailable as err:
        console.print(f"[red]error:[/] {escape(str(err))}; is `fedclient start` running with this --home/--state-dir?")
        return 1
    table = Table(title="site runtime")
    table.add_column("")
    table.add_column("")
    last = status.get("last-message") or {}
    for name, value in (("process", str(status["pid"])), ("up", f"{status['uptime-seconds']:.0f} s"),
                        ("memory", f"{status['memory-mb']} MB"), ("messages answered", str(status["messages"])),
                        ("answering now", status.get("busy") or "nothing"),
                        ("models loaded", f"{status['models-loaded']} ({status['model-loads']} loads so far"
                         + (f", {status['model-reloads']} after a model changed" if status.get("model-reloads") else "")
                         + ")"),
                        ("model digests", ", ".join(f"{task} {digest}" for task, digest in
                                                    sorted((status.get("model-digests") or {}).items())) or "none yet"),
                        ("last message", f"{last['type']} of run {last['run-id']} at {last['at']}, {last['seconds']} s"
                         + (", failed" if last.get("failed") else "") if last else "none yet")):
        table.add_row(name, escape(value))
    console.print(table)
    return 0


def check_data(directory: str, task_name: str) -> int:
    """Validate a site's data directory against a task's classes and summarise it."""
    from fedclient.tasks import MissingDataError, SiteDataError, get_task

    try:
        task = get_task(task_name)
        corpus = task.read_site_data(directory)
        task.encode_site_corpus(corpus)  # what training tokenizes: an answer too long for the task shows here
    except (SiteDataError, MissingDataError, ValueError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    kind = "prompt/completion pairs" if corpus.completions else "labelled rows"
    console.print(escape(f"{directory}: {len(corpus)} {kind}, valid for task {task_name}"))
    table = Table()
    table.add_column("file")
    table.add_column("rows", justify="right")
    for name, rows in corpus.rows_per_file.items():
        table.add_row(name, str(rows))
    console.print(table)
    if corpus.completions:
        console.print(f"{len(corpus.classes)} distinct completions")
    else:
        classes = Table(title="rows per class")
        classes.add_column("class")
        classes.add_column("rows", justify="right")
        for name, rows in corpus.class_counts().items():
            classes.add_row(escape(name), str(rows) if rows else "[yellow]0[/]")
        console.print(classes)
    train, evaluate = corpus.split_rows(seed=0)
    console.print(f"{len(train)} rows to train on, {len(evaluate)} for local evaluation "
                  "(rows marked split=eval, else 10% of the rest)")
    return 0


def index(directory: str, encoder_weights: str, row_bound: int = 10_000) -> int:
    """Build or update the site's vector store for encrypted search."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
    )

    from fedclient.vector_store import VectorStore, VectorStoreError

    store = VectorStore(directory)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task("embedding documents", total=None)
            report = store.build(encoder_weights, progress=lambda done, total: progress.update(task, completed=done,
                                                                                             total=total))
    except VectorStoreError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    console.print(f"indexed {report.total} documents in {store.path} with {report.encoder}: {report.added} added, "
                  f"{report.changed} changed, {report.removed} removed, {report.unchanged} unchanged")
    if report.total and row_bound:
        from privacy.he_backends import BackendError

        try:
            backend, seconds = store.encode_for_search(row_bound)
        except BackendError as err:
            console.print(f"[yellow]not pre-encoding for encrypted search:[/] {escape(str(err))}")
            return 0
        except VectorStoreError as err:
            console.print(f"[red]error:[/] {escape(str(err))} (--row-bound)")
            return 2
        console.print(f"encoded the rows for encrypted search ({backend}, row bound {row_bound}) in "
                      f"{seconds:.1f} s; cached in {store.path}")
    return 0


def policy_command(action: str, path: str) -> int:
    """``fedclient policy init FILE`` / ``fedclient policy check FILE``."""
    from fedclient.policy import SitePolicy, write_default

    if action == "init":
        try:
            written = write_default(path)
        except FileExistsError as err:
            console.print(f"[red]error:[/] {escape(str(err))}")
            return 2
        console.print(f"wrote {written}: review it, then `fedclient policy check {written}` and "
                      f"`fedclient start --policy {written} ...`")
        return 0
    try:
        policy = SitePolicy.load(path)
    except ValueError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    problems = []
    if policy.search.index and not (pathlib.Path(policy.search.index) / ".fedtune-index").is_dir():
        problems.append(f"search.index {policy.search.index} has no vector store yet (`fedclient index DIR`)")
    if policy.search.querier_key and not pathlib.Path(policy.search.querier_key).is_file():
        problems.append(f"search.querier-key {policy.search.querier_key} does not exist")
    table = Table(title=f"site policy {path}")
    table.add_column("setting")
    table.add_column("value")
    for setting, value in policy.describe():
        table.add_row(setting, value)
    console.print(table)
    for problem in problems:
        console.print(f"[red]error:[/] {escape(str(problem))}")
    if not problems:
        console.print("valid")
    return 2 if problems else 0


def keys(path: str, force: bool) -> int:
    import pathlib

    from fedclient.keys import create_site_keys, fingerprint

    try:
        private, public = create_site_keys(pathlib.Path(path), overwrite=force)
    except FileExistsError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    console.print(f"private key {private} (mode 600: it never leaves this site)")
    console.print(f"public key  {public}  {fingerprint(public)}")
    console.print(f"send {public} to the coordinator's operator: `fedserver enrol DIR SITE --public-key {public}`")
    return 0


def start(args: argparse.Namespace) -> int:
    import os
    import pathlib
    import signal
    import subprocess

    from fedclient.supernode import (
        check_reachable,
        check_tls,
        supernode_command,
        supernode_environment,
    )

    node_config: dict = {"partition-id": args.partition_id, "num-partitions": args.num_partitions}
    if args.data:
        from fedclient.tasks import SiteDataError
        from fedclient.tasks.site_data import read_site_examples

        data = pathlib.Path(args.data).expanduser().resolve()
        try:  # the format now; the labels against the run's task when a run asks for training
            corpus = read_site_examples(data, None)
        except SiteDataError as err:
            console.print(f"[red]error:[/] {escape(str(err))}")
            return 2
        node_config = {"data-dir": str(data)}
        kind = "prompt/completion pairs" if corpus.completions else "labelled rows"
        console.print(escape(f"site data: {len(corpus)} {kind} from {data}"))
    if args.site_name:
        node_config["site-name"] = args.site_name
    # the enrolled key also signs this site's secure-aggregation keys (fedclient/secure_aggregation.py)
    node_config["site-key"] = str(pathlib.Path(args.key).expanduser().resolve())
    if args.device:
        node_config["device"] = args.device
    if args.layer_budget is not None:
        node_config["layer-budget"] = args.layer_budget
    home = pathlib.Path(args.home).expanduser().resolve()
    node_config["state-dir"] = str(pathlib.Path(args.state_dir).expanduser().resolve() if args.state_dir
                                   else home / "state")
    from fedclient.policy import BUILT_IN

    node_config["policy"] = str(pathlib.Path(args.policy).expanduser().resolve()) if args.policy else BUILT_IN
    if args.search_index:
        node_config["search-index"] = str(pathlib.Path(args.search_index).expanduser().resolve())
    if args.querier_key:
        node_config["search-querier-key"] = str(pathlib.Path(args.querier_key).expanduser().resolve())
    if args.query_budget is not None:
        node_config["query-budget"] = args.query_budget
    for key in ("dp_epsilon", "dp_delta", "clip", "dp_noise_multiplier", "dp_ledger"):
        if getattr(args, key) is not None:
            value = getattr(args, key)
            node_config[key.replace("_", "-")] = str(pathlib.Path(value).expanduser().resolve()) \
                if key == "dp_ledger" else value
    try:  # the policy this site will enforce, now rather than at the first message
        from fedclient.policy import site_policy

        policy = site_policy(node_config)
    except ValueError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    if policy.search.index or policy.search.querier_key:
        from fedclient.vector_store import VectorStore, VectorStoreError
        from privacy.vector_search import SearchError, load_trusted_key

        try:  # fail now, not at the first query
            if not (policy.search.index and policy.search.querier_key):
                raise SearchError("encrypted search needs both a search index (--search-index DIR or search.index) "
                                  "and a trusted querier key (--querier-key FILE or search.querier-key)")
            vectors, _ = VectorStore(policy.search.index).load()
            load_trusted_key(pathlib.Path(policy.search.querier_key))
        except (SearchError, VectorStoreError) as err:
            console.print(f"[red]error:[/] {escape(str(err))}")
            return 2
        console.print(f"encrypted search: {len(vectors)} documents in {policy.search.index}, "
                      f"{policy.search.limits.query_budget} queries per querier")
    privacy = policy.privacy
    console.print(f"site policy {policy.source}: local DP "
                  + (f"required (epsilon <= {privacy.max_epsilon_per_run:g} per run, {privacy.max_epsilon_lifetime:g} "
                     f"over the ledger's life)" if privacy.required else "not required")
                  + f"; evaluation {policy.evaluation_mode}; state in {node_config['state-dir']}")
    if not args.no_runtime:  # where a ClientApp process would forward a message (the runtime claims them all)
        from fedclient.runtime import NODE_CONFIG_KEY, socket_path

        node_config[NODE_CONFIG_KEY] = str(socket_path(node_config["state-dir"]))
    try:
        if not args.data and args.partition_id < 0 or args.partition_id >= args.num_partitions:
            raise ValueError(f"--partition-id must be in 0..{args.num_partitions - 1}, got {args.partition_id}")
        check_reachable(args.superlink)  # 1. the address, 2. the CA, then (Flower's admission) 3. the enrolment
        check_tls(args.superlink, pathlib.Path(args.ca))
        command = supernode_command(superlink=args.superlink, ca=pathlib.Path(args.ca), key=pathlib.Path(args.key),
                                    node_config=node_config, runtime_port=args.port,
                                    trusted_publisher=pathlib.Path(args.trusted_publisher),
                                    max_retries=args.max_retries, poll_interval=args.poll_interval,
                                    heartbeat_interval=args.heartbeat_interval,
                                    isolation="subprocess" if args.no_runtime else "process")
    except ValueError as err:
        console.print(f"[red]error:[/] {escape(str(err))}")
        return 2
    home.mkdir(parents=True, exist_ok=True)
    runtime = None
    if not args.no_runtime:  # a long-lived process answers every message with the model kept loaded
        from fedclient.runtime import RuntimeUnavailable, Supervisor

        runtime = Supervisor(node_config["state-dir"], node_config, home / "runtime.log",
                             runtime_api=f"127.0.0.1:{args.port}")  # it claims the SuperNode's tasks
        console.print(f"starting the site runtime (log: {escape(str(runtime.log))})")
        try:
            runtime.start(ready_timeout=None)  # it warms up while the SuperNode connects
        except RuntimeUnavailable as err:
            console.print(f"[red]error:[/] {escape(str(err))}")
            return 1
    console.print(f"starting the SuperNode: {' '.join(command)}")
    refused = stopped_here = clock_refused = False

    def terminate(_signum: int, _frame: object) -> None:  # run the cleanup below on SIGTERM too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # its own session, so the SuperExec it spawns is stopped with it
    with subprocess.Popen(command, env=supernode_environment(home), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True) as process:
        assert process.stdout is not None
        try:
            for line in process.stdout:  # pass Flower's log through, watching for an admission refusal
                sys.stdout.write(line)
                refused = refused or "code: 2004" in line or "Exit Code: 305" in line
                clock_refused = clock_refused or "Invalid timestamp" in line  # node auth's signed-time check
                if refused or process.poll() is not None:
                    break
        except KeyboardInterrupt:
            stopped_here = True
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(2 if sig == signal.SIGTERM else 0)
            if runtime is not None:
                runtime.stop()
        returncode = process.wait()
    if refused and clock_refused:
        console.print("[red]error:[/] the coordinator refused this site's signed request as badly timed: this "
                      "machine's clock is off; `fedclient doctor --time-server pool.ntp.org` measures it (sync it, "
                      "e.g. with chrony)")
        return 3
    if refused:
        from fedclient.keys import fingerprint

        public = pathlib.Path(f"{args.key}.pub")
        console.print(f"[red]error:[/] the coordinator has not enrolled this site's key (Flower exit code 305; its "
                      f"certificate verified with --ca, so the CA is right). Send {escape(str(public))} "
                      f"({escape(fingerprint(public)) if public.is_file() else 'the public key'}) to its operator for "
                      f"`fedserver enrol DIR {escape(args.site_name or 'SITE')} --public-key site.key.pub`")
        return 3
    if stopped_here:
        console.print("stopped the SuperNode")
        return 0
    if returncode != 0:
        console.print(f"[red]error:[/] the SuperNode exited with code {returncode}; its log is above")
    return returncode


def _poll_interval(text: str) -> float | str:
    """``--poll-interval``: seconds in 0.01..3, or ``flower``."""
    if text.strip().lower() == "flower":
        return "flower"
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give seconds (0.01..3) or 'flower', not '{text}'") from None
    if not 0.01 <= seconds <= 3.0:
        raise argparse.ArgumentTypeError(f"must be in 0.01..3 s, got {seconds:g}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedclient", description="fedtune's partner-site client.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("doctor", help="check versions, device, and that tasks load offline")
    check.add_argument("--task", action="append", default=[], help="only check this task (repeatable)")
    check.add_argument("--superlink", default="", help="also check the coordinator's Fleet API HOST:PORT is reachable")
    check.add_argument("--ca", default="", help="... and that its certificate verifies with this CA file")
    check.add_argument("--key", default="", help="also check this site's private key")
    check.add_argument("--data", default="", help="also check this data directory against each --task's classes")
    check.add_argument("--time-server", default="", help="also measure this clock's offset against an NTP server "
                       "HOST[:PORT]; Flower refuses sites > 5 s ahead of the coordinator")
    validate = sub.add_parser("check-data", help="validate a data directory (text,label or prompt,completion) for a task",
                              description="Validate a site's data directory and summarise it. Labelled text: *.csv files "
                              "with a header naming columns text and label, and/or *.jsonl files of objects with text and "
                              "label; labels are the task's class names. For a language-model task (smollm2-*), *.jsonl "
                              "objects with prompt and completion may be given instead: trained on as they are, the "
                              "loss on the completion. An optional split field (train/eval) fixes the local evaluation "
                              "rows.")
    validate.add_argument("directory", help="the directory holding the site's *.csv / *.jsonl files")
    validate.add_argument("--task", default="minilm-bbc", help="the task whose classes the labels must name")
    make_keys = sub.add_parser("keys", help="create this site's key pair (OpenSSH ECDSA P-384)")
    make_keys.add_argument("path", help="private key file to create (PATH.pub gets the public key)")
    make_keys.add_argument("--force", action="store_true", help="replace an existing key (re-enrol afterwards)")
    run = sub.add_parser("start", help="start this site's SuperNode against a coordinator",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--superlink", required=True, help="the coordinator's Fleet API, HOST:PORT")
    run.add_argument("--ca", required=True, help="the coordinator's CA certificate (ca.crt)")
    run.add_argument("--key", required=True, help="this site's private key (from `fedclient keys`)")
    run.add_argument("--trusted-publisher", required=True, help="the publisher key whose signature every app this "
                     "site runs must carry (the coordinator's publisher.key.pub); unsigned apps are refused before "
                     "any of their code runs")
    run.add_argument("--policy", default="", help="this site's policy (TOML, from `fedclient policy init`): what it "
                     "accepts, whatever the coordinator asks; default: the built-in policy `fedclient policy init` "
                     "writes (local DP required, evaluation refused)")
    run.add_argument("--state-dir", default="", help="where this site keeps its privacy ledger and search records "
                     "(default: HOME/state)")
    run.add_argument("--data", default="", help="this site's own data: a directory of CSV/JSONL files with "
                     "text,label, or for a language-model task JSONL with prompt,completion (see `fedclient "
                     "check-data`); without it the site uses a share of the task's built-in corpus "
                     "(--partition-id/--num-partitions)")
    run.add_argument("--partition-id", type=int, default=0, help="which share of a built-in task's data this site uses")
    run.add_argument("--num-partitions", type=int, default=1, help="how many shares the built-in task is split into")
    run.add_argument("--site-name", default="", help="how this site names itself to the coordinator")
    run.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N (default: the best present)")
    run.add_argument("--layer-budget", type=int, default=None, help="layers this site can train (selective-layer)")
    run.add_argument("--dp-epsilon", type=float, default=None, help="require local DP with at most this epsilon per "
                     "run (tightens the policy)")
    run.add_argument("--dp-delta", type=float, default=None, help="require local DP with at most this delta")
    run.add_argument("--clip", type=float, default=None, help="require local DP with at most this clip norm")
    run.add_argument("--dp-noise-multiplier", type=float, default=None, help="require local DP with at least this "
                     "noise multiplier")
    run.add_argument("--dp-ledger", default=None, help="this site's privacy ledger file (default: STATE/privacy-ledger.json)")
    run.add_argument("--search-index", default="", help="answer encrypted searches over this directory's vector "
                     "store (built with `fedclient index DIR`)")
    run.add_argument("--querier-key", default="", help="the querier public key this site trusts for searches "
                     "(the coordinator's querier.key.pub)")
    run.add_argument("--query-budget", type=int, default=None, help="encrypted queries the querier may ask in total "
                     "(default 64, or the policy's search.query-budget: every answer reveals all scores, see the "
                     "README's leakage note)")
    run.add_argument("--port", type=int, default=9094, help="local port (127.0.0.1) of the SuperNode's runtime API, where the site "
                     "runtime claims the SuperNode's tasks")
    run.add_argument("--home", default=".fedclient", help="FLWR_HOME of this SuperNode")
    run.add_argument("--max-retries", type=int, default=None, help="give up after N failed connection attempts")
    run.add_argument("--poll-interval", type=_poll_interval, default=None, metavar="SECONDS|flower",
                     help="how long the SuperNode waits between pulls for messages: default adaptive (0.2 s for a "
                     "minute after a message, so rounds and a search's fetch follow at once; Flower's 3 s when "
                     "idle); SECONDS always (more PullMessages calls when idle; see "
                     "fedclient/supernode_launcher.py); 'flower' for Flower's own 3 s idle wait and 0.5 s reply poll")
    run.add_argument("--heartbeat-interval", type=float, default=None,
                     help="seconds between this site's heartbeats, 10..1800: if the site dies, the coordinator "
                     "gives up on its replies after two missed heartbeats (default: Flower's 30 s, so 60 s)")
    run.add_argument("--no-runtime", action="store_true",
                     help="answer each message in Flower's own per-message ClientApp process (imports and the model "
                     "load are paid at every message) instead of the long-lived site runtime (fedclient/runtime.py)")
    status = sub.add_parser("status", help="what this site's runtime is doing: model loads, memory, last message")
    status.add_argument("--home", default=".fedclient", help="the --home `fedclient start` was given")
    status.add_argument("--state-dir", default="", help="the --state-dir `fedclient start` was given (default: HOME/state)")
    rules = sub.add_parser("policy", help="write or check this site's policy file",
                           description="A site's policy (TOML) says what it accepts whatever the coordinator asks: "
                           "tasks and strategies, required local DP and its limits, federated evaluation, encrypted "
                           "search and its budgets, the largest example count it reports.")
    rules_sub = rules.add_subparsers(dest="policy_command", required=True)
    rules_sub.add_parser("init", help="write the commented default policy").add_argument("file")
    rules_sub.add_parser("check", help="validate a policy and print what it decides").add_argument("file")
    build_index = sub.add_parser("index", help="build or update this site's vector store for encrypted search",
                                 description="Embed the documents in DIR (*.txt: one document per file, id = path; "
                                 "*.jsonl: objects with id and text) with MiniLM and keep the vectors in "
                                 "DIR/.fedtune-index. Re-running embeds only new or changed documents.")
    build_index.add_argument("directory", help="the directory of the site's documents")
    build_index.add_argument("--encoder-weights", default="", help="use a finished run's fine-tuned encoder: the "
                             "file `fedserver export RUN --out FILE.safetensors` wrote")
    build_index.add_argument("--row-bound", type=int, default=10_000, help="encode the rows for encrypted queries "
                             "with this row bound (the coordinator's --row-bound) ahead of time; 0: skip")
    args = parser.parse_args(argv)
    if args.command == "index":
        return index(args.directory, args.encoder_weights, args.row_bound)
    if args.command == "keys":
        return keys(args.path, args.force)
    if args.command == "start":
        return start(args)
    if args.command == "policy":
        return policy_command(args.policy_command, args.file)
    if args.command == "status":
        return runtime_status_command(args.home, args.state_dir)
    if args.command == "check-data":
        return check_data(args.directory, args.task)
    return doctor(args.task, args.superlink, args.ca, args.key, args.data, args.time_server)


if __name__ == "__main__":
    sys.exit(main())
