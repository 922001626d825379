"""The operator's and the site's mistakes, caught on the real command-line entry points before
anything is submitted or started, with messages that say what is wrong and what to do (issue
#18). The same paths end to end over TLS are in tests/test_deployment.py (a failed run's exit
code, the Flower id `fedserver show` takes, CA versus enrolment, withheld training loss)."""

from __future__ import annotations

import pathlib

import pytest

from fedserver import cli as fedserver_cli
from fedserver import deployment as dep
from fedserver.run_config import RunConfigError, check_run_config, parse_run_config_args


def _said(capsys) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


@pytest.fixture(scope="module")
def coord(tmp_path_factory) -> pathlib.Path:
    """A deployment directory with no SuperLink running: nothing can be submitted to it."""
    directory = tmp_path_factory.mktemp("operator") / "coord"
    dep.init(directory, ["127.0.0.1"], fleet_port=1, control_port=2, fleet_host="127.0.0.1")
    return directory


@pytest.mark.parametrize("args, expected", [
    (["--strategy", "fedavgg"], "unknown strategy 'fedavgg'; did you mean 'fedavg'?"),
    (["--task", "tinny"], "unknown task 'tinny'; did you mean 'tiny'?"),
    (["--run-config", "local_steps=2"], "unknown key 'local_steps'; did you mean 'local-steps'?"),
    (["--run-config", 'local-steps="2"'], "local-steps must be a whole number, got '2' (e.g. local-steps=4)"),
    (["--run-config", 'codec="topk:2"'], "codec"),
    (["--run-config", 'dp="gaussian" fraction-evaluate=0.5'], "with dp on, use central evaluation only"),
    (["--run-config", 'store="sqlite:///elsewhere.db"'], "store is the deployment's own"),
    (["--run-config", "local-steps=2 lr=oops"], "cannot be read: use key=value pairs"),
    (["--run-config", 'resume="no-such-run"'], "resume: no run 'no-such-run'"),
    (["--run-config", "local-steps=2 lr 0.001"], "'lr 0.001' is not a key=value pair"),
    (["--run-config", "seed=-1"], "seed must be a whole number >= 0"),
    (["--run-config", "zzzz=1"], "unknown key 'zzzz'; the keys are:"),
    (["--run-config", "run-name='a\tb'"], "control characters"),
    (["--run-config", 'run-name="it\'s a\\\\b"'], "cannot hold ' together with"),  # the value: it's a\b
])
def test_fedserver_run_refuses_a_bad_run_config_before_submitting(coord, capsys, args, expected) -> None:
    """Nothing is submitted (no SuperLink runs here: a submission would fail differently), exit 2."""
    assert fedserver_cli.main(["run", str(coord), "--task", "tiny", *args]) == 2
    said = _said(capsys)
    assert expected in said, said
    assert "nothing was submitted" in said
    assert not list((coord / "apps").glob("*")), "the app was staged: something went further than the check"


def test_run_config_text_is_read_as_flwr_run_reads_it(coord, capsys) -> None:
    """`flwr run`'s syntax: quoted strings keep their spaces (the old split on whitespace broke
    them), and what fedserver passes on parses back to the same values."""
    from flwr.common.config import parse_config_args

    config = parse_run_config_args(['run-name="my first run" local-steps=2 codec="topk:0.02+q8"', "lr=0.001"])
    assert config == {"run-name": "my first run", "local-steps": 2, "codec": "topk:0.02+q8", "lr": 0.001}
    assert parse_config_args([dep.run_config_text({**config, "quote": 'say "hi"'})]) == {**config, "quote": 'say "hi"'}
    backslashed = {"run-name": "a\\bc", "tail": "ends in \\"}  # TOML escapes inside "...": single quotes keep them
    assert parse_config_args([dep.run_config_text(backslashed)]) == backslashed
    assert fedserver_cli.main(["run", str(coord), "--run-config", 'run-name="my first run" local_steps=2']) == 2
    said = _said(capsys)
    assert "local_steps" in said and "run-name" not in said  # one problem, and it is not the quoted name


def test_every_problem_is_reported_at_once_with_what_to_do() -> None:
    with pytest.raises(RunConfigError) as caught:
        check_run_config({"strategy": "ferett", "task": "minilm-bbcc", "fraction-train": 2.0, "partition": "iid"})
    problems = caught.value.problems
    assert any("did you mean 'ferret'?" in p for p in problems) and any("did you mean 'minilm-bbc'?" in p
                                                                        for p in problems)
    with pytest.raises(RunConfigError, match="fraction-train must be between 0 and 1"):
        check_run_config({"fraction-train": 2.0})
    assert check_run_config({"task": "tiny"})["strategy"] == "fedavg"  # defaults fill the rest


def test_resume_of_another_strategy_or_a_run_that_cannot_resume_is_refused_before_submitting(coord, capsys) -> None:
    from fedserver.store import RunStore

    store = RunStore(dep.Deployment.load(coord).store_url)
    done = store.create_run(task="tiny", strategy="fedavg", num_rounds=2, config={}, name="done", num_clients=2)
    assert fedserver_cli.main(["run", str(coord), "--task", "tiny", "--strategy", "ferret", "--run-config",
                               f'resume="{done}"']) == 2
    said = _said(capsys)
    assert "is fedavg on tiny; resume it with the same task and strategy" in said and "nothing was submitted" in said
    assert not list((coord / "apps").glob("*"))


def test_error_text_with_brackets_is_printed_whole(capsys, tmp_path, monkeypatch) -> None:
    """rich reads ``[...]`` as markup; errors are escaped, so nothing of them disappears."""
    from simulations import cli as fedsim_cli

    assert fedsim_cli.main(["run", "--task", "[bold]tiny[/bold]"]) == 2
    assert "unknown task '[bold]tiny[/bold]'" in _said(capsys)
    monkeypatch.chdir(tmp_path)  # the relative store path below is made here, not in the checkout
    assert fedserver_cli.main(["--store", "sqlite:///[x]/nope.db", "show", "[abc]"]) == 2
    assert "[abc]" in _said(capsys)
    from fedserver.report import runs_table
    from fedserver.store import RunStore
    from rich.console import Console

    store = RunStore(f"sqlite:///{tmp_path}/runs.db")
    store.create_run(task="tiny", strategy="fedavg", num_rounds=1, config={}, name="[red]mine[/red]", num_clients=1)
    console = Console(record=True, width=300)
    console.print(runs_table([(r, store.url) for r in store.list_runs()], {}))
    assert "[red]mine[/red]" in console.export_text()  # the operator's name, not a style


def test_check_data_points_at_the_line_where_a_quote_is_left_open(tmp_path, capsys) -> None:
    from fedclient import cli as fedclient_cli

    (tmp_path / "export.csv").write_text(
        'text,label\n'
        '"Shares rose, the bank said.",business\n'
        '"A text over\ntwo lines",tech\n'
        '"The striker scored,sports\n'  # line 5: the quote is never closed
        'The minister spoke.,politics\n')
    assert fedclient_cli.main(["check-data", str(tmp_path), "--task", "tiny"]) != 0
    said = _said(capsys)
    assert "export.csv:5: a quote opened in this record is never closed" in said, said
    assert "label None" not in said and "export.csv:6" not in said


def test_train_loss_under_local_dp_reads_withheld_not_nan() -> None:
    from fedserver.strategy import train_loss_text

    assert train_loss_text(None, local_dp=True) == "train-loss withheld (local DP)"
    assert train_loss_text(0.0, local_dp=False) == "train-loss 0.0000"  # a real zero is not missing
    assert "nan" not in train_loss_text(None, local_dp=False)
