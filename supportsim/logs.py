"""What every service process does first: logging as one event per line on stdout."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO", service: str = "supportsim") -> None:
    """Log one event per line to stdout, prefixed with time, level and service name."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def redacted(url: str) -> str:
    """A URL with any password replaced, fit for a log line."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
