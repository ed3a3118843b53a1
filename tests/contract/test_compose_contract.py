"""Contract tests of docker-compose.yml, standing in for `docker compose config` and `up`.

There is no Docker engine on the build machines. These tests validate the file against the Compose
Specification JSON schema (the copy shipped in the `check-jsonschema` package, Apache-2.0), check
what each service gets (built from this repository, the environment its settings read, state on a
volume, healthchecks, replicas, order) and that docs/deploy.md describes exactly these services,
ports, volumes and healthchecks. The InfluxDB token hand-over scripts run for real, with stand-ins
for the influxdb3 CLI and the service.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.contract import (
    ONE_OFF_SERVICES,
    REPO,
    SERVICES,
    env_of,
    healthcheck_mode,
    load_compose,
    service_dockerfile,
    service_env,
)
from tests.contract.test_dockerfile_contract import image_env

DOCS = REPO / "docs" / "deploy.md"
STATEFUL = ("ai_customer", "ai_support_agent", "sentiment_analysis", "redis_aggregator")
BOTS = ("ai_customer", "ai_support_agent")
# opt-in viewers nothing depends on: no healthcheck
OPTIONAL_TOOLS = {"kafka-ui": "ui"}
INFRASTRUCTURE_IMAGES = {"kafka": "apache/kafka:", "redis": "redis:", "influxdb": "influxdb:"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def validator(schema: dict) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


# ---------------------------------------------------------------------------------------------
# the file as a whole


def test_compose_file_validates_against_the_compose_specification(compose, schema):
    errors = sorted(validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_check_catches_mistakes(compose, schema):
    """The schema is strict enough to matter: a misspelled key or a bad type fails."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["dashboard"]["enviroment"] = {"X": "1"}
    assert list(validator(schema).iter_errors(broken))
    broken = json.loads(json.dumps(compose))
    broken["services"]["kafka"]["healthcheck"] = ["redis-cli", "ping"]
    assert list(validator(schema).iter_errors(broken))


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_the_file(tmp_path):
    """A second, independent validator where installed (Debian's docker-compose 1.29 reads the
    file and resolves it without a Docker engine)."""
    result = subprocess.run(
        ["docker-compose", "--project-directory", str(REPO), "config", "--quiet"],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_up_needs_no_account_token_or_cloud(compose):
    text = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    assert not re.search(r"\$\{\w+:?\?", text), "a required variable would need a .env file"
    assert "env_file" not in text
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            assert not re.search(
                r"cloud2\.influxdata|quix\.io|amazonaws|confluent\.cloud", value
            ), f"{name}: {key} points at a cloud service"


def test_infrastructure_images_are_pinned(compose):
    for name, prefix in INFRASTRUCTURE_IMAGES.items():
        image = compose["services"][name]["image"]
        assert image.startswith(prefix), f"{name}: {image}"
        tag = image.split(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: pin a version, not {tag}"
    assert "core" in compose["services"]["influxdb"]["image"], "InfluxDB 3 Core"


def test_kafka_runs_kraft_with_a_healthcheck(compose):
    kafka = compose["services"]["kafka"]
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["CLUSTER_ID"] and "ZOOKEEPER" not in " ".join(env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "services create their topics"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    for key in (
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
    ):
        assert env[key] == "1", "one broker: exactly-once needs single-replica internal topics"
    assert kafka["healthcheck"]["test"]


@pytest.mark.parametrize("service", SERVICES)
def test_service_is_built_from_this_repository(compose, service):
    spec = compose["services"].get(service)
    assert spec is not None, f"docker-compose.yml has no service {service}"
    build = spec["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == f"{service}/dockerfile"
    assert build["args"]["MAINAPPPATH"] == service
    assert (REPO / build["dockerfile"]).is_file()


def test_every_compose_service_is_accounted_for(compose):
    built = {n for n, s in compose["services"].items() if "build" in s}
    assert built == set(SERVICES)


def test_bot_replicas_default_to_two_and_are_configurable():
    default = load_compose()["services"]
    assert str(default["ai_customer"]["deploy"]["replicas"]) == "2"
    assert str(default["ai_support_agent"]["deploy"]["replicas"]) == "2"
    scaled = load_compose({"CUSTOMER_REPLICAS": "5", "AGENT_REPLICAS": "3"})["services"]
    assert scaled["ai_customer"]["deploy"]["replicas"] == "5"
    assert scaled["ai_support_agent"]["deploy"]["replicas"] == "3"


def test_conversation_starter_is_a_one_off_job_after_kafka(compose):
    for name in ONE_OFF_SERVICES:
        spec = compose["services"][name]
        assert spec["restart"] == "no"
        assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_services_wait_for_what_they_use(compose):
    for name in SERVICES:
        spec = compose["services"][name]
        env = service_env(name) if (REPO / name / "main.py").exists() else {}
        needs = {"kafka"} if "KAFKA_BROKER_ADDRESS" in env else set()
        if "REDIS_URL" in env:
            needs.add("redis")
        if name == "influx_sink":
            needs.add("influxdb")
        for dependency in needs:
            assert spec["depends_on"][dependency]["condition"] == "service_healthy", (
                f"{name} must wait for {dependency}"
            )


def test_bot_threads_come_from_one_variable():
    """LLM_N_THREADS is set for both bots from one variable (default 2: 2 + 2 replicas x 2
    threads), so the replicas do not each take every core."""
    default = load_compose()["services"]
    for bot in BOTS:
        assert env_of(default[bot])["LLM_N_THREADS"] == "2"
        assert "LLM_N_THREADS" in service_env(bot), f"{bot} no longer reads LLM_N_THREADS"
    chosen = load_compose({"LLM_N_THREADS": "3"})["services"]
    assert {env_of(chosen[bot])["LLM_N_THREADS"] for bot in BOTS} == {"3"}
    replicas = sum(int(default[bot]["deploy"]["replicas"]) for bot in BOTS)
    threads = replicas * int(env_of(default["ai_customer"])["LLM_N_THREADS"])
    assert f"{threads} threads" in (REPO / "docker-compose.yml").read_text(encoding="utf-8")


def test_kafka_ui_is_an_opt_in_profile_on_the_internal_listener(compose):
    for name, profile in OPTIONAL_TOOLS.items():
        spec = compose["services"][name]
        assert spec["profiles"] == [profile]
        assert re.search(r":v\d+\.\d+\.\d+$", spec["image"]), f"{name}: pin {spec['image']}"
        assert env_of(spec)["KAFKA_BROKERS"] == "kafka:9092", "the listener other containers use"
        assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert all(str(p).startswith("127.0.0.1:") for p in spec["ports"])
        assert not any(name in (s.get("depends_on") or {}) for s in compose["services"].values())
    docs = DOCS.read_text(encoding="utf-8")
    assert "docker compose --profile ui up" in docs


def test_dashboard_is_published_on_localhost_8501(compose):
    assert "127.0.0.1:8501:8501" in compose["services"]["dashboard"]["ports"]
    env = image_env(service_dockerfile("dashboard"))
    assert env["STREAMLIT_SERVER_PORT"] == "8501"


@pytest.mark.parametrize("service", SERVICES)
def test_service_environment_is_what_its_settings_read(compose, service):
    reads = service_env(service)
    spec = compose["services"][service]
    env = env_of(spec)
    image = image_env(service_dockerfile(service))
    unknown = set(env) - set(reads) - set(image)
    assert not unknown, f"{service}: compose sets {sorted(unknown)}, which its code never reads"
    provided = set(env) | set(image) | _entrypoint_exports(spec)
    required = {k for k, f in reads.items() if f is not None and not f.has_default}
    assert required <= provided, f"{service}: required settings not set: {required - provided}"
    if "KAFKA_BROKER_ADDRESS" in reads:
        assert env.get("KAFKA_BROKER_ADDRESS") == "kafka:9092"
    if "REDIS_URL" in reads:
        assert env.get("REDIS_URL") == "redis://redis:6379/0"
    if "STATE_DIR" in reads:
        assert (env.get("STATE_DIR") or image.get("STATE_DIR")) == "/app/state"


def test_influx_sink_gets_host_database_and_token(compose):
    spec = compose["services"]["influx_sink"]
    env = env_of(spec)
    assert env["INFLUXDB_HOST"] == "http://influxdb:8181"
    assert env["INFLUXDB_DATABASE"]
    assert "INFLUXDB_TOKEN" not in env, "the token comes from the volume, never from this file"
    assert _entrypoint_exports(spec) == {"INFLUXDB_TOKEN"}


@pytest.mark.parametrize("service", STATEFUL)
def test_stateful_service_keeps_state_dir_on_a_volume(compose, service):
    spec = compose["services"][service]
    state_dir = env_of(spec).get("STATE_DIR") or image_env(service_dockerfile(service))["STATE_DIR"]
    targets = {v.split(":")[1]: v.split(":")[0] for v in spec.get("volumes", [])}
    assert state_dir in targets, f"{service}: STATE_DIR={state_dir} is not on a volume"
    assert targets[state_dir] in compose["volumes"], "a named volume, declared at the top level"


def test_every_long_running_service_has_a_healthcheck(compose):
    for name, spec in compose["services"].items():
        one_off = spec.get("restart") == "no"
        check = spec.get("healthcheck", {})
        if one_off:
            continue
        if name in OPTIONAL_TOOLS:
            assert spec.get("profiles") and check.get("disable"), f"{name}: an opt-in viewer"
            continue
        if "build" in spec:
            assert healthcheck_mode(service_dockerfile(name)) and not check.get("disable")
        else:
            assert check.get("test"), f"{name} has no healthcheck"


# ---------------------------------------------------------------------------------------------
# docs/deploy.md describes this file


def _docs_table() -> list[dict[str, str]]:
    text = DOCS.read_text(encoding="utf-8")
    block = text.split("<!-- compose-services:start -->")[1]
    block = block.split("<!-- compose-services:end -->")[0]
    rows = [line for line in block.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
        for row in rows[2:]
    ]


def _cell_items(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def _expected_healthcheck(name: str, spec: dict) -> str:
    check = spec.get("healthcheck", {})
    if check.get("disable") or (spec.get("restart") == "no" and not check.get("test")):
        return "none"
    if check.get("test"):
        test = check["test"]
        command = test[1] if test[0] == "CMD-SHELL" else test[1]
        return Path(command.split()[0]).name
    return f"image: {healthcheck_mode(service_dockerfile(name))}"


def test_docs_table_lists_exactly_the_compose_services(compose):
    documented = [row["Service"] for row in _docs_table()]
    assert sorted(documented) == sorted(compose["services"]), "docs/deploy.md table is stale"


def test_docs_table_matches_ports_volumes_replicas_and_healthchecks(compose):
    for row in _docs_table():
        name = row["Service"]
        spec = compose["services"][name]
        assert _cell_items(row["Published port"]) == set(spec.get("ports", [])), name
        assert _cell_items(row["Volumes"]) == set(spec.get("volumes", [])), name
        replicas = str(spec.get("deploy", {}).get("replicas", 1))
        assert row["Replicas"] == replicas, f"{name}: docs say {row['Replicas']}, file {replicas}"
        expected = _expected_healthcheck(name, spec)
        assert expected in row["Healthcheck"], f"{name}: docs should say {expected!r}"
        source = row["From"]
        if "build" in spec:
            assert f"`{spec['build']['dockerfile']}`" in source, name
        else:
            assert f"`{spec['image']}`" in source, name


def _docs_compose_snippets() -> list[dict]:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return [yaml.safe_load(b) for b in blocks if b.lstrip().startswith("services:")]


def test_docs_override_for_a_host_model_is_valid_compose(schema):
    snippets = _docs_compose_snippets()
    assert snippets, "docs/deploy.md shows no compose override for a model from the host"
    for snippet in snippets:
        errors = list(validator(schema).iter_errors(snippet))
        assert not errors, [e.message for e in errors]
        for name, spec in snippet["services"].items():
            assert name in SERVICES
            env = env_of(spec)
            assert env["LLM_MODEL"].startswith("/models/") and env["LLM_MODEL"].endswith(".gguf")
            mounted = {v.split(":")[1] for v in spec["volumes"]}
            assert env["LLM_MODEL"] in mounted, (
                "the model file must be mounted where LLM_MODEL says"
            )
            assert all(v.endswith(":ro") for v in spec["volumes"])


def test_docs_override_sets_only_variables_the_bots_read():
    for snippet in _docs_compose_snippets():
        for name, spec in snippet["services"].items():
            reads = set(service_env(name)) | set(image_env(service_dockerfile(name)))
            unknown = set(env_of(spec)) - reads
            assert not unknown, (
                f"docs tell users to set {sorted(unknown)}, which {name} never reads"
            )


# ---------------------------------------------------------------------------------------------
# the InfluxDB token hand-over, run for real with stand-ins


TOKEN_DIR = "/var/lib/influxdb3-token"


def _script(spec: dict) -> str:
    entrypoint = spec["entrypoint"]
    assert entrypoint[:2] == ["sh", "-ec"]
    return entrypoint[2]


def _entrypoint_exports(spec: dict) -> set[str]:
    entrypoint = spec.get("entrypoint")
    if not entrypoint or entrypoint[:2] != ["sh", "-ec"]:
        return set()
    return set(re.findall(r"^\s*export (\w+)", entrypoint[2], flags=re.M))


def _fake_tool(folder: Path, name: str, body: str) -> None:
    tool = folder / name
    tool.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    tool.chmod(0o755)


@pytest.mark.parametrize("pretty", [False, True])
def test_influxdb_token_is_made_once_and_handed_to_the_sink(compose, tmp_path, pretty):
    token = "apiv3_" + os.urandom(24).hex()  # made up here, never stored
    document = {"token": token, "name": "_admin", "expiry_millis": None}
    rendered = json.dumps(document, indent=2 if pretty else None)
    tools = tmp_path / "bin"
    tools.mkdir()
    volume = tmp_path / "volume"
    volume.mkdir()
    calls = tmp_path / "calls"
    # influxdb3 stand-in: writes the offline token file where --output-file says
    _fake_tool(
        tools,
        "influxdb3",
        f'echo "$@" >> {calls}\nwhile [ $# -gt 0 ]; do\n'
        f'  if [ "$1" = --output-file ]; then printf %s \'{rendered}\' > "$2"; fi; shift\ndone\n',
    )
    env = {"PATH": f"{tools}:/usr/bin:/bin"}
    init = _script(compose["services"]["influxdb-token"]).replace(TOKEN_DIR, str(volume))
    for _ in range(2):  # a second `up` keeps the first token
        subprocess.run(["sh", "-ec", init], env=env, check=True, timeout=30)
    assert calls.read_text().count("create token --admin") == 1
    assert "--offline" in calls.read_text()
    assert (volume / "token").read_text().strip() == token
    assert oct((volume / "token").stat().st_mode)[-3:] == "644", "readable by the sink's user"
    # the sink: its entrypoint exports the token and execs python main.py
    _fake_tool(tools, "python", 'printf "%s|%s" "$INFLUXDB_TOKEN" "$*"\n')
    sink = _script(compose["services"]["influx_sink"]).replace(TOKEN_DIR, str(volume))
    result = subprocess.run(
        ["sh", "-ec", sink], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout == f"{token}|main.py"
    # InfluxDB adopts the same file, and its healthcheck reads the same token
    command = compose["services"]["influxdb"]["command"]
    assert f"--admin-token-file={TOKEN_DIR}/admin-token.json" in command
    check = compose["services"]["influxdb"]["healthcheck"]["test"][1]
    assert f"{TOKEN_DIR}/token" in check
