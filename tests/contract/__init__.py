"""Contract tests: static checks that stand in for what cannot run on the build machines.

No Docker engine, no Quix Cloud and no InfluxDB run here, so these tests read the deployment files
(docker-compose.yml, the service dockerfiles, quix.yaml, every app.yaml, docs/deploy.md) and check
them against the code: what each service imports, which environment variables its settings classes
read, which topics it uses. This module holds the shared readers:

- :class:`CodeIndex` finds, by AST and without importing a service, what a service's ``main.py``
  reaches (functions and classes, followed through ``supportsim``), the third-party modules those
  import, the pydantic-settings classes they use and the environment variables they read;
- :func:`parse_dockerfile` splits a Dockerfile into stages and instructions;
- :func:`load_compose` reads docker-compose.yml with Compose's variable interpolation.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RENDERER = REPO / "docker" / "render_app_yaml.py"


@cache
def renderer():
    """docker/render_app_yaml.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("render_app_yaml", RENDERER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# The final layout (DESIGN.md section 3 and the deployment issue): one folder per service, plus
# any other top-level folder with a main.py (a new service must be deployable too).
EXPECTED_SERVICES = (
    "ai_customer",
    "ai_support_agent",
    "conversation_starter",
    "sentiment_analysis",
    "redis_aggregator",
    "influx_sink",
    "dashboard",
)
SERVICES = tuple(
    sorted(
        set(EXPECTED_SERVICES)
        | {p.parent.name for p in REPO.glob("*/main.py") if not p.parent.name.startswith(".")}
    )
)
ONE_OFF_SERVICES = ("conversation_starter",)
BOT_IMAGE_SERVICES = ("ai_customer", "ai_support_agent")
LIBRARY_PACKAGE = "supportsim"


# ---------------------------------------------------------------------------------------------
# Code model


@dataclass
class SettingsField:
    """One field of a pydantic-settings class, as the environment sees it."""

    env: str
    name: str
    annotation: str
    has_default: bool
    default: Any  # a Python literal, or NOT_LITERAL
    owner: str  # the class that declares it

    @property
    def secret(self) -> bool:
        """Declared as a SecretStr: a credential, or a value that may carry one."""
        return "SecretStr" in self.annotation


NOT_LITERAL = object()


@dataclass
class SettingsClass:
    """A BaseSettings subclass found in the code."""

    name: str
    module: str
    bases: list[str]
    prefix: str | None
    # name, annotation, has a default, the default, alias
    own_fields: list[tuple[str, str, bool, Any, str | None]]


@dataclass
class Unit:
    """A piece of code that runs as a whole: a module's top level, a function or a class."""

    module: str
    name: str  # "<module>", a function name or a class name
    node: ast.AST


@dataclass
class Reach:
    """What a service's main.py reaches."""

    units: set[tuple[str, str]]
    modules: set[str]
    files: set[Path]
    third_party: dict[str, set[str]]  # top-level module -> the local modules importing it
    settings: list[SettingsClass]
    env_reads: set[str]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _local_python_files() -> list[Path]:
    files = sorted((REPO / LIBRARY_PACKAGE).rglob("*.py"))
    for service in SERVICES:
        files.extend(sorted((REPO / service).glob("*.py")))
    return [f for f in files if "__pycache__" not in f.parts]


class _Refs(ast.NodeVisitor):
    """Names, attribute chains and import statements inside a node, annotations skipped."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.attrs: set[tuple[str, str]] = set()
        self.imports: list[tuple[ast.AST, bool]] = []  # node, guarded by except ImportError
        self._guarded = 0

    def visit_Name(self, node: ast.Name) -> None:
        self.names.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            self.attrs.add((node.value.id, node.attr))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.append((node, self._guarded > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.imports.append((node, self._guarded > 0))

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(h) for h in node.handlers)
        self._guarded += guarded
        for statement in node.body:
            self.visit(statement)
        self._guarded -= guarded
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    def visit_arg(self, node: ast.arg) -> None:
        pass  # annotations only

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for part in (*node.decorator_list, *node.args.defaults, *node.args.kw_defaults):
            if part is not None:
                self.visit(part)
        for statement in node.body:
            self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    if isinstance(handler.type, ast.Name):
        names = [handler.type.id]
    elif isinstance(handler.type, ast.Tuple):
        names = [e.id for e in handler.type.elts if isinstance(e, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


class CodeIndex:
    """An AST index of supportsim/ and the service folders; nothing is imported."""

    def __init__(self) -> None:
        self.trees: dict[str, ast.Module] = {}
        self.paths: dict[str, Path] = {}
        for path in _local_python_files():
            name = _module_name(path)
            self.trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            self.paths[name] = path
        self.units: dict[tuple[str, str], Unit] = {}
        self.namespaces: dict[str, dict[str, tuple[str, ...]]] = {}
        self.constants: dict[str, dict[str, str]] = {}
        for module, tree in self.trees.items():
            self._index_module(module, tree)
        self.settings = self._find_settings()

    # -- indexing

    def is_local(self, module: str) -> bool:
        """True for supportsim.* and the service folders' modules."""
        top = module.split(".")[0]
        return top == LIBRARY_PACKAGE or top in SERVICES

    def _index_module(self, module: str, tree: ast.Module) -> None:
        top_level = ast.Module(body=[], type_ignores=[])
        namespace: dict[str, tuple[str, ...]] = {}
        constants: dict[str, str] = {}
        for statement in tree.body:
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.units[(module, statement.name)] = Unit(module, statement.name, statement)
                namespace[statement.name] = ("symbol", module, statement.name)
            else:
                top_level.body.append(statement)
            if (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and isinstance(statement.value, ast.Constant)
                and isinstance(statement.value.value, str)
            ):
                constants[statement.targets[0].id] = statement.value.value
        self.units[(module, "<module>")] = Unit(module, "<module>", top_level)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        namespace[alias.asname] = ("module", alias.name)
                    else:
                        namespace[alias.name.split(".")[0]] = ("module", alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                source = self._absolute(module, node)
                for alias in node.names:
                    namespace[alias.asname or alias.name] = ("symbol", source, alias.name)
        self.namespaces[module] = namespace
        self.constants[module] = constants

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.split(".")
        is_package = self.paths[module].name == "__init__.py"
        base = package if is_package else package[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def _find_settings(self) -> dict[str, SettingsClass]:
        classes: dict[str, tuple[str, ast.ClassDef]] = {}
        for (module, name), unit in self.units.items():
            if isinstance(unit.node, ast.ClassDef):
                classes[name] = (module, unit.node)
        found: dict[str, SettingsClass] = {}
        changed = True
        while changed:
            changed = False
            for name, (module, node) in classes.items():
                bases = [_base_name(b) for b in node.bases]
                if name not in found and any(b == "BaseSettings" or b in found for b in bases):
                    found[name] = _settings_class(name, module, node, bases)
                    changed = True
        return found

    # -- settings

    def fields(self, settings: SettingsClass) -> dict[str, SettingsField]:
        """Every field of a settings class, inherited ones included, by environment name."""
        prefix = self._prefix(settings)
        result: dict[str, SettingsField] = {}
        for owner in reversed(self._mro(settings)):
            for name, annotation, has_default, value, alias in owner.own_fields:
                env = (alias or f"{prefix}{name}").upper()
                result = {k: v for k, v in result.items() if v.name != name}
                result[env] = SettingsField(env, name, annotation, has_default, value, owner.name)
        return result

    def _mro(self, settings: SettingsClass) -> list[SettingsClass]:
        order = [settings]
        for base in settings.bases:
            if base in self.settings:
                order.extend(c for c in self._mro(self.settings[base]) if c not in order)
        return order

    def _prefix(self, settings: SettingsClass) -> str:
        for owner in self._mro(settings):
            if owner.prefix is not None:
                return owner.prefix
        return ""

    # -- reach

    def reach(self, service: str) -> Reach:
        """Follow `service/main.py` through every function and class it references."""
        start = (f"{service}.main", "<module>")
        if start[0] not in self.trees:
            raise FileNotFoundError(f"{service}/main.py does not exist yet")
        seen: set[tuple[str, str]] = set()
        modules: set[str] = set()
        third_party: dict[str, set[str]] = {}
        env_reads: set[str] = set()
        todo = [start]
        while todo:
            key = todo.pop()
            if key in seen or key not in self.units:
                continue
            seen.add(key)
            module = key[0]
            for package in _packages_of(module):
                if package in self.trees and package not in modules:
                    modules.add(package)
                    todo.append((package, "<module>"))
            refs = _Refs()
            refs.visit(self.units[key].node)
            namespace = self.namespaces[module]
            for node, guarded in refs.imports:
                for target in self._import_targets(module, node):
                    if self.is_local(target):
                        missing = not self._module_exists(target)
                        if missing and not guarded:
                            raise ModuleNotFoundError(
                                f"{self.paths[module].relative_to(REPO)} imports {target}, "
                                "which is not in this checkout"
                            )
                        todo.append((target, "<module>"))
                    elif not guarded and target.split(".")[0] not in sys.stdlib_module_names:
                        third_party.setdefault(target.split(".")[0], set()).add(module)
            for name in refs.names:
                todo.extend(self._resolve(namespace.get(name)))
            for base, attr in refs.attrs:
                entry = namespace.get(base)
                if entry and entry[0] == "module" and self.is_local(entry[1]):
                    todo.extend(self._resolve(("symbol", entry[1], attr)))
            env_reads |= _env_reads(self.units[key].node, self.constants[module], namespace, self)
        modules |= {m for m, _ in seen}
        settings = [self.settings[name] for (m, name) in seen if name in self.settings]
        files = {self.paths[m] for m in modules if m in self.paths}
        return Reach(seen, modules, files, third_party, settings, env_reads)

    def _module_exists(self, module: str) -> bool:
        return module in self.trees

    def _import_targets(self, module: str, node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        assert isinstance(node, ast.ImportFrom)
        source = self._absolute(module, node)
        targets = [source]
        for alias in node.names:
            candidate = f"{source}.{alias.name}"
            if candidate in self.trees:
                targets.append(candidate)
        return targets

    def _resolve(self, entry: tuple[str, ...] | None) -> list[tuple[str, str]]:
        if entry is None:
            return []
        if entry[0] == "module":
            return [(entry[1], "<module>")] if self.is_local(entry[1]) else []
        _, module, name = entry
        if not self.is_local(module):
            return []
        if f"{module}.{name}" in self.trees:
            return [(f"{module}.{name}", "<module>")]
        if (module, name) in self.units:
            return [(module, name), (module, "<module>")]
        # re-exported through a package __init__: follow its namespace
        return self._resolve(self.namespaces.get(module, {}).get(name)) + [(module, "<module>")]


def _packages_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return NOT_LITERAL
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError):
        pass
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "SecretStr"
        and node.args
    ):
        return _literal(node.args[0])
    if isinstance(node, ast.BinOp):  # 7 * 24 * 3600 * 1000, 1024**3
        left, right = _literal(node.left), _literal(node.right)
        if isinstance(left, int | float) and isinstance(right, int | float):
            operations = {ast.Mult: lambda a, b: a * b, ast.Pow: lambda a, b: a**b}
            operation = operations.get(type(node.op))
            if operation:
                return operation(left, right)
    return NOT_LITERAL


def _settings_class(name: str, module: str, node: ast.ClassDef, bases: list[str]) -> SettingsClass:
    prefix = None
    fields = []
    for statement in node.body:
        if (
            isinstance(statement, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "model_config" for t in statement.targets)
            and isinstance(statement.value, ast.Call)
        ):
            for keyword in statement.value.keywords:
                if keyword.arg == "env_prefix":
                    prefix = _literal(keyword.value)
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        field_name = statement.target.id
        annotation = ast.unparse(statement.annotation)
        if field_name.startswith("_") or field_name == "model_config" or "ClassVar" in annotation:
            continue
        value, alias, has_default = statement.value, None, statement.value is not None
        if isinstance(value, ast.Call) and _base_name(value.func) == "Field":
            keywords = {k.arg: k.value for k in value.keywords}
            for key in ("validation_alias", "alias"):
                if key in keywords and isinstance(_literal(keywords[key]), str):
                    alias = _literal(keywords[key])
            if "default" in keywords:
                value = keywords["default"]
            elif value.args and not (
                isinstance(value.args[0], ast.Constant) and value.args[0].value is Ellipsis
            ):
                value = value.args[0]
            elif "default_factory" in keywords:
                value = None
            else:
                has_default, value = False, None
        default = _literal(value) if has_default and value is not None else None
        if has_default and value is None and statement.value is not None:
            default = NOT_LITERAL
        fields.append((field_name, annotation, has_default, default, alias))
    return SettingsClass(name, module, bases, prefix, fields)


def _env_reads(node: ast.AST, constants: dict[str, str], namespace, index: CodeIndex) -> set[str]:
    """Variable names read with os.environ.get / os.environ[...] / os.getenv in a unit."""

    def value_of(arg: ast.expr) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name):
            if arg.id in constants:
                return constants[arg.id]
            entry = namespace.get(arg.id)
            if entry and entry[0] == "symbol":
                return index.constants.get(entry[1], {}).get(entry[2])
        return None

    names = set()
    for sub in ast.walk(node):
        target = None
        if isinstance(sub, ast.Call) and sub.args:
            func = ast.unparse(sub.func)
            if func in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                target = sub.args[0]
        elif isinstance(sub, ast.Subscript) and ast.unparse(sub.value) in ("os.environ", "environ"):
            target = sub.slice
        if target is not None and (name := value_of(target)):
            names.add(name)
    return names


@cache
def code_index() -> CodeIndex:
    """The code index of this checkout (built once per test session)."""
    return CodeIndex()


def service_env(service: str) -> dict[str, SettingsField | None]:
    """Every environment variable `service` reads: settings fields, and direct os.environ reads
    (those map to None)."""
    index = code_index()
    reach = index.reach(service)
    result: dict[str, SettingsField | None] = dict.fromkeys(sorted(reach.env_reads))
    # base classes first, so a subclass's redefinition of a field wins
    for settings in sorted(reach.settings, key=lambda c: len(index._mro(c))):
        result.update(index.fields(settings))
    return result


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Instruction:
    """One Dockerfile instruction: keyword, flags (--from=...), and the rest of the line."""

    keyword: str
    flags: dict[str, str]
    value: str

    def words(self) -> list[str]:
        """The arguments, exec form (JSON) or shell words."""
        text = self.value.strip()
        if text.startswith("["):
            return list(yaml.safe_load(text))
        return shlex.split(text, posix=True)


@dataclass
class Stage:
    """A build stage."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """The instructions of one kind, in order."""
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    """A parsed Dockerfile."""

    path: Path
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        """The stage that becomes the image."""
        return self.stages[-1]

    def arg_default(self, name: str, stage: Stage | None = None) -> str | None:
        """The default of a build argument, as declared in `stage` (default: the final one)."""
        for instruction in (stage or self.final).all("ARG"):
            key, _, value = instruction.value.strip().partition("=")
            if key == name:
                return value.strip().strip('"') if value else None
        return None


def parse_dockerfile(path: Path) -> Dockerfile:
    """Split a Dockerfile into stages and instructions (continuations joined, comments dropped)."""
    stages: list[Stage] = []
    for line in renderer().dockerfile_lines(path):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.lstrip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
            continue
        if not stages:
            stages.append(Stage("", None))  # ARGs before the first FROM
        stages[-1].instructions.append(Instruction(keyword, flags, rest))
    return Dockerfile(path, [s for s in stages if s.base])


def substitute(text: str, values: dict[str, str]) -> str:
    """Expand ${NAME} and $NAME with the given values (Dockerfile ARG/ENV semantics, simplified)."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, text)


def healthcheck_command(dockerfile: Dockerfile) -> list[str]:
    """The words of the final stage's HEALTHCHECK command (after CMD), [] when there is none."""
    checks = dockerfile.final.all("HEALTHCHECK")
    if not checks:
        return []
    value = checks[-1].value.strip()
    if value.upper() == "NONE":
        return []
    command = value[3:].strip() if value.upper().startswith("CMD") else value
    if command.startswith("["):
        return list(yaml.safe_load(command))
    return shlex.split(command)


def healthcheck_mode(dockerfile: Dockerfile) -> str | None:
    """`kafka` or `http`: the mode the image's healthcheck runs docker/healthcheck.py in."""
    words = healthcheck_command(dockerfile)
    for i, word in enumerate(words[:-1]):
        if word.endswith("healthcheck.py"):
            return words[i + 1]
    return None


def service_dockerfile(service: str) -> Dockerfile:
    """The dockerfile Quix Cloud and docker compose build for a service."""
    return parse_dockerfile(REPO / service / "dockerfile")


# ---------------------------------------------------------------------------------------------
# docker-compose.yml

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $$ -> $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml after YAML merge keys and variable interpolation (empty environment by
    default, as on a machine with no .env file)."""
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    return interpolate(raw, env or {})


def load_yaml(path: Path) -> Any:
    """A YAML file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def env_of(service: dict) -> dict[str, str]:
    """A compose service's environment as a dict (list or mapping form)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


# {{NAME}}: a project variable Quix substitutes into quix.yaml at sync (its per-environment value)
_QUIX_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PROFILES_START, PROFILES_END = "<!-- quix-profiles:start -->", "<!-- quix-profiles:end -->"


def quix_template_variables() -> set[str]:
    """The project variables quix.yaml substitutes with {{NAME}}."""
    return set(_QUIX_TEMPLATE.findall((REPO / "quix.yaml").read_text(encoding="utf-8")))


def quix_profiles() -> dict[str, dict[str, str]]:
    """The sizing profiles docs/deploy.md documents: profile -> {project variable: value}."""
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    block = text.split(PROFILES_START)[1].split(PROFILES_END)[0]
    rows = [line for line in block.strip().splitlines() if line.startswith("|")]
    header = [c.strip().strip("`") for c in rows[0].strip("|").split("|")]
    profiles = {}
    for row in rows[2:]:
        cells = [c.strip().strip("`*") for c in row.strip("|").split("|")]
        profiles[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return profiles


def render_quix_yaml(values: dict[str, str]) -> str:
    """quix.yaml's text with its {{NAME}} placeholders replaced as Quix does at sync."""

    def replace(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"no value for the project variable {match.group(1)}")
        return values[match.group(1)]

    return _QUIX_TEMPLATE.sub(replace, (REPO / "quix.yaml").read_text(encoding="utf-8"))


def quix_yaml(profile: str = "full") -> dict:
    """quix.yaml as Quix resolves it with one of the documented profiles (default: full)."""
    return yaml.safe_load(render_quix_yaml(quix_profiles()[profile]))


def app_yaml(service: str) -> dict:
    """A service folder's app.yaml."""
    return load_yaml(REPO / service / "app.yaml")
