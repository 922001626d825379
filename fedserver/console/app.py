"""The operator console: a FastAPI app over the run store (and a deployment, when given).

Pages (``/``, ``/runs/{id}``, ``/sites``) are static HTML that render from the JSON API
(``/api/...``, schema at ``/openapi.json``) and poll it every two seconds while a run is in
progress. Charts use plotly.js served from the installed ``plotly`` package: nothing is fetched
from the internet.

Security (a web page in the operator's browser is not trusted):

* **A token, always**, on loopback too: ``Authorization: Bearer TOKEN`` for API clients; browsers
  open the login URL ``fedserver console`` prints once (``/login?token=TOKEN``), which sets a
  session cookie (``HttpOnly``, ``Secure``, ``SameSite=Strict``) and redirects to ``/``.
* **Host check**: a request whose ``Host`` is not one the console serves is refused with 400, so a
  DNS-rebinding page (evil.example resolving to 127.0.0.1) reads nothing.
* **CSRF**: every state-changing request authenticated by the cookie must carry ``X-CSRF-Token``
  equal to the ``fedtune_csrf`` cookie (set with the session; a page of another site can neither read
  it nor set the header without a CORS preflight the console never grants), and an ``Origin`` or
  ``Referer``, when sent, must be the console's own; otherwise 403.
* **Exact run ids**: the API acts on a run named by its whole id, never by a prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware
from pydantic import BaseModel, Field

from fedserver.console import views
from fedserver.console.control import DP_MECHANISMS, FormError, RunControl, RunRequest
from fedserver.store import RunStore, StoreError

STATIC = pathlib.Path(__file__).parent / "static"
TOKEN_COOKIE = "fedtune_console_session"
CSRF_COOKIE, CSRF_HEADER = "fedtune_csrf", "x-csrf-token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class NewRun(BaseModel):
    """The new-run form."""

    task: str = Field("tiny", description="task (model + data)")
    strategy: str = Field("fedavg", description="aggregation strategy")
    rounds: int = Field(3, ge=1, le=10_000, description="federated rounds")
    clients: int = Field(3, ge=1, le=1_000, description="virtual clients (simulation) ")
    codec: str = Field("", description="update codec, e.g. topk:0.01+q8 (empty: none)")
    dp: str = Field("off", description="DP mechanism: off, gaussian or laplace (local), distributed (each site's "
                    "share of the noise, secure aggregation), central (the coordinator noises the sum)")
    dp_epsilon: float = Field(8.0, gt=0, description="each site's privacy budget ε")
    secagg: bool = Field(False, description="secure aggregation: the coordinator sees only the sum of the updates")
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


def csrf_token(token: str) -> str:
    """The CSRF token that goes with a console token (derived, so nothing extra is stored)."""
    return hmac.new(token.encode(), b"fedtune-console-csrf", hashlib.sha256).hexdigest()


def create_app(store_url: str, *, token: str, deployment=None, log_dir: pathlib.Path | None = None,
               hosts: Sequence[str] = LOOPBACK_HOSTS) -> FastAPI:
    """The console over ``store_url`` (and ``deployment``, a :class:`fedserver.deployment.Deployment`).
    ``token`` is required from every client; ``hosts`` are the Host names it answers to."""
    if not token or len(token) < 16:
        raise RuntimeError("the console needs a token of at least 16 characters")
    store = RunStore(store_url)
    control = RunControl(store, deployment, log_dir)
    plotly = plotly_js()
    csrf = csrf_token(token)
    app = FastAPI(title="fedtune console", version="1", docs_url=None, redoc_url=None,
                  description="Runs, rounds, sites and privacy of a fedtune coordinator; start and stop runs.")
    app.state.store, app.state.control = store, control

    def same_origin(request: Request, url: str) -> bool:
        parts = urlsplit(url)
        return bool(parts.netloc) and parts.netloc == request.headers.get("host", "")

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path.startswith("/static/") or request.url.path == "/login":
            return await call_next(request)
        header = request.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else ""
        given = bearer or request.cookies.get(TOKEN_COOKIE, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
                return JSONResponse({"detail": "this console needs its token: open the login URL "
                                     "`fedserver console` printed, or send 'Authorization: Bearer TOKEN'"},
                                    status_code=401)
            return HTMLResponse("<!doctype html><title>fedtune console: log in</title><p>Open the login URL "
                                "that <code>fedserver console</code> printed when it started.</p>", status_code=401)
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin") or request.headers.get("referer")
            if origin and not same_origin(request, origin):
                return JSONResponse({"detail": "cross-site request refused (Origin is not this console)"},
                                    status_code=403)
            if not bearer and not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), csrf.encode()):
                return JSONResponse({"detail": f"missing or wrong {CSRF_HEADER} header (CSRF protection)"},
                                    status_code=403)
        return await call_next(request)

    @app.get("/login", include_in_schema=False)
    def login(request: Request) -> RedirectResponse:
        if not hmac.compare_digest(request.query_params.get("token", "").encode(), token.encode()):
            return HTMLResponse("<!doctype html><title>fedtune console</title><p>Wrong or missing token.</p>",
                                status_code=401)
        response = RedirectResponse("/", status_code=303)  # the token leaves the address bar at once
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, secure=True, samesite="strict", path="/")
        response.set_cookie(CSRF_COOKIE, csrf, httponly=False, secure=True, samesite="strict", path="/")
        return response

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))

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
            store.get_run(run_id, exact=True)
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
        return views.run_detail(store, store.get_run(run_id, exact=True).id)

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

    return app


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
