"""InfluxDB sink: every scored message stored as a point in InfluxDB 3, for analysis and export.

Wiring only; the point layout and retry behaviour live in `supportsim.sinks.influx`. Needs
INFLUXDB_HOST, INFLUXDB_DATABASE and INFLUXDB_TOKEN (a secret, never logged).
"""

import logging

from supportsim.logs import configure_logging
from supportsim.sinks.influx import HistorySettings, build_history, influx_configured


def main() -> None:
    """Read settings from the environment, build the sink and run it until SIGTERM."""
    settings = HistorySettings()
    configure_logging(settings.log_level, settings.service_name)
    why_not = influx_configured({})
    if why_not:
        logging.getLogger(__name__).error("not started: %s", why_not)
        raise SystemExit(2)
    build_history(settings).run()


if __name__ == "__main__":
    main()
