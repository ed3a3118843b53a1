"""Scenario cards: drawn per conversation from a scenario's cards.yaml, hidden from the agent."""

from __future__ import annotations

import random
import shutil

import pytest

from supportsim.bots.cards import Card, CardDeck, CardError
from supportsim.bots.conversation import BotConfig, Reply, handle, opening_message
from supportsim.bots.prompts import PROMPTS_ROOT, Persona, Scenario, ScenarioError
from supportsim.contract.messages import ChatMessage
from supportsim.contract.protocol import slot_id

SCENARIOS = ["electronics", "travel"]


@pytest.fixture(params=SCENARIOS)
def scenario(request) -> Scenario:
    return Scenario.load(request.param)


def test_the_same_seed_draws_the_same_card(scenario):
    assert scenario.cards.draw(random.Random(9)) == scenario.cards.draw(random.Random(9))


def test_concurrent_conversations_never_share_a_card(scenario):
    messages = [opening_message(slot_id("cards", i), scenario) for i in range(40)]
    cards = [m.card for m in messages]
    assert all(card is not None for card in cards)
    assert len({card.id for card in cards}) == len(cards)
    # a conversation re-opened (a redo after a crash) draws its own card again
    again = opening_message(messages[3].conversation_id, scenario)
    assert again.card == messages[3].card and again.policy == messages[3].policy


def test_a_card_holds_concrete_facts_a_goal_a_limit_and_patience(scenario):
    mood, card, policy = scenario.cards.draw(random.Random(1))
    assert mood in scenario.moods and card.product in scenario.products
    reference = card.facts[scenario.cards.reference_label]
    assert any(ch.isdigit() for ch in reference) and "#" not in reference
    assert card.facts[scenario.cards.bought_label].endswith("days ago")
    assert card.wants and card.refuses and card.patience >= 1
    assert set(policy) == set(scenario.cards.policy)


def test_moods_are_weighted_and_include_calm_customers(scenario):
    moods = [scenario.cards.draw(random.Random(seed))[0] for seed in range(400)]
    calm = sum(m in ("calm", "polite", "polite but firm") for m in moods)
    assert 0.15 < calm / len(moods) < 0.6  # a dataset is not all angry customers
    assert len(set(moods)) > 6


def test_a_card_round_trips_through_the_message_contract(scenario):
    message = opening_message(slot_id("cards", 1), scenario)
    raw = message.model_dump_json()
    back = ChatMessage.model_validate_json(raw)
    assert Card.from_contract(back.card.model_dump()).to_contract() == message.card.model_dump()


def test_the_agents_prompt_holds_none_of_the_customers_hidden_facts(scenario):
    for seed in range(20):
        persona = scenario.draw_persona(random.Random(seed))
        agent = scenario.system_prompt("agent", persona)
        customer = scenario.system_prompt("customer", persona)
        hidden = list(persona.card.facts.values())
        for fact in hidden:
            assert fact in customer
            assert fact not in agent, fact
        assert persona.card.describe() in customer and "What you want" not in agent
        for value in persona.policy.values():
            assert value in agent and value not in customer
        for turn in range(3):
            reminder = scenario.turn_reminder("agent", persona, first=turn == 0, structured=True)
            assert not any(fact in reminder for fact in hidden)


def test_a_card_round_trips_through_a_persona(scenario):
    persona = scenario.draw_persona(random.Random(4))
    again = Persona.from_contract(
        persona.customer(), persona.agent(), persona.card.to_contract(), persona.policy
    )
    assert again == persona


def test_a_malformed_cards_file_says_what_is_wrong(tmp_path):
    folder = tmp_path / "shop"
    shutil.copytree(PROMPTS_ROOT / "electronics", folder)
    text = (folder / "cards.yaml").read_text(encoding="utf-8")
    (folder / "cards.yaml").write_text(text.replace("reference:", "ref:"), encoding="utf-8")
    with pytest.raises(ScenarioError, match="cards.yaml is malformed.*reference"):
        Scenario.load(folder)
    (folder / "cards.yaml").write_text(text.replace("  - escalation", "  - none"), "utf-8")
    with pytest.raises(CardError, match="not a remedy"):
        CardDeck.load(folder)


def test_a_third_scenario_is_a_folder_and_needs_no_code(tmp_path):
    scenario = Scenario.load(PROMPTS_ROOT.parent / "tests" / "fixtures" / "bakery")
    assert scenario.name == "bakery"
    persona = scenario.draw_persona(random.Random(2))
    assert persona.product in ("birthday cake", "bread subscription")
    assert "Crumb & Co" in scenario.system_prompt("agent", persona)
    assert persona.card.facts["order code"].startswith("CC-")
    assert scenario.remedies == ("remake", "refund")
    message = opening_message(slot_id("bakery", 0), scenario)
    assert message.card.scenario == "bakery" and "Crumb & Co" in message.text
    # its own check phrases and stage directions, from its folder
    assert scenario.phrases.is_goodbye("Lovely, cheerio!")
    assert not Scenario.load("electronics").phrases.is_goodbye("Lovely, cheerio!")
    assert "of the bakery" in scenario.turn_reminder("agent", persona)
    # a whole unstructured conversation ends on the bakery's own farewell word
    customer = BotConfig(role="customer")
    line = ScriptedLine("Ta-ra then, cheerio!")
    reply = handle(None, message, customer, line, scenario).messages[0]
    assert reply.final and reply.end_reason == "goodbye"


class ScriptedLine:
    """A responder that always says one line, with no structured decision."""

    model_name = "scripted-line"

    def __init__(self, text: str) -> None:
        self.text = text

    def respond(self, role, conversation):
        return Reply(text=self.text)
