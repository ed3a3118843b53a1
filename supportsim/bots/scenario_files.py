"""Reading the YAML files of a scenario folder (cards, check phrases, stage directions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(folder: Path, name: str, error: type[Exception]) -> Any:
    """The parsed YAML file `name` of a scenario folder; `error` says it is missing or broken."""
    path = folder / name
    if not path.is_file():
        raise error(f"scenario file {path} is missing")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path} is malformed: {type(exc).__name__}: {exc}") from None
