"""Compare a sentiment model's labels with the ones recorded on a topic (Cohen's kappa)."""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supportsim.contract.messages import DeadLetter
from supportsim.datasets.export import LABELS, ExportError, ProgressBar, scored_records
from supportsim.kafka.reader import TopicRead, TopicReader, TopicReadError
from supportsim.settings import ServiceSettings


@dataclass
class Comparison:
    """Labels of two scored topics on the same messages (matched by message_id)."""

    a: str
    b: str
    confusion: dict[tuple[str, str], int]
    only_a: int = 0
    only_b: int = 0
    bad_a: int = 0
    bad_b: int = 0
    models_a: dict[str, int] = field(default_factory=dict)
    models_b: dict[str, int] = field(default_factory=dict)
    mean_abs_score_diff: float | None = None

    @property
    def both(self) -> int:
        """Messages present in both topics."""
        return sum(self.confusion.values())

    @property
    def agreed(self) -> int:
        """Messages given the same label by both models."""
        return sum(count for (a, b), count in self.confusion.items() if a == b)

    @property
    def agreement(self) -> float | None:
        """Share of common messages with the same label."""
        return self.agreed / self.both if self.both else None

    def labels(self) -> list[str]:
        """The usual labels, then any other label either model used."""
        seen = {label for pair in self.confusion for label in pair}
        return [*LABELS, *sorted(seen - set(LABELS))]

    def totals(self, side: int) -> Counter[str]:
        """Messages per label according to model A (side 0) or B (side 1)."""
        counts: Counter[str] = Counter()
        for pair, count in self.confusion.items():
            counts[pair[side]] += count
        return counts

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: agreement corrected for what chance alone would give."""
        if not self.both:
            return None
        a, b = self.totals(0), self.totals(1)
        chance = sum(a[label] * b[label] for label in self.labels()) / self.both**2
        return 1.0 if chance == 1 else (self.agreement - chance) / (1 - chance)

    def per_label(self) -> list[dict[str, Any]]:
        """Per label: count by A, by B, by both, and agreement = 2 * both / (A + B)."""
        a, b = self.totals(0), self.totals(1)
        table = []
        for label in self.labels():
            both = self.confusion.get((label, label), 0)
            total = a[label] + b[label]
            table.append(
                {
                    "label": label,
                    "a": a[label],
                    "b": b[label],
                    "both": both,
                    "agreement": 2 * both / total if total else None,
                }
            )
        return table

    def to_json(self) -> dict[str, Any]:
        """Everything as a JSON-ready dict."""
        return {
            "a": self.a,
            "b": self.b,
            "models_a": self.models_a,
            "models_b": self.models_b,
            "in_both": self.both,
            "only_in_a": self.only_a,
            "only_in_b": self.only_b,
            "bad_records_a": self.bad_a,
            "bad_records_b": self.bad_b,
            "agreement": self.agreement,
            "kappa": self.kappa,
            "mean_abs_score_diff": self.mean_abs_score_diff,
            "per_label": self.per_label(),
            "confusion": {
                a: {b: self.confusion.get((a, b), 0) for b in self.labels()} for a in self.labels()
            },
        }

    def render(self) -> str:
        """The comparison as text: counts, agreement, per-label table and confusion table."""

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        def models(counts: dict[str, int]) -> str:
            return ", ".join(counts) or "no messages"

        labels = self.labels()
        width = max(10, *(len(label) + 2 for label in labels))
        lines = [
            f"A: {self.a} (sentiment model: {models(self.models_a)})",
            f"B: {self.b} (sentiment model: {models(self.models_b)})",
            f"messages: {self.both} in both, {self.only_a} only in A, {self.only_b} only in B"
            f"; bad records: {self.bad_a} in A, {self.bad_b} in B",
            f"overall agreement: {pct(self.agreement)} ({self.agreed}/{self.both})"
            + (f", Cohen's kappa {self.kappa:.3f}" if self.kappa is not None else "")
            + (
                f", mean |score A - score B| {self.mean_abs_score_diff:.3f}"
                if self.mean_abs_score_diff is not None
                else ""
            ),
            "",
            "per-label agreement (2 x both / (A + B)):",
            f"{'label':<{width}}{'A':>8}{'B':>8}{'both':>8}{'agreement':>11}",
        ]
        for item in self.per_label():
            lines.append(
                f"{item['label']:<{width}}{item['a']:>8}{item['b']:>8}{item['both']:>8}"
                f"{pct(item['agreement']):>11}"
            )
        lines += ["", "confusion (rows: A, columns: B):"]
        corner = "A \\ B"
        lines.append(f"{corner:<{width}}" + "".join(f"{b:>{width}}" for b in labels) + "   total")
        a_totals, b_totals = self.totals(0), self.totals(1)
        for a in labels:
            cells = "".join(f"{self.confusion.get((a, b), 0):>{width}}" for b in labels)
            lines.append(f"{a:<{width}}{cells}{a_totals[a]:>8}")
        lines.append(
            f"{'total':<{width}}"
            + "".join(f"{b_totals[b]:>{width}}" for b in labels)
            + f"{self.both:>8}"
        )
        return "\n".join(lines)


def _load_labels(
    db: sqlite3.Connection, table: str, reading: TopicRead
) -> tuple[int, dict[str, int]]:
    """Read one topic's labels into `table`; return (bad records, messages per sentiment model)."""
    db.execute(
        f"CREATE TABLE {table} (message_id TEXT PRIMARY KEY, label TEXT, score REAL, model TEXT)"
        " WITHOUT ROWID"
    )
    bad, models, pending = 0, Counter(), []

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?, ?)", pending)  # noqa: S608
        db.execute("COMMIT")
        pending.clear()

    for _record, parsed in scored_records(reading):
        if isinstance(parsed, DeadLetter):
            bad += 1
            continue
        sentiment = parsed.sentiment
        pending.append((parsed.message_id, sentiment.label, sentiment.score, sentiment.model))
        models[sentiment.model] += 1
        if len(pending) >= 2000:
            flush()
    flush()
    return bad, dict(sorted(models.items(), key=lambda item: (-item[1], item[0])))


def compare(
    a: str,
    b: str,
    settings: ServiceSettings | None = None,
    *,
    progress: bool = True,
    stall_timeout: float = 30.0,
) -> Comparison:
    """Compare the sentiment labels of two scored topics on the messages they share."""
    settings = settings or ServiceSettings()
    work = Path(tempfile.mkdtemp(prefix="supportsim-compare-"))
    db = sqlite3.connect(work / "labels.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    try:
        loaded = {}
        with TopicReader(settings, purpose="compare") as reader:
            for table, name in (("a", a), ("b", b)):
                bar = ProgressBar(progress, f"reading {name}")
                try:
                    reading = reader.read(name, stall_timeout=stall_timeout, on_progress=bar.update)
                    loaded[table] = _load_labels(db, table, reading)
                except TopicReadError as exc:
                    raise ExportError(str(exc)) from exc
                finally:
                    bar.close()
        confusion = {
            (label_a, label_b): count
            for label_a, label_b, count in db.execute(
                "SELECT a.label, b.label, count(*) FROM a JOIN b USING (message_id)"
                " GROUP BY a.label, b.label"
            )
        }
        only_a = db.execute(
            "SELECT count(*) FROM a WHERE message_id NOT IN (SELECT message_id FROM b)"
        ).fetchone()[0]
        only_b = db.execute(
            "SELECT count(*) FROM b WHERE message_id NOT IN (SELECT message_id FROM a)"
        ).fetchone()[0]
        (diff,) = db.execute(
            "SELECT avg(abs(a.score - b.score)) FROM a JOIN b USING (message_id)"
        ).fetchone()
        return Comparison(
            a=a,
            b=b,
            confusion=confusion,
            only_a=only_a,
            only_b=only_b,
            bad_a=loaded["a"][0],
            bad_b=loaded["b"][0],
            models_a=loaded["a"][1],
            models_b=loaded["b"][1],
            mean_abs_score_diff=None if diff is None else round(diff, 6),
        )
    finally:
        db.close()
        shutil.rmtree(work, ignore_errors=True)


def cmd_compare(args: argparse.Namespace) -> int:
    """`supportsim compare`: print the agreement of two scored topics."""
    try:
        result = compare(
            args.a or ServiceSettings().scored_topic,
            args.b,
            progress=not args.no_progress,
            stall_timeout=args.stall_timeout,
        )
    except ExportError as exc:
        print(f"supportsim compare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else result.render())
    return 0


def add_compare_command(subparsers) -> None:
    """Register the `compare` subcommand on the `supportsim` parser."""
    compare_parser = subparsers.add_parser(
        "compare",
        help="agreement and confusion table of two scored topics (e.g. after a re-score)",
        description=(
            "Match the messages of two scored topics by message_id and compare their sentiment "
            "labels: overall and per-label agreement, Cohen's kappa, confusion table, and counts "
            "of messages found in only one topic."
        ),
    )
    compare_parser.add_argument("--a", help="first scored topic (default: SCORED_TOPIC)")
    compare_parser.add_argument("--b", required=True, help="second scored topic")
    compare_parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    compare_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare_parser.add_argument("--stall-timeout", type=float, default=30.0)
    compare_parser.set_defaults(func=cmd_compare)
