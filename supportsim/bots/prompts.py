"""Scenarios: the bots' prompts and persona lists, loaded from a folder under ``prompts/``.

A scenario folder holds LangChain prompt files (``customer.yaml``, ``agent.yaml``, loaded with
``load_prompt``), the agent's opening lines (``greetings.txt``), the name lists
(``customer_names.txt``, ``agent_names.txt``: one entry per line, ``#`` starts a comment) and the
scenario cards (``cards.yaml``: weighted moods, products with their problems, goals, the agent's
policy; see :mod:`supportsim.bots.cards`). Personas and cards are drawn with a caller's
``random.Random``, one per conversation, so concurrent conversations never share one.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.prompts import PromptTemplate
from langchain_core.prompts.loading import load_prompt

from supportsim.bots.cards import Card, CardDeck, CardError, describe_policy
from supportsim.bots.loops import Phrases, PhrasesError
from supportsim.bots.scenario_files import read_yaml
from supportsim.contract.messages import Role

DEFAULT_SCENARIO = "electronics"
PROMPTS_ROOT = Path(__file__).resolve().parents[2] / "prompts"
LIST_FILES = ("customer_names", "agent_names", "greetings")

DIRECTIONS_FILE = "directions.yaml"


@dataclass(frozen=True)
class Directions:
    """A scenario's stage directions (its ``directions.yaml``): what a bot is told each turn.

    Templates take {customer_name}, {agent_name}, {mood}, {product} and {remedies}.
    """

    opening: dict[str, str]
    reminder: dict[str, str]
    first_message: str
    wrap_up: str
    patience: str
    structured: dict[str, str]
    hints: dict[str, str]
    speaker_labels: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, folder: Path) -> Directions:
        """Read ``directions.yaml`` of a scenario folder."""
        path = folder / DIRECTIONS_FILE
        data = read_yaml(folder, DIRECTIONS_FILE, ScenarioError)
        try:
            sides = ("customer", "agent")
            return cls(
                opening={r: str(data["opening"][r]) for r in sides},
                reminder={r: str(data["reminder"][r]) for r in sides},
                first_message=str(data["first_message"]),
                wrap_up=str(data["wrap_up"]),
                patience=str(data["patience"]),
                structured={r: str(data["structured"][r]) for r in sides},
                hints={str(k): str(v) for k, v in dict(data.get("hints") or {}).items()},
                speaker_labels={r: tuple(str(x) for x in data["speaker_labels"][r]) for r in sides},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ScenarioError(f"{path} is malformed: {type(exc).__name__}: {exc}") from None

    def all_cues(self) -> list[str]:
        """Every template a bot may be given: a reply that starts copying one is done."""
        return [
            *self.reminder.values(),
            *self.structured.values(),
            *self.hints.values(),
            self.first_message,
            self.wrap_up,
            self.patience,
        ]


class ScenarioError(ValueError):
    """A scenario folder is missing, incomplete or malformed."""


@dataclass(frozen=True)
class Persona:
    """Who talks in one conversation: the customer (name, mood, product, card), the agent's name
    and the agent's policy for this customer."""

    customer_name: str
    mood: str
    product: str
    agent_name: str
    card: Card | None = None
    policy: dict[str, str] = field(default_factory=dict)

    def customer(self) -> dict[str, str]:
        """The customer persona as the message contract carries it."""
        return {"name": self.customer_name, "mood": self.mood, "product": self.product}

    def agent(self) -> dict[str, str]:
        """The agent persona as the message contract carries it."""
        return {"name": self.agent_name}

    @classmethod
    def from_contract(
        cls,
        customer: dict[str, Any],
        agent: dict[str, Any],
        card: dict[str, Any] | None = None,
        policy: dict[str, str] | None = None,
    ) -> Persona:
        """Rebuild a persona from the `customer`, `agent`, `card` and `policy` of a message."""
        return cls(
            customer_name=customer["name"],
            mood=customer["mood"],
            product=customer["product"],
            agent_name=agent["name"],
            card=Card.from_contract(card) if card else None,
            policy=dict(policy or {}),
        )

    def name_of(self, role: Role) -> str:
        """The name of the side playing `role`."""
        return self.customer_name if role == "customer" else self.agent_name


@dataclass(frozen=True)
class Scenario:
    """One business the bots play out: its prompts, persona lists and greetings."""

    name: str
    folder: Path
    customer_prompt: PromptTemplate
    agent_prompt: PromptTemplate
    customer_names: tuple[str, ...]
    agent_names: tuple[str, ...]
    greetings: tuple[str, ...]
    cards: CardDeck
    directions: Directions
    phrases: Phrases

    @property
    def moods(self) -> tuple[str, ...]:
        """Every mood a customer of this scenario can have."""
        return self.cards.mood_names

    @property
    def products(self) -> tuple[str, ...]:
        """Every product a conversation of this scenario can be about."""
        return self.cards.products

    @property
    def remedies(self) -> tuple[str, ...]:
        """What the agent may offer (its structured output names one, or none)."""
        return self.cards.remedies

    @classmethod
    def load(cls, scenario: str | Path = DEFAULT_SCENARIO, root: Path = PROMPTS_ROOT) -> Scenario:
        """Load a scenario by folder name under `root` (``prompts/``) or by a path to its folder."""
        folder = root / str(scenario)
        if not folder.is_dir():
            folder = Path(scenario).expanduser()
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise ScenarioError(
                f"scenario {str(scenario)!r} not found: it is neither a folder nor one of "
                f"{known} under {root}"
            )
        lists = {name: read_list(folder / f"{name}.txt") for name in LIST_FILES}
        try:
            cards = CardDeck.load(folder)
            phrases = Phrases.load(folder)
        except (CardError, PhrasesError) as exc:
            raise ScenarioError(str(exc)) from None
        return cls(
            name=folder.name,
            folder=folder,
            customer_prompt=_load_prompt_file(folder / "customer.yaml"),
            agent_prompt=_load_prompt_file(folder / "agent.yaml"),
            cards=cards,
            directions=Directions.load(folder),
            phrases=phrases,
            **lists,
        )

    def draw_persona(self, rng: random.Random) -> Persona:
        """Draw a persona and its card for one conversation from this scenario's lists."""
        customer_name = rng.choice(self.customer_names)
        agent_name = rng.choice(self.agent_names)
        mood, card, policy = self.cards.draw(rng)
        return Persona(
            customer_name=customer_name,
            mood=mood,
            product=card.product,
            agent_name=agent_name,
            card=card,
            policy=policy,
        )

    def greeting(self, persona: Persona, rng: random.Random) -> str:
        """The agent's opening line of a conversation (a template, no model needed)."""
        return rng.choice(self.greetings).format(
            agent_name=persona.agent_name,
            customer_name=persona.customer_name,
            customer_first_name=persona.customer_name.split()[0],
        )

    def open(self, conversation_id: str, rng: random.Random) -> tuple[dict, dict, str, dict]:
        """Draw a new conversation's (customer persona, agent persona, greeting text, extra
        message fields: the customer's `card` and the agent's `policy`).

        `conversation_id` is unused: `rng` is already seeded for that conversation.
        """
        persona = self.draw_persona(rng)
        extra = {"card": persona.card.to_contract() if persona.card else None}
        extra["policy"] = persona.policy
        return persona.customer(), persona.agent(), self.greeting(persona, rng), extra

    def system_prompt(self, role: Role, persona: Persona) -> str:
        """The system prompt of the bot playing `role` in a conversation with `persona`."""
        values = {"customer_name": persona.customer_name, "agent_name": persona.agent_name}
        if role == "customer":
            # the card is the customer's alone: it never reaches the agent's prompt
            values["card"] = persona.card.describe() if persona.card else ""
            prompt = self.customer_prompt.partial(mood=persona.mood, product=persona.product)
        else:
            values["policy"] = describe_policy(persona.policy)
            prompt = self.agent_prompt
        text = prompt.format(**{k: v for k, v in values.items() if k in prompt.input_variables})
        return re.sub(r"\n{3,}", "\n\n", text).strip()

    def turn_reminder(
        self,
        role: Role,
        persona: Persona,
        *,
        hints: Sequence[str] = (),
        wrap_up: bool = False,
        first: bool = False,
        impatient: bool = False,
        structured: bool = False,
    ) -> str:
        """A one-line reminder of who `role` plays, given after the message it answers.

        For a retry, `hints` names the checks the attempt before failed; each adds its line
        (``hints`` in directions.yaml). `wrap_up` (the customer's turn after an agent's closing
        line) lets the customer say goodbye; `first` (the customer's first message) tells it to
        open with its problem; `impatient` (its patience spent with no remedy offered) tells it
        to give up. `structured` adds what the JSON fields mean.
        """
        names = {
            "customer_name": persona.customer_name,
            "agent_name": persona.agent_name,
            "mood": persona.mood,
            "product": persona.product,
            "remedies": ", ".join(self.remedies),
        }
        said = self.directions
        first = first and role == "customer"
        lines = [(said.first_message if first else said.reminder[role]).format(**names)]
        if impatient and role == "customer":
            lines.append(said.patience.format(**names))
        elif wrap_up and role == "customer":
            lines.append(said.wrap_up.format(**names))
        lines += [said.hints[h].format(**names) for h in hints if h in said.hints]
        if structured:
            lines.append(said.structured[role].format(**names))
        return "\n".join(lines)

    def opening_cue(self, role: Role, persona: Persona) -> str:
        """The instruction given to `role` when it must write a conversation's first message."""
        return self.directions.opening[role].format(
            agent_name=persona.agent_name, customer_name=persona.customer_name
        )


def load_scenario(scenario: str | Path = DEFAULT_SCENARIO) -> Scenario:
    """The scenario named by the ``SCENARIO`` setting: a folder under ``prompts/`` or a path."""
    return Scenario.load(scenario)


def read_list(path: Path) -> tuple[str, ...]:
    """Non-empty lines of a list file, without ``#`` comments; at least one entry is required."""
    if not path.is_file():
        raise ScenarioError(f"scenario file {path} is missing")
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append(entry)
    if not entries:
        raise ScenarioError(f"scenario file {path} has no entries")
    return tuple(entries)


def _load_prompt_file(path: Path) -> PromptTemplate:
    if not path.is_file():
        raise ScenarioError(f"scenario file {path} is missing")
    with warnings.catch_warnings():
        # load_prompt is deprecated in langchain-core 1.2 (removal in 2.0) but still the way to
        # read the YAML prompt files this project keeps beside its persona lists
        warnings.simplefilter("ignore", DeprecationWarning)
        prompt = load_prompt(path, encoding="utf-8")
    if not isinstance(prompt, PromptTemplate):
        raise ScenarioError(f"{path} must be a plain prompt file (_type: prompt)")
    if "\\n" in prompt.template:
        raise ScenarioError(f"{path} holds a literal \\n: use real newlines in a YAML block")
    return prompt
