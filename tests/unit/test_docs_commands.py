"""Every command and address in README.md and docs/*.md that can be checked here is checked.

From the fenced shell blocks and the inline code of the documents: `supportsim` subcommands and
their `--flags` exist (asked of the real CLI parser), `python -m supportsim.X` modules and
`bench/`, `tests/` and service scripts named exist, `./dev` subcommands exist, repository paths
named exist, every `localhost`/`127.0.0.1` port named is one docker-compose.yml publishes (or the
dashboard's, Quix's or a documented server's), every UPPER_CASE variable set in a command is read
by some settings class or documented deployment file, and the Kafka address given for the host
under Docker Compose is the one compose publishes. What cannot be checked here (Docker, Quix
Cloud, a GPU server) is not run.
"""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from supportsim import cli
from tests.contract import code_index, load_compose

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
# ports named in the docs that are not compose's: Streamlit's default under `streamlit run`,
# servers users run themselves (vLLM, llama.cpp's server, Ollama), InfluxDB Cloud's HTTPS
EXTERNAL_PORTS = {8501, 8000, 8080, 11434, 443}
# KAFKA_BROKER_ADDRESS's code default: a broker of the user's own (compose's host port is 9094)
CODE_DEFAULT_PORTS = {9092}
# variables a command may set that no settings class reads: read by tools, compose or the shell
OTHER_VARIABLES = {
    "CUSTOMER_REPLICAS",  # compose: replica counts
    "AGENT_REPLICAS",
    "LLM_SERVER_MODEL",  # compose: the vLLM server's model
    "HF_TOKEN",
    "SUPPORTSIM_TORCH_INDEX",  # ./dev
    "SUPPORTSIM_WHEELS",
    "PYTHON",
    "CMAKE_ARGS",
    "PORT",  # a placeholder in an example address
}


def shell_lines(text: str) -> list[str]:
    """Commands of the fenced shell blocks, continuations joined, comments and prompts cut."""
    lines: list[str] = []
    for block in FENCE.findall(text):
        pending = ""
        for raw in block.splitlines():
            line = raw.split("  #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line:
                lines.append(line)
    return lines


def inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


@cache
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("supportsim has no subcommands")


def flags_of(sub: argparse.ArgumentParser) -> set[str]:
    return {flag for action in sub._actions for flag in action.option_strings}


def supportsim_invocations() -> list[tuple[Path, list[str]]]:
    """(document, words after `supportsim`) of every `supportsim ...` command in code."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for line in [*shell_lines(text), *inline_code(text)]:
            for segment in re.split(r"\s*(?:\||&&|;|&)\s*", line):
                match = re.search(r"(?:^|[\s/])supportsim\s+([a-z].*)$", segment)
                if match and "supportsim." not in segment.split("supportsim")[0][-1:]:
                    try:
                        words = shlex.split(match.group(1))
                    except ValueError:
                        continue
                    found.append((document, words))
    return found


def test_supportsim_subcommands_and_flags_named_in_the_docs_exist():
    commands = subcommands()
    checked = 0
    for document, words in supportsim_invocations():
        name = words[0]
        if name in ("export", "up", "compare", "score") or name in commands:
            assert name in commands, f"{document.name}: `supportsim {name}` does not exist"
            known = flags_of(commands[name])
            for word in words[1:]:
                flag = word.split("=")[0]
                if flag.startswith("--"):
                    assert flag in known, f"{document.name}: `supportsim {name} {flag}` is unknown"
            checked += 1
    assert checked >= 10, "the documents' supportsim commands were not found"


def test_documented_export_options_are_the_cli_options():
    """docs/datasets.md's option table lists exactly what `supportsim export` accepts."""
    text = (REPO / "docs" / "datasets.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (`--[^|]+)\|", text, flags=re.M)
    documented = {flag for cell in rows for flag in re.findall(r"`(--[a-z-]+)", cell)}
    actual = flags_of(subcommands()["export"]) - {"-h", "--help", "--topic"}
    assert actual - documented == set(), f"undocumented: {sorted(actual - documented)}"
    assert documented - actual == set(), f"documented but unknown: {sorted(documented - actual)}"


def test_python_modules_and_scripts_named_in_the_docs_exist():
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for line in shell_lines(text) + inline_code(text):
            for module in re.findall(r"python -m ([\w.]+)", line):
                if module.startswith("supportsim"):
                    path = REPO / Path(*module.split("."))
                    assert path.with_suffix(".py").is_file() or path.is_dir(), (
                        f"{document.name}: {module}"
                    )
            for script in re.findall(
                r"python (?:\S+/)?((?:bench|tests|docker|[a-z_]+)/\S+\.py)", line
            ):
                assert (REPO / script).is_file(), f"{document.name}: {script} does not exist"


def test_dev_subcommands_named_in_the_docs_exist():
    script = (REPO / "dev").read_text(encoding="utf-8")
    cases = set(re.findall(r"^  ([a-z]+)\)$", script, flags=re.M))
    for document in DOCUMENTS:
        for name in re.findall(r"\./dev ([a-z]+)", document.read_text(encoding="utf-8")):
            assert name in cases, f"{document.name}: `./dev {name}` is not a dev subcommand"


def test_repository_paths_named_in_the_docs_exist():
    prefixes = ("supportsim/", "tests/", "bench/", "docs/", "docker/", "prompts/")
    for document in DOCUMENTS:
        for code in inline_code(document.read_text(encoding="utf-8")):
            path = code.split(":")[0].split(" ")[0].rstrip(",.")
            if path.startswith(prefixes) and not any(c in path for c in "<>*{$"):
                assert (REPO / path).exists(), f"{document.name}: {path} does not exist"
            if re.fullmatch(r"[a-z_]+/(?:main\.py|app\.yaml|dockerfile)", path):
                assert (REPO / path).exists(), f"{document.name}: {path} does not exist"


def published_host_ports() -> set[int]:
    ports = set()
    for spec in load_compose()["services"].values():
        for entry in spec.get("ports", []):
            parts = str(entry).split(":")
            ports.add(int(parts[-2] if len(parts) >= 2 else parts[-1]))
    return ports


def test_local_addresses_in_the_docs_are_published_by_compose():
    published = published_host_ports()
    assert {9094, 8501, 6379, 8181} <= published
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for port in re.findall(r"(?:localhost|127\.0\.0\.1):(\d+)", text):
            port = int(port)
            assert port in published | EXTERNAL_PORTS | CODE_DEFAULT_PORTS, (
                f"{document.name}: localhost:{port} is not a port docker-compose.yml publishes"
            )


def test_the_host_kafka_address_under_compose_is_the_published_one():
    """Compose's Kafka listens for the host on 9094 (HOST listener); 9092 is the containers'."""
    kafka = load_compose()["services"]["kafka"]
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    host_port = int(re.search(r"HOST://localhost:(\d+)", advertised).group(1))
    assert host_port in published_host_ports()
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for sentence in re.split(r"(?<=[.;])\s", text.replace("\n", " ")):
            if re.search(r"compose", sentence, re.I) and re.search(r"host", sentence, re.I):
                for port in re.findall(r"localhost:(\d+)", sentence):
                    if "Kafka" in sentence and int(port) in (9092, host_port):
                        assert int(port) == host_port, f"{document.name}: {sentence.strip()}"


@cache
def known_variables() -> set[str]:
    index = code_index()
    names: set[str] = set()
    for settings in index.settings.values():
        names |= set(index.fields(settings))
    for module in index.trees:
        names |= _env_reads_of(module)
    compose_text = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    names |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", compose_text))
    return names | OTHER_VARIABLES


def _env_reads_of(module: str) -> set[str]:
    text = code_index().paths[module].read_text(encoding="utf-8")
    return set(re.findall(r"""environ(?:\.get)?\(?\[?["']([A-Z_][A-Z0-9_]*)["']""", text))


def test_variables_set_in_documented_commands_are_read_somewhere():
    for document in DOCUMENTS:
        for line in shell_lines(document.read_text(encoding="utf-8")):
            for name in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", line):
                assert name in known_variables(), f"{document.name}: {name} is read by nothing"


def test_the_checks_catch_mistakes(tmp_path):
    fake = "```bash\nFOO_BAR=1 supportsim export --no-such-flag\n./dev launch\n```\n"
    assert shell_lines(fake) == ["FOO_BAR=1 supportsim export --no-such-flag", "./dev launch"]
    assert "--no-such-flag" not in flags_of(subcommands()["export"])
    assert "FOO_BAR" not in known_variables()
    assert 9092 not in published_host_ports(), "compose publishes Kafka to the host on 9094"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_readme_does_not_say_the_docker_sentiment_image_trains_at_first_use(document):
    text = document.read_text(encoding="utf-8").replace("\n", " ")
    assert not re.search(r"\(Docker[^)]*\) trains it on first use", text), (
        f"{document.name}: the sentiment image trains at build time"
    )
