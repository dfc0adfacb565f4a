"""RouteTable: the routes swapserve's app serves, for the Ray ingress to match a path against, and which of them
are admin routes and which need an API key (read from the app itself, so routes added later are covered)."""
from __future__ import annotations

from starlette.routing import compile_path

from server.api.app import create_app
from server.api.auth import require_admin, require_api_key


class _NoEngine:
    """Just enough of an engine for create_app() to build its routes; never started."""

    def __init__(self, engine_config):
        self.config = engine_config
        self.model_name = engine_config.served_model_name

    def add_observer(self, observer) -> None:
        pass


def _routes_behind(app, dependency) -> set[str]:
    """Paths of the routes that depend on ``dependency``; a route made by an APIRouter carries the router's
    dependencies, and included routers are walked (FastAPI >= 0.120 keeps them as routers, not copies)."""
    found = set()

    def walk(routes) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:
                walk(inner.routes)
            elif any(getattr(d, "dependency", None) is dependency for d in getattr(route, "dependencies", [])):
                found.add(route.path)

    walk(app.routes)
    return found


class RouteTable:
    """The paths create_app() serves, read from its OpenAPI schema (stable across FastAPI's router internals),
    which of them are admin routes (behind require_admin) and which need an API key (behind require_api_key)."""

    def __init__(self, engine_config, server_config):
        app = create_app(_NoEngine(engine_config), server_config)
        self.paths = [(compile_path(path)[0], path) for path in app.openapi()["paths"]]
        self.admin = _routes_behind(app, require_admin)
        self.api = _routes_behind(app, require_api_key)

    def match(self, path: str) -> str | None:
        """The route template `path` falls under (e.g. /v1/adapters/{name}), or None."""
        return next((template for regex, template in self.paths if regex.match(path)), None)
