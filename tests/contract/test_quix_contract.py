"""Contract tests of the Quix Cloud template (quix.yaml and every app.yaml), standing in for an
import into Quix Cloud, which cannot be reached from the build machines.

Each deployment's application folder exists with its app.yaml and dockerfile; the app.yaml
variables are rendered from the settings classes (test_app_yaml_rendered.py), and here every value
Quix would inject is one the code accepts; no variable names a single replica; secrets are project
variables marked secret (Quix's current form; the deprecated `inputType: Secret` is refused) with
no value; what differs per environment is a project variable asked for at sync, each one
documented; every topic a service uses is declared with the partitions and retention the code
creates it with, the bots' chat topic as input and output; stateful services have state enabled;
Redis is reachable in the environment where REDIS_URL points; the dashboard is public on port 80
without root; the documented sizing profiles resolve, the trial one within a trial workspace's
quota (the totals are printed); the full profile's replicas agree with docker-compose.yml. Sources:
Quix's documentation (quixio/quix-docs: project-variables.md, yaml-2-0.md, ports.md,
deploy-public-page.md, quix-variables.md, changelogs/2023-archive.md for the trial quota) and its
Redis template (quixio/quix-samples docker/redis_server/library.json).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from urllib.parse import urlsplit

import pytest

from tests.contract import (
    REPO,
    SERVICES,
    app_yaml,
    code_index,
    load_compose,
    quix_profiles,
    quix_template_variables,
    quix_yaml,
    render_quix_yaml,
    service_dockerfile,
    service_env,
)
from tests.contract.test_dockerfile_contract import copied_paths, image_env

# A transactional.id names one process; a deployment variable is the same for every replica,
# which would then fence each other (on Quix the id comes from Quix__Deployment__ReplicaName)
PER_PROCESS_VARIABLES = {"REPLICA_INDEX", "TRANSACTIONAL_ID"}
STATEFUL_BY_DESIGN = {"ai_customer", "ai_support_agent", "sentiment_analysis", "redis_aggregator"}
SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIALS?)(?:$|_)", re.I)
# Quix's current input types (quix-docs project-structure.md); `Secret` is deprecated
INPUT_TYPES = {
    "FreeText",
    "HiddenText",
    "InputTopic",
    "OutputTopic",
    "Options",
    "ProjectVariable",
    "VariableGroup",
}
PROJECT_VARIABLE_KEY = re.compile(r"[A-Z_][A-Z0-9_]*")
# values that differ between environments: project variables asked for at the first sync
ENVIRONMENT_VARIABLES = {"influx_sink": {"INFLUXDB_HOST", "INFLUXDB_DATABASE"}}
BOTS = ("ai_customer", "ai_support_agent")
# Quix's trial tier quota (quix-docs changelogs/2023-archive.md): 8 cores, 16 GB, 40 replicas
TRIAL_QUOTA = {"cpu": 8000, "memory": 16000, "replicas": 40}
DOCS = REPO / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def quix() -> dict:
    return quix_yaml()


def deployments(quix: dict) -> dict[str, dict]:
    return {d["name"]: d for d in quix["deployments"]}


def declared(service: str) -> dict[str, dict]:
    return {v["name"]: v for v in app_yaml(service)["variables"]}


def is_secret(name: str, field) -> bool:
    return bool(SECRET_NAME.search(name)) or (field is not None and field.secret)


def image_set(service: str) -> dict[str, str]:
    return image_env(service_dockerfile(service))


# ---------------------------------------------------------------------------------------------
# deployments and applications


def test_descriptor_version(quix):
    assert str(quix["metadata"]["version"]) == "2.0", "deployments inherit app.yaml variables"


def test_every_service_is_a_deployment_of_its_own_folder(quix):
    applications = {d["application"]: d for d in quix["deployments"] if "application" in d}
    assert set(applications) == set(SERVICES)
    for name, deployment in applications.items():
        assert deployment["name"] == name
        assert (REPO / name / "app.yaml").is_file(), f"{name}/app.yaml is missing"


def test_image_deployments_are_pinned(quix):
    for deployment in quix["deployments"]:
        if "image" in deployment:
            image = deployment["image"]
            assert re.search(r":\d+\.\d+", image), f"{deployment['name']}: pin {image}"
            assert image == load_compose()["services"][deployment["name"]]["image"], (
                "the same image as docker compose"
            )


def test_deployments_declare_resources_and_replicas(quix):
    for deployment in quix["deployments"]:
        resources = deployment["resources"]
        limits = resources["limits"]
        assert isinstance(limits["cpu"], int) and limits["cpu"] > 0
        assert isinstance(limits["memory"], int) and limits["memory"] > 0
        assert isinstance(resources["replicas"], int) and resources["replicas"] >= 1
        assert deployment["deploymentType"] in ("Service", "Job")
    assert deployments(quix)["conversation_starter"]["deploymentType"] == "Job"


def test_full_profile_replicas_agree_with_docker_compose(quix):
    compose = load_compose()["services"]
    for name in SERVICES:
        local = int(compose[name].get("deploy", {}).get("replicas", 1))
        assert deployments(quix)[name]["resources"]["replicas"] == local, name


@pytest.mark.parametrize("service", SERVICES)
def test_app_yaml_builds_the_service(service):
    app = app_yaml(service)
    assert app["name"] == service and app["language"] == "python"
    assert (REPO / service / app["dockerfile"]).is_file()
    assert (REPO / service / app["runEntryPoint"]).is_file(), f"{service}/main.py is missing"
    folders = set(app.get("includedFolders", []))
    for folder in folders:
        assert (REPO / folder).is_dir(), f"{service}: includedFolders names {folder}/"
    copied = {p.split("/")[0] for p in copied_paths(service_dockerfile(service), service)}
    assert folders == copied - {service}, (
        f"{service}: Quix builds with the app folder plus includedFolders {sorted(folders)}; "
        f"the dockerfile copies {sorted(copied)}"
    )


def test_stack_services_are_all_deployed(quix):
    stack = importlib.import_module("supportsim.local.stack")
    names = {spec.name for spec in stack.SERVICES}
    assert names <= set(deployments(quix)), names - set(deployments(quix))


# ---------------------------------------------------------------------------------------------
# variables


@pytest.mark.parametrize("service", SERVICES)
def test_no_deployment_variable_names_a_single_replica(service):
    assert not PER_PROCESS_VARIABLES & set(declared(service)), (
        f"{service}/app.yaml lets every replica share {sorted(PER_PROCESS_VARIABLES)}"
    )


def secret_problems(where: str, variable: dict, secret: bool) -> list[str]:
    """A secret is a project variable marked secret whose only value is the variable's key."""
    name = variable["name"]
    problems = []
    if variable.get("inputType") == "Secret" or "secretKey" in variable:
        problems.append(f"{where}: {name} uses the deprecated Secret/secretKey form")
    if secret:
        if variable.get("inputType") != "ProjectVariable" or variable.get("secret") is not True:
            problems.append(f"{where}: {name} must be a ProjectVariable with secret: true")
        key = variable.get("defaultValue", variable.get("variableKey"))
        if key != name:
            problems.append(f"{where}: {name} must bind the project variable {name}, not {key!r}")
        if "value" in variable:
            problems.append(f"{where}: the secret {name} has a value")
    elif variable.get("inputType") == "ProjectVariable":
        key = str(variable.get("defaultValue", variable.get("variableKey", "")))
        if not PROJECT_VARIABLE_KEY.fullmatch(key):
            problems.append(f"{where}: {name} names no project variable key ({key!r})")
    return problems


@pytest.mark.parametrize("service", SERVICES)
def test_variables_have_a_type_and_secrets_have_no_value(service, quix):
    fields = service_env(service)
    problems = []
    for name, variable in declared(service).items():
        assert variable["inputType"] in INPUT_TYPES, f"{service}: {name} {variable['inputType']}"
        assert variable.get("description"), f"{service}: {name} has no description"
        secret = is_secret(name, fields.get(name))
        problems += secret_problems(f"{service}/app.yaml", variable, secret)
        if variable.get("required") and not secret:
            assert "defaultValue" in variable, f"{service}: {name} is required with no value"
    for variable in deployments(quix)[service].get("variables", []):
        name = variable["name"]
        assert name in declared(service), f"quix.yaml overrides {name}, unknown to {service}"
        secret = is_secret(name, fields.get(name))
        problems += secret_problems(f"quix.yaml {service}", variable, secret)
        assert not secret, f"quix.yaml {service}: {name} is inherited from app.yaml, not repeated"
    assert not problems, problems


def test_secret_check_catches_the_deprecated_form_and_a_value():
    old = {"name": "REDIS_URL", "inputType": "Secret", "secretKey": "redis_url"}
    assert len(secret_problems("x", old, True)) == 3
    valued = {"name": "LLM_API_KEY", "inputType": "ProjectVariable", "secret": True}
    assert secret_problems("x", {**valued, "defaultValue": "LLM_API_KEY"}, True) == []
    assert secret_problems("x", {**valued, "defaultValue": "sk-made-up"}, True)
    assert secret_problems("x", {**valued, "defaultValue": "LLM_API_KEY", "value": "v"}, True)
    unmarked = {"name": "INFLUXDB_TOKEN", "inputType": "ProjectVariable", "defaultValue": "X"}
    assert secret_problems("x", unmarked, True)


def test_no_deployment_file_uses_the_deprecated_secret_form():
    for path in [REPO / "quix.yaml", *sorted(REPO.glob("*/app.yaml"))]:
        text = path.read_text(encoding="utf-8")
        assert "inputType: Secret" not in text and "secretKey" not in text, path.name


def deployment_environment(service: str, quix: dict) -> dict[str, str]:
    """What Quix Cloud would inject: app.yaml defaults, quix.yaml values, secrets (stand-ins)."""
    env = {n: str(v["defaultValue"]) for n, v in declared(service).items() if "defaultValue" in v}
    for variable in deployments(quix)[service].get("variables", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
    for name, variable in declared(service).items():
        if variable["inputType"] == "ProjectVariable":  # the value typed in at the first sync
            env[name] = STAND_INS.get(name, "stand-in")
    return env


STAND_INS = {"REDIS_URL": "redis://redis:6379/0", "INFLUXDB_HOST": "https://influxdb.example:8181"}


@pytest.mark.parametrize("service", SERVICES)
def test_the_code_accepts_the_values_quix_injects(service, quix, monkeypatch):
    env = deployment_environment(service, quix)
    for name in list(os.environ):
        if name in service_env(service):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for settings in code_index().reach(service).settings:
        module = importlib.import_module(settings.module)
        cls = getattr(module, settings.name)
        instance = cls()  # raises a ValidationError when a Quix value does not parse
        for variable, field in code_index().fields(settings).items():
            if variable in env:
                assert getattr(instance, field.name) is not None


# ---------------------------------------------------------------------------------------------
# topics and state


def topic_settings(service: str) -> list[tuple[str, str | None]]:
    """(topic variable, partitions variable) pairs the service reads."""
    reads = service_env(service)
    pairs = []
    for name in reads:
        if name.endswith("_TOPIC"):
            partitions = name.removesuffix("_TOPIC") + "_PARTITIONS"
            pairs.append((name, partitions if partitions in reads else None))
    return pairs


@pytest.mark.parametrize("service", SERVICES)
def test_topics_the_service_uses_are_declared(service, quix):
    topics = {t["name"]: t["configuration"] for t in quix["topics"]}
    variables = declared(service)
    reads = service_env(service)
    for topic_variable, partitions_variable in topic_settings(service):
        variable = variables[topic_variable]
        assert variable["inputType"] in ("InputTopic", "OutputTopic", "FreeText")
        name = variable["defaultValue"]
        assert name in topics, f"quix.yaml does not declare the topic {name!r}"
        configuration = topics[name]
        assert partitions_variable, f"{service}: no partition setting for {topic_variable}"
        partitions = reads[partitions_variable].default
        assert configuration["partitions"] == partitions
        retention_ms = reads["TOPIC_RETENTION_MS"].default
        assert configuration["retentionInMinutes"] * 60_000 == retention_ms
        assert configuration["retentionInBytes"] == reads["TOPIC_RETENTION_BYTES"].default
        factor = variables["KAFKA_REPLICATION_FACTOR"]["defaultValue"]
        assert str(configuration["replicationFactor"]) == str(factor)


def test_every_declared_topic_is_used(quix):
    used = {declared(s)[v]["defaultValue"] for s in SERVICES for v, _ in topic_settings(s)}
    assert {t["name"] for t in quix["topics"]} == used


def uses_state(service: str) -> bool:
    """True when code reached by the service asks Quix Streams for state."""
    index = code_index()
    for module, name in index.reach(service).units:
        for node in ast.walk(index.units[(module, name)].node):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "stateful"
                and isinstance(node.value, ast.Constant)
                and node.value.value is True
            ):
                return True
            if isinstance(node, ast.Attribute) and node.attr.endswith("_window"):
                return True
    return False


@pytest.mark.parametrize("service", SERVICES)
def test_stateful_services_have_state_enabled(service, quix):
    stateful = service in STATEFUL_BY_DESIGN or uses_state(service)
    state = deployments(quix)[service].get("state", {})
    if stateful:
        assert state.get("enabled") is True, f"{service} keeps Quix Streams state"
        assert declared(service)["STATE_DIR"]["defaultValue"] == "/app/state"


def test_bot_state_is_detected_in_the_code():
    assert uses_state("ai_customer") and uses_state("ai_support_agent")


def test_dashboard_is_public_on_port_80_without_root(quix):
    """Quix serves a public deployment on port 80 (deploy-public-page.md); a non-root user cannot
    bind it, so Streamlit listens on 8501 and the network block maps port 80 to it (ports.md)."""
    dashboard = deployments(quix)["dashboard"]
    assert dashboard["publicAccess"]["enabled"] is True
    port = int(declared("dashboard")["STREAMLIT_SERVER_PORT"]["defaultValue"])
    assert port > 1024, "a non-root user binds only ports above 1024"
    assert image_set("dashboard")["STREAMLIT_SERVER_PORT"] == str(port)
    ports = dashboard["network"]["ports"]
    assert {"port": 80, "targetPort": port} in ports, ports
    user = service_dockerfile("dashboard").final.all("USER")[-1].value.split(":")[0]
    assert int(user) != 0


def test_redis_is_reachable_where_redis_url_points(quix):
    """The redis deployment is a service of the environment by the name and port REDIS_URL uses
    (Quix's own Redis template declares the same network block)."""
    redis = deployments(quix)["redis"]
    network = redis["network"]
    url = urlsplit(STAND_INS["REDIS_URL"])
    assert network["serviceName"] == url.hostname
    assert {"port": url.port, "targetPort": 6379} in network["ports"]
    docs = DOCS.read_text(encoding="utf-8").split("## Quix Cloud", 1)[1]
    assert STAND_INS["REDIS_URL"] in docs, "docs/deploy.md tells users which REDIS_URL to enter"
    for service in SERVICES:
        if "REDIS_URL" in declared(service):
            assert declared(service)["REDIS_URL"]["inputType"] == "ProjectVariable"


def test_every_project_variable_is_documented_and_environment_values_are_asked_for():
    """What differs per environment is a project variable (asked for at sync, never a value in
    the repository), and docs/deploy.md lists every one a user is asked for."""
    keys = set(quix_template_variables())
    for service in SERVICES:
        for variable in declared(service).values():
            if variable["inputType"] == "ProjectVariable":
                keys.add(variable["defaultValue"])
        for name in ENVIRONMENT_VARIABLES.get(service, ()):
            assert declared(service)[name]["inputType"] == "ProjectVariable", name
    section = DOCS.read_text(encoding="utf-8").split("## Quix Cloud", 1)[1]
    undocumented = {key for key in keys if f"`{key}`" not in section}
    assert not undocumented, f"docs/deploy.md (Quix Cloud) does not name {sorted(undocumented)}"
    assert {"BOT_REPLICAS", "BOT_CPU", "BOT_MEMORY"} <= keys


def _totals(quix: dict, running_only: bool = False) -> dict[str, int]:
    totals = {"cpu": 0, "memory": 0, "replicas": 0}
    for deployment in quix["deployments"]:
        if running_only and deployment.get("desiredStatus") == "Stopped":
            continue
        resources = deployment["resources"]
        totals["cpu"] += resources["limits"]["cpu"] * resources["replicas"]
        totals["memory"] += resources["limits"]["memory"] * resources["replicas"]
        totals["replicas"] += resources["replicas"]
    return totals


def test_sizing_profiles_resolve_and_the_trial_one_fits_a_trial_workspace(capsys):
    """Every documented profile gives a value to every {{NAME}} of quix.yaml; the trial profile
    stays within Quix's trial quota counting every deployment (a stopped one included)."""
    profiles = quix_profiles()
    assert {"trial", "full"} <= set(profiles)
    lines = []
    for name, values in profiles.items():
        assert set(values) == quix_template_variables(), f"profile {name}: {sorted(values)}"
        quix = quix_yaml(name)
        every, running = _totals(quix), _totals(quix, running_only=True)
        lines.append(
            f"quix profile {name}: {every['cpu'] / 1000:.2f} vCPU, {every['memory'] / 1000:.1f} GB,"
            f" {every['replicas']} replicas (running at import: {running['cpu'] / 1000:.2f} vCPU,"
            f" {running['memory'] / 1000:.1f} GB)"
        )
        bots = {d["name"]: d["resources"] for d in quix["deployments"] if d["name"] in BOTS}
        for bot, resources in bots.items():
            assert resources["limits"]["cpu"] >= 1000, f"{name}: {bot} needs a whole core"
            assert resources["limits"]["memory"] >= 2500, f"{name}: {bot} holds a 1.5B model"
        if name == "trial":
            for key, quota in TRIAL_QUOTA.items():
                assert every[key] <= quota, f"trial profile: {key} {every[key]} > {quota}"
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_a_profile_missing_a_value_is_refused():
    with pytest.raises(KeyError):
        render_quix_yaml({"BOT_CPU": "1000"})


@pytest.mark.parametrize("bot", BOTS)
def test_bots_declare_chat_as_input_and_output(bot):
    """Quix draws the pipeline from InputTopic/OutputTopic variables: a bot reads chat and writes
    its replies to chat, so chat is declared both ways."""
    variables = declared(bot)
    inputs = {v["defaultValue"] for v in variables.values() if v["inputType"] == "InputTopic"}
    outputs = {v["defaultValue"] for v in variables.values() if v["inputType"] == "OutputTopic"}
    chat = variables["CHAT_TOPIC"]["defaultValue"]
    assert chat in inputs and chat in outputs


def test_bot_threads_follow_the_deployment_cpu_limit(quix):
    """LLM_N_THREADS is left empty on Quix, so the bot image's launcher sizes it from
    Quix__Deployment__Limits__Cpu (tests/contract/test_llm_threads.py runs the launcher)."""
    for bot in BOTS:
        assert "defaultValue" not in declared(bot)["LLM_N_THREADS"], bot
        overrides = {v["name"] for v in deployments(quix)[bot].get("variables", [])}
        assert "LLM_N_THREADS" not in overrides
        entrypoint = service_dockerfile(bot).final.all("ENTRYPOINT")[-1].words()
        assert entrypoint[1] == "/opt/supportsim/llm_threads.py"
