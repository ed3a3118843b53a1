"""Scenarios: the bots' prompts and persona lists, loaded from a folder under ``prompts/``.

A scenario folder holds LangChain prompt files (``customer.yaml``, ``agent.yaml``, loaded with
``load_prompt``), the agent's opening lines (``greetings.txt``) and the persona lists
(``customer_names.txt``, ``moods.txt``, ``products.txt``, ``agent_names.txt``: one entry per line,
``#`` starts a comment). Personas are drawn with a caller's ``random.Random``, one per
conversation, so concurrent conversations in one process never share a mood or product.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.prompts import PromptTemplate
from langchain_core.prompts.loading import load_prompt

from supportsim.messages import Role

DEFAULT_SCENARIO = "electronics"
PROMPTS_ROOT = Path(__file__).resolve().parents[2] / "prompts"
LIST_FILES = ("customer_names", "moods", "products", "agent_names", "greetings")

# Sent as the first "other side" message when a bot must speak first (it then has nothing to
# answer); chat models follow an instruction in a user message better than one in the system prompt.
OPENING_CUES: dict[Role, str] = {
    "customer": "(The support chat with {agent_name} has just opened. Write your first message.)",
    "agent": "(A customer, {customer_name}, has just joined the chat. Greet them.)",
}


# Given as a last system message after the message a bot answers (never stored in the history):
# with the 1.5B model it keeps the customer from turning into a helpful assistant on the first
# turns more often; appended to the human message instead, small models copy it into the reply.
TURN_REMINDERS: dict[Role, str] = {
    "customer": "(Reply as {customer_name}, the {mood} customer who needs help, in one to three "
    "sentences.)",
    "agent": "(Reply as {agent_name}, the support agent, in one to three sentences.)",
}
# added to the reminder when a reply is generated again because it repeated an earlier line
REPEAT_WARNING = "(Say something new: do not repeat anything already said in this chat.)"
# added to the customer's reminder for a retry when it offered help like an agent would
OFFERED_HELP_WARNING = "(You are the customer, {customer_name}: ask for help, do not offer it.)"
# the customer's reminder for its first message, so it opens with its problem (the 1.5B model
# otherwise greets back like an agent, or says goodbye at once). One line in the same form as the
# usual reminder: as a second line of its own ("(Your first message: ...)") the model copied it into
# 3 of 14 first replies (two wordings), in this form into none of 8 (measured 2026-12-04)
FIRST_MESSAGE_REMINDER = (
    TURN_REMINDERS["customer"].removesuffix(".)")
    + ": say what is wrong with your {product} and what you want.)"
)
# added to the customer's reminder after an agent's closing line (a farewell, "anything else?")
WRAP_UP_CUE = (
    "(If your problem is solved, thank {agent_name} and say goodbye. Otherwise, say what is "
    "still wrong.)"
)


class ScenarioError(ValueError):
    """A scenario folder is missing, incomplete or malformed."""


@dataclass(frozen=True)
class Persona:
    """Who talks in one conversation: the customer (name, mood, product) and the agent's name."""

    customer_name: str
    mood: str
    product: str
    agent_name: str

    def customer(self) -> dict[str, str]:
        """The customer persona as the message contract carries it."""
        return {"name": self.customer_name, "mood": self.mood, "product": self.product}

    def agent(self) -> dict[str, str]:
        """The agent persona as the message contract carries it."""
        return {"name": self.agent_name}

    @classmethod
    def from_contract(cls, customer: dict[str, Any], agent: dict[str, Any]) -> Persona:
        """Rebuild a persona from the `customer` and `agent` fields of a chat message."""
        return cls(
            customer_name=customer["name"],
            mood=customer["mood"],
            product=customer["product"],
            agent_name=agent["name"],
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
    moods: tuple[str, ...]
    products: tuple[str, ...]
    agent_names: tuple[str, ...]
    greetings: tuple[str, ...]

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
        return cls(
            name=folder.name,
            folder=folder,
            customer_prompt=_load_prompt_file(folder / "customer.yaml"),
            agent_prompt=_load_prompt_file(folder / "agent.yaml"),
            **lists,
        )

    def draw_persona(self, rng: random.Random) -> Persona:
        """Draw a persona for one conversation from this scenario's lists."""
        return Persona(
            customer_name=rng.choice(self.customer_names),
            mood=rng.choice(self.moods),
            product=rng.choice(self.products),
            agent_name=rng.choice(self.agent_names),
        )

    def greeting(self, persona: Persona, rng: random.Random) -> str:
        """The agent's opening line of a conversation (a template, no model needed)."""
        return rng.choice(self.greetings).format(
            agent_name=persona.agent_name,
            customer_name=persona.customer_name,
            customer_first_name=persona.customer_name.split()[0],
        )

    def open(self, conversation_id: str, rng: random.Random) -> tuple[dict, dict, str]:
        """Draw a new conversation's (customer persona, agent persona, greeting text).

        `conversation_id` is unused: `rng` is already seeded for that conversation.
        """
        persona = self.draw_persona(rng)
        return persona.customer(), persona.agent(), self.greeting(persona, rng)

    def system_prompt(self, role: Role, persona: Persona) -> str:
        """The system prompt of the bot playing `role` in a conversation with `persona`."""
        names = {"customer_name": persona.customer_name, "agent_name": persona.agent_name}
        if role == "customer":
            prompt = self.customer_prompt.partial(mood=persona.mood, product=persona.product)
        else:
            prompt = self.agent_prompt
        return prompt.format(
            **{k: v for k, v in names.items() if k in prompt.input_variables}
        ).strip()

    def turn_reminder(
        self,
        role: Role,
        persona: Persona,
        *,
        repeated: bool = False,
        offered_help: bool = False,
        wrap_up: bool = False,
        first: bool = False,
    ) -> str:
        """A one-line reminder of who `role` plays, given after the message it answers.

        For a retry, `repeated` adds a warning against repeating earlier lines and
        `offered_help` one against the customer offering help. `wrap_up` (the customer's turn
        after an agent's closing line) lets the customer say goodbye; `first` (the customer's
        first message) tells it to open with its problem.
        """
        names = {
            "customer_name": persona.customer_name,
            "agent_name": persona.agent_name,
            "mood": persona.mood,
            "product": persona.product,
        }
        first = first and role == "customer"
        lines = [(FIRST_MESSAGE_REMINDER if first else TURN_REMINDERS[role]).format(**names)]
        if wrap_up and role == "customer":
            lines.append(WRAP_UP_CUE.format(**names))
        if offered_help and role == "customer":
            lines.append(OFFERED_HELP_WARNING.format(**names))
        if repeated:
            lines.append(REPEAT_WARNING)
        return "\n".join(lines)

    def opening_cue(self, role: Role, persona: Persona) -> str:
        """The instruction given to `role` when it must write a conversation's first message."""
        return OPENING_CUES[role].format(
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
