"""Benchmark: LLM tokens per second of the bots through Kafka, against raw llama-cpp-python.

One conversation at a time, one customer and one agent process (so generation is strictly
sequential, as raw generation is), talk through a Tansu broker for a fixed time. Our rate is the
completion tokens of every reply divided by the wall time from the greeting to the last reply:
it pays for Kafka hops, state, prompt building and memory trimming. The baseline, in the same
run, replays the same conversations through llama-cpp-python's own chat API: one `Llama` per
side, each reply generated in the bots' order from the same system prompt and conversation so far,
with the same sampling and as many tokens (see `raw_rate`).

Usage: .venv/bin/python bench/bots.py [--quick] [--model qwen2.5-1.5b|smollm2-135m] [--seconds N]
Last line: RESULT bots ratio=<ours/raw> target=0.9 ours_tok_s=... raw_tok_s=... msgs_per_min=...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.messages import new_id  # noqa: E402
from supportsim.stack import (  # noqa: E402
    REPO_ROOT,
    LocalBroker,
    spawn,
    stop_process,
)


def run_bots(
    model: str, seconds: float, conversations: int, max_turns: int, threads: int = 2
) -> list[dict]:
    """Run the real bots through a broker for `seconds`; return every chat message.

    `threads` is llama.cpp's per bot: with one conversation the bots take turns and each may use
    both cores; with several, both generate at once and must share them (as `supportsim up`
    does with 1 each: llama.cpp threads that outnumber the cores spin and slow everything down).
    """
    work = Path(tempfile.mkdtemp(prefix="bench-bots-"))
    broker = LocalBroker(work / "broker.log")
    broker.start()
    env = {
        **broker.client_env,
        "CHAT_TOPIC": "chat",
        "BOT_MODE": "llm",
        "LLM_MODEL": model,
        "LLM_N_THREADS": str(threads),
        "MAX_TURNS": str(max_turns),
        "CONVERSATIONS": str(conversations),
        "SEED_NAMESPACE": new_id(),
        "PYTHONUNBUFFERED": "1",
    }
    procs = []
    # a SIGTERM (a killed benchmark) unwinds like Ctrl-C, so no bot or broker is left behind
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        try:
            for name in ["ai_customer", "ai_support_agent"]:
                procs.append(
                    spawn(
                        [sys.executable, str(REPO_ROOT / name / "main.py")],
                        work / f"{name}.log",
                        {**env, "STATE_DIR": str(work / name)},
                    )
                )
            starter = spawn(
                [sys.executable, str(REPO_ROOT / "conversation_starter" / "main.py")],
                work / "starter.log",
                env,
            )
            starter.wait(120)
            print(f"bots running for {seconds:.0f} s with {model} (logs in {work})", flush=True)
            time.sleep(seconds)
        finally:
            for p in procs:
                stop_process(p)
        messages = read_all(broker.address, "chat")
    finally:
        broker.stop()
        signal.signal(signal.SIGTERM, previous)
    with (work / "chat.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(m) + "\n" for m in messages)
    return messages


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def read_all(address: str, topic: str) -> list[dict]:
    """Every message of a topic, deduplicated on message_id, in arrival order."""
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": new_id(),
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    out, seen, idle_since = [], set(), time.monotonic()
    while time.monotonic() - idle_since < 8:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        idle_since = time.monotonic()
        value = json.loads(msg.value())
        if value["message_id"] not in seen:
            seen.add(value["message_id"])
            out.append(value)
    consumer.close()
    return out


def by_conversation(messages: list[dict]) -> dict[str, list[dict]]:
    """Messages grouped by conversation, each in turn order."""
    grouped: dict[str, list[dict]] = {}
    for m in messages:
        grouped.setdefault(m["conversation_id"], []).append(m)
    return {cid: sorted(ms, key=lambda m: m["turn"]) for cid, ms in grouped.items()}


def is_bot_reply(message: dict) -> bool:
    """True for a line a bot generated (not the starter's template greeting)."""
    return message["turn"] > 0 and message["model"] != "template"


def turn_gaps_ms(messages: list[dict]) -> list[float]:
    """Per reply, the time from the previous message's write to the start of its generation.

    That is what the pipeline adds to each turn: the Kafka hop, state and prompt building.
    """
    gaps = []
    for conversation in by_conversation(messages).values():
        for before, m in zip(conversation, conversation[1:], strict=False):
            if is_bot_reply(m) and m["turn"] == before["turn"] + 1:
                gaps.append(m["timestamp_ms"] - m["latency_ms"] - before["timestamp_ms"])
    return gaps


def raw_rate(model: str, messages: list[dict], threads: int = 2) -> float:
    """Tokens/s of llama-cpp-python's own chat API replaying the same conversations.

    One `Llama` per side, as the bots run one process per side (so each keeps its own prompt
    cache); every reply is generated in the order the bots wrote them, from the same system
    prompt and the same conversation so far, with the same sampling and as many tokens. No Kafka,
    no state, no LangChain, no memory trimming: what a plain chat loop over the model would pay.
    (A reply the bots retried counts its two attempts' tokens in one generation here.)
    """
    from llama_cpp import Llama

    from supportsim.bots.llm import LLMConfig
    from supportsim.bots.models import resolve_model
    from supportsim.bots.prompts import Persona, load_scenario

    config = LLMConfig()
    path = str(resolve_model(model).path)
    llms = {
        role: Llama(model_path=path, n_ctx=config.n_ctx, n_threads=threads, verbose=False, seed=1)
        for role in ("customer", "agent")
    }
    scenario = load_scenario()
    conversations = by_conversation(messages)
    replies = sorted(filter(is_bot_reply, messages), key=lambda m: m["timestamp_ms"])
    tokens = 0
    started = time.perf_counter()
    for reply in replies:
        role = reply["role"]
        persona = Persona.from_contract(reply["customer"], reply["agent"])
        chat = [{"role": "system", "content": scenario.system_prompt(role, persona)}]
        for line in conversations[reply["conversation_id"]]:
            if line["turn"] >= reply["turn"]:
                break
            speaker = "assistant" if line["role"] == role else "user"
            chat.append({"role": speaker, "content": line["text"]})
        out = llms[role].create_chat_completion(
            chat,
            max_tokens=max(1, reply["completion_tokens"]),
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            repeat_penalty=config.repeat_penalty,
        )
        tokens += out["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - started)


def main() -> None:
    """Run the bots, then the raw baseline; print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2, 90 s (< 5 min)")
    parser.add_argument("--model")
    parser.add_argument("--seconds", type=float)
    args = parser.parse_args()
    model = args.model or ("smollm2-135m" if args.quick else "qwen2.5-1.5b")
    seconds = args.seconds or (90 if args.quick else 600)
    messages = run_bots(model, seconds, conversations=1, max_turns=10)
    replies = [m for m in messages if is_bot_reply(m)]
    if len(replies) < 2:
        raise SystemExit(f"only {len(replies)} replies in {seconds} s: see the logs")
    # from the start of the first generation (model loading and the group join do not count)
    first = min(m["timestamp_ms"] - m["latency_ms"] for m in replies)
    last = max(m["timestamp_ms"] for m in replies)
    tokens = sum(m["completion_tokens"] for m in replies)
    ours = tokens / ((last - first) / 1000)
    raw = raw_rate(model, messages)
    conversations = sum(1 for m in messages if m["final"])
    per_min = len(replies) / ((last - first) / 60000)
    per_hour = conversations / ((last - first) / 3_600_000)
    print(f"replies={len(replies)} tokens={tokens} ours={ours:.1f} tok/s raw={raw:.1f} tok/s")
    gaps = turn_gaps_ms(messages)
    if gaps:
        print(
            f"between turns (previous message written -> generation starts): median "
            f"{statistics.median(gaps):.0f} ms, max {max(gaps):.0f} ms over {len(gaps)} turns; "
            f"generation: median {statistics.median(m['latency_ms'] for m in replies):.0f} ms"
        )
    print(
        f"RESULT bots ratio={ours / raw:.2f} target=0.9 ours_tok_s={ours:.1f} raw_tok_s={raw:.1f} "
        f"msgs_per_min={per_min:.1f} conversations_per_hour={per_hour:.1f} model={model} "
        f"cores={os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
