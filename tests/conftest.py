"""Shared fixtures. Environment first: Flower and Ray must stay offline and on loopback."""

from __future__ import annotations

import os

from fedclient.runconfig import QUIET_ENVIRONMENT  # noqa: E402  (imports only os)

os.environ.update(QUIET_ENVIRONMENT)  # forced, not defaults: tests must never reach the network
# Ray starts its workers (Flower's ClientApp actors) at niceness 15: on two shared cores they then
# wait behind every process of the other pytest worker (measured: the runtime-kill simulation took
# 33 s alone and 379 s for one round beside two busy loops). Tests compete on equal terms instead.
os.environ["RAY_worker_niceness"] = "0"

if "FEDTUNE_CACHE_DIR" not in os.environ:  # the ClientApp cache (fedclient/tasks/cache.py): one per session
    import atexit
    import shutil
    import tempfile

    os.environ["FEDTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedtune-cache-")
    atexit.register(shutil.rmtree, os.environ["FEDTUNE_CACHE_DIR"], ignore_errors=True)

# converted models (SmolLM2's GGUF → fp32 safetensors, 40 s, 538 MB, sha256-checked on use) stay
# in the user's cache across sessions: the conversion is deterministic and verified
os.environ.setdefault("FEDTUNE_MODEL_DIR", os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                        os.path.expanduser("~/.cache"), "fedtune", "models"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # two workers share 2 cores

LONGEST_FIRST = (  # measured here, slowest first: minutes of processes and Flower simulations
    "test_deployment.py", "test_simulation.py", "test_llm.py", "test_cli.py", "test_vector_search.py",
    "test_console.py", "test_search_flower.py", "test_site_runtime.py", "test_hostile_coordinator.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs the tests on two pytest-xdist workers, a file at a time (``--dist loadfile``,
    so a module's costly fixtures are built once) in this order (``--no-loadscope-reorder``;
    xdist's own order is by number of tests, which put the 5-minute deployment scenario last):
    the longest files first, so that neither worker is left with a long file at the end."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def one_ray_cluster_per_session():
    """Every in-process Flower simulation shares one local Ray cluster: Flower's Ray backend starts
    one only when none is running and shuts it down after each run, which cost ~6 s per simulation
    here (4 s to start, 2 s to stop). Actors are still created and terminated per run (each its own
    process), so no Python state crosses from one simulation to the next."""
    try:
        import ray
    except ImportError:
        yield
        return
    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        if ray.is_initialized():
            shutdown()


@pytest.fixture(scope="session")
def tiny_task():
    from fedclient.tasks import get_task

    return get_task("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_task):
    """The tiny task's model, built once; tests that train must work on a copy (fresh_tiny_model)."""
    return tiny_task.build_model()


@pytest.fixture
def fresh_tiny_model(tiny_model):
    import copy

    return copy.deepcopy(tiny_model)


@pytest.fixture
def flower_identity():
    """Flower 1.39 messages need a task identity (set by the runtime inside a real run)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
