"""Benchmark: how good the LLM conversations are, measured apart from the bots' own checks.

Plays conversations with the bots' own protocol and responder (`supportsim.bots`: scenario cards,
prompts, structured turns, retries) in one process, one conversation after another, with the
model on every core, until `--conversations` have ended (20 by default). That is the code the bot
services run, without Kafka in between, so runs are fast and repeatable: the conversation ids
come from `--namespace`, the cards and every sampling seed from the ids, so two runs with the same
namespace play the same customers. `--stack` runs `supportsim up`'s whole stack instead.

Every figure is computed here, from the transcripts and the cards, with this file's own word
lists; none reuses the checks the bots retry on (`supportsim.bots.loops`):
- ratio: the share of ended conversations that ended normally (not `loop`, not `error`);
- gives_detail: conversations in which the customer states a fact of its card (its order or
  booking reference, its date, or most words of its symptom);
- offers_remedy: conversations in which the agent names a concrete remedy (refund, repair, ...);
- mirrors: replies that mostly repeat the message they answer;
- agent_voice: customer replies in a support agent's voice; self_address: customer replies that
  name the customer itself ("Thanks, Carla" from Carla);
- remedy_in_text: agent replies with a recorded remedy whose text names a remedy at all;
- outcomes by mood; and, for conversations of the shipped hand-labelled set
  (bench/data/quality-labels.json, labelled by reading bench/data/quality-run.jsonl),
  outcome_agreement: the share whose recorded outcome is the label.

Usage: .venv/bin/python bench/quality.py [--quick] [--model M] [--conversations N]
       [--structured] [--compare] [--stack] [--save PATH] [--from chat.jsonl]
Last line: RESULT quality ratio=<share ending normally> target=0.9 gives_detail=... ...
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parent / "data"
LABELS = DATA / "quality-labels.json"
DEFAULT_NAMESPACE = "quality-bench"

# what a concrete remedy is called in a support chat, either scenario
REMEDY_WORDS = re.compile(
    r"\b(?:refund\w*|replac\w*|repair\w*|exchang\w*|voucher\w*|store credit|rebook\w*|"
    r"compensat\w*|reimburs\w*|escalat\w*|technician|send (?:you )?a new|money back|"
    r"return label|courier)\b",
    re.IGNORECASE,
)
# what a support agent says and a customer does not (this bench's own list)
AGENT_PHRASES = re.compile(
    r"\b(?:how (?:can|may) i (?:help|assist)|i(?:'m| am) (?:here|happy|glad) to help|"
    r"thank(?:s| you) for (?:contacting|reaching out|choosing|your patience)|"
    r"sorry (?:to hear|for the inconvenience)|i understand your (?:frustration|concern)|"
    r"anything else i can|let me (?:check|look into) (?:that|this) for you|"
    r"i will do (?:everything|my best)|we apologi[sz]e)\b",
    re.IGNORECASE,
)
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "my",
        "your",
        "it",
        "is",
        "was",
        "i",
        "me",
        "you",
        "this",
        "that",
        "after",
        "about",
        "every",
        "by",
        "from",
        "not",
        "no",
    ]
)
MIRROR_THRESHOLD = 0.6


def words(text: str) -> list[str]:
    """Lower-case words of `text`."""
    return re.findall(r"[a-z0-9']+", text.lower())


def by_conversation(messages: list[dict]) -> dict[str, list[dict]]:
    """Messages grouped by conversation, each in turn order."""
    grouped: dict[str, list[dict]] = {}
    for m in messages:
        grouped.setdefault(m["conversation_id"], []).append(m)
    return {cid: sorted(ms, key=lambda m: m["turn"]) for cid, ms in grouped.items()}


def states_a_card_fact(text: str, card: dict) -> bool:
    """True when `text` states a fact of the customer's card (not only names the product)."""
    lowered = text.lower()
    for label, value in (card.get("facts") or {}).items():
        if re.fullmatch(r"[A-Z]{2,4}-[A-Z0-9]{4,8}", value) and value.lower() in lowered:
            return True
        days = re.fullmatch(r"(\d+) days ago", value)
        if days and re.search(rf"\b{days.group(1)}\s+days\b", lowered):
            return True
        if label in ("what is wrong", "already tried"):
            content = [w for w in words(value) if w not in STOP_WORDS]
            said = set(words(text))
            if content and sum(w in said for w in content) >= 0.6 * len(content):
                return True
    return False


def mirrors(reply: str, previous: str) -> bool:
    """True when `reply` mostly repeats `previous`, the message it answers."""
    a, b = words(reply), words(previous)
    if len(a) < 4 or len(b) < 4:
        return a == b and bool(a)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    copied = sum(block.size for block in matcher.get_matching_blocks() if block.size >= 3)
    return copied >= MIRROR_THRESHOLD * len(a) or matcher.ratio() >= 0.8


def report(messages: list[dict], model: str, labels: dict[str, dict] | None = None) -> dict:
    """Print the figures of a run's chat messages and the RESULT line; return the figures."""
    conversations = by_conversation(messages)
    ended = {cid: c for cid, c in conversations.items() if c[-1]["final"]}
    reasons = Counter(c[-1]["end_reason"] for c in ended.values())
    normal = sum(n for r, n in reasons.items() if r not in {"loop", "error"})
    replies = [
        (m, c[i - 1])
        for c in conversations.values()
        for i, m in enumerate(c)
        if i > 0 and m["end_reason"] != "error"
    ]
    customer = [m for m, _ in replies if m["role"] == "customer"]
    agent = [m for m, _ in replies if m["role"] == "agent"]
    detail = sum(
        any(
            m["role"] == "customer" and states_a_card_fact(m["text"], m.get("card") or {})
            for m in c
        )
        for c in ended.values()
    )
    remedy = sum(
        any(m["role"] == "agent" and m["turn"] > 0 and REMEDY_WORDS.search(m["text"]) for m in c)
        for c in ended.values()
    )
    recorded = [m for m in agent if m.get("remedy")]
    figures = {
        "ratio": normal / len(ended) if ended else 0.0,
        "gives_detail": detail / max(1, len(ended)),
        "offers_remedy": remedy / max(1, len(ended)),
        "mirrors": sum(mirrors(m["text"], p["text"]) for m, p in replies) / max(1, len(replies)),
        "agent_voice": sum(bool(AGENT_PHRASES.search(m["text"])) for m in customer)
        / max(1, len(customer)),
        "self_address": sum(
            bool(re.search(rf"\b{re.escape(m['customer']['name'].split()[0])}\b", m["text"]))
            for m in customer
        )
        / max(1, len(customer)),
        "remedy_in_text": sum(bool(REMEDY_WORDS.search(m["text"])) for m in recorded)
        / len(recorded)
        if recorded
        else float("nan"),
        "avg_turns": sum(len(c) for c in ended.values()) / max(1, len(ended)),
    }
    by_mood: dict[str, Counter] = defaultdict(Counter)
    for c in ended.values():
        last = c[-1]
        by_mood[last["customer"]["mood"]][last.get("outcome") or last["end_reason"]] += 1
    # a label holds for the transcript it was read from: same conversation, same last line
    labelled = {
        cid: label["outcome"]
        for cid, label in (labels or {}).items()
        if cid in ended and ended[cid][-1]["text"] == label["last"]
    }
    agree = sum(
        (ended[cid][-1].get("outcome") or "none") == label for cid, label in labelled.items()
    )
    figures["outcome_agreement"] = agree / len(labelled) if labelled else float("nan")
    print(f"conversations ended: {len(ended)} {dict(reasons)}; replies: {len(replies)}")
    print("outcomes by mood: " + "; ".join(f"{k}: {dict(v)}" for k, v in sorted(by_mood.items())))
    if labelled:
        print(f"hand-labelled conversations in this run: {len(labelled)}, agreeing: {agree}")
    shown = " ".join(f"{k}={v:.2f}" for k, v in figures.items() if k != "ratio")
    print(
        f"RESULT quality ratio={figures['ratio']:.2f} target=0.9 {shown} "
        f"ended={len(ended)} model={model}",
        flush=True,
    )
    return figures


def play_inprocess(
    model: str,
    conversations: int,
    *,
    structured: bool,
    namespace: str,
    scenario: str,
    save: Path | None = None,
) -> list[dict]:
    """Play `conversations` whole conversations, one after another, with the bots' own code.

    Each message is appended to `save` as it is written, so a long run can be read as it goes.
    """
    from supportsim.bots.conversation import BotConfig, handle, opening_message
    from supportsim.bots.llm import ChatLLM, LLMConfig
    from supportsim.bots.prompts import Scenario
    from supportsim.bots.turns import LLMResponder
    from supportsim.contract.protocol import slot_id

    loaded = Scenario.load(scenario)
    llm = ChatLLM.load(LLMConfig(model=model, n_threads=os.cpu_count() or 1))
    responder = LLMResponder(llm, loaded, structured=structured)
    configs = {role: BotConfig(role=role) for role in ("customer", "agent")}
    messages: list[dict] = []
    started = time.monotonic()
    out = save.open("w", encoding="utf-8") if save else None
    for index in range(conversations):
        queue = [opening_message(slot_id(namespace, index), loaded)]
        states: dict = {"customer": None, "agent": None}
        while queue:
            message = queue.pop(0)
            messages.append(json.loads(message.model_dump_json()))
            if out:
                out.write(json.dumps(messages[-1]) + "\n")
                out.flush()
            if message.final:
                break
            for role in configs:
                outcome = handle(states[role], message, configs[role], responder, loaded)
                states[role] = outcome.state
                queue += [
                    m for m in outcome.messages if m.conversation_id == message.conversation_id
                ]
        last = messages[-1]
        print(
            f"conversation {index + 1}/{conversations}: {last['turn'] + 1} turns, "
            f"{last.get('outcome') or last['end_reason']} ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    if out:
        out.close()
    return messages


def play_stack(model: str, conversations: int, *, structured: bool, quick: bool) -> list[dict]:
    """`supportsim up`'s stack until `conversations` have ended (see bench/bots.py)."""
    from bots import run_stack

    settings = {
        "CONVERSATIONS": "4",
        "LLM_STRUCTURED": str(structured).lower(),
        **({"MAX_TURNS": "8"} if quick else {}),
    }
    return run_stack("quality", model, 3600, settings=settings, until_ended=conversations).messages


def main() -> None:
    """Play (or load) conversations and print the quality figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2, 6 conversations")
    parser.add_argument("--model")
    parser.add_argument("--conversations", type=int, help="how many to play (default 20)")
    parser.add_argument("--scenario", default="electronics")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="seeds the conversations")
    parser.add_argument("--structured", action="store_true", help="LLM_STRUCTURED=true")
    parser.add_argument(
        "--compare", action="store_true", help="play the same conversations both ways"
    )
    parser.add_argument("--stack", action="store_true", help="through supportsim up's stack")
    parser.add_argument("--save", type=Path, help="write the transcripts here (jsonl)")
    parser.add_argument(
        "--from", dest="saved", type=Path, help="score a saved chat.jsonl; plays nothing"
    )
    args = parser.parse_args()
    model = args.model or ("smollm2-135m" if args.quick else "qwen2.5-1.5b")
    labels = json.loads(LABELS.read_text(encoding="utf-8")) if LABELS.is_file() else {}
    if args.saved:
        lines = args.saved.read_text(encoding="utf-8").splitlines()
        messages = [json.loads(line) for line in lines if line.strip()]
        model = next((m["model"] for m in messages if m["turn"] > 0), model)
        report(messages, model, labels)
        return
    count = args.conversations or (6 if args.quick else 20)
    modes = [False, True] if args.compare else [args.structured]
    for structured in modes:
        print(f"--- {'structured' if structured else 'unstructured'} turns", flush=True)
        path = None
        if args.save:
            path = (
                args.save.with_suffix(".structured.jsonl")
                if args.compare and structured
                else args.save
            )
        if args.stack:
            messages = play_stack(model, count, structured=structured, quick=args.quick)
            if path:
                path.write_text("".join(json.dumps(m) + "\n" for m in messages), "utf-8")
        else:
            messages = play_inprocess(
                model,
                count,
                structured=structured,
                namespace=args.namespace,
                scenario=args.scenario,
                save=path,
            )
        if path:
            print(f"transcripts saved to {path}", flush=True)
        report(messages, model, labels)


if __name__ == "__main__":
    main()
