"""Benchmark: messages per minute of `supportsim up`'s bots against the limit of this hardware.

Ours: the stack `supportsim up` runs (embedded broker, every service, its default bot replicas
and llama.cpp threads) for a fixed time after the first reply; every bot reply on `chat` counts,
over the time from the first generation to the last reply. It runs twice in the same benchmark:
with prompt reuse (the default) and with it switched off (``LLM_PROMPT_CACHE_MB=0``).

The limit, in the same run: llama-cpp-python alone in one process, using every core, replays the
conversations of the reuse run in the bots' order: the same prompts (the bots' own prompt
builder), sampling and completion token counts, each side of each conversation in its own
`Llama` context so every turn evaluates only its new tokens (sampling past end tokens, so
each reply has the bots' token count). No Kafka, no state, no other
service competing for the cores.

Usage: .venv/bin/python bench/bots.py [--quick] [--model M] [--seconds N] [--sweep]
`--sweep` measures 1+1 and 2+2 bot replicas, one thread each or every core with the core lock.
Last line: RESULT bots ratio=<ours/limit msgs per min> target=0.8 reuse_speedup=...
evaluated_prompt_share=... msgs_per_min=... conversations_per_hour=... limit_msgs_per_min=...
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
from dataclasses import dataclass
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.contract.messages import new_id  # noqa: E402
from supportsim.local.stack import DEFAULT_BOT_THREADS, Stack, topic_counts  # noqa: E402
from supportsim.settings import RedisSettings  # noqa: E402
from tests.harness.readback import read_records  # noqa: E402

START_TIMEOUT_S = 1800  # model assembly and the sentiment model's first training included


@dataclass
class Run:
    """What one stack run produced."""

    label: str
    messages: list[dict]
    fleet: dict

    @property
    def replies(self) -> list[dict]:
        return [m for m in self.messages if is_bot_reply(m)]

    @property
    def minutes(self) -> float:
        replies = self.replies
        first = min(m["timestamp_ms"] - m["latency_ms"] for m in replies)
        return (max(m["timestamp_ms"] for m in replies) - first) / 60000

    @property
    def per_minute(self) -> float:
        return len(self.replies) / self.minutes

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens of every reply (retried attempts included) per second of the run."""
        return sum(m["completion_tokens"] for m in self.replies) / (self.minutes * 60)

    @property
    def conversations_per_hour(self) -> float:
        return sum(1 for m in self.messages if m["final"]) / (self.minutes / 60)

    @property
    def evaluated_share(self) -> float | None:
        counted = [m for m in self.replies if m.get("evaluated_prompt_tokens") is not None]
        prompt = sum(m["prompt_tokens"] for m in counted)
        return sum(m["evaluated_prompt_tokens"] for m in counted) / prompt if prompt else None

    def summary(self) -> str:
        latency = statistics.mean(m["latency_ms"] for m in self.replies)
        share = self.evaluated_share
        return (
            f"{self.label}: {len(self.replies)} replies in {self.minutes:.1f} min = "
            f"{self.per_minute:.2f} msgs/min, {self.conversations_per_hour:.1f} conversations/h, "
            f"mean latency {latency / 1000:.1f} s, evaluated prompt share "
            + (f"{share:.2f}" if share is not None else "n/a")
            + f", fleet latency_ms_avg {self.fleet.get('latency_ms_avg', 'n/a')}"
        )


def by_conversation(messages: list[dict]) -> dict[str, list[dict]]:
    """Messages grouped by conversation, each in turn order."""
    grouped: dict[str, list[dict]] = {}
    for m in messages:
        grouped.setdefault(m["conversation_id"], []).append(m)
    return {cid: sorted(ms, key=lambda m: m["turn"]) for cid, ms in grouped.items()}


def is_bot_reply(message: dict) -> bool:
    """True for a line a bot generated (not the starter's template greeting, not an error)."""
    return message["turn"] > 0 and message["model"] != "template" and message["latency_ms"] > 0


def run_stack(
    label: str,
    model: str,
    seconds: float,
    *,
    replicas: int | None = None,
    threads: int | None = None,
    cache_mb: int | None = None,
    settings: dict[str, str] | None = None,
    until_ended: int | None = None,
) -> Run:
    """Run `supportsim up`'s stack until `seconds` after the first reply; return its chat.

    `settings` are further variables for every service (e.g. CONVERSATIONS, MAX_TURNS);
    `until_ended` stops it sooner, once that many conversations have ended.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="bench-bots-"))
    prefix = f"bench-bots-{new_id()[:8]}:"
    os.environ["REDIS_KEY_PREFIX"] = prefix  # the stack clears and the services use only these
    env = {
        "LLM_MODEL": model,
        "LLM_N_THREADS": str(threads or DEFAULT_BOT_THREADS),
        "SEED_NAMESPACE": new_id(),
        "REDIS_KEY_PREFIX": prefix,
        **(settings or {}),
    }
    if cache_mb is not None:
        env["LLM_PROMPT_CACHE_MB"] = str(cache_mb)
    counts = {} if replicas is None else {"ai_customer": replicas, "ai_support_agent": replicas}
    redis_url = RedisSettings().redis_url.get_secret_value()
    stack = Stack(run_dir, redis_url=redis_url, replicas=counts, extra_env=env, say=lambda _: None)
    print(f"{label}: starting the stack (logs in {run_dir / 'logs'})", flush=True)
    try:
        stack.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        greetings = None
        while time.monotonic() < deadline:
            stack.supervise()
            chat = topic_counts(stack.broker.address, ["chat"]).get("chat", 0)
            greetings = greetings or (chat or None)
            if greetings and chat > greetings:
                break
            time.sleep(2)
        else:
            raise SystemExit(f"{label}: no reply in {START_TIMEOUT_S} s; see {run_dir / 'logs'}")
        print(f"{label}: first reply; measuring for {seconds:.0f} s", flush=True)
        end = time.monotonic() + seconds
        checked = time.monotonic()
        while time.monotonic() < end:
            stack.supervise()
            time.sleep(2)
            if until_ended and time.monotonic() - checked > 30:
                checked = time.monotonic()
                finals = sum(m["final"] for m in _chat_messages(stack.broker.address))
                if finals >= until_ended:
                    break
        messages = _chat_messages(stack.broker.address)
        fleet_doc = redis.Redis.from_url(stack.redis.url).get(f"{prefix}fleet")
        fleet = json.loads(fleet_doc) if fleet_doc else {}
    finally:
        stack.stop()
    run = Run(label, messages, fleet)
    if len(run.replies) < 2:
        raise SystemExit(f"{label}: only {len(run.replies)} replies; see {run_dir / 'logs'}")
    with (run_dir / "chat.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(m) + "\n" for m in messages)
    return run


def _chat_messages(address: str) -> list[dict]:
    """Every message on `chat`, deduplicated on message_id."""
    out, seen = [], set()
    for record in read_records(address, "chat"):
        value = json.loads(record.value or b"{}")
        if value.get("message_id") and value["message_id"] not in seen:
            seen.add(value["message_id"])
            out.append(value)
    return out


def limit_rate(model: str, messages: list[dict]) -> tuple[float, int, int]:
    """Messages/min of llama-cpp-python alone replaying the same turns (see the module doc).

    Returns (messages per minute, completion tokens asked, completion tokens generated).
    """
    from llama_cpp import Llama

    from supportsim.bots.llm import ChatLLM, LLMConfig
    from supportsim.bots.prompts import Persona, load_scenario
    from supportsim.bots.turns import turn_prompt

    config = LLMConfig(model=model, prompt_cache_mb=0)
    renderer = ChatLLM.load(config)  # the bots' tokenizer and chat template, for the prompts
    scenario = load_scenario()
    cores = os.cpu_count() or 1
    conversations = by_conversation(messages)
    replies = sorted(
        (m for m in messages if is_bot_reply(m)), key=lambda m: m["timestamp_ms"] - m["latency_ms"]
    )
    last_turn = {(m["conversation_id"], m["role"]): m["turn"] for m in replies}
    contexts: dict[tuple[str, str], Llama] = {}
    asked = generated = 0
    elapsed = 0.0
    for reply in replies:
        side = (reply["conversation_id"], reply["role"])
        history = [
            {"role": m["role"], "text": m["text"], "remedy": m.get("remedy")}
            for m in conversations[reply["conversation_id"]]
            if m["turn"] < reply["turn"]
        ]
        persona = Persona.from_contract(
            reply["customer"], reply["agent"], reply.get("card"), reply.get("policy")
        )
        prompt = renderer.prompt_text(
            turn_prompt(
                renderer, scenario, persona, reply["role"], history, structured=config.structured
            )
        )
        if side not in contexts:  # loading a context is not generation: not timed
            contexts[side] = Llama(
                model_path=str(renderer.model.path),
                n_ctx=config.n_ctx,
                n_threads=cores,
                n_batch=config.n_batch,
                seed=1,
                verbose=False,
            )
        context = contexts[side]
        tokens = context.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        wanted = max(1, reply["completion_tokens"])
        started = time.perf_counter()
        count = 0
        # generate() samples past end tokens: each reply gets the bots' token count, not fewer
        for _ in context.generate(
            tokens,
            temp=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            repeat_penalty=config.repeat_penalty,
        ):
            count += 1
            if count >= wanted:
                break
        elapsed += time.perf_counter() - started
        asked += reply["completion_tokens"]
        generated += count
        if last_turn[side] == reply["turn"]:
            del contexts[side]
    return len(replies) / (elapsed / 60), asked, generated


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def sweep(model: str, seconds: float) -> None:
    """One stack run per bot layout (replicas per side, llama threads, core lock); one line each.

    Without the core lock each process gets one thread (more would spin on the others' cores);
    with it, every core.
    """
    cores = os.cpu_count() or 1
    layouts = ((1, 1, False), (2, 1, False), (1, cores, True), (2, cores, True))
    for replicas, threads, lock in layouts:
        run = run_stack(
            f"{replicas}+{replicas} replicas, {threads} thread(s), core lock {int(lock)}",
            model,
            seconds,
            replicas=replicas,
            threads=threads,
            settings=None if lock else {"LLM_CORE_LOCK": ""},
        )
        print(
            f"SWEEP replicas={replicas}+{replicas} threads={threads} core_lock={int(lock)} "
            f"msgs_per_min={run.per_minute:.2f} completion_per_s={run.tokens_per_second:.2f} "
            f"conversations_per_hour={run.conversations_per_hour:.1f} "
            f"evaluated_prompt_share={run.evaluated_share or 0:.2f} "
            f"fleet_latency_ms_avg={run.fleet.get('latency_ms_avg', 'n/a')}",
            flush=True,
        )


def main() -> None:
    """Run the stack with and without reuse, then the limit; print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2, 120 s per run (~10 min)")
    parser.add_argument("--model")
    parser.add_argument("--seconds", type=float, help="measured time per stack run")
    parser.add_argument("--sweep", action="store_true", help="compare bot layouts instead")
    args = parser.parse_args()
    model = args.model or ("smollm2-135m" if args.quick else "qwen2.5-1.5b")
    seconds = args.seconds or (120 if args.quick else 480)
    # a SIGTERM (a killed benchmark) unwinds like Ctrl-C, so no service or broker is left behind
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.sweep:
        sweep(model, seconds)
        return
    reuse = run_stack("with prompt reuse", model, seconds)
    print(reuse.summary(), flush=True)
    no_reuse = run_stack("without prompt reuse", model, seconds, cache_mb=0)
    print(no_reuse.summary(), flush=True)
    limit, asked, generated = limit_rate(model, reuse.messages)
    print(
        f"limit: llama-cpp-python alone, {os.cpu_count()} threads: {limit:.2f} msgs/min "
        f"({generated} of {asked} completion tokens)",
        flush=True,
    )
    share = reuse.evaluated_share
    print(
        f"RESULT bots ratio={reuse.per_minute / limit:.2f} target=0.8 "
        f"reuse_speedup={reuse.per_minute / no_reuse.per_minute:.2f} "
        f"evaluated_prompt_share={share if share is not None else float('nan'):.2f} "
        f"msgs_per_min={reuse.per_minute:.2f} "
        f"conversations_per_hour={reuse.conversations_per_hour:.1f} "
        f"limit_msgs_per_min={limit:.2f} no_reuse_msgs_per_min={no_reuse.per_minute:.2f} "
        f"model={model} cores={os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
