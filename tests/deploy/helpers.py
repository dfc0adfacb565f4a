"""Shared by the deploy tests: the repository root, create_app()'s routes, and flags -> configs as the CLI does."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from server.__main__ import ENGINE_FLAGS, SERVER_FLAGS, build_configs, build_parser
from server.api.app import create_app

REPO = Path(__file__).resolve().parents[2]
FLAG_ENV_NAMES = {flag.env for flag in ENGINE_FLAGS + SERVER_FLAGS}


def served_routes() -> dict[str, set[str]]:
    """{path: methods} of create_app() (read from its OpenAPI schema; no engine is loaded or started)."""
    engine = SimpleNamespace(model_name="m", config=SimpleNamespace(max_loras=1), add_observer=lambda _: None)
    schema = create_app(engine).openapi()
    return {path: {method.upper() for method in operations} for path, operations in schema["paths"].items()}


def deploy_module(relative: str):
    """A module of deploy/ by its file (`ray/fanout.py`): tests/deploy is the package `deploy` in a test run, which
    hides the repository's deploy/ directory from `import deploy.ray...`."""
    import importlib.util
    import sys

    name = "swapserve_deploy_" + relative.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "deploy" / relative)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def configs_from(args: list[str], env: dict[str, str]):
    """(EngineConfig, ServerConfig) that `swapserve serve ARGS` builds in environment `env`."""
    return build_configs(build_parser().parse_args(["serve", *args]), env)
