"""Contract tests of the Quix Cloud template (quix.yaml and every app.yaml), standing in for an
import into Quix Cloud, which cannot be reached from the build machines.

Each deployment's application folder exists with its app.yaml and dockerfile; every environment
variable a service reads (found in its settings classes, see tests/contract/__init__.py) is
declared, with a value the code accepts; secrets are Secret variables with no value; every topic a
service uses is declared with the partitions and retention the code creates it with; stateful
services have state enabled; replicas agree with docker-compose.yml.
"""

from __future__ import annotations

import ast
import importlib
import os
import re

import pytest

from tests.contract import (
    NOT_LITERAL,
    REPO,
    SERVICES,
    app_yaml,
    code_index,
    load_compose,
    quix_yaml,
    service_dockerfile,
    service_env,
)
from tests.contract.test_dockerfile_contract import copied_paths, image_env

# Set by Quix Cloud itself: the SDK token (the services then connect with no address), and the
# connection settings that only apply off the platform.
PLATFORM_VARIABLES = {
    "KAFKA_BROKER_ADDRESS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA_LOCATION",
}
STATEFUL_BY_DESIGN = {"ai_customer", "ai_support_agent", "sentiment_analysis", "redis_aggregator"}
SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIALS?)(?:$|_)", re.I)
INPUT_TYPES = {"FreeText", "Secret", "InputTopic", "OutputTopic", "HiddenText", "ProjectVariable"}


@pytest.fixture(scope="module")
def quix() -> dict:
    return quix_yaml()


def deployments(quix: dict) -> dict[str, dict]:
    return {d["name"]: d for d in quix["deployments"]}


def declared(service: str) -> dict[str, dict]:
    return {v["name"]: v for v in app_yaml(service)["variables"]}


def is_secret(name: str, field) -> bool:
    return bool(SECRET_NAME.search(name)) or (field is not None and field.secret)


def expected_variables(service: str) -> dict:
    """The variables a service reads that Quix Cloud must be able to set."""
    return {
        name: field
        for name, field in service_env(service).items()
        if not name.startswith("Quix__") and name not in PLATFORM_VARIABLES
    }


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


def test_replicas_agree_with_docker_compose(quix):
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
    stack = importlib.import_module("supportsim.stack")
    names = {spec.name for spec in stack.SERVICES}
    assert names <= set(deployments(quix)), names - set(deployments(quix))


# ---------------------------------------------------------------------------------------------
# variables


@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_the_service_reads_is_declared(service):
    expected = expected_variables(service)
    have = declared(service)
    image = image_set(service)
    missing = set(expected) - set(have) - set(image)
    assert not missing, f"{service}/app.yaml does not declare {sorted(missing)}"
    unknown = set(have) - set(expected) - set(image)
    assert not unknown, f"{service}/app.yaml declares {sorted(unknown)}, which nothing reads"


@pytest.mark.parametrize("service", SERVICES)
def test_variables_have_a_type_and_secrets_have_no_value(service, quix):
    fields = service_env(service)
    for name, variable in declared(service).items():
        assert variable["inputType"] in INPUT_TYPES, f"{service}: {name}"
        assert variable.get("description"), f"{service}: {name} has no description"
        if is_secret(name, fields.get(name)):
            assert variable["inputType"] == "Secret", f"{service}: {name} must be a Secret"
            assert "defaultValue" not in variable, f"{service}: the secret {name} has a default"
        elif variable.get("required"):
            assert "defaultValue" in variable or name in ("INFLUXDB_HOST",), name
    for variable in deployments(quix)[service].get("variables", []):
        name = variable["name"]
        assert name in declared(service), f"quix.yaml overrides {name}, unknown to {service}"
        if declared(service)[name]["inputType"] == "Secret":
            assert set(variable) <= {"name", "inputType", "secretKey", "required", "description"}
            assert re.fullmatch(r"[a-z][a-z0-9_]*", variable["secretKey"]), variable


@pytest.mark.parametrize("service", SERVICES)
def test_non_secret_settings_have_quix_values(service):
    """Every non-optional setting has a value on Quix: the platform never injects an empty one."""
    fields = service_env(service)
    for name, variable in declared(service).items():
        field = fields.get(name)
        if variable["inputType"] == "Secret" or field is None or field.optional:
            continue
        if not field.has_default or name in ("INFLUXDB_HOST",):
            continue
        assert "defaultValue" in variable, f"{service}: {name} needs a defaultValue"


def deployment_environment(service: str, quix: dict) -> dict[str, str]:
    """What Quix Cloud would inject: app.yaml defaults, quix.yaml values, secrets (stand-ins)."""
    env = {n: str(v["defaultValue"]) for n, v in declared(service).items() if "defaultValue" in v}
    for variable in deployments(quix)[service].get("variables", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
    for name, variable in declared(service).items():
        if variable["inputType"] == "Secret":
            env[name] = "redis://redis:6379/0" if name.endswith("_URL") else "stand-in"
        elif name not in env and variable.get("required"):
            env[name] = "https://influxdb.example:8181" if name.endswith("_HOST") else "stand-in"
    return env


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
        assert name == reads[topic_variable].default, f"{topic_variable}: app.yaml and code differ"
        assert name in topics, f"quix.yaml does not declare the topic {name!r}"
        configuration = topics[name]
        assert partitions_variable, f"{service}: no partition setting for {topic_variable}"
        partitions = reads[partitions_variable].default
        assert configuration["partitions"] == partitions
        assert str(variables[partitions_variable]["defaultValue"]) == str(partitions)
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


def test_dashboard_is_public_on_port_80(quix):
    dashboard = deployments(quix)["dashboard"]
    assert dashboard["publicAccess"]["enabled"] is True
    assert declared("dashboard")["STREAMLIT_SERVER_PORT"]["defaultValue"] == "80"
    assert "STREAMLIT_SERVER_PORT" in image_set("dashboard")


def test_quix_values_of_code_defaults_are_documented_differences(quix):
    """app.yaml repeats the code's defaults, except where Quix Cloud needs another value."""
    allowed = {"SERVICE_NAME", "STATE_DIR", "KAFKA_REPLICATION_FACTOR", "STREAMLIT_SERVER_PORT"}
    docs = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    for service in SERVICES:
        fields = service_env(service)
        image = image_set(service)
        for name, variable in declared(service).items():
            field = fields.get(name)
            if name in image and name not in allowed:
                # the image decides (e.g. LLM_MODEL names the model file baked into it)
                assert str(variable.get("defaultValue")) == image[name], f"{service}: {name}"
                continue
            if field is None or "defaultValue" not in variable or field.default is NOT_LITERAL:
                continue
            code = str(field.default).lower() if isinstance(field.default, bool) else field.default
            if str(variable["defaultValue"]) != str(code) and name not in allowed:
                pytest.fail(f"{service}: {name}={variable['defaultValue']!r}, code says {code!r}")
    for name in allowed - {"SERVICE_NAME"}:
        assert name in docs, f"docs/deploy.md should explain why {name} differs on Quix Cloud"
