"""``fedclient``: the partner site's command line.

``fedclient doctor`` checks this site can take part: Python and library versions, the device the
client will train on (CUDA when present), and that each task's model and data load offline.
Enrolment and starting a SuperNode come with issue #8.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from rich.console import Console
from rich.table import Table

from fedclient.runconfig import quiet_environment

quiet_environment()
console = Console()


def doctor(task_names: list[str]) -> int:
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
            table.add_row(f"task {name}", "[red]fail[/]", str(err))
    console.print(table)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedclient", description="fedtune's partner-site client.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("doctor", help="check versions, device, and that tasks load offline")
    check.add_argument("--task", action="append", default=[], help="only check this task (repeatable)")
    args = parser.parse_args(argv)
    return doctor(args.task)


if __name__ == "__main__":
    sys.exit(main())
