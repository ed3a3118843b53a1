"""Contract tests of the deployment files' single sources, standing in for a Quix Cloud import and
a `docker build` (neither runs on the build machines).

- Every `app.yaml` is what `docker/render_app_yaml.py` renders from the settings classes, so a
  setting added without re-rendering fails here; and the renderer's list of the settings classes
  (and direct `os.environ` reads) of each service is what the service's code reaches, followed by
  AST from its main.py (tests/contract/__init__.py).
- `docker/constraints.txt` is the one pin file: it pins every requirement of pyproject.toml once,
  exactly, to a version pyproject's range admits, and nothing else; pyproject.toml pins nothing
  exactly; every pip command of every dockerfile runs under it and names no version of its own;
  `./dev` reads its versions from it (run for real: `./dev pin NAME`).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import Field

from tests.contract import RENDERER, REPO, SERVICES, code_index, renderer, service_dockerfile
from tests.contract.test_dockerfile_contract import run_segments

CONSTRAINTS = "docker/constraints.txt"
# the bot image's model stage installs the 22 model chunks by the version that goes with their
# SHA-256 in supportsim/bots/models.py (test_dockerfile_contract checks the two agree)
MODEL_STAGE = "model"


# ---------------------------------------------------------------------------------------------
# app.yaml


def test_every_service_has_renderer_data():
    assert set(renderer().SERVICES) == set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_app_yaml_is_rendered_from_the_settings_classes(service):
    committed = (REPO / service / "app.yaml").read_text(encoding="utf-8")
    assert committed == renderer().render(service), (
        f"{service}/app.yaml is stale: run `.venv/bin/python docker/render_app_yaml.py`"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_renderer_reads_the_settings_the_service_code_reaches(service):
    """The one list the renderer keeps by hand: a new settings class or os.environ read in a
    service's code must be added to it (or nothing would declare its variables on Quix)."""
    index = code_index()
    reach = index.reach(service)
    data = renderer().SERVICES[service]
    named = {path.split(":")[1] for path in data.settings}
    assert named <= set(index.settings), f"{service}: {sorted(named - set(index.settings))}"
    covered = {c.name for name in named for c in index._mro(index.settings[name])}
    reached = {c.name for c in reach.settings}
    assert covered == reached, (
        f"{service}: its code reads {sorted(reached)}, the renderer renders {sorted(covered)}"
    )
    environ = {n for n in reach.env_reads if not n.startswith("Quix__")}
    assert environ == set(data.environ), f"{service} reads {sorted(environ)} from os.environ"


def test_a_field_added_without_rendering_fails_and_one_without_description_is_refused(
    monkeypatch,
):
    module = renderer()
    original = module.settings_class

    class WithNewField(original(module.BOT)):
        brand_new_setting: int = Field(7, description="A setting added by this test.")

    class Undescribed(original(module.BOT)):
        undescribed_setting: int = 7

    swap = {module.BOT: WithNewField}
    monkeypatch.setattr(module, "settings_class", lambda path: swap.get(path) or original(path))
    diffs = module.stale(module.render_all())
    assert diffs and all("BRAND_NEW_SETTING" in diff for diff in diffs)
    assert len(diffs) == 3, "both bots and the conversation starter read BotSettings"
    swap[module.BOT] = Undescribed
    with pytest.raises(module.RenderError, match="undescribed_setting has no description"):
        module.render("conversation_starter")


def test_renderer_data_changes_show_too(monkeypatch):
    module = renderer()
    data = module.SERVICES["dataset_sink"]
    topics = {**data.topics, "SCORED_TOPIC": "FreeText"}
    monkeypatch.setitem(module.SERVICES, "dataset_sink", dataclasses.replace(data, topics=topics))
    (diff,) = module.stale({REPO / "dataset_sink" / "app.yaml": module.render("dataset_sink")})
    assert "-    inputType: InputTopic" in diff and "+    inputType: FreeText" in diff


def test_check_mode_passes_on_this_checkout():
    result = subprocess.run(
        [sys.executable, str(RENDERER), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# the one pin file


def constraint_pins() -> dict[str, str]:
    """docker/constraints.txt: canonical name -> exact version (each line checked)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate((REPO / CONSTRAINTS).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        where = f"{CONSTRAINTS}:{number}"
        assert not requirement.extras and requirement.marker is None, f"{where}: {line}"
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{where}: pin exactly"
        assert "*" not in specifiers[0].version, f"{where}: pin one version"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{where}: {name} is pinned twice"
        pins[name] = specifiers[0].version
    return pins


def pyproject_requirements() -> list[Requirement]:
    """Every requirement of pyproject.toml, core and extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = [*project["dependencies"]]
    for requirements in project["optional-dependencies"].values():
        lines.extend(requirements)
    return [Requirement(line) for line in lines]


def test_constraints_pin_every_requirement_of_pyproject_within_its_range():
    pins = constraint_pins()
    declared = set()
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        declared.add(name)
        assert name in pins, f"{CONSTRAINTS} does not pin {requirement}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"pyproject.toml's {requirement} does not admit {CONSTRAINTS}'s {name}=={pins[name]}"
        )
    assert set(pins) == declared, f"{CONSTRAINTS} pins {sorted(set(pins) - declared)}: unused"


def test_pyproject_declares_ranges_and_leaves_exact_pins_to_the_constraints():
    exact = [
        str(r)
        for r in pyproject_requirements()
        if any(s.operator in ("==", "===") for s in r.specifier)
    ]
    assert not exact, f"pyproject.toml pins {exact}: give a range, the pin goes in {CONSTRAINTS}"


def pip_commands(stage) -> list[tuple[list[str], dict[str, str]]]:
    """(requirement words, options) of every `pip install` and `pip wheel` of a stage."""
    with_value = {"-c", "--constraint", "-r", "--requirement", "--index-url", "-i"}
    with_value |= {"--extra-index-url", "--find-links", "-f", "--target", "-t", "--wheel-dir", "-w"}
    found = []
    for words in run_segments(stage):
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # VAR=x pip ...
        if words[:1] != ["pip"] or words[1:2] not in (["install"], ["wheel"]):
            continue
        requirements, options, pending = [], {}, None
        for word in words[2:]:
            if pending:
                options[pending], pending = word, None
            elif word in with_value:
                pending = word
            elif word.startswith("-"):
                key, _, value = word.partition("=")
                options[key] = value
            else:
                requirements.append(word)
        found.append((requirements, options))
    return found


def constraint_copies(stage) -> set[str]:
    """Where a stage COPYs docker/constraints.txt to."""
    copies = set()
    for instruction in stage.all("COPY"):
        words = instruction.words()
        if "from" not in instruction.flags and CONSTRAINTS in words[:-1]:
            copies.add(words[-1])
    return copies


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_installs_under_the_constraints_and_pins_nothing(service):
    dockerfile = service_dockerfile(service)
    declared: dict[str, set[frozenset[str]]] = {}  # name -> the extras pyproject asks it with
    for requirement in pyproject_requirements():
        declared.setdefault(canonicalize_name(requirement.name), set()).add(
            frozenset(requirement.extras)
        )
    commands = 0
    for stage in dockerfile.stages:
        if stage.name == MODEL_STAGE:
            continue
        for requirements, options in pip_commands(stage):
            commands += 1
            constraint = options.get("-c", options.get("--constraint"))
            assert constraint in constraint_copies(stage), (
                f"{service}: `pip {' '.join(requirements)}` does not run under {CONSTRAINTS}"
            )
            for word in requirements:
                requirement = Requirement(word)
                name = canonicalize_name(requirement.name)
                assert not requirement.specifier and not requirement.url, (
                    f"{service}: {word} pins a version; {CONSTRAINTS} does"
                )
                assert name in declared, f"{service}: {name} is not a requirement of pyproject"
                assert frozenset(requirement.extras) in declared[name] | {frozenset()}, word
    assert commands, f"{service}: no pip command found"
    text = (REPO / service / "dockerfile").read_text(encoding="utf-8").lower()
    for requirement in pyproject_requirements():
        name = re.escape(canonicalize_name(requirement.name))
        assert not re.search(rf"(?<![\w.-]){name}(\[[^\]]*\])?\s*[=<>~!]=", text), (
            f"{service}/dockerfile names a version of {requirement.name}"
        )


def run_dev(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "dev"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dev_takes_its_pins_from_the_constraints_file():
    pins = constraint_pins()
    for name in ("torch", "llama-cpp-python", "PyYAML", "LLAMA_cpp.python"):
        result = run_dev("pin", name)
        canonical = canonicalize_name(name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().lower() == f"{canonical}=={pins[canonical]}"
    refused = run_dev("pin", "no-such-package")
    assert refused.returncode != 0 and CONSTRAINTS in refused.stderr
    script = (REPO / "dev").read_text(encoding="utf-8")
    assert f"CONSTRAINTS={CONSTRAINTS}" in script
    assert 'sha256sum pyproject.toml dev "$CONSTRAINTS"' in script, "setup re-runs on a new pin"
    assert '-c "$CONSTRAINTS"' in script
    for requirement in pyproject_requirements():
        name = re.escape(canonicalize_name(requirement.name))
        assert not re.search(rf"(?<![\w.-]){name}\s*==", script.lower()), (
            f"./dev pins {requirement.name}"
        )
