"""The bot runner's model-assembly progress: logged as readable lines, not logging errors."""

import logging

from supportsim.bots.runner import _log_assembly


def test_model_assembly_progress_is_logged_at_each_tenth(caplog):
    progress = _log_assembly()
    with caplog.at_level(logging.INFO, logger="supportsim.bots.runner"):
        for done in range(0, 1_000_001, 50_000):
            progress(done, 1_000_000)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "assembling the model: 0% of 1 MB"
    assert lines[-1] == "assembling the model: 100% of 1 MB"
    assert len(lines) == 11  # one line per tenth, not one per chunk
