"""The operator console: a FastAPI app over the run store (and a deployment, when given).

Pages (``/``, ``/runs/{id}``, ``/sites``) are static HTML that render from the JSON API
(``/api/...``, schema at ``/openapi.json``) and poll it every two seconds while a run is in
progress. Charts use plotly.js served from the installed ``plotly`` package: nothing is fetched
from the internet. Bound to 127.0.0.1 by default; any other bind requires a token
(``Authorization: Bearer TOKEN``, or open ``/?token=TOKEN`` once to set a cookie).
"""

from __future__ import annotations

import hmac
import importlib.util
import pathlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from fedserver.console import views
from fedserver.console.control import DP_MECHANISMS, FormError, RunControl, RunRequest
from fedserver.store import RunStore, StoreError

STATIC = pathlib.Path(__file__).parent / "static"
TOKEN_COOKIE = "fedtune_console_token"


class NewRun(BaseModel):
    """The new-run form."""

    task: str = Field("tiny", description="task (model + data)")
    strategy: str = Field("fedavg", description="aggregation strategy")
    rounds: int = Field(3, ge=1, le=10_000, description="federated rounds")
    clients: int = Field(3, ge=1, le=1_000, description="virtual clients (simulation) ")
    codec: str = Field("", description="update codec, e.g. topk:0.01+q8 (empty: none)")
    dp: str = Field("off", description="local DP mechanism: off, gaussian or laplace")
    dp_epsilon: float = Field(8.0, gt=0, description="each site's privacy budget ε")
    name: str = Field("", max_length=100, description="run name (default: console-<time>)")


class SearchForm(BaseModel):
    """One encrypted search across the deployment's sites."""

    query: str = Field(..., min_length=1, max_length=2000, description="query text (embedded with MiniLM)")
    k: int = Field(10, ge=1, le=1000, description="documents to return")


def plotly_js() -> pathlib.Path:
    """plotly.min.js from the installed plotly package (served offline)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise RuntimeError("the console's charts need the plotly package: pip install plotly")
    path = pathlib.Path(spec.origin).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly is installed but {path} is missing; reinstall plotly")
    return path


def create_app(store_url: str, *, deployment=None, token: str | None = None,
               log_dir: pathlib.Path | None = None) -> FastAPI:
    """The console over ``store_url`` (and ``deployment``, a :class:`fedserver.deployment.Deployment`)."""
    store = RunStore(store_url)
    control = RunControl(store, deployment, log_dir)
    plotly = plotly_js()
    app = FastAPI(title="fedtune console", version="1", docs_url=None, redoc_url=None,
                  description="Runs, rounds, sites and privacy of a fedtune coordinator; start and stop runs.")
    app.state.store, app.state.control = store, control

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None or request.url.path.startswith("/static/"):
            return await call_next(request)
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:]
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "this console needs its token: open /?token=TOKEN or send "
                                 "'Authorization: Bearer TOKEN'"}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(StoreError)
    async def store_error(_request: Request, err: StoreError) -> JSONResponse:
        status = 409 if "not running" in str(err) else 404
        return JSONResponse({"detail": str(err)}, status_code=status)

    @app.exception_handler(FormError)
    async def form_error(_request: Request, err: FormError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    # ---- pages ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def runs_page() -> FileResponse:
        return FileResponse(STATIC / "runs.html")

    @app.get("/runs/{run_id}", include_in_schema=False, response_model=None)
    def run_page(run_id: str) -> FileResponse | HTMLResponse:
        try:
            store.get_run(run_id)
        except StoreError as err:
            return HTMLResponse(f"<!doctype html><title>not found</title><p>{_escape(str(err))}</p>"
                                "<p><a href='/'>all runs</a></p>", status_code=404)
        return FileResponse(STATIC / "run.html")

    @app.get("/sites", include_in_schema=False)
    def sites_page() -> FileResponse:
        return FileResponse(STATIC / "sites.html")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_bundle() -> FileResponse:
        return FileResponse(plotly, media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- API --------------------------------------------------------------------------------
    @app.get("/api/meta", summary="What the new-run form offers and how this console runs")
    def meta() -> dict[str, Any]:
        from aggregators import ALGORITHMS
        from fedclient.tasks import TASKS

        return {"engine": control.engine, "store": store.url, "tasks": sorted(TASKS), "strategies": sorted(ALGORITHMS),
                "dp": list(DP_MECHANISMS), "codec_examples": ["topk:0.01+q8", "randk:0.05+q8", "q8", "sign"],
                "deployment": str(deployment.directory) if deployment is not None else None}

    @app.get("/api/runs", summary="Every run: status, progress, best accuracy, bytes, privacy spent")
    def list_runs() -> dict[str, Any]:
        return {"runs": views.runs_overview(store)}

    @app.get("/api/runs/{run_id}", summary="One run: rounds, bytes vs FedAvg, sites, privacy, heat map")
    def get_run(run_id: str) -> dict[str, Any]:
        return views.run_detail(store, run_id)

    @app.post("/api/runs", status_code=202, summary="Start a run (deployment: flwr run; else fedsim)")
    def start_run(form: NewRun) -> dict[str, Any]:
        return control.start(RunRequest(**form.model_dump()))

    @app.post("/api/runs/{run_id}/stop", status_code=202, summary="Stop a running run, keeping finished rounds")
    def stop_run(run_id: str) -> dict[str, Any]:
        return control.stop(run_id, requested_by="the console")

    @app.get("/api/sites", summary="Enrolled sites, key fingerprints, connected or not, last heartbeat")
    def sites() -> JSONResponse:
        if deployment is None:
            return JSONResponse({"detail": "this console serves a bare run store; start it on a deployment "
                                 "(`fedserver console DIR`) to see its sites", "sites": []}, status_code=404)
        return JSONResponse({"sites": views.sites_overview(deployment)})

    @app.post("/api/search", summary="One encrypted top-k query across the deployment's sites (blocks until done)")
    def search(form: SearchForm) -> JSONResponse:
        from fedserver import deployment as dep
        from privacy.vector_search import SearchError

        if deployment is None:
            return JSONResponse({"detail": "encrypted search runs on a deployment's sites; start the console with "
                                 "`fedserver console DIR`"}, status_code=404)
        try:
            return JSONResponse(dep.search(deployment, form.query, k=form.k))
        except SearchError as err:
            return JSONResponse({"detail": str(err)}, status_code=422)

    @app.get("/token", include_in_schema=False)
    def with_token() -> RedirectResponse:
        return RedirectResponse("/")

    return app


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
