"""Contract test: no secret-looking value in the repository (stands in for a hosted secret scan).

Scans every file git would commit (tracked, plus untracked files that are not ignored) for private
keys, provider tokens, passwords inside URLs, and high-entropy values assigned to secret-ish names
(token, password, secret, api key, ...). Placeholders and references (`${VAR}`, `<password>`,
empty values) pass.

Allow-list, for test fixtures that need a secret-shaped string:
- put `pragma: allowlist secret` in a comment on the line (the detect-secrets convention), or
- add (file pattern, exact value) to ALLOWED_VALUES below with the reason, or a whole file to
  ALLOWED_FILES.
Prefer building such strings at run time (as this file's own self-test does), so nothing is allowed.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections import Counter
from fnmatch import fnmatch

import pytest

from tests.contract import REPO

ALLOWED_FILES: dict[str, str] = {
    # "tests/fixtures/example.pem": "a throw-away key that a TLS test needs",
}
ALLOWED_VALUES: dict[tuple[str, str], str] = {
    ("tests/unit/test_settings.py", "pw123"): "made-up password of a URL-redaction test",
    ("tests/integration/test_dashboard_app.py", "hunter2"): "made-up password of a redaction test",
}
INLINE_ALLOW = "pragma: allowlist secret"
MAX_BYTES = 2_000_000

PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "API key (sk-...)": re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{24,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "InfluxDB 3 token": re.compile(r"\bapiv3_[A-Za-z0-9_-]{20,}"),
    "JSON web token": re.compile(
        r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
    ),
}
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]*:(?P<password>[^@\s/'\"]+)@")
SECRET_NAME = r"[A-Za-z0-9_.-]*(?:token|passw(?:or)?d|passwd|secret|api[_-]?key|private[_-]?key|credential|auth[_-]?key)[A-Za-z0-9_]*"  # noqa: E501
ASSIGNMENT = re.compile(
    rf"""(?ix)(?P<name>{SECRET_NAME})["']?\s*(?::|=|:=|=>)\s*
    (?P<quote>["']?)(?P<value>[^"'\s#,;)}}\]]*)(?P=quote)"""
)
PLACEHOLDER = re.compile(
    r"""(?ix)^(?:|\$.*|<.*>|\*+|x+|\.\.\.|none|null|true|false|changeme|change-me|example.*|
    .*placeholder.*|stand-in|dummy.*|your[_-].*|redacted|secret|password|token|\{\{.*\}\})$"""
)


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def high_entropy(value: str) -> bool:
    """Looks generated: long, mixed letters and digits, and close to random."""
    return (
        len(value) >= 12
        and bool(re.search(r"[A-Za-z]", value))
        and bool(re.search(r"\d", value))
        and entropy(value) >= 3.5
    )


def findings_in_line(line: str) -> list[tuple[str, str]]:
    """(kind, value) of what in one line looks like a secret; empty when the line is allowed."""
    if INLINE_ALLOW in line:
        return []
    found = [(kind, m.group(0)) for kind, p in PATTERNS.items() for m in p.finditer(line)]
    for match in URL_PASSWORD.finditer(line):
        if not PLACEHOLDER.match(match.group("password")):
            found.append(("password in a URL", match.group("password")))
    for match in ASSIGNMENT.finditer(line):
        value = match.group("value")
        if (
            not PLACEHOLDER.match(value)
            and not value.startswith(("/", "./"))
            and high_entropy(value)
        ):
            found.append((f"high-entropy value for {match.group('name')}", value))
    return found


def committed_files() -> list[str]:
    """Files git would commit: tracked, and untracked ones that are not ignored."""
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    names = [n for n in result.stdout.decode().split("\0") if n]
    return sorted(n for n in names if (REPO / n).is_file())


def scan_file(relative: str) -> list[str]:
    """`path:line: kind` for every finding in a file (binary and huge files are skipped)."""
    if any(fnmatch(relative, pattern) for pattern in ALLOWED_FILES):
        return []
    data = (REPO / relative).read_bytes()
    if b"\0" in data[:8192] or len(data) > MAX_BYTES:
        return []
    text = data.decode("utf-8", errors="replace")
    return [
        f"{relative}:{number}: {kind}"
        for number, line in enumerate(text.splitlines(), 1)
        for kind, value in findings_in_line(line)
        if not any(fnmatch(relative, p) and value == v for p, v in ALLOWED_VALUES)
    ]


# ---------------------------------------------------------------------------------------------
# the scanner works (secret-shaped strings are assembled at run time, never stored)


def _made_up(prefix: str, length: int, alphabet: str = "aB3dE5gH7jK9mN1pQ2rS4tU6vW8xY0z") -> str:
    return prefix + (alphabet * 10)[:length]


@pytest.mark.parametrize(
    "line",
    [
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "key = " + "AKIA" + "ABCDEFGHIJKLMNOP",
        "GITHUB=" + _made_up("ghp_", 36),
        "Authorization: " + _made_up("sk-" + "proj-", 30),
        "INFLUXDB_TOKEN=" + _made_up("apiv3_", 40),
        "url: redis://:" + "s3cr3tPa55" + "@redis.example:6379/0",
        'password = "' + _made_up("", 20) + '"',
        "KAFKA_SASL_PASSWORD: " + _made_up("", 16),
        "api_key=" + _made_up("", 24),
    ],
)
def test_scanner_finds_secret_shaped_values(line):
    assert findings_in_line(line), line


@pytest.mark.parametrize(
    "line",
    [
        "INFLUXDB_TOKEN=",
        "# INFLUXDB_TOKEN=",
        'INFLUXDB_TOKEN="$(cat /var/lib/influxdb3-token/token)"',
        "REDIS_URL: redis://redis:6379/0",
        "put a password in it only here (redis://:PASSWORD@host:6379/0)",
        "redis://:${REDIS_PASSWORD}@redis:6379/0",
        "secretKey: influxdb_token",
        'QUIX_TOKEN_VARIABLE = "Quix__Sdk__Token"',
        "token = settings.influxdb_token.get_secret_value()",
        "password: <your password>",
        "INFLUXDB_TOKEN=" + _made_up("apiv3_", 40) + "  # pragma: allowlist secret",
    ],
)
def test_scanner_lets_placeholders_and_references_pass(line):
    assert findings_in_line(line) == [], line


# ---------------------------------------------------------------------------------------------
# the repository


def test_no_secret_in_the_repository():
    files = committed_files()
    assert "pyproject.toml" in files and "docker-compose.yml" in files
    findings = [finding for relative in files for finding in scan_file(relative)]
    assert not findings, (
        "secret-looking values (remove them, or see the allow-list in this file's docstring):\n"
        + "\n".join(findings)
    )


def test_allow_list_entries_still_exist():
    files = committed_files()
    for pattern, reason in ALLOWED_FILES.items():
        assert reason, f"{pattern}: say why it is allowed"
        assert any(fnmatch(f, pattern) for f in files), f"{pattern} matches no file any more"
    for (pattern, value), reason in ALLOWED_VALUES.items():
        assert reason, f"{pattern}: say why {value!r} is allowed"
        matching = [f for f in files if fnmatch(f, pattern)]
        assert any(value in (REPO / f).read_text(encoding="utf-8") for f in matching), (
            f"{value!r} is no longer in {pattern}: drop it from ALLOWED_VALUES"
        )


def test_example_env_has_only_empty_secrets():
    text = (REPO / "example.env").read_text(encoding="utf-8")
    assignments = re.findall(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.M)
    assert assignments, "example.env documents no variable"
    secret_name = re.compile(SECRET_NAME, re.I)
    for name, value in assignments:
        if secret_name.fullmatch(name) or name.endswith("_URL"):
            assert value.strip() == "", f"example.env gives {name} a value"


def test_local_env_files_are_git_ignored():
    def ignored(path: str) -> bool:
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        return result.returncode == 0

    for path in (".env", "local.env", "ai_customer/.env"):
        assert ignored(path), f"{path} would be committed"
    assert not ignored("example.env")
