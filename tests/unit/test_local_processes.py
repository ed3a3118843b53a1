"""Child processes of the local stack: the pipeline services yield the cores to the bots."""

import os
import sys

from supportsim.local.processes import spawn
from supportsim.local.stack import PIPELINE_NICE, SERVICES


def test_a_process_spawned_with_nice_runs_at_lower_priority(tmp_path):
    log = tmp_path / "nice.log"
    process = spawn([sys.executable, "-c", "import os; print(os.nice(0))"], log, nice=5)
    assert process.wait(30) == 0
    assert int(log.read_text().strip()) == min(19, os.nice(0) + 5)


def test_up_runs_the_services_after_the_bots_below_the_bots_priority():
    nice = {spec.name: spec.nice for spec in SERVICES}
    assert PIPELINE_NICE > 0
    for service in ("sentiment_analysis", "redis_aggregator", "dataset_sink", "influx_sink"):
        assert nice[service] == PIPELINE_NICE, service
    # the bots, the starter and the page someone is looking at keep the normal priority
    for service in ("ai_customer", "ai_support_agent", "conversation_starter", "dashboard"):
        assert nice[service] == 0, service
