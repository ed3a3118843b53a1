"""The core lock: bot processes of one machine generate one at a time."""

import subprocess
import sys
import time

from supportsim.bots.llm import CoreLock

HOLDER = """
import sys, time
from supportsim.bots.llm import CoreLock
lock, log = sys.argv[1], sys.argv[2]
with CoreLock(lock):
    open(log, "a").write("other in\\n")
    time.sleep(1.0)
    open(log, "a").write("other out\\n")
"""


def test_a_process_waits_for_the_lock_another_process_holds(tmp_path):
    lock, log = tmp_path / "cores.lock", tmp_path / "order.log"
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(log)])
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "other in" in log.read_text()):
            assert other.poll() is None and time.monotonic() < deadline, "holder never ran"
            time.sleep(0.02)
        with CoreLock(str(lock)), log.open("a") as out:
            out.write("this in\n")
    finally:
        assert other.wait(60) == 0
    assert log.read_text().splitlines() == ["other in", "other out", "this in"]


def test_the_lock_is_taken_again_after_release_and_is_a_no_op_without_a_path(tmp_path):
    lock = CoreLock(str(tmp_path / "cores.lock"))
    for _ in range(2):
        with lock:
            pass
    with CoreLock(""):  # off: no file is made
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["cores.lock"]
