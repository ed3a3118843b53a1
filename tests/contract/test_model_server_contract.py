"""Contract tests of the bots against a model server, standing in for a Docker engine with an
NVIDIA GPU and for a Quix Cloud import, neither of which runs on the build machines.

docker-compose.yml's profile `gpu` adds `llm-server`, a vLLM OpenAI-compatible server that the bots
reach with LLM_BACKEND=openai. These tests check that the server is pinned, reserves the GPUs the
Compose Specification way, listens where the bots' default LLM_BASE_URL points and takes its API key
from LLM_API_KEY; that the bots carry every LLM_ variable of the model backends with the code's
defaults and depend on nothing of the profile; that LLM_API_KEY has no value in any deployment
file; that quix.yaml's bot deployments keep the backend defaults of their app.yaml (rendered from
the settings, see test_app_yaml_rendered.py); and that docs/deploy.md gives the command and the
defaults. Each check returns its problems, and the last tests feed the checks
broken copies, so a check that cannot fail is caught too. Where the Compose plugin or Debian's
docker-compose is installed, it resolves the file with and without the profile.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.contract import (
    REPO,
    app_yaml,
    env_of,
    load_compose,
    quix_yaml,
    service_dockerfile,
    service_env,
)
from tests.contract.test_dockerfile_contract import image_env

BOTS = ("ai_customer", "ai_support_agent")
PROFILE = "gpu"
SERVER = "llm-server"
SERVER_IMAGE = re.compile(r"vllm/vllm-openai:v\d+\.\d+\.\d+(?:\.\d+)?")
HF_CACHE = "/root/.cache/huggingface"
# the settings of the model backends (LLMConfig in supportsim/bots/llm.py) every deployment declares
BACKEND_VARIABLES = (
    "LLM_BACKEND",
    "LLM_BASE_URL",
    "LLM_API_KEY",
    "LLM_CONCURRENCY",
    "LLM_PROMPT_CACHE_MB",
)
SECRET = "LLM_API_KEY"
# environment names under which a deployment file could hand the key to a process
KEY_NAMES = {SECRET, "VLLM_API_KEY"}
KEY_REFERENCE = re.compile(r"\$\{LLM_API_KEY(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")
DOCS = REPO / "docs" / "deploy.md"
DOCS_SECTION = "## Bots against a model server"


# ---------------------------------------------------------------------------------------------
# readers


def raw_compose() -> dict:
    """docker-compose.yml as written (YAML merge keys applied, no variable interpolation)."""
    return yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))


def compose_text() -> str:
    return (REPO / "docker-compose.yml").read_text(encoding="utf-8")


def code_default(name: str, service: str = "ai_customer") -> Any:
    field = service_env(service)[name]
    assert field is not None, f"{name} is read directly, not by a settings class"
    return field.default


def quix_text(value: Any) -> str:
    """A code default the way Quix variables and compose values write it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def compose_variables(service: str) -> set[str]:
    """The LLM_ variables a bot's compose environment must carry."""
    reads = service_env(service)
    requests = {n for n in reads if n.startswith("LLM_REQUEST_")}
    return set(BACKEND_VARIABLES) | {"LLM_MODEL"} | requests


def server_port(spec: dict) -> int:
    """The port `vllm serve` listens on: --port N or --port=N (vLLM's default is 8000)."""
    words = [str(w) for w in spec.get("command", [])]
    for i, word in enumerate(words):
        if word.startswith("--port="):
            return int(word.split("=", 1)[1])
        if word == "--port" and i + 1 < len(words):
            return int(words[i + 1])
    return 8000


def published_container_ports(spec: dict) -> set[int]:
    ports = set()
    for entry in spec.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split(":")[-1].split("/")[0]))
    return ports


def walk_keys(node: Any, path: str = ""):
    """(path, key, value) of every mapping entry in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from walk_keys(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_keys(value, f"{path}[{i}]")


def app_yamls() -> dict[str, dict]:
    """Every service folder's app.yaml."""
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in sorted(REPO.glob("*/app.yaml"))}


# ---------------------------------------------------------------------------------------------
# checks: each returns its problems, so the tests at the end can feed it broken copies


def server_problems(compose: dict) -> list[str]:
    """The gpu profile's server: pinned vLLM image, GPU reservation, healthcheck, cache volume."""
    spec = compose["services"].get(SERVER)
    if spec is None:
        return [f"docker-compose.yml has no {SERVER} service"]
    problems = []
    if spec.get("profiles") != [PROFILE]:
        problems.append(f"{SERVER} must run only with --profile {PROFILE}: {spec.get('profiles')}")
    if not SERVER_IMAGE.fullmatch(str(spec.get("image", ""))):
        problems.append(f"{SERVER}: pin a vllm/vllm-openai release, not {spec.get('image')!r}")
    devices = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(
        d.get("driver") == "nvidia" and str(d.get("count")) == "all" and "gpu" in d["capabilities"]
        for d in devices
    ):
        problems.append(f"{SERVER}: no deploy.resources.reservations.devices nvidia/all/[gpu]")
    if "runtime" in spec:
        problems.append(f"{SERVER}: `runtime` is the legacy nvidia-docker way; use devices")
    check = spec.get("healthcheck", {})
    test = " ".join(str(w) for w in check.get("test", []))
    if check.get("disable") or f"localhost:{server_port(spec)}/health" not in test:
        problems.append(f"{SERVER}: the healthcheck must ask /health on port {server_port(spec)}")
    volumes = {str(v).split(":")[1]: str(v).split(":")[0] for v in spec.get("volumes", [])}
    if volumes.get(HF_CACHE) not in (compose.get("volumes") or {}):
        problems.append(f"{SERVER}: {HF_CACHE} must be a named volume (models survive a restart)")
    return problems


def base_url_problems(compose: dict) -> list[str]:
    """The bots' default LLM_BASE_URL is the server's host, port and /v1 under the profile."""
    spec = compose["services"].get(SERVER)
    if spec is None:
        return [f"docker-compose.yml has no {SERVER} service"]
    port = server_port(spec)
    problems = []
    if port not in published_container_ports(spec):
        problems.append(f"{SERVER} listens on {port} but publishes {spec.get('ports')}")
    for bot in BOTS:
        url = urlsplit(env_of(compose["services"][bot]).get("LLM_BASE_URL", ""))
        if (url.scheme, url.hostname, url.port, url.path) != ("http", SERVER, port, "/v1"):
            problems.append(
                f"{bot}: LLM_BASE_URL {url.geturl()!r} is not http://{SERVER}:{port}/v1"
            )
    return problems


def dependency_problems(compose: dict) -> list[str]:
    """Services outside a profile must not need a profiled one (the file must run without it)."""
    profiled = {name for name, spec in compose["services"].items() if spec.get("profiles")}
    problems = []
    for name, spec in compose["services"].items():
        if spec.get("profiles"):
            continue
        depends = spec.get("depends_on") or {}
        if isinstance(depends, list):
            depends = dict.fromkeys(depends, {})
        for dependency, condition in depends.items():
            optional = isinstance(condition, dict) and condition.get("required") is False
            if dependency in profiled and not optional:
                problems.append(f"{name} depends on {dependency}, which only runs with a profile")
    return problems


def api_key_problems(text: str, raw: dict, quix: dict, apps: dict[str, dict]) -> list[str]:
    """LLM_API_KEY has no non-empty default in docker-compose.yml, quix.yaml or any app.yaml."""
    problems = []
    for match in KEY_REFERENCE.finditer(text):
        if match.group("op") in ("-", ":-", "+", ":+") and match.group("arg"):
            problems.append(f"docker-compose.yml gives LLM_API_KEY a value: {match.group(0)}")
    for path, key, value in walk_keys(raw):
        if key in KEY_NAMES and value is not None and not KEY_REFERENCE.fullmatch(str(value)):
            problems.append(f"docker-compose.yml{path} is not a bare ${{{SECRET}}} reference")
    for name, spec in raw.get("services", {}).items():
        words = [str(w) for w in spec.get("command") or []] if isinstance(spec, dict) else []
        for i, word in enumerate(words):
            if word.startswith("--api-key"):
                value = word.split("=", 1)[1] if "=" in word else " ".join(words[i + 1 : i + 2])
                if not KEY_REFERENCE.fullmatch(value):
                    problems.append(f"{name}: --api-key must come from ${{{SECRET}}}")
    for deployment in quix["deployments"]:
        for variable in deployment.get("variables", []):
            if variable["name"] == SECRET:
                problems.extend(_secret_problems(f"quix.yaml {deployment['name']}", variable))
    for service, app in apps.items():
        for variable in app.get("variables", []):
            if variable["name"] == SECRET:
                problems.extend(_secret_problems(f"{service}/app.yaml", variable))
    return problems


def _secret_problems(where: str, variable: dict) -> list[str]:
    """The key is the secret project variable LLM_API_KEY: bound by name, never given a value."""
    problems = []
    if variable.get("inputType") != "ProjectVariable" or variable.get("secret") is not True:
        problems.append(f"{where}: {SECRET} must be a ProjectVariable with secret: true")
    if "value" in variable:
        problems.append(f"{where}: {SECRET} has a value")
    key = variable.get("defaultValue", variable.get("variableKey"))
    if key != SECRET:
        problems.append(f"{where}: {SECRET} binds {key!r}, not the project variable {SECRET}")
    return problems


def quix_deployment_problems(quix: dict) -> list[str]:
    """The bots' deployments inherit the backend variables from app.yaml (descriptor 2.0): an
    override may not change a default to another backend or give the key a value."""
    deployments = {d["name"]: d for d in quix["deployments"]}
    problems = []
    if str(quix["metadata"]["version"]) != "2.0":
        problems.append("quix.yaml: descriptor 2.0 is what lets deployments inherit app.yaml")
    for bot in BOTS:
        if deployments[bot].get("version") is None or deployments[bot].get("application") != bot:
            problems.append(f"quix.yaml {bot}: inherits only with an application and a version")
        for variable in deployments[bot].get("variables", []):
            name = variable["name"]
            if name == SECRET:
                problems.extend(_secret_problems(f"quix.yaml {bot}", variable))
            elif (
                name in BACKEND_VARIABLES
                and "value" in variable
                and str(variable["value"]) != quix_text(code_default(name, bot))
            ):
                problems.append(
                    f"quix.yaml {bot}: {name}={variable['value']!r}, "
                    f"the code's default is {code_default(name, bot)!r}"
                )
    return problems


def partition_problems(compose: dict, quix: dict) -> list[str]:
    """With the defaults, `chat` has a partition (and a conversation) for every turn in flight."""
    problems = []
    for bot in BOTS:
        env = env_of(compose["services"][bot])
        in_flight = int(compose["services"][bot]["deploy"]["replicas"]) * int(
            env["LLM_CONCURRENCY"]
        )
        for name in ("CHAT_PARTITIONS", "CONVERSATIONS"):
            if int(env[name]) < in_flight:
                problems.append(f"compose {bot}: {name}={env[name]} < {in_flight} turns in flight")
    topics = {t["name"]: t["configuration"] for t in quix["topics"]}
    deployments = {d["name"]: d for d in quix["deployments"]}
    for bot in BOTS:
        variables = {v["name"]: v for v in deployments[bot].get("variables", [])}
        defaults = {v["name"]: v for v in app_yaml(bot)["variables"]}
        chat = defaults["CHAT_TOPIC"]["defaultValue"]
        concurrency = variables.get("LLM_CONCURRENCY", defaults["LLM_CONCURRENCY"])
        value = concurrency.get("value", concurrency.get("defaultValue"))
        in_flight = deployments[bot]["resources"]["replicas"] * int(value)
        if topics[chat]["partitions"] < in_flight:
            problems.append(f"quix.yaml: {chat} has fewer partitions than {bot}'s {in_flight}")
    return problems


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: the gpu profile's server


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_gpu_profile_runs_a_pinned_model_server_with_the_gpus_reserved(compose):
    assert not server_problems(compose), server_problems(compose)


def test_model_server_listens_where_the_bots_default_base_url_points(compose):
    assert not base_url_problems(compose), base_url_problems(compose)


def test_model_server_serves_the_documented_model():
    raw = raw_compose()["services"][SERVER]
    match = re.fullmatch(r"\$\{LLM_SERVER_MODEL:-([^}]+)\}", str(raw["command"][0]))
    assert match, "the served model is the first argument, ${LLM_SERVER_MODEL:-default}"
    default = match.group(1)
    assert raw["entrypoint"] == ["vllm", "serve"], "the model is a positional argument of serve"
    assert load_compose()["services"][SERVER]["command"][0] == default
    custom = load_compose({"LLM_SERVER_MODEL": "org/other-model"})["services"][SERVER]
    assert custom["command"][0] == "org/other-model"
    docs = DOCS.read_text(encoding="utf-8")
    assert f"LLM_MODEL={default} docker compose --profile {PROFILE} up" in docs
    assert f"LLM_MODEL={default} docker compose --profile {PROFILE} up" in compose_text()


def test_model_server_takes_its_api_key_from_llm_api_key():
    assert env_of(load_compose()["services"][SERVER])["VLLM_API_KEY"] == ""
    keyed = load_compose({SECRET: "made-up-key"})
    assert env_of(keyed["services"][SERVER])["VLLM_API_KEY"] == "made-up-key"
    for bot in BOTS:
        assert env_of(keyed["services"][bot])[SECRET] == "made-up-key", "the bots send the same"


def test_bots_depend_on_nothing_of_the_gpu_profile(compose):
    assert not dependency_problems(compose), dependency_problems(compose)


# ---------------------------------------------------------------------------------------------
# docker-compose.yml: the bots


@pytest.mark.parametrize("bot", BOTS)
def test_bots_carry_every_backend_variable_with_the_code_defaults(compose, bot):
    env = env_of(compose["services"][bot])
    reads = service_env(bot)
    expected = compose_variables(bot)
    missing = expected - set(env)
    assert not missing, f"{bot}: compose does not pass {sorted(missing)}"
    assert expected <= set(reads), f"{bot} no longer reads {sorted(expected - set(reads))}"
    image = image_env(service_dockerfile(bot))
    for name in sorted(expected):
        default = code_default(name, bot)
        if name == "LLM_BASE_URL":
            assert code_default("LLM_BACKEND", bot) == "llamacpp" == env["LLM_BACKEND"], (
                "the in-compose server URL is a safe default only while llamacpp is the default"
            )
        elif name == "LLM_MODEL":
            assert env[name] == image[name], "the GGUF file baked into the image"
        elif name == SECRET:
            assert default is None and env[name] == ""
        else:
            assert env[name] == quix_text(default), f"{bot}: {name}={env[name]!r}, code {default!r}"


@pytest.mark.parametrize("bot", BOTS)
def test_bots_take_the_backend_variables_from_the_environment(bot):
    values = {
        "LLM_BACKEND": "openai",
        "LLM_BASE_URL": "http://gpu-box:11434/v1",
        "LLM_MODEL": "qwen2.5:1.5b",
        "LLM_CONCURRENCY": "3",
        "LLM_PROMPT_CACHE_MB": "0",
        "LLM_REQUEST_RETRIES": "1",
        "LLM_REQUEST_TIMEOUT_S": "30.0",
    }
    env = env_of(load_compose(values)["services"][bot])
    for name in compose_variables(bot) - {SECRET}:
        assert env[name] == values[name], f"{bot}: {name} ignores the environment"


def test_chat_partitions_cover_the_turns_in_flight(compose):
    assert not partition_problems(compose, quix_yaml()), partition_problems(compose, quix_yaml())


def _compose_cli() -> list[str] | None:
    """The Compose plugin, or else Debian's docker-compose 1.29; None when neither is here."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose / docker-compose here")
@pytest.mark.parametrize("profile", [None, PROFILE])
def test_compose_cli_resolves_the_file_with_and_without_the_gpu_profile(tmp_path, profile):
    """The Compose CLI reads the file and needs no engine for `config`."""
    cli = _compose_cli()
    args = [*cli, "--project-directory", str(REPO)]
    if profile:
        args += ["--profile", profile]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LLM_BACKEND": "openai"}
    result = subprocess.run(
        [*args, "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for bot in BOTS:
        assert env_of(services[bot])["LLM_BACKEND"] == "openai"
    if profile:
        devices = services[SERVER]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    elif cli == ["docker", "compose"]:
        assert SERVER not in services, "without the profile the plugin leaves the server out"


# ---------------------------------------------------------------------------------------------
# LLM_API_KEY, quix.yaml and app.yaml


def test_llm_api_key_has_no_default_in_any_deployment_file():
    problems = api_key_problems(compose_text(), raw_compose(), quix_yaml(), app_yamls())
    assert not problems, problems
    assert KEY_REFERENCE.search(compose_text()), "docker-compose.yml no longer passes LLM_API_KEY"


def test_quix_bot_deployments_list_the_backend_variables_and_the_key_secret():
    assert not quix_deployment_problems(quix_yaml()), quix_deployment_problems(quix_yaml())


# ---------------------------------------------------------------------------------------------
# docs/deploy.md


def _docs_section() -> str:
    text = DOCS.read_text(encoding="utf-8")
    assert DOCS_SECTION in text, f"docs/deploy.md has no section {DOCS_SECTION!r}"
    return text.split(DOCS_SECTION, 1)[1].split("\n## ", 1)[0]


def _docs_variables() -> dict[str, str]:
    block = _docs_section().split("<!-- llm-variables:start -->")[1]
    block = block.split("<!-- llm-variables:end -->")[0]
    rows = [r for r in block.strip().splitlines() if r.startswith("|")][2:]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    return {c[0].strip("`"): c[1] for c in cells}


def test_docs_table_of_backend_variables_matches_the_code():
    documented = _docs_variables()
    missing = set(BACKEND_VARIABLES) - set(documented)
    assert not missing, f"docs/deploy.md does not list {sorted(missing)}"
    reads = service_env("ai_customer")
    for name, cell in documented.items():
        assert name in reads, f"docs/deploy.md lists {name}, which the bots never read"
        literal = re.match(r"`([^`]*)`", cell)
        if literal:
            assert literal.group(1) == quix_text(code_default(name)), f"docs: {name} = {cell}"
    assert documented[SECRET].startswith("none"), "the key has no default"


def test_docs_explain_endpoints_partitions_and_the_secret():
    section = _docs_section()
    assert f"--profile {PROFILE}" in section and "LLM_BACKEND=openai" in section
    for server in ("vLLM", "llama.cpp", "Ollama"):
        assert server in section, f"docs: no word on {server}"
    assert "http://host:11434/v1" in section, "Ollama's OpenAI-compatible root"
    assert "partitions of `chat` >= bot replicas x `LLM_CONCURRENCY`" in section
    assert "### LLM_API_KEY is a secret" in section
    assert "`LLM_API_KEY`" in DOCS.read_text(encoding="utf-8").split("## Quix Cloud", 1)[1]


# ---------------------------------------------------------------------------------------------
# the checks catch mistakes


def test_server_check_catches_a_missing_gpu_reservation_and_an_unpinned_image(compose):
    broken = copy.deepcopy(compose)
    del broken["services"][SERVER]["deploy"]
    assert any("reservations" in p for p in server_problems(broken))
    broken = copy.deepcopy(compose)
    broken["services"][SERVER]["deploy"]["resources"]["reservations"]["devices"][0].pop("driver")
    broken["services"][SERVER]["runtime"] = "nvidia"
    assert len(server_problems(broken)) == 2
    broken = copy.deepcopy(compose)
    broken["services"][SERVER]["image"] = "vllm/vllm-openai:latest"
    broken["services"][SERVER]["profiles"] = []
    assert len(server_problems(broken)) == 2
    broken = copy.deepcopy(compose)
    del broken["services"][SERVER]
    assert server_problems(broken)


def test_base_url_check_catches_a_port_mismatch(compose):
    broken = copy.deepcopy(compose)
    command = broken["services"][SERVER]["command"]
    command[command.index("--port=8000")] = "--port=8001"
    problems = base_url_problems(broken)
    assert len(problems) == 1 + len(BOTS), problems
    broken = copy.deepcopy(compose)
    broken["services"]["ai_customer"]["environment"]["LLM_BASE_URL"] = "http://llm-server:8000"
    assert len(base_url_problems(broken)) == 1


def test_dependency_check_catches_a_bot_that_needs_the_profile(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["ai_customer"]["depends_on"][SERVER] = {"condition": "service_healthy"}
    assert dependency_problems(broken)
    broken["services"]["ai_customer"]["depends_on"][SERVER]["required"] = False
    assert not dependency_problems(broken), "an optional dependency is fine"


def test_api_key_check_catches_a_default_anywhere():
    text, raw, quix, apps = compose_text(), raw_compose(), quix_yaml(), app_yamls()
    value = "made-up"
    broken_text = text.replace("${LLM_API_KEY:-}", "${LLM_API_KEY:-" + value + "}", 1)
    assert broken_text != text
    assert api_key_problems(broken_text, yaml.safe_load(broken_text), quix, apps)
    broken_raw = copy.deepcopy(raw)
    broken_raw["services"][SERVER]["environment"]["VLLM_API_KEY"] = value
    assert api_key_problems(text, broken_raw, quix, apps)
    broken_raw = copy.deepcopy(raw)
    broken_raw["services"][SERVER]["command"].append("--api-key=" + value)
    assert api_key_problems(text, broken_raw, quix, apps)
    broken_quix = copy.deepcopy(quix)
    broken_quix["deployments"][0]["variables"] = [
        {"name": SECRET, "inputType": "ProjectVariable", "secret": True, "value": value}
    ]
    assert api_key_problems(text, raw, broken_quix, apps)
    broken_apps = copy.deepcopy(apps)
    for variable in broken_apps["ai_support_agent"]["variables"]:
        if variable["name"] == SECRET:
            variable["defaultValue"] = value
    assert api_key_problems(text, raw, quix, broken_apps)


def test_deployment_check_catches_another_backend_and_a_valued_key():
    quix = copy.deepcopy(quix_yaml())
    assert not quix_deployment_problems(quix)
    for deployment in quix["deployments"]:
        if deployment["name"] == "ai_support_agent":
            deployment["variables"] = [
                {"name": "LLM_BACKEND", "value": "openai"},
                {"name": SECRET, "inputType": "Secret", "secretKey": "llm_api_key"},
            ]
    assert len(quix_deployment_problems(quix)) == 3


def test_partition_check_catches_more_turns_than_partitions(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["ai_customer"]["environment"]["LLM_CONCURRENCY"] = "8"
    assert len(partition_problems(broken, quix_yaml())) == 2
    quix = copy.deepcopy(quix_yaml())
    for deployment in quix["deployments"]:
        if deployment["name"] == "ai_support_agent":
            deployment["resources"]["replicas"] = 5
    assert len(partition_problems(compose, quix)) == 1
