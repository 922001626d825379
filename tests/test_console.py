"""The operator console's JSON API (FastAPI's test client) over a store filled by a real ``tiny``
simulation: selective-layer with a codec and local DP, so every panel has data."""

from __future__ import annotations

import pathlib

import pytest
from fastapi.testclient import TestClient

from fedserver.console import create_app
from fedserver.store import RunStore

pytestmark = pytest.mark.simulation


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory) -> tuple[str, str]:
    from flwr.simulation import run_simulation

    from fedclient.app import build_client_app
    from fedclient.runconfig import resolve_run_config
    from fedserver.app import build_server_app
    from tests.test_simulation import BACKEND

    url = f"sqlite:///{tmp_path_factory.mktemp('console') / 'store.db'}"
    config = resolve_run_config({}, {
        "task": "tiny", "strategy": "selective-layer", "num-server-rounds": 2, "local-steps": 2, "store": url,
        "codec": "topk:0.05+q8", "dp": "gaussian", "dp-epsilon": 4.0, "run-name": "console-fixture",
        "train-layers": "encoder.layer.0,head", "layer-budget": "1",
    })
    created: dict[str, str] = {}
    server = build_server_app(config, num_clients=3, on_run_created=lambda rid: created.setdefault("id", rid))
    run_simulation(server_app=server, client_app=build_client_app(config), num_supernodes=3, backend_config=BACKEND)
    return url, created["id"]


TOKEN = "console-test-token-0123456789"


@pytest.fixture
def client(filled_store, tmp_path) -> TestClient:
    """An API client: the console's token as a bearer header, on the console's own host."""
    return TestClient(create_app(filled_store[0], token=TOKEN, log_dir=tmp_path / "logs"),
                      base_url="https://127.0.0.1:8080", headers={"Authorization": f"Bearer {TOKEN}"})


def test_runs_list_shows_status_progress_accuracy_bytes_and_privacy(client, filled_store) -> None:
    (run,) = client.get("/api/runs").json()["runs"]
    assert run["id"] == filled_store[1] and run["name"] == "console-fixture"
    assert run["status"] == "completed" and (run["rounds_done"], run["rounds_total"]) == (2, 2)
    assert run["strategy"] == "selective-layer" and run["codec"] == "topk:0.05+q8"
    assert 0 <= run["best_accuracy"] <= 1 and run["bytes_moved"] > 0
    assert 0 < run["epsilon_spent"] <= run["epsilon_budget"] == 4.0
    assert run["created_at"].endswith("Z") and run["finished_at"]


def test_run_detail_has_rounds_fedavg_comparison_sites_and_heat_map(client, filled_store) -> None:
    store = RunStore(filled_store[0])
    detail = client.get(f"/api/runs/{filled_store[1]}").json()
    assert [r["round"] for r in detail["rounds"]] == [1, 2]
    moved = sum(r.bytes_up + r.bytes_down for r in store.rounds(filled_store[1]))
    comparison = detail["fedavg_comparison"]
    assert comparison["moved"] == moved and 0 < comparison["fraction"] < 1
    assert comparison["text"].startswith("you moved ") and "% of what FedAvg would" in comparison["text"]
    assert detail["fedavg_bytes_per_round"][0] == 2 * store.checkpoint_size(filled_store[1]) * 3
    sites = {s["site"]: s for s in detail["sites"]}
    assert sorted(sites) == ["partition-0", "partition-1", "partition-2"]
    for site in sites.values():
        assert site["device"] == "cpu" and site["rounds_asked"] == 2 and site["bytes_up"] > 0
        assert 0 < site["epsilon_spent"] <= site["epsilon_budget"] == 4.0
    heat = detail["heatmap"]
    assert heat["sites"] == sorted(sites) and set(heat["layers"]) <= {"encoder.layer.0", "head"}
    assert all(sum(row) >= 2 for row in heat["rounds"])  # each site trained >= 1 layer in each of 2 rounds
    assert {p["site"] for p in detail["privacy"]} == set(sites)
    assert detail["accuracy_label"] == "accuracy" and len(detail["evaluation_metrics"]["macro-f1"]) == 2
    assert not any(k.startswith("central-") for k in (detail["algorithm_metrics"] or {"series": {}})["series"])


def test_unknown_runs_and_bad_forms_get_clear_4xx(client, filled_store) -> None:
    for path in ("/api/runs/no-such-run", "/runs/no-such-run", f"/api/runs/{filled_store[1][:-2]}"):
        response = client.get(path)
        assert response.status_code == 404 and path.rsplit("/", 1)[-1] in response.text
    response = client.post(f"/api/runs/{filled_store[1]}/stop")
    assert response.status_code == 409 and "completed, not running" in response.json()["detail"]
    assert client.post("/api/runs/nope/stop").status_code == 404
    bad = [({"rounds": "abc"}, "rounds"), ({"rounds": 0}, "rounds"), ({"dp_epsilon": -1}, "dp_epsilon"),
           ({"strategy": "fedavgg"}, "unknown strategy 'fedavgg'; did you mean 'fedavg'?"), ({"codec": "topk:2"}, "codec"),
           ({"dp": "maybe"}, "dp must be one of"), ({"task": "imagenet"}, "unknown task 'imagenet'"),
           ({"name": 'a"b'}, "name must be")]
    for body, expected in bad:
        response = client.post("/api/runs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert expected in response.text, (body, response.text)
    assert client.post("/api/runs", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert client.get("/api/sites").status_code == 404  # no deployment behind this console
    assert "fedserver console DIR" in client.post("/api/search", json={"query": "rates", "k": 5}).json()["detail"]
    assert client.post("/api/search", json={"query": "", "k": 5}).status_code == 422
    assert client.post("/api/search", json={"query": "rates", "k": 0}).status_code == 422


def test_a_stop_request_reaches_the_running_run(client, filled_store) -> None:
    store = RunStore(filled_store[0])
    run_id = store.create_run(task="tiny", strategy="fedavg", num_rounds=5, config={})
    assert store.stop_requested(run_id) is None
    response = client.post(f"/api/runs/{run_id}/stop")
    assert response.status_code == 202 and response.json() == {"id": run_id, "status": "stopping"}
    assert store.stop_requested(run_id) == "the console"
    store.finish_run(run_id, "stopped", "test")


def test_openapi_schema_and_offline_chart_library(client) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/stop", "/api/sites", "/api/meta",
            "/api/search"} <= set(schema["paths"])
    script = client.get("/static/plotly.min.js")
    assert script.status_code == 200 and len(script.content) > 1_000_000 and b"plotly" in script.content[:2000].lower()
    page = client.get("/").text
    assert "cdn" not in page.lower() and "/static/console.js" in page


def test_no_token_is_401_even_on_loopback_and_the_login_url_sets_strict_cookies(filled_store, tmp_path) -> None:
    browser = TestClient(create_app(filled_store[0], token=TOKEN, log_dir=tmp_path), base_url="https://127.0.0.1:8080")
    for path in ("/api/runs", "/", "/openapi.json", f"/runs/{filled_store[1]}"):
        assert browser.get(path).status_code == 401, path
    assert browser.get("/api/runs", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert browser.get("/login?token=nope").status_code == 401
    login = browser.get(f"/login?token={TOKEN}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"  # the token leaves the address bar
    cookies = login.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("fedtune_console_session="))
    assert all(flag in session.lower() for flag in ("httponly", "secure", "samesite=strict"))
    assert browser.get("/api/runs").status_code == 200  # the cookie now authenticates
    with pytest.raises(RuntimeError, match="token"):
        create_app(filled_store[0], token="", log_dir=tmp_path)


def test_a_foreign_host_is_400_and_a_cross_site_post_is_403(filled_store, tmp_path) -> None:
    from fedserver.console.app import csrf_token
    from fedserver.store import RunStore

    app = create_app(filled_store[0], token=TOKEN, log_dir=tmp_path)
    rebinding = TestClient(app, base_url="https://evil.example:8080", headers={"Authorization": f"Bearer {TOKEN}"})
    assert rebinding.get("/api/runs").status_code == 400  # DNS rebinding: evil.example -> 127.0.0.1
    browser = TestClient(app, base_url="https://127.0.0.1:8080")
    browser.get(f"/login?token={TOKEN}")
    run_id = RunStore(filled_store[0]).create_run(task="tiny", strategy="fedavg", num_rounds=5, config={})
    stop = f"/api/runs/{run_id}/stop"
    assert browser.post(stop).status_code == 403  # a cross-site form: the cookie rides along, no CSRF header
    forged = {"X-CSRF-Token": csrf_token(TOKEN), "Origin": "https://evil.example"}
    assert browser.post(stop, headers=forged).status_code == 403  # another origin
    assert browser.post(stop, headers={"X-CSRF-Token": "guess"}).status_code == 403
    assert browser.post("/api/runs", json={"task": "tiny"}).status_code == 403  # every state-changing endpoint
    assert browser.post("/api/search", json={"query": "x"}).status_code == 403
    assert RunStore(filled_store[0]).stop_requested(run_id) is None  # nothing happened
    by_prefix = browser.post(f"/api/runs/{run_id[:-3]}/stop", headers={"X-CSRF-Token": csrf_token(TOKEN)})
    assert by_prefix.status_code == 404  # exact run ids only
    same = browser.post(stop, headers={"X-CSRF-Token": csrf_token(TOKEN), "Origin": "https://127.0.0.1:8080"})
    assert same.status_code == 202  # the console's own page, with its token: allowed
    RunStore(filled_store[0]).finish_run(run_id, "stopped", "test")


ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "test-artifacts"


def _chromium(user_data: pathlib.Path):
    """Debian's headless Chromium through its ChromeDriver (installed by `make test`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not pathlib.Path(p).exists()]
    if missing:
        pytest.fail(f"{missing} not installed: run `make browser` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={user_data}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_browser_shows_runs_and_charts_and_stops_a_running_run(filled_store, tmp_path: pathlib.Path) -> None:
    """A real browser on a real console process: the runs table, the run page's charts (screenshot
    saved to test-artifacts/), then a run started from the form and stopped with its button."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from fedserver.deployment import stop_group

    url, _ = filled_store
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fedserver.cli", "--store", url, "console", "--port", str(port),
                               "--token", TOKEN],
                              cwd=tmp_path, stdout=open(tmp_path / "console.log", "w"),  # noqa: SIM115
                              stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "SE_OFFLINE": "true"})
    driver = None
    store = RunStore(url)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "console.log").read_text()
            time.sleep(0.2)
        driver = _chromium(tmp_path / "chromium")
        wait = WebDriverWait(driver, 30)
        base = f"http://127.0.0.1:{port}"
        driver.get(base + "/")
        assert "login URL" in driver.page_source  # no token, no console
        driver.get(f"{base}/login?token={TOKEN}")  # the URL `fedserver console` prints
        assert "token=" not in driver.current_url
        link = wait.until(ready.presence_of_element_located((By.LINK_TEXT, "console-fixture")))
        row = link.find_element(By.XPATH, "./ancestor::tr")
        assert "completed" in row.text and "selective-layer" in row.text and "2 / 2" in row.text
        link.click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#chart-accuracy .main-svg")))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#chart-heatmap .main-svg")))
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-accuracy .scatterlayer .trace")  # lines drawn
        assert "% of what FedAvg would" in driver.find_element(By.ID, "fedavg-banner").text
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "console-run.png"))

        driver.get(base + "/")
        wait.until(ready.element_to_be_clickable((By.ID, "start")))  # enabled once the form's choices loaded
        for field, value in (("f-rounds", "300"), ("f-clients", "2"), ("f-name", "browser-stop")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "start").click()
        wait_long = WebDriverWait(driver, 180)
        stop = wait_long.until(ready.element_to_be_clickable(
            (By.XPATH, "//a[text()='browser-stop']/ancestor::tr//button[text()='stop']")))
        stop.click()
        wait_long.until(ready.text_to_be_present_in_element(
            (By.XPATH, "//a[text()='browser-stop']/ancestor::tr/td[2]"), "stopped"))
        assert driver.save_screenshot(str(ARTIFACTS / "console-runs-stopped.png"))
        stopped = store.get_run("browser-stop")
        assert stopped.status == "stopped" and "stopped by the console" in stopped.error
        assert len(store.rounds(stopped.id)) < 300
    finally:
        if driver is not None:
            driver.quit()
        stop_group(server.pid, grace=5)
        for line in subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True,
                                   check=False).stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if "browser-stop" in args and "simulations.cli" in args:
                stop_group(int(pid), grace=10)  # only if the stop above failed
