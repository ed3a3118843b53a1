"""The README's configuration table names every setting a service reads."""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "docker"))

import render_app_yaml  # noqa: E402


def test_every_setting_of_every_service_is_in_the_readme_configuration_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ", 1)]
    documented = set(re.findall(r"`([A-Za-z_]+)`", table))
    missing = {
        variable: service
        for service, spec in render_app_yaml.SERVICES.items()
        for variable in render_app_yaml.settings_of(spec)
        if variable not in documented
    }
    assert not missing, f"settings missing from README's configuration table: {missing}"
