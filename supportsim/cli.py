"""The `supportsim` command line: run the stack, score text, export datasets."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from supportsim.settings import RedisSettings, ServiceSettings


def _replicas(values: list[str]) -> dict[str, int]:
    result = {}
    for value in values:
        name, _, count = value.partition("=")
        if not count.isdigit():
            raise SystemExit(f"--replicas takes SERVICE=N, got {value!r}")
        result[name] = int(count)
    return result


def bot_env(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `up`'s options set for the bots (on top of `environ`)."""
    from supportsim.local.stack import DEFAULT_BOT_THREADS

    env = {}
    if args.bots:
        env["BOT_MODE"] = args.bots
    if args.conversations:
        env["CONVERSATIONS"] = str(args.conversations)
    if args.model:
        env["LLM_MODEL"] = args.model
    if args.llm_url:
        env.update(LLM_BACKEND="openai", LLM_BASE_URL=args.llm_url)
    elif "LLM_N_THREADS" not in environ:
        env["LLM_N_THREADS"] = str(DEFAULT_BOT_THREADS)
    return env


def cmd_up(args: argparse.Namespace) -> int:
    """Run the whole system on this machine until Ctrl-C, SIGTERM or --duration."""
    from supportsim.local.processes import StackError
    from supportsim.local.stack import Stack, topic_counts

    run_dir = Path(
        args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    ).resolve()
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    redis_url = RedisSettings().redis_url.get_secret_value()
    extra_env = {"SEED_NAMESPACE": run_dir.name, **bot_env(args, os.environ)}
    stack = Stack(
        run_dir,
        redis_url=redis_url,
        replicas=_replicas(args.replicas or []),
        extra_env=extra_env,
        stop_requested=lambda: stopping["signal"] is not None,
    )
    settings = ServiceSettings()
    topics = [settings.chat_topic, settings.scored_topic, settings.dead_letter_topic]
    started = time.monotonic()
    try:
        try:
            stack.start()
        except StackError as exc:
            print(f"supportsim up: {exc}", file=sys.stderr)
            return 0 if stopping["signal"] is not None else 1
        print(
            "running; Ctrl-C stops everything"
            + (f" (for {args.duration} s)" if args.duration else "")
        )
        last_report = 0.0
        while stopping["signal"] is None:
            now = time.monotonic()
            if args.duration and now - started >= args.duration:
                break
            for event in stack.supervise():
                print(event)
            if now - last_report >= args.progress_every:
                last_report = now
                print(_progress_line(stack, topics, topic_counts), flush=True)
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        stack.stop()
        print(f"stopped; logs in {run_dir / 'logs'}")
    return 0


def _progress_line(stack, topics, topic_counts) -> str:
    services = " ".join(
        f"{name}={alive}/{total}" + (f"(restarts {restarts})" if restarts else "")
        for name, (alive, total, restarts) in stack.status().items()
    )
    try:
        counts = topic_counts(stack.broker.address, topics)
        messages = " ".join(f"{name}={count}" for name, count in counts.items())
    except Exception as exc:  # progress must never stop the stack
        messages = f"(topic counts unavailable: {exc})"
    return f"[up] services: {services or 'none'} | offsets: {messages}"


def cmd_score(args: argparse.Namespace) -> int:
    """Score text lines (or JSON lines with a "text" field) from stdin as JSON lines on stdout."""
    from supportsim.sentiment.model import Scorer, score_lines

    scorer = Scorer(args.model, threads=args.threads, progress=lambda m: print(m, file=sys.stderr))
    counts = score_lines(sys.stdin, sys.stdout, scorer)
    return 1 if counts.errors else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `supportsim`."""
    parser = argparse.ArgumentParser(prog="supportsim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run broker, Redis, every service and the dashboard locally")
    up.add_argument(
        "--duration", type=float, default=0, help="stop after N seconds (0: run until Ctrl-C)"
    )
    up.add_argument(
        "--replicas",
        action="append",
        metavar="SERVICE=N",
        help="replicas of a service, e.g. --replicas ai_customer=3 (repeatable)",
    )
    up.add_argument("--run-dir", help="folder for logs and state (default: runs/<timestamp>)")
    up.add_argument("--bots", choices=["llm", "scripted"], help="LLM bots (default) or templates")
    up.add_argument("--conversations", type=int, help="concurrent conversations (default 4)")
    up.add_argument(
        "--model",
        help="chat model: qwen2.5-1.5b, smollm2-135m, a .gguf path, hf:...; with --llm-url the "
        "server's model name (default: the server's only model)",
    )
    up.add_argument(
        "--llm-url",
        metavar="URL",
        help="run the bots against an OpenAI-compatible server instead of loading a model, e.g. "
        "http://gpu-host:8000/v1 (key: LLM_API_KEY in the environment)",
    )
    up.add_argument(
        "--progress-every",
        type=float,
        default=float(os.environ.get("SUPPORTSIM_PROGRESS_EVERY", 5)),
    )
    up.set_defaults(func=cmd_up)

    score = sub.add_parser("score", help="score text lines from stdin: JSON lines on stdout")
    score.add_argument("--model", default=os.environ.get("SENTIMENT_MODEL", "builtin"))
    score.add_argument("--threads", type=int, default=1)
    score.set_defaults(func=cmd_score)

    from supportsim.datasets.export import add_export_commands
    from supportsim.sentiment.compare import add_compare_command

    add_export_commands(sub)
    add_compare_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `supportsim` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
