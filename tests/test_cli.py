"""The command-line faces: fedsim end to end on the tiny task, and its error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import pathlib

import pytest

from fedclient.runconfig import DEFAULT_RUN_CONFIG, resolve_run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fedsim(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200"}, timeout=600,
    )


def test_pyproject_run_config_matches_the_code_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULT_RUN_CONFIG
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedserver.app:app", "clientapp": "fedclient.app:app"}


def test_unknown_run_config_keys_are_refused():
    with pytest.raises(ValueError, match="unknown run-config key"):
        resolve_run_config({"learning-rate": 0.1})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "gpt5"], "unknown task 'gpt5'; choose one of"),
        (["--strategy", "krum"], "unknown strategy 'krum'; choose one of: fedavg"),
        (["--fraction", "1.5"], "--fraction must be between 0 and 1"),
        (["--fraction", "0.05", "--clients", "10"], "samples fewer than one client"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--task", "tiny", "--partition", "natural"], "no natural client ids"),
        (["--task", "tiny", "--clients", "1000"], "cannot split 240 training examples over 1000 clients"),
        (["--train-layers", "encoder.layer.9"], "unknown layer(s) ['encoder.layer.9']"),
        (["--lr", "-1"], "lr must be positive"),
    ],
)
def test_fedsim_run_refuses_bad_input_before_starting(tmp_path, monkeypatch, capsys, args, message):
    """`fedsim run`'s own entry point, in this process (a subprocess per case cost ~3 s of start-up
    each); the CLI test below runs the real console script."""
    from simulations.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.simulation
def test_fedsim_run_writes_a_run_directory_and_list_show_read_it(tmp_path, capsys, monkeypatch):
    """The real command for the run; list/show/refusals through the CLI's own entry point, in this
    process (each subprocess cost seconds of start-up)."""
    from simulations import cli

    monkeypatch.setattr(cli.console, "width", 200)  # tables at a terminal's width, not pytest's 80 columns
    out = tmp_path / "myrun"
    result = fedsim("run", "--task", "tiny", "--clients", "2", "--rounds", "2", "--local-steps", "2",
                    "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final central accuracy" in result.stdout and "MB down" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["total_bytes_down"] > 0 and summary["final_central_accuracy"] is not None
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "store.db").is_file()

    def fedsim_here(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, " ".join(captured.err.split())

    code, listed, _ = fedsim_here("list", "--runs-dir", str(tmp_path))
    assert code == 0 and summary["run_id"] in listed and "completed" in listed
    code, shown, err = fedsim_here("show", summary["run_id"][:15], "--runs-dir", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(shown)["rounds"] == summary["rounds"]
    code, by_dir, _ = fedsim_here("show", str(out))
    assert code == 0 and "central acc" in by_dir
    code, _, err = fedsim_here("show", "nope", "--runs-dir", str(tmp_path))
    assert code == 2 and "no run 'nope'" in err
    code, _, err = fedsim_here("run", "--task", "tiny", "--out", str(out))
    assert code == 2 and "exists and is not empty" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.simulation
def test_flwr_run_runs_the_flower_app_from_pyproject(tmp_path):
    """`flwr run .` builds the FAB from pyproject.toml and runs our ServerApp/ClientApp."""
    bin_dir = pathlib.Path(sys.executable).parent
    http_port, control_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    }
    store = tmp_path / "flwr.db"
    before = (ROOT / "pyproject.toml").read_text()
    try:
        result = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "--stream",
             "--run-config", f'task="tiny" num-server-rounds=1 local-steps=1 store="sqlite:///{store}"',
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:  # the local SuperLink that `flwr run` started outlives it: stop it by its port
        subprocess.run(["pkill", "-f", f"flower-superlink.*--port {http_port}"], check=False)
    assert (ROOT / "pyproject.toml").read_text() == before
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from fedserver.store import RunStore

    (run,) = RunStore(f"sqlite:///{store}").list_runs()
    assert run.status == "completed" and run.task == "tiny" and run.num_rounds == 1
