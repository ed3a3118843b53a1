"""Scenario cards: what one customer knows and wants, and what the agent may offer.

A scenario folder's ``cards.yaml`` holds weighted choices; each conversation draws its own card
with the conversation's ``random.Random``, so two conversations never share one and the same seed
gives the same card. The customer's side (:class:`Card`) goes only into the customer's prompt and
travels on the chat messages as the ``card`` field; the agent's side (the drawn ``policy``) goes
only into the agent's prompt and travels as the ``policy`` field.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from supportsim.bots.scenario_files import read_yaml

CARDS_FILE = "cards.yaml"
NO_REMEDY = "none"


class CardError(ValueError):
    """A scenario's cards.yaml is missing or malformed."""


@dataclass(frozen=True)
class Card:
    """The customer's side of one conversation: facts it reveals when asked, goals, limits."""

    scenario: str
    id: str
    product: str
    facts: dict[str, str]
    wants: str
    refuses: str
    patience: int
    # the remedies that give the customer what it wants
    accepts: tuple[str, ...] = ()

    def to_contract(self) -> dict[str, Any]:
        """The card as the `card` field of a chat message."""
        data = asdict(self)
        data["accepts"] = list(self.accepts)
        return data

    @classmethod
    def from_contract(cls, data: Mapping[str, Any]) -> Card:
        """Rebuild a card from a message's `card` field."""
        return cls(
            scenario=str(data["scenario"]),
            id=str(data["id"]),
            product=str(data["product"]),
            facts={str(k): str(v) for k, v in dict(data.get("facts") or {}).items()},
            wants=str(data["wants"]),
            refuses=str(data["refuses"]),
            patience=int(data["patience"]),
            accepts=tuple(str(r) for r in data.get("accepts") or ()),
        )

    def describe(self) -> str:
        """The card as lines of the customer's prompt."""
        facts = "; ".join(f"{label}: {value}" for label, value in self.facts.items())
        know, want, refuse = CARD_LABEL_PARTS
        return f"{know}: {facts}.\n{want}: {self.wants}. {refuse}: {self.refuses}."


CARD_LABEL_PARTS = (
    "What you know (tell it when the agent asks, one or two facts at a time)",
    "What you want",
    "What you will not accept",
)
CARD_LABELS = ". ".join(CARD_LABEL_PARTS)  # the card's own words, without its facts


@dataclass(frozen=True)
class Problem:
    """One product and the symptoms and earlier attempts that can go with it."""

    product: str
    symptoms: tuple[str, ...]
    tried: tuple[str, ...]


Weighted = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class CardDeck:
    """The weighted choices of one scenario, from its ``cards.yaml``."""

    scenario: str
    moods: Weighted
    reference_label: str
    reference_format: str
    bought_label: str
    days_ago: tuple[int, int]
    problems: tuple[tuple[Problem, float], ...]
    wants: Weighted
    wanted_remedies: dict[str, tuple[str, ...]]
    refuses: Weighted
    patience: tuple[tuple[int, float], ...]
    policy: dict[str, Weighted] = field(default_factory=dict)
    remedies: tuple[str, ...] = ()

    @classmethod
    def load(cls, folder: Path) -> CardDeck:
        """Read ``cards.yaml`` of a scenario folder; a clear :class:`CardError` when malformed."""
        path = folder / CARDS_FILE
        data = read_yaml(folder, CARDS_FILE, CardError)
        try:
            days = data["bought"]["days_ago"]
            wants = {
                str(k): v if isinstance(v, Mapping) else {"weight": v}
                for k, v in dict(data["wants"]).items()
            }
            deck = cls(
                scenario=folder.name,
                moods=_weighted(data["moods"]),
                reference_label=str(data["reference"]["label"]),
                reference_format=str(data["reference"]["format"]),
                bought_label=str(data["bought"]["label"]),
                days_ago=(int(days[0]), int(days[1])),
                problems=tuple(
                    (
                        Problem(
                            product=str(p["product"]),
                            symptoms=tuple(str(s) for s in p["symptom"]),
                            tried=tuple(str(t) for t in p["tried"]),
                        ),
                        float(p.get("weight", 1)),
                    )
                    for p in data["problems"]
                ),
                wants=_weighted({k: v.get("weight", 1) for k, v in wants.items()}),
                wanted_remedies={
                    k: tuple(str(r) for r in v.get("remedies") or ()) for k, v in wants.items()
                },
                refuses=_weighted(data["refuses"]),
                patience=tuple((int(k), w) for k, w in _weighted(data["patience"])),
                policy={str(k): _weighted(v) for k, v in (data.get("policy") or {}).items()},
                remedies=tuple(str(r) for r in data.get("remedies") or ()),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CardError(f"{path} is malformed: {type(exc).__name__}: {exc}") from None
        if not deck.problems or any(not p.symptoms or not p.tried for p, _ in deck.problems):
            raise CardError(f"{path}: every problem needs a product, a symptom and a tried list")
        if NO_REMEDY in deck.remedies:
            raise CardError(f"{path}: {NO_REMEDY!r} is not a remedy, it is the absence of one")
        unknown = {r for rs in deck.wanted_remedies.values() for r in rs} - set(deck.remedies)
        if unknown:
            raise CardError(f"{path}: wants name remedies not in the remedies list: {unknown}")
        return deck

    @property
    def mood_names(self) -> tuple[str, ...]:
        """Every mood a card can have."""
        return tuple(m for m, _ in self.moods)

    @property
    def products(self) -> tuple[str, ...]:
        """Every product a card can be about."""
        return tuple(p.product for p, _ in self.problems)

    def draw(self, rng: random.Random) -> tuple[str, Card, dict[str, str]]:
        """Draw (mood, customer card, agent policy) for one conversation."""
        mood = _choice(rng, self.moods)
        problem = rng.choices([p for p, _ in self.problems], [w for _, w in self.problems])[0]
        facts = {
            self.reference_label: _fill(self.reference_format, rng),
            self.bought_label: f"{rng.randint(*self.days_ago)} days ago",
            "what is wrong": rng.choice(problem.symptoms),
            "already tried": rng.choice(problem.tried),
        }
        wants = _choice(rng, self.wants)
        body = {
            "product": problem.product,
            "facts": facts,
            "wants": wants,
            "accepts": list(self.wanted_remedies.get(wants, ())),
            "refuses": _choice(rng, self.refuses),
            "patience": rng.choices([p for p, _ in self.patience], [w for _, w in self.patience])[
                0
            ],
        }
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
        card = Card.from_contract(
            {"scenario": self.scenario, "id": f"{self.scenario}-{digest}", **body}
        )
        policy = {label: _choice(rng, choices) for label, choices in self.policy.items()}
        return mood, card, policy


def describe_policy(policy: Mapping[str, str]) -> str:
    """The drawn policy facts as one line of the agent's prompt ("" when there are none)."""
    if not policy:
        return ""
    return "For this customer: " + "; ".join(f"{k}: {v}" for k, v in policy.items()) + "."


def _weighted(data: Any) -> Weighted:
    if isinstance(data, Mapping):
        pairs = tuple((str(k), float(v)) for k, v in data.items())
    elif isinstance(data, Sequence) and not isinstance(data, str):
        pairs = tuple((str(v), 1.0) for v in data)
    else:
        raise ValueError(f"expected a list or a mapping of value: weight, got {data!r}")
    if not pairs or any(w < 0 for _, w in pairs) or not any(w > 0 for _, w in pairs):
        raise ValueError(f"a weighted choice needs entries with positive weights: {data!r}")
    return pairs


def _choice(rng: random.Random, choices: Weighted) -> str:
    return rng.choices([v for v, _ in choices], [w for _, w in choices])[0]


def _fill(template: str, rng: random.Random) -> str:
    return "".join(
        rng.choice(string.digits)
        if c == "#"
        else rng.choice(string.ascii_uppercase)
        if c == "@"
        else c
        for c in template
    )
