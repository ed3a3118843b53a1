"""Container healthcheck of the supportsim images: standard library only (the images have no curl).

    python /opt/supportsim/healthcheck.py kafka      healthy while the process holds an
                                                     established TCP connection to the broker
    python /opt/supportsim/healthcheck.py http URL   healthy when URL answers 200

A Kafka consumer that lost its broker, or never reached it, has no established connection to the
broker's port; a live one always has (fetches, heartbeats, the transactional producer). On Quix
Cloud the broker comes from Quix__Sdk__Token and Kubernetes ignores Docker healthchecks, so the
kafka check passes there.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

ESTABLISHED = "01"
PROC_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


def broker_ports(addresses: str) -> set[int]:
    """The ports of a `host:port[,host:port...]` bootstrap list (9092 when a port is missing)."""
    ports = set()
    for address in filter(None, (a.strip() for a in addresses.split(","))):
        _, _, port = address.rpartition(":")
        ports.add(int(port) if port.isdigit() else 9092)
    return ports


def established_remote_ports(tables: tuple[str, ...] = PROC_TCP) -> set[int]:
    """Remote ports of this network namespace's established TCP connections."""
    ports = set()
    for table in tables:
        try:
            with open(table, encoding="ascii") as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6 in this container
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == ESTABLISHED:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def check_kafka() -> tuple[bool, str]:
    """Healthy when a connection to one of the broker ports is established."""
    addresses = os.environ.get("KAFKA_BROKER_ADDRESS", "")
    if os.environ.get("Quix__Sdk__Token") or not addresses:  # noqa: SIM112 (Quix's spelling)
        return True, "broker chosen by the platform; nothing to check"
    wanted = broker_ports(addresses)
    if wanted & established_remote_ports():
        return True, f"connected to the broker ({addresses})"
    return False, f"no established connection to the broker ({addresses})"


def check_http(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    """Healthy when `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our own URL)
            return response.status == 200, f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    """Run one check; exit 0 when healthy, 1 otherwise (the Docker HEALTHCHECK contract)."""
    if argv[:1] == ["kafka"]:
        healthy, why = check_kafka()
    elif argv[:1] == ["http"] and len(argv) == 2:
        healthy, why = check_http(argv[1])
    else:
        print("usage: healthcheck.py kafka | healthcheck.py http URL", file=sys.stderr)
        return 2
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
