"""A coordinator the sites do not trust: every move it can make against a site, through the real
ClientApp handlers (and the real SuperNode hook), is refused or neutralised by the site's own
policy and node config.

Each test sends what a hostile coordinator can send (it writes the run config, every instruction
and every message) and checks what leaves the site.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from aggregators import make_algorithm
from fedclient.app import build_client_app
from fedclient.wire import ARRAYS, CONFIG, refusal_reason, to_recorddict
from fedclient.policy import BUILT_IN
from privacy.accounting import LedgerFile, Release


ROOT = pathlib.Path(__file__).resolve().parents[1]
DP_RUN = {"dp": "gaussian", "dp-epsilon": 100.0, "dp-delta": 1e-3, "clip": 5.0, "dp-noise-multiplier": 0.0,
          "dp-releases": 3}


def _policy(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _deliver(app, message_type: str, content: RecordDict, node_config: dict, run_config: dict | None = None,
             run_id: int = 7, state: RecordDict | None = None) -> Message:
    """What the SuperNode does for one message: a Context with the site's node config and the
    run config the coordinator chose, then the ClientApp."""
    message = Message(content, dst_node_id=1, message_type=message_type)
    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    context = Context(run_id=run_id, node_id=1, node_config=node_config, state=state if state is not None else RecordDict(),
                      run_config=run_config or {"task": "tiny"})
    return app(message, context)


def _train_content(config: dict | None = None, server_round: int = 1) -> RecordDict:
    """A FedAvg instruction for the tiny task, as the coordinator's strategy sends it."""
    from fedclient.tasks import get_task

    task = get_task("tiny")
    model = task.build_model()
    keys = task.trainable_keys(model, list(task.train_layers))
    algorithm = make_algorithm("fedavg", {"local-steps": 1, "batch-size": 4})
    state = algorithm.init_state({k: v for k, v in model.state_dict().items() if k in keys})
    (instruction,) = algorithm.plan(server_round, [11], state).values()
    parts = instruction.to_record()
    parts.config = {**parts.config, "strategy": "fedavg", "server-round": server_round, **(config or {})}
    return to_recorddict(parts)


NODE = {"partition-id": 0, "num-partitions": 2}  # no policy: a SuperNode started by hand gets the built-in one
OPEN = '[privacy]\nrequired = false\n[evaluation]\nmode = "exact"\n'  # a site that opted out of DP, in writing


@pytest.fixture(scope="module")
def app():
    return build_client_app({"task": "tiny"})


# ---- local DP: the site's policy, never the run's --------------------------------------------------
def test_dp_off_towards_a_site_that_requires_it_is_declined(app, tmp_path, flower_identity) -> None:
    node = {**NODE, "policy": _policy(tmp_path, "[privacy]\nrequired = true\n"), "state-dir": str(tmp_path / "state")}
    reply = _deliver(app, "train", _train_content({"dp": "off"}), node)
    reason = refusal_reason(reply.content)
    assert reason and reason.startswith("site policy privacy.required")
    assert ARRAYS not in reply.content  # nothing trained, nothing sent
    node_flags = {**NODE, "policy": BUILT_IN, "dp-epsilon": 2.0,  # fedclient start --dp-epsilon 2
                  "state-dir": str(tmp_path / "flags")}
    assert "privacy.required" in refusal_reason(_deliver(app, "train", _train_content({"dp": "off"}), node_flags).content)
    for fail_open in ({**NODE, "state-dir": str(tmp_path / "hand")},  # flower-supernode started by hand, no policy
                      {**NODE, "policy": _policy(tmp_path, '[search]\nmax-k = 5\n')}):  # a policy silent on privacy
        assert "privacy.required" in refusal_reason(_deliver(app, "train", _train_content({"dp": "off"}), fail_open).content)
        assert "evaluation.mode" in refusal_reason(_deliver(app, "evaluate", RecordDict(), fail_open).content)
    laplace_only = {**NODE, "policy": _policy(tmp_path, '[privacy]\nrequired = true\nmechanisms = ["laplace"]\n')}
    assert "privacy.mechanisms" in refusal_reason(_deliver(app, "train", _train_content(DP_RUN), laplace_only).content)


def test_a_weaker_epsilon_or_delta_than_the_policy_gets_the_policys(app, tmp_path, flower_identity) -> None:
    node = {**NODE, "state-dir": str(tmp_path / "state"), "policy": _policy(tmp_path, """
        [privacy]
        required = true
        max-epsilon-per-run = 2.0
        max-epsilon-lifetime = 5.0
        max-delta = 1e-6
        max-clip = 0.5
    """)}
    reply = _deliver(app, "train", _train_content(DP_RUN), node)  # the run asks ε = 100, δ = 1e-3, clip 5
    metrics = dict(reply.content["metrics"])
    assert (metrics["dp-epsilon-budget"], metrics["dp-delta"], metrics["dp-clip"]) == (2.0, 1e-6, 0.5)
    assert 0 < metrics["dp-epsilon-spent"] <= 2.0 and metrics["num-examples"] == 1  # withheld under DP
    ledger = LedgerFile(tmp_path / "state" / "privacy-ledger.json", 5.0, 1e-6).read()  # in the state dir
    assert len(ledger.entries) == 1 and ledger.entries[0].run == "flower-run-7"
    spent = ledger.spent_in_run("flower-run-7", 1e-6)
    assert spent == pytest.approx(metrics["dp-epsilon-spent"])
    # a new run (or a resume: a new Flower run) starts from the same ledger: the lifetime cap holds
    for run_id in range(100, 110):
        reply = _deliver(app, "train", _train_content({**DP_RUN, "dp-releases": 1}), node, run_id=run_id)
        if refusal_reason(reply.content):
            break
    assert "privacy budget" in refusal_reason(reply.content) and "lifetime" in refusal_reason(reply.content)
    assert LedgerFile(tmp_path / "state" / "privacy-ledger.json", 5.0, 1e-6).read().spent() <= 5.0


def test_a_site_started_with_dp_flags_or_a_policy_without_delta_keeps_delta_and_lifetime(app, tmp_path,
                                                                                       flower_identity) -> None:
    """``fedclient start --dp-epsilon 2`` (the built-in policy, tightened) caps the run and the site's
    lifetime at ε = 2, and the δ of every account is the site's (its policy's ``max-delta``, the
    built-in 1e-6 where the file says none): a coordinator asking ``dp-delta = 0.9`` or starting new
    runs gets neither weaker noise nor a fresh budget."""
    from fedclient.policy import site_policy

    flags = {**NODE, "policy": BUILT_IN, "dp-epsilon": 2.0, "state-dir": str(tmp_path / "flags")}
    assert (site_policy(flags).privacy.max_epsilon_lifetime, site_policy(flags).privacy.max_delta) == (2.0, 1e-6)
    metrics = dict(_deliver(app, "train", _train_content({**DP_RUN, "dp-delta": 0.9}), flags).content["metrics"])
    assert metrics["dp-delta"] == 1e-6 and metrics["dp-epsilon-budget"] == 2.0
    for run_id in range(20, 30):  # fresh Flower runs (or resumes) do not reset the budget
        reply = _deliver(app, "train", _train_content({**DP_RUN, "dp-delta": 0.9, "dp-releases": 1}), flags,
                         run_id=run_id)
        if refusal_reason(reply.content):
            break
    assert "lifetime" in refusal_reason(reply.content)
    assert LedgerFile(tmp_path / "flags" / "privacy-ledger.json", 2.0, 1e-6).read().spent() <= 2.0
    partial = {**NODE, "policy": _policy(tmp_path, "[privacy]\nrequired = true\nmax-epsilon-lifetime = 3.0\n")}
    assert site_policy(partial).privacy.max_delta == 1e-6  # not the run's to choose
    built_in = site_policy({**NODE, "policy": BUILT_IN})  # `fedclient start` without --policy
    assert built_in.privacy.required and built_in.evaluation_mode == "refuse"


def test_federated_evaluation_is_refused_or_noised_and_charged(app, tmp_path, flower_identity) -> None:
    from fedclient.tasks import get_task

    model = get_task("tiny").build_model()
    weights = to_recorddict(make_algorithm("fedavg").plan(1, [1], {k: v for k, v in model.state_dict().items()
                                                                   if k.startswith("head")})[1].to_record())
    content = RecordDict({ARRAYS: weights[ARRAYS], CONFIG: ConfigRecord({"server-round": 1})})
    refusing = {**NODE, "policy": _policy(tmp_path, "[privacy]\nrequired = true\n")}
    assert "evaluation.mode" in refusal_reason(_deliver(app, "evaluate", content, refusing).content)
    noised_policy = tmp_path / "noised"
    noised_policy.mkdir()
    node = {**NODE, "state-dir": str(tmp_path / "state"), "policy": _policy(noised_policy, """
        [privacy]
        required = true
        max-epsilon-per-run = 100000.0
        max-epsilon-lifetime = 100000.0
        max-delta = 1e-6
        [evaluation]
        mode = "noised"
        noise-multiplier = 0.1  # small enough not to clamp: values differ
    """)}
    exact = dict(_deliver(app, "evaluate", content, {**NODE, "policy": _policy(tmp_path, OPEN)}).content["metrics"])
    noisy = [dict(_deliver(app, "evaluate", content, node).content["metrics"]) for _ in range(3)]
    assert all(m["num-examples"] == 1 and 0 <= m["accuracy"] <= 1 for m in noisy)
    assert len({m["accuracy"] for m in noisy}) > 1 and any(m["accuracy"] != exact["accuracy"] for m in noisy)
    ledger = LedgerFile(tmp_path / "state" / "privacy-ledger.json", 1e5, 1e-6).read()
    assert len(ledger.entries) == 3 and all(e.release == Release("gaussian", 0.1) for e in ledger.entries)  # charged
    laplace_dir = tmp_path / "laplace"  # a site that accepts only Laplace noise evaluates with Laplace noise
    laplace_dir.mkdir()
    laplace = {**node, "state-dir": str(tmp_path / "laplace-state"), "policy": _policy(laplace_dir, (
        noised_policy / "policy.toml").read_text().replace("required = true", 'required = true\nmechanisms = ["laplace"]'))}
    assert 0 <= dict(_deliver(app, "evaluate", content, laplace).content["metrics"])["accuracy"] <= 1
    (entry,) = LedgerFile(tmp_path / "laplace-state" / "privacy-ledger.json", 1e5, 1e-6).read().entries
    assert entry.release == Release("laplace", 0.1)


def test_example_counts_are_capped_and_refusals_never_quote_site_data(app, tmp_path, flower_identity) -> None:
    node = {**NODE, "policy": _policy(tmp_path, OPEN + "[training]\nmax-num-examples = 7\n")}
    reply = _deliver(app, "train", _train_content(), node)
    assert dict(reply.content["metrics"])["num-examples"] == 7  # the site trained on more; it reports at most 7
    only = {**NODE, "policy": _policy(tmp_path, '[training]\ntasks = ["minilm-drugs"]\n')}
    assert refusal_reason(_deliver(app, "train", _train_content(), only).content).startswith("site policy training.tasks")
    data = tmp_path / "private-oncology-export"
    data.mkdir()
    (data / "patients-2026.csv").write_text("text,label\nhistory of stage IV carcinoma,diagnosis-carcinoma-IV\n")
    reason = refusal_reason(_deliver(app, "train", _train_content(), {"data-dir": str(data),
                                                                       "policy": _policy(tmp_path, OPEN)}).content)
    assert reason.startswith("site data:")
    for secret in ("carcinoma", "patients-2026", "oncology", str(data)):
        assert secret not in reason


def test_a_round_asking_more_work_than_the_policy_allows_is_declined_before_any_is_done(app, tmp_path,
                                                                                     flower_identity) -> None:
    """Steps, batch size, accumulation and sequence length are the site's to bound: the built-in
    policy's limits hold against a hostile instruction or run config, before a model is loaded;
    an out-of-range learning-rate schedule fails the round instead of training with it."""
    node = {**NODE, "policy": _policy(tmp_path, OPEN)}  # the file leaves [training] out: built-in limits
    for config, key in (({"local-steps": 10**6}, "max-local-steps"), ({"batch-size": 100_000}, "max-batch-size"),
                        ({"grad-accumulation": 64}, "max-grad-accumulation"), ({"zo-steps": 10**9}, "max-local-steps")):
        reason = refusal_reason(_deliver(app, "train", _train_content(config), node).content)
        assert reason.startswith(f"site policy training.{key}"), reason
    reason = refusal_reason(_deliver(app, "train", _train_content(), node, {"task": "tiny", "max-length": 2048}).content)
    assert reason.startswith("site policy training.max-sequence-length")
    assert "training.max-sequence-length" in refusal_reason(
        _deliver(app, "evaluate", RecordDict(), node, {"task": "tiny", "max-length": 2048}).content)
    wider = {**NODE, "policy": _policy(tmp_path, OPEN + "[training]\nmax-local-steps = 3\n")}
    assert "training.max-local-steps" in refusal_reason(_deliver(app, "train", _train_content({"local-steps": 4}),
                                                                 wider).content)
    assert dict(_deliver(app, "train", _train_content({"local-steps": 3, "schedule-steps": 3}), wider).content["metrics"])["num-examples"]
    hostile_schedule = _deliver(app, "train", _train_content({"warmup-steps": 1, "schedule-step": -10**6}), node)
    assert hostile_schedule.has_error() and "ValueError" in hostile_schedule.error.reason
    assert not hostile_schedule.has_content()  # nothing trained is sent


def test_errors_and_spent_budgets_stay_in_the_site_log(app, tmp_path, flower_identity, capfd) -> None:
    """An unexpected error (here an unreadable ledger) reaches the coordinator as its type only,
    its text (which names the site's files) goes to the site's log; a spent budget is refused
    naming the policy key, without what this site spent."""
    import re

    state = tmp_path / "private-hospital-state"
    (state).mkdir()
    (state / "privacy-ledger.json").write_text("{not json")
    node = {**NODE, "state-dir": str(state), "policy": _policy(tmp_path, "[privacy]\nmax-delta = 1e-3\n")}
    reply = _deliver(app, "train", _train_content({**DP_RUN, "dp-epsilon": 1.0}), node)
    assert reply.has_error() and reply.error.reason.startswith("the site could not process this message (ValueError")
    assert "private-hospital" not in reply.error.reason and "ledger" not in reply.error.reason
    assert "private-hospital-state/privacy-ledger.json is unreadable" in capfd.readouterr().err  # the site's log
    (state / "privacy-ledger.json").unlink()
    tight = {**node, "dp-epsilon": 0.5}
    for run_id in range(40, 50):
        reply = _deliver(app, "train", _train_content({**DP_RUN, "dp-releases": 1}), tight, run_id=run_id)
        if refusal_reason(reply.content):
            break
    reason = refusal_reason(reply.content)
    assert reason.startswith("site policy privacy.max-epsilon-")
    assert not re.search(r"\d", reason.split(":", 1)[1]), reason  # no spent or budget figure
    log = capfd.readouterr().err
    assert "spent so far" in log or "spent in this run" in log  # the figures stay in the site's log
    hand_started = {**NODE, "policy": node["policy"]}  # no state-dir: no ledger outlives the run
    reason = refusal_reason(_deliver(app, "train", _train_content({**DP_RUN, "dp-epsilon": 1.0}), hand_started).content)
    assert reason.startswith("site policy privacy.ledger")


# ---- the ledger: persistent, locked, durable -----------------------------------------------------------
RACER = """
import json, sys, uuid
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
from fedclient.app import build_client_app
from tests.test_hostile_coordinator import DP_RUN, _deliver, _train_content
app = build_client_app({"task": "tiny"})
node = json.loads(sys.argv[1])
content = _train_content({**DP_RUN, "dp-releases": 50})
print("ready", flush=True)
sys.stdin.readline()  # both processes start charging at the same moment
for i in range(int(sys.argv[2])):
    reply = _deliver(app, "train", content, node, run_id=int(sys.argv[3]))
    assert "metrics" in reply.content, reply.content
print("done", flush=True)
"""


CHARGER = """
import sys
from privacy.accounting import LedgerFile, Release
store = LedgerFile(sys.argv[1], 1e12, 1e-5)
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    with store.transaction() as ledger:  # read, add one release, write: lost updates without the lock
        ledger.charge(i, sys.argv[3], [Release("gaussian", 3.0)])
print("done", flush=True)
"""


def _race(script: str, args: list[list[str]]) -> None:
    """Start one process per argument list, release them at the same moment, wait for both."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [subprocess.Popen([sys.executable, "-c", script, *a], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for a in args]
    try:
        for racer in racers:
            assert racer.stdout.readline().strip() == "ready"
        for racer in racers:
            racer.stdin.write("go\n")
            racer.stdin.flush()
        for racer in racers:
            assert racer.stdout.readline().strip() == "done"
            assert racer.wait(timeout=120) == 0
    finally:
        for racer in racers:
            racer.kill()


def test_two_clientapp_processes_racing_on_one_ledger_both_count(tmp_path) -> None:
    """Two processes charging one ledger in a tight loop (hundreds of overlapping read-modify-writes),
    then two real ClientApps training under DP at once: every charge is on file."""
    path = tmp_path / "tight" / "privacy-ledger.json"
    _race(CHARGER, [[str(path), "150", "run-a"], [str(path), "150", "run-b"]])
    runs = [e.run for e in LedgerFile(path, 1e12, 1e-5).read().entries]
    assert (runs.count("run-a"), runs.count("run-b")) == (150, 150)
    node = {**NODE, "state-dir": str(tmp_path / "state"), "policy": _policy(tmp_path, """
        [privacy]
        max-epsilon-per-run = 1000.0
        max-epsilon-lifetime = 1e9
        max-delta = 1e-3
        max-clip = 5.0
    """)}
    _race(RACER, [[json.dumps(node), "4", str(run)] for run in (1, 2)])
    ledger = LedgerFile(tmp_path / "state" / "privacy-ledger.json", 1e12, 1e-3).read()
    runs = [e.run for e in ledger.entries]
    assert (runs.count("flower-run-1"), runs.count("flower-run-2")) == (4, 4)  # 8 charges, none lost


WRITER = """
import sys
from privacy.accounting import LedgerFile, Release
store = LedgerFile(sys.argv[1], 1e12, 1e-5)
for i in range(100000):
    with store.transaction() as ledger:
        ledger.charge(i, "run", [Release("gaussian", 1.0 + i % 7)])
    print(i + 1, flush=True)  # committed: the release may leave the site now
"""


def test_a_sigkill_during_ledger_writes_never_rolls_it_back(tmp_path) -> None:
    path = tmp_path / "privacy-ledger.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = np.random.default_rng(0)
    total = 0
    for attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "1"  # writing now
        time.sleep(float(rng.uniform(0.05, 0.5)))  # then killed somewhere inside a write, most likely
        writer.send_signal(signal.SIGKILL)
        printed = [int(line) for line in writer.communicate()[0].split()]
        committed = max([1, *printed])  # this process reported these releases as charged
        entries = json.loads(path.read_text())["entries"]  # never a torn file
        assert len(entries) >= total + committed, (attempt, len(entries), total, committed)  # nothing lost
        total = len(entries)
    assert path.stat().st_mode & 0o777 == 0o600


# ---- encrypted search: the site's settings only ---------------------------------------------------------
@pytest.fixture(scope="module")
def search_site(tmp_path_factory):
    from fedclient.vector_store import VectorStore
    from privacy.vector_search import KeyEpoch, QuerierIdentity

    root = tmp_path_factory.mktemp("search")
    docs = root / "docs"
    docs.mkdir()
    for i, text in enumerate(["rates rise", "cup final", "new phone", "election called", "oil falls", "film prize"]):
        (docs / f"d{i}.txt").write_text(text)
    VectorStore(docs).build()
    identity = QuerierIdentity.load_or_create(root / "querier.key")
    attacker = QuerierIdentity.load_or_create(root / "attacker.key")
    epoch = KeyEpoch.create(identity, "tenseal")
    return root, docs, identity, attacker, epoch


def _search_message(app, kind: str, node: dict, run_config: dict, **fields) -> Message:
    return _deliver(app, "query.search", RecordDict({"search": ConfigRecord({"kind": kind, **fields})}), node,
                    run_config)


def test_budget_index_and_key_paths_in_the_run_config_are_ignored(app, search_site, tmp_path, flower_identity) -> None:
    """The site's budget, index and trusted key come from its policy file alone: the same settings
    in the run config (where the coordinator used to be able to put them) change nothing."""
    from privacy.vector_search import KeyEpoch, Querier

    root, docs, identity, attacker, epoch = search_site
    policy = _policy(tmp_path, f"""
        [search]
        index = "{docs}"
        querier-key = "{root / 'querier.key.pub'}"
        query-budget = 2
    """)
    node = {"policy": policy, "state-dir": str(tmp_path / "state")}  # no search flags at all
    hostile = {"task": "tiny", "query-budget": 1_000_000, "search-index-root": str(tmp_path / "elsewhere"),
               "search-index": "/etc", "search-querier-key": str(root / "attacker.key.pub")}
    assert refusal_reason(_search_message(app, "keys", node, hostile, bundle=epoch.bundle.to_bytes()).content) is None
    foreign = KeyEpoch.create(attacker, "tenseal")
    refused = _search_message(app, "keys", node, hostile, bundle=foreign.bundle.to_bytes())
    assert "does not trust" in refusal_reason(refused.content)  # the run config's key is not trusted
    querier = Querier(identity, epoch)
    vector = np.random.default_rng(0).normal(size=384)
    for _ in range(2):
        answer = _search_message(app, "query", node, hostile, **querier.encrypt(vector, k=2, row_bound=100).to_record())
        assert refusal_reason(answer.content) is None and len(answer.content["search-reply"]["results"]) == 1
    third = _search_message(app, "query", node, hostile, **querier.encrypt(vector, k=2, row_bound=100).to_record())
    assert "query budget exhausted" in refusal_reason(third.content)  # the policy's 2, not 1,000,000
    bare = {"state-dir": str(tmp_path / "bare")}  # a site that offers no search: the run config cannot add one
    assert "search.index" in refusal_reason(_search_message(app, "keys", bare, hostile,
                                                             bundle=epoch.bundle.to_bytes()).content)


def test_fetch_of_rows_not_answered_or_more_than_k_is_refused(app, search_site, tmp_path, flower_identity) -> None:
    from privacy.vector_search import FetchRequest, Querier

    root, docs, identity, _, epoch = search_site
    node = {"search-index": str(docs), "search-querier-key": str(root / "querier.key.pub"),
            "state-dir": str(tmp_path / "state")}
    _search_message(app, "keys", node, {}, bundle=epoch.bundle.to_bytes())

    def fetch(query_id: str, rows) -> Message:
        unsigned = FetchRequest(query_id, tuple(rows), identity.public_bytes)
        return _search_message(app, "fetch", node, {}, **{"query-id": query_id, "rows": list(rows),
                                                          "querier": identity.public_bytes,
                                                          "signature": identity.sign(unsigned.digest())})

    assert "did not answer" in refusal_reason(fetch("a" * 16, range(6)).content)  # enumerate every id
    query = Querier(identity, epoch).encrypt(np.random.default_rng(1).normal(size=384), k=2, row_bound=100)
    assert refusal_reason(_search_message(app, "query", node, {}, **query.to_record()).content) is None
    assert "asks for 6 rows" in refusal_reason(fetch(query.query_id, range(6)).content)
    ids = fetch(query.query_id, [3, 0]).content["search-reply"]["ids"]
    assert ids == ["d3", "d0"]
    assert "fetched already" in refusal_reason(fetch(query.query_id, [1, 2]).content)


# ---- identity: the enrolled name, bound to the key -------------------------------------------------------
def test_a_site_claiming_another_enrolled_name_is_refused(flower_identity) -> None:
    from fedserver.strategy import AlgorithmStrategy, stable_client_id
    from tests.grids import IdentifyingGrid

    grid = IdentifyingGrid({101: "site-a", 202: "site-a", 303: "site-c"})  # node 202 claims site-a's name
    strategy = AlgorithmStrategy(make_algorithm("fedavg"), enrolled={101: "site-a", 202: "site-b"})
    sampled = strategy._sample(grid, 1, 1.0, "train")
    assert [s.name for s in sampled] == ["site-a"]
    assert "claims to be 'site-a' but its key is enrolled as 'site-b'" in strategy.retired[stable_client_id("site-b")]
    assert "not enrolled" in strategy.retired[stable_client_id("node-303")]
    assert strategy._sites[101].client_id == stable_client_id("site-a")  # seeds and state follow the enrolled name


# ---- code: only apps signed by the trusted publisher run -------------------------------------------------
def _supernode_fixture(fab: bytes, signature: str):
    """A real NodeState/ObjectStore and the four Fleet calls a SuperNode makes for a new run."""
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory

    from fedclient.app_trust import fab_hash

    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state, store = factory.state(), factory.objectstore_factory.store()
    state.set_node_id(1)
    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id
    objects = get_all_nested_objects(message)
    run = Run.create_empty(message.metadata.run_id)
    run.fab_hash = fab_hash(fab)
    run.override_config = {"fab-signature": signature} if signature else {}
    calls = {"receive": [(message, get_object_tree(message))]}
    return dict(state=state, object_store=store, node_config={},
                receive=lambda: calls["receive"].pop() if calls["receive"] else None,
                get_run=lambda run_id: run, get_fab=lambda fab_hash_, run_id: Fab(fab_hash_, fab, {}),
                pull_object=lambda run_id, object_id: objects[object_id].deflate(),
                confirm_message_received=lambda run_id, message_id: None, trusted_entities=None), message


def test_an_unsigned_or_foreign_signed_app_is_refused_by_the_supernode(flower_identity) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from flwr.common.constant import ErrorCode
    from flwr.supernode import start_client_internal

    from fedclient import supernode_launcher
    from fedclient.app_trust import fab_hash, sign_fab

    from flwr.cli.build import build_fab_from_files

    publisher, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    fab, _ = build_fab_from_files({"app.py": b"import os  # would run at the site with its data in reach\n",
                                   "pyproject.toml": PROBE_APP})
    original = start_client_internal._pull_and_store_message
    try:
        supernode_launcher.install_app_check(publisher.public_key())
        for signature, why in (("", "carries no publisher signature"),
                               (sign_fab(stranger, fab_hash(fab)), "not signed by the publisher"),
                               (sign_fab(publisher, fab_hash(b"another app")), "not signed by the publisher")):
            kwargs, message = _supernode_fixture(fab, signature)
            run_id = start_client_internal._pull_and_store_message(**kwargs)
            assert run_id == message.metadata.run_id
            state = kwargs["state"]
            (reply,) = state.get_messages(is_reply=True)
            assert reply.error.code == ErrorCode.INVALID_FAB and why in reply.error.reason
            assert state.get_run(run_id) is None  # the FAB was not stored: no ClientApp can install it
        from flwr.supercore.constant import TaskType

        kwargs, message = _supernode_fixture(fab, sign_fab(publisher, fab_hash(fab)))
        run = kwargs["get_run"](message.metadata.run_id)
        run.primary_task_type = TaskType.AGENT_APP  # set by the SuperLink, not signed: no one here claims it
        assert start_client_internal._pull_and_store_message(**kwargs) == message.metadata.run_id
        (reply,) = kwargs["state"].get_messages(is_reply=True)
        assert reply.error.code == ErrorCode.INVALID_FAB and "ClientApps only" in reply.error.reason
        assert not kwargs["state"].get_tasks()  # no task that would wait forever for a claimer
        kwargs, message = _supernode_fixture(fab, sign_fab(publisher, fab_hash(fab)))
        assert start_client_internal._pull_and_store_message(**kwargs) == message.metadata.run_id
        assert kwargs["state"].get_run(message.metadata.run_id) is not None  # signed: stored as usual
        assert not kwargs["state"].get_messages(is_reply=True)
    finally:
        start_client_internal._pull_and_store_message = original


def test_a_clientapp_that_finished_without_a_reply_is_answered_and_the_supernode_goes_on(flower_identity) -> None:
    """Flower 1.39's SuperNode waits for a reply forever once a ClientApp task finished without
    pushing one (its push failed): the site would heartbeat and answer nothing. The launcher's
    watchdog answers such a message with Flower's CLIENT_APP_CRASHED error and moves on."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from flwr.cli.build import build_fab_from_files
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode import start_client_internal

    from fedclient import supernode_launcher
    from fedclient.app_trust import fab_hash, sign_fab

    publisher = Ed25519PrivateKey.generate()
    fab, _ = build_fab_from_files({"app.py": b"", "pyproject.toml": PROBE_APP})
    kwargs, message = _supernode_fixture(fab, sign_fab(publisher, fab_hash(fab)))
    state = kwargs["state"]
    original = start_client_internal._push_messages
    sent: list = []
    import threading

    try:
        supernode_launcher.install_lost_reply_watchdog(grace=0.3)
        assert start_client_internal._pull_and_store_message(**kwargs) == message.metadata.run_id
        (task,) = state.get_tasks()
        assert state.claim_task(task.task_id) and state.activate_task(task.task_id)
        assert state.get_messages(is_reply=False)  # the ClientApp took the message ...
        pushing = threading.Thread(target=start_client_internal._push_messages, daemon=True, kwargs=dict(
            state=state, object_store=kwargs["object_store"], push_object=lambda *args: None,
            send=lambda reply, tree, runtime: sent.append(reply) or (set(), "s")))
        pushing.start()
        pushing.join(timeout=2.0)
        assert pushing.is_alive() and not sent  # while its task runs, the SuperNode waits, as Flower does
        assert state.finish_task(task.task_id, SubStatus.COMPLETED, "")  # ... and it ended without its reply
        pushing.join(timeout=10)
        assert not pushing.is_alive(), "the SuperNode still waits for a reply that will never come"
    finally:
        start_client_internal._push_messages = original
    (reply,) = sent
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.error.code == ErrorCode.CLIENT_APP_CRASHED
    assert not state.get_messages()  # nothing left waiting: the next pull goes ahead


def test_the_supernode_hook_is_pinned_to_the_flower_it_was_written_for() -> None:
    """A Flower upgrade that changes where the SuperNode fetches and stores FABs must fail here first,
    so that someone checks the app verification still runs before any app code."""
    import hashlib
    import inspect

    import flwr
    from flwr.supernode import start_client_internal

    from fedclient.supernode_launcher import FLOWER_VERSION

    assert flwr.__version__ == FLOWER_VERSION == "1.39.0"
    source = inspect.getsource(start_client_internal._pull_and_store_message)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == PINNED_PULL_AND_STORE
    loop = inspect.getsource(start_client_internal.start_client_internal)
    assert "run_id = _pull_and_store_message(" in loop and "get_fab=get_fab," in loop
    assert "state.store_fab(fab)" in source and source.index("get_fab(") < source.index("state.store_fab(fab)")
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState  # the lost-reply watchdog's parts

    pushing = inspect.getsource(start_client_internal._push_messages)
    assert "while not (reply_messages := state.get_messages(is_reply=True)):" in pushing
    assert "entry.is_retrieved" in inspect.getsource(InMemoryNodeState._store_error_replies)
    assert "_push_messages(" in loop
    assert "time.sleep(3)" in loop and pushing.count("time.sleep(0.5)") == 2  # the waits _ShorterWaits adapts,
    assert len(re.findall(r"\btime\.\w+\(", inspect.getsource(start_client_internal))) == 3  # and no other
    from flwr.client.grpc_rere_client import connection  # where --heartbeat-interval takes effect
    from flwr.supercore import heartbeat

    assert inspect.getsource(connection).count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(heartbeat.HeartbeatSender._run)
    from flwr.superlink.grid import http_grid  # where the ServerApp's shorter reply backoff takes effect

    assert "all_object_contents = pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)


def test_the_supernodes_adaptive_waits_are_quick_while_active_and_flowers_when_idle(monkeypatch) -> None:
    """fedclient start's default: 0.2 s between pulls for a minute after a message, Flower's 3 s once
    idle; the reply polled for from 10 ms, doubling up to the pull wait; a fixed --poll-interval
    waits the same whether idle or not."""
    from fedclient import supernode_launcher as launcher

    import types

    slept: list[float] = []
    monkeypatch.setattr(launcher, "_time", types.SimpleNamespace(sleep=slept.append, monotonic=time.monotonic))
    waits = launcher._ShorterWaits(launcher.ACTIVE_POLL_S, idle_interval=launcher.IDLE_WAIT_S, active_window=60)
    waits.sleep(launcher.IDLE_WAIT_S)  # idle since it started: Flower's wait
    waits.message_seen()
    waits.sleep(launcher.IDLE_WAIT_S)
    for _ in range(7):
        waits.sleep(launcher.REPLY_WAIT_S)
    waits.sleep(1.0)  # any other wait is left alone
    assert slept == [3.0, 0.2, 0.01, 0.02, 0.04, 0.08, 0.16, 0.2, 0.2, 1.0]
    waits.message_seen()  # the next message's reply is polled for quickly again
    waits.sleep(launcher.REPLY_WAIT_S)
    assert slept[-1] == 0.01
    waits.last_message -= 61  # a minute without messages: idle again
    waits.sleep(launcher.IDLE_WAIT_S)
    assert slept[-1] == 3.0
    fixed = launcher._ShorterWaits(0.5)
    fixed.sleep(launcher.IDLE_WAIT_S)
    assert slept[-1] == 0.5
    with pytest.raises(ValueError, match="0.01..3.0"):
        launcher.install_shorter_waits(0.2, idle_interval=5.0)


PROBE_APP = b"""[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
[project]
name = "probe"
version = "1.0.0"
[tool.flwr.app]
publisher = "someone"
[tool.flwr.app.components]
serverapp = "app:server"
clientapp = "app:client"
[tool.flwr.app.config]
x = 1
fab-signature = ""
"""
PINNED_PULL_AND_STORE = "eaf5d0e36dc34e4c"  # flwr 1.39.0
