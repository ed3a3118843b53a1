"""Entry point of the bot image: size llama.cpp's threads from the container's CPU limit, then run.

    python /opt/supportsim/llm_threads.py main.py [args...]

llama.cpp sizes its threads from the cores it sees, which in a container are the node's cores, not
the deployment's CPU limit: 8 threads under a 2-core limit are throttled most of the time. So,
unless LLM_N_THREADS is set (non-empty), it is set to the CPU limit in whole cores (at least 1,
at most the cores visible), read from, in order:

- ``Quix__Deployment__Limits__Cpu``: millicores, injected by Quix Cloud into every deployment;
- cgroup v2 ``/sys/fs/cgroup/cpu.max`` (``<quota> <period>``, ``max`` when unlimited);
- cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 when unlimited).

With no limit anywhere, LLM_N_THREADS stays unset and llama.cpp keeps its own default. The command
then replaces this process (``exec``), so it receives SIGTERM directly. Standard library only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

QUIX_CPU_LIMIT = "Quix__Deployment__Limits__Cpu"  # noqa: S105 (a variable name, not a secret)
CGROUP = Path("/sys/fs/cgroup")


def _millicores_from_quix(environ: dict[str, str]) -> int | None:
    value = environ.get(QUIX_CPU_LIMIT, "").strip()
    try:
        millicores = int(float(value))
    except ValueError:
        return None
    return millicores if millicores > 0 else None


def _millicores_from_cgroup(root: Path) -> int | None:
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) * 1000 // int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota * 1000 // period


def cpu_limit_millicores(environ: dict[str, str], cgroup: Path = CGROUP) -> int | None:
    """The container's CPU limit in millicores, or None when it has none."""
    return _millicores_from_quix(environ) or _millicores_from_cgroup(cgroup)


def llm_threads(environ: dict[str, str], cgroup: Path = CGROUP, cores: int | None = None) -> str:
    """The LLM_N_THREADS to run with: the variable when set, else whole cores of the limit (at
    least 1, at most the visible cores), else "" (llama.cpp's default)."""
    explicit = environ.get("LLM_N_THREADS", "").strip()
    if explicit:
        return explicit
    millicores = cpu_limit_millicores(environ, cgroup)
    if millicores is None:
        return ""
    threads = max(1, millicores // 1000)
    return str(min(threads, cores or os.cpu_count() or threads))


def main(argv: list[str]) -> int:
    """Set LLM_N_THREADS and exec `python argv...` (default `python main.py`)."""
    environ = dict(os.environ)
    threads = llm_threads(environ)
    if threads:
        os.environ["LLM_N_THREADS"] = threads
    else:
        os.environ.pop("LLM_N_THREADS", None)  # empty would not parse as a thread count
    command = argv or ["main.py"]
    os.execv(sys.executable, [sys.executable, *command])  # noqa: S606 (the image's own command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
