"""Render every service's Quix Cloud `app.yaml` from the settings classes its code reads.

    .venv/bin/python docker/render_app_yaml.py           # rewrite the app.yaml files
    .venv/bin/python docker/render_app_yaml.py --check   # exit 1, with a diff, if one is stale

Each variable comes from a field of a pydantic settings class: its name (upper case, with the
class's env_prefix), its description (`Field(description=...)`; a subclass that only changes a
default keeps its base's) and its default. To add a setting, add the field with a description and
run this script; `tests/contract/test_app_yaml_rendered.py` fails until the files are rendered.

What only the deployment knows is the data below: which settings classes each service reads
(the test checks the list against what its code reaches), how Quix draws its topics, which
values are project variables, the deploy-only variables, and the few values Quix Cloud needs
that differ from the code's defaults. A default the service's image sets (an ENV of its
dockerfile) is the one the container sees, so it is the one declared.

Secrets (every `SecretStr` field) are project variables marked secret and bound by name, never
given a value: Quix asks for them at the first sync.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import shlex
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]

KAFKA = "supportsim.settings:KafkaSettings"
BOT = "supportsim.bots.runner:BotSettings"
LLM = "supportsim.bots.llm:LLMConfig"
TOPIC_TYPES = ("InputTopic", "OutputTopic")

# Quix Cloud's token brings the broker connection; these only apply off the platform
PLATFORM = frozenset(
    {
        "KAFKA_BROKER_ADDRESS",
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD",
        "KAFKA_SSL_CA_LOCATION",
    }
)
# one value per process: a deployment variable would be shared by every replica, which would then
# fence each other's transactions (on Quix the id comes from Quix__Deployment__ReplicaName)
PER_PROCESS = frozenset({"REPLICA_INDEX", "TRANSACTIONAL_ID"})
# values Quix Cloud needs that differ from the code's defaults
QUIX_VALUES = {"KAFKA_REPLICATION_FACTOR": "2"}  # as quix.yaml's topics
# non-secret values that differ per environment: project variables asked for at the first sync
PROJECT_VARIABLES = frozenset({"INFLUXDB_HOST", "INFLUXDB_DATABASE"})
# deployment facts appended to a field's description
NOTES = {
    "STATE_DIR": "In the image: /app/state, the deployment's state volume on Quix Cloud.",
    "KAFKA_REPLICATION_FACTOR": "On Quix Cloud: 2, as the topics of quix.yaml.",
    "LLM_N_THREADS": "In the image, unset or empty: the deployment's CPU limit in whole cores"
    " (at least 1).",
    "LLM_MODEL": "The image's default is the Qwen GGUF file baked into it.",
    "LLM_CORE_LOCK": "On Quix Cloud every replica is a container of its own: leave it empty.",
    "DASHBOARD_ADDRESS": "In the image Streamlit listens on 0.0.0.0 instead.",
    "DASHBOARD_PORT": "In the image STREAMLIT_SERVER_PORT decides instead.",
    "REDIS_URL": "On Quix Cloud: redis://redis:6379/0 for the redis deployment of quix.yaml.",
}


@dataclass(frozen=True)
class Extra:
    """A deploy-only variable: declared for Quix, read by no settings class of ours."""

    name: str
    description: str
    input_type: str = "FreeText"
    same_as: str | None = None  # its default is this variable's (else the image's ENV)


@dataclass(frozen=True)
class Service:
    """What the deployment of one service folder needs beyond its settings classes."""

    settings: tuple[str, ...]  # every settings class its code reads, as "module:Class"
    folders: tuple[str, ...]  # includedFolders: what its dockerfile copies besides its folder
    topics: dict[str, str] = field(default_factory=dict)  # topic variable -> Input/OutputTopic
    environ: dict[str, str] = field(default_factory=dict)  # os.environ reads -> description
    extra: tuple[Extra, ...] = ()
    required: frozenset[str] = frozenset()  # project variables the service cannot start without


CHAT_OUTPUT = Extra(
    "CHAT_OUTPUT_TOPIC",
    "The topic the bot writes its replies to: always CHAT_TOPIC (declared so Quix's pipeline"
    " view draws the bot's output).",
    input_type="OutputTopic",
    same_as="CHAT_TOPIC",
)
BOT_SERVICE = Service(
    settings=(BOT, KAFKA, LLM),
    folders=("supportsim", "prompts", "docker"),
    topics={"CHAT_TOPIC": "InputTopic", "DEAD_LETTER_TOPIC": "OutputTopic"},
    environ={"SUPPORTSIM_CACHE": "Where models are assembled; the image has its model already."},
    extra=(CHAT_OUTPUT,),
)
SERVICES: dict[str, Service] = {
    "ai_customer": BOT_SERVICE,
    "ai_support_agent": BOT_SERVICE,
    "conversation_starter": Service(
        settings=(BOT, KAFKA),
        folders=("supportsim", "prompts", "docker"),
        topics={"CHAT_TOPIC": "OutputTopic", "DEAD_LETTER_TOPIC": "OutputTopic"},
    ),
    "sentiment_analysis": Service(
        settings=("supportsim.sentiment.service:SentimentSettings", KAFKA),
        folders=("supportsim", "docker"),
        topics={
            "CHAT_TOPIC": "InputTopic",
            "SCORED_TOPIC": "OutputTopic",
            "DEAD_LETTER_TOPIC": "OutputTopic",
        },
        environ={
            "SUPPORTSIM_CACHE": "Where the sentiment model lives; the image has it trained there."
        },
    ),
    "redis_aggregator": Service(
        settings=("supportsim.sinks.live_view:AggregatorSettings", KAFKA),
        folders=("supportsim", "docker"),
        topics={"SCORED_TOPIC": "InputTopic", "DEAD_LETTER_TOPIC": "OutputTopic"},
        required=frozenset({"REDIS_URL"}),
    ),
    "influx_sink": Service(
        settings=("supportsim.sinks.influx:HistorySettings", KAFKA),
        folders=("supportsim", "docker"),
        topics={"SCORED_TOPIC": "InputTopic", "DEAD_LETTER_TOPIC": "OutputTopic"},
        required=frozenset({"INFLUXDB_HOST", "INFLUXDB_DATABASE", "INFLUXDB_TOKEN"}),
    ),
    "dataset_sink": Service(
        settings=("supportsim.sinks.dataset_files:DatasetSettings", KAFKA),
        folders=("supportsim", "docker"),
        topics={"SCORED_TOPIC": "InputTopic", "DEAD_LETTER_TOPIC": "OutputTopic"},
    ),
    "dashboard": Service(
        settings=("supportsim.live.store:DashboardSettings",),
        folders=("supportsim", "docker"),
        extra=(
            Extra(
                "STREAMLIT_SERVER_PORT",
                "Port Streamlit listens on (a non-root user: above 1024); Quix's public port 80"
                " maps to it.",
            ),
        ),
        required=frozenset({"REDIS_URL"}),
    ),
}


class RenderError(ValueError):
    """The code or the data above cannot be rendered (the message names the fix)."""


# ---------------------------------------------------------------------------------------------
# reading the code


def settings_class(path: str) -> type:
    """The class named "module:Class", imported."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def env_name(cls: type, name: str, info) -> str:
    """The environment variable a field is read from."""
    if isinstance(info.validation_alias, str):
        return info.validation_alias.upper()
    return (cls.model_config.get("env_prefix", "") + name).upper()


def description(cls: type, name: str) -> str:
    """A field's description, or the nearest base class's when a subclass only re-declares it."""
    for owner in cls.__mro__:
        info = getattr(owner, "model_fields", {}).get(name)
        if info is not None and info.description:
            return info.description.strip()
    raise RenderError(f"{cls.__name__}.{name} has no description: add Field(description=...)")


def is_secret(annotation: Any) -> bool:
    """True for SecretStr and SecretStr | None."""
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def text(value: Any) -> str | None:
    """A default as an environment variable would spell it (None: no default)."""
    if value is None or value is PydanticUndefined:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, SecretStr):
        raise RenderError("a secret has no default on Quix Cloud")
    return str(value)


def dockerfile_lines(path: Path) -> list[str]:
    """The instructions of a dockerfile, one line each: continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    return logical


def image_env(service: str) -> dict[str, str]:
    """The ENV values of the final stage of a service's dockerfile."""
    env: dict[str, str] = {}
    for line in dockerfile_lines(REPO / service / "dockerfile"):
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            env = {}
        elif keyword.upper() == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    return env


@dataclass
class Setting:
    """One variable as the code declares it."""

    name: str
    description: str
    default: str | None
    secret: bool


def settings_of(service: Service) -> dict[str, Setting]:
    """Every variable the service's settings classes read, by name."""
    found: dict[str, Setting] = {}
    for path in service.settings:
        cls = settings_class(path)
        for name, info in cls.model_fields.items():
            variable = env_name(cls, name, info)
            default = info.get_default(call_default_factory=True)
            secret = is_secret(info.annotation)
            setting = Setting(
                variable, description(cls, name), None if secret else text(default), secret
            )
            if variable in found and found[variable] != setting:
                raise RenderError(f"{variable} is declared differently by two settings classes")
            found[variable] = setting
    return found


# ---------------------------------------------------------------------------------------------
# rendering


def variables(name: str, service: Service) -> list[dict[str, Any]]:
    """The app.yaml variables of one service, sorted by name."""
    image = image_env(name)
    settings = {k: v for k, v in settings_of(service).items() if k not in PLATFORM | PER_PROCESS}
    for variable, about in service.environ.items():
        settings[variable] = Setting(variable, about, None, secret=False)
    rendered: dict[str, dict[str, Any]] = {}
    for variable, setting in settings.items():
        about = " ".join(filter(None, [setting.description, NOTES.get(variable)]))
        entry: dict[str, Any] = {"name": variable}
        if setting.secret or variable in PROJECT_VARIABLES:
            secret = "the secret project variable" if setting.secret else "the project variable"
            entry["inputType"] = "ProjectVariable"
            entry["description"] = f"{about} Quix Cloud: {secret} {variable}."
            entry["defaultValue"] = variable
            if setting.secret:
                entry["secret"] = True
            entry["required"] = variable in service.required
        else:
            if variable == "SERVICE_NAME":
                default = name  # the bots share one settings class and pass their own name
            elif variable in QUIX_VALUES:
                default = QUIX_VALUES[variable]
            else:
                default = image.get(variable, setting.default)
            input_type = service.topics.get(variable, "FreeText")
            entry["inputType"] = input_type
            entry["description"] = about
            if default is not None:
                entry["defaultValue"] = default
            entry["required"] = input_type in TOPIC_TYPES
        rendered[variable] = entry
    for extra in service.extra:
        if extra.same_as:
            default = rendered[extra.same_as].get("defaultValue")
        else:
            default = image.get(extra.name)
        if default is None:
            raise RenderError(f"{name}: {extra.name} has no default (same_as or an image ENV)")
        rendered[extra.name] = {
            "name": extra.name,
            "inputType": extra.input_type,
            "description": extra.description,
            "defaultValue": default,
            "required": extra.input_type in TOPIC_TYPES,
        }
    unknown = set(service.topics) - set(rendered)
    if unknown:
        raise RenderError(f"{name}: no setting reads the topic variables {sorted(unknown)}")
    return [rendered[key] for key in sorted(rendered)]


def scalar(value: Any) -> str:
    """A YAML scalar: strings double-quoted (JSON's escapes are YAML's), booleans bare."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(str(value), ensure_ascii=False)


def render(name: str) -> str:
    """The text of `<name>/app.yaml`."""
    service = SERVICES[name]
    document: dict[str, Any] = {
        "name": name,
        "language": "python",
        "variables": variables(name, service),
        "dockerfile": "dockerfile",
        "runEntryPoint": "main.py",
        "defaultFile": "main.py",
        "includedFolders": list(service.folders),
    }
    lines = [
        f"# Quix Cloud application descriptor of {name} (see quix.yaml and docs/deploy.md).",
        "# Rendered by docker/render_app_yaml.py from the settings classes; do not edit: change a",
        "# field (or the script's data) and run `.venv/bin/python docker/render_app_yaml.py`.",
        f"name: {name}",
        "language: python",
        "variables:",
    ]
    for variable in document["variables"]:
        first = True
        for key, value in variable.items():
            shown = value if key in ("name", "inputType") else scalar(value)  # identifiers
            lines.append(f"  {'- ' if first else '  '}{key}: {shown}")
            first = False
    lines += ["dockerfile: dockerfile", "runEntryPoint: main.py", "defaultFile: main.py"]
    lines += ["includedFolders:", *(f"  - {folder}" for folder in service.folders)]
    result = "\n".join(lines) + "\n"
    if yaml.safe_load(result) != document:  # the hand-written YAML says what was meant
        raise RenderError(f"{name}: the rendered YAML does not read back as rendered")
    return result


def render_all() -> dict[Path, str]:
    """Every service's app.yaml path and rendered text."""
    return {REPO / name / "app.yaml": render(name) for name in SERVICES}


def stale(rendered: dict[Path, str]) -> list[str]:
    """A unified diff (committed -> rendered) for each file that differs from its rendering."""
    diffs = []
    for path, text_ in rendered.items():
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        if committed != text_:
            relative = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        text_.splitlines(keepends=True),
                        f"{relative} (committed)",
                        f"{relative} (rendered)",
                    )
                )
            )
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 with a diff if a file is stale"
    )
    args = parser.parse_args(argv)
    try:
        rendered = render_all()
    except RenderError as exc:
        print(f"render_app_yaml: {exc}", file=sys.stderr)
        return 2
    if args.check:
        diffs = stale(rendered)
        for diff in diffs:
            print(diff, end="")
        if diffs:
            print(
                f"{len(diffs)} app.yaml file(s) differ from their settings classes: run "
                "`.venv/bin/python docker/render_app_yaml.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    for path, text_ in rendered.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text_:
            path.write_text(text_, encoding="utf-8")
            print(f"rendered {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
