"""The bot image's launcher (docker/llm_threads.py), run for real here: llama.cpp's threads come
from the container's CPU limit (Quix__Deployment__Limits__Cpu on Quix Cloud, else the cgroup
quota), not from the node's cores, unless LLM_N_THREADS is set. The cgroup files are stand-ins
written to a temporary folder; the exec into `main.py` is real."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.contract import REPO

LAUNCHER = REPO / "docker" / "llm_threads.py"


def launcher():
    spec = importlib.util.spec_from_file_location("llm_threads", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cgroup_v2(folder: Path, cpu_max: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")
    return folder


def cgroup_v1(folder: Path, quota: int, period: int = 100_000) -> Path:
    (folder / "cpu").mkdir(parents=True, exist_ok=True)
    (folder / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return folder


@pytest.mark.parametrize(
    ("millicores", "threads"), [("2000", "2"), ("1500", "1"), ("500", "1"), ("4000", "4")]
)
def test_threads_follow_the_quix_cpu_limit(tmp_path, millicores, threads):
    env = {"Quix__Deployment__Limits__Cpu": millicores}
    assert launcher().llm_threads(env, tmp_path / "none", cores=16) == threads


def test_threads_follow_the_cgroup_quota(tmp_path):
    module = launcher()
    assert module.llm_threads({}, cgroup_v2(tmp_path / "v2", "300000 100000"), cores=16) == "3"
    assert module.llm_threads({}, cgroup_v2(tmp_path / "v2max", "max 100000"), cores=16) == ""
    assert module.llm_threads({}, cgroup_v1(tmp_path / "v1", 200_000), cores=16) == "2"
    assert module.llm_threads({}, cgroup_v1(tmp_path / "v1none", -1), cores=16) == ""


def test_threads_never_exceed_the_visible_cores(tmp_path):
    env = {"Quix__Deployment__Limits__Cpu": "8000"}
    assert launcher().llm_threads(env, tmp_path, cores=2) == "2"


def test_an_explicit_value_wins_and_an_empty_one_does_not(tmp_path):
    module = launcher()
    limited = {"Quix__Deployment__Limits__Cpu": "2000"}
    assert module.llm_threads({**limited, "LLM_N_THREADS": "5"}, tmp_path, cores=16) == "5"
    assert module.llm_threads({**limited, "LLM_N_THREADS": ""}, tmp_path, cores=16) == "2"
    assert module.llm_threads({"Quix__Deployment__Limits__Cpu": "junk"}, tmp_path) == ""


def run_launcher(tmp_path: Path, env: dict[str, str]) -> str:
    """Exec the launcher into a stand-in main.py that prints what it was given."""
    (tmp_path / "main.py").write_text(
        "import os, sys\nprint(repr(os.environ.get('LLM_N_THREADS')), sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "main.py", "--flag"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_launcher_sets_the_threads_and_execs_main(tmp_path):
    assert run_launcher(tmp_path, {"Quix__Deployment__Limits__Cpu": "1000"}) == "'1' ['--flag']"
    assert run_launcher(tmp_path, {"LLM_N_THREADS": "3"}) == "'3' ['--flag']"


def test_launcher_leaves_an_empty_value_unset_without_a_limit(tmp_path, monkeypatch):
    module = launcher()
    monkeypatch.setattr(module, "CGROUP", tmp_path / "no-cgroup")
    assert module.llm_threads({"LLM_N_THREADS": ""}, module.CGROUP) == ""
