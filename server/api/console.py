"""The web console: static files at / and /console/, and the JSON it reads (GET /v1/stats, /v1/stats/adapters).

The shell (server/console/: index.html, app.js, style.css; no build step, nothing fetched from elsewhere, so it
works offline) is public, as a login form must be; it holds no data. Everything it shows comes from routes
that need the API key when the server has one (GET /console/config says only whether one is needed). Admin
actions go to the admin routes (server/api/admin.py) with the admin key typed into the page.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from server.api.auth import require_api_key, tenant_of
from server.api.errors import scrub_paths
from server.api.stats import StatsWindow, server_stats
from server.api.tenants import visible

STATIC = Path(__file__).resolve().parent.parent / "console"
# the shell loads nothing from elsewhere, runs only its own script, and may not be framed
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff"}

shell = APIRouter(include_in_schema=False)
data = APIRouter(dependencies=[Depends(require_api_key)])


@shell.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=HEADERS)


@shell.get("/console/config")
async def console_config(request: Request) -> dict:
    """What the login form needs before any key: whether there is an API key to ask for, and an admin key."""
    config = request.app.state.server_config
    return {"api_key_required": config.api_key is not None, "admin_key_required": config.admin_key is not None}


@data.get("/v1/stats")
async def stats(request: Request) -> dict:
    """Running and waiting requests, KV-cache and adapter-slot use, totals, and rates and TTFT/ITL/e2e
    percentiles over the last stats.WINDOW_S seconds (server.api.stats)."""
    state = request.app.state
    out = server_stats(state.engine, state.metrics, state.stats_window)
    tenant = tenant_of(request)
    if tenant is not None:  # a tenant key sees the server's load, never another tenant's adapter names or paths
        for field in ("running_adapters", "waiting_adapters"):
            out[field] = [name for name in out[field] if visible(tenant, name)]
        out["engine"] = {k: v for k, v in out["engine"].items() if k != "model"}
    return out


@data.get("/v1/stats/adapters")
def adapter_stats(request: Request) -> dict:
    """Every adapter the server knows (AsyncEngine.adapter_catalog: registered, on disk under the roots, failed),
    with requests and generated tokens served since start. Sources (server paths) are for the admin routes.
    A tenant key sees only the adapters it may use (as /v1/models), their load errors without server paths.
    A plain def: FastAPI runs it on its thread pool, since listing the roots reads the disk."""
    state = request.app.state
    served, tenant = state.metrics.per_adapter(), tenant_of(request)
    rows = []
    for adapter in state.engine.adapter_catalog():
        if not visible(tenant, adapter["name"]):
            continue
        counts = served.get(adapter["name"], {})
        row = {k: v for k, v in adapter.items() if k != "source"}
        if tenant is not None and row.get("error"):
            row["error"] = scrub_paths(row["error"])
        rows.append(row | {"requests": counts.get("requests", 0), "tokens_served": counts.get("tokens", 0)})
    return {"object": "list", "data": rows}


def install(app: FastAPI) -> None:
    app.state.stats_window = StatsWindow()
    app.include_router(shell)
    app.include_router(data)
    app.mount("/console", StaticFiles(directory=STATIC), name="console")
