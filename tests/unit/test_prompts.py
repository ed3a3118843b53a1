"""Scenarios: prompt files via LangChain's load_prompt, persona lists, per-conversation draws."""

from __future__ import annotations

import os
import random
import shutil
import warnings

import pytest
from langchain_core.prompts import PromptTemplate
from langchain_core.prompts.loading import load_prompt

from supportsim.bots.prompts import (
    DEFAULT_SCENARIO,
    PROMPTS_ROOT,
    Persona,
    Scenario,
    ScenarioError,
    read_list,
)
from supportsim.contract.messages import AgentPersona, CustomerPersona, ScenarioCard

SCENARIOS = ["electronics", "travel"]


@pytest.fixture(params=SCENARIOS)
def scenario(request) -> Scenario:
    return Scenario.load(request.param)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("role", ["customer", "agent"])
def test_prompt_files_load_with_langchain_load_prompt(name, role):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prompt = load_prompt(PROMPTS_ROOT / name / f"{role}.yaml", encoding="utf-8")
    assert isinstance(prompt, PromptTemplate)
    card_or_policy = "card" if role == "customer" else "policy"
    assert set(prompt.input_variables) == {"customer_name", "agent_name", card_or_policy}
    if role == "customer":
        assert set(prompt.partial_variables) == {"mood", "product"}


def test_default_scenario_is_electronics():
    assert DEFAULT_SCENARIO == "electronics"
    assert Scenario.load().name == "electronics"


def test_rendered_prompts_have_real_newlines_and_no_literal_backslash_n(scenario):
    persona = scenario.draw_persona(random.Random(7))
    for role in ("customer", "agent"):
        text = scenario.system_prompt(role, persona)
        assert "\\n" not in text
        assert "\n" in text
        assert "{" not in text and "}" not in text
        assert text == text.strip()
    for greeting in scenario.greetings:
        assert "\\n" not in greeting


def test_customer_prompt_applies_mood_and_product_as_partial_variables(scenario):
    persona = Persona("Ada Lovelace", "sarcastic", "the thing under test", "Sam")
    text = scenario.system_prompt("customer", persona)
    assert "sarcastic" in text
    assert "the thing under test" in text
    assert "not set" not in text
    assert "Ada Lovelace" in text and "Sam" in text
    # the loaded template itself is untouched: each conversation applies its own partials
    assert scenario.customer_prompt.partial_variables["mood"] == "(mood not set)"


def test_both_prompts_forbid_writing_the_other_side(scenario):
    persona = scenario.draw_persona(random.Random(3))
    customer = scenario.system_prompt("customer", persona)
    agent = scenario.system_prompt("agent", persona)
    assert f"Never write {persona.agent_name}'s replies" in customer
    assert f"Never write {persona.customer_name}'s replies" in agent
    assert "one to three sentences" in customer and "one to three sentences" in agent
    assert "goodbye" in customer


def test_persona_draws_depend_only_on_their_own_random(scenario):
    assert scenario.draw_persona(random.Random(42)) == scenario.draw_persona(random.Random(42))

    # two conversations drawing in turn do not change each other's personas
    a, b = random.Random(1), random.Random(2)
    interleaved = [(scenario.draw_persona(a), scenario.draw_persona(b)) for _ in range(5)]
    alone_a, alone_b = random.Random(1), random.Random(2)
    assert [pair[0] for pair in interleaved] == [scenario.draw_persona(alone_a) for _ in range(5)]
    assert [pair[1] for pair in interleaved] == [scenario.draw_persona(alone_b) for _ in range(5)]


def test_persona_draws_vary(scenario):
    personas = [scenario.draw_persona(random.Random(seed)) for seed in range(60)]
    assert len({p.mood for p in personas}) > 3
    assert len({p.product for p in personas}) > 3
    assert len({p.customer_name for p in personas}) > 3
    assert len({p.agent_name for p in personas}) > 2
    for p in personas:
        assert p.mood in scenario.moods and p.product in scenario.products


def test_open_draws_contract_personas_and_a_greeting(scenario):
    customer, agent, greeting, extra = scenario.open("any-id", random.Random(5))
    CustomerPersona(**customer)
    AgentPersona(**agent)
    card = ScenarioCard(**extra["card"])
    assert card.product == customer["product"] and card.scenario == scenario.name
    assert extra["policy"] and all(isinstance(v, str) for v in extra["policy"].values())
    assert agent["name"] in greeting
    assert customer["name"].split()[0] in greeting
    assert "{" not in greeting


def test_every_greeting_formats(scenario):
    names = {"agent_name": "Quinn", "customer_name": "Grace Liu", "customer_first_name": "Grace"}
    for greeting in scenario.greetings:
        assert "Quinn" in greeting.format(**names)


def test_persona_round_trips_through_the_contract_fields():
    persona = Persona("Grace Liu", "anxious", "e-reader", "Quinn")
    assert Persona.from_contract(persona.customer(), persona.agent()) == persona
    assert persona.name_of("customer") == "Grace Liu" and persona.name_of("agent") == "Quinn"


def test_turn_reminder_names_who_the_bot_plays(scenario):
    persona = Persona("Grace Liu", "anxious", "e-reader", "Quinn")
    customer = scenario.turn_reminder("customer", persona)
    assert "Grace Liu" in customer and "anxious" in customer and "Quinn" not in customer
    assert "Quinn" in scenario.turn_reminder("agent", persona)
    retry = scenario.turn_reminder("customer", persona, hints=["repeats"])
    assert retry.startswith(customer) and "repeat" in retry


def test_wrap_up_reminder_lets_only_the_customer_say_goodbye(scenario):
    persona = Persona("Grace Liu", "anxious", "e-reader", "Quinn")
    customer = scenario.turn_reminder("customer", persona, wrap_up=True)
    assert customer.startswith(scenario.turn_reminder("customer", persona))
    assert "thank Quinn and say goodbye" in customer
    agent = scenario.turn_reminder("agent", persona, wrap_up=True)
    assert agent == scenario.turn_reminder("agent", persona)


def test_opening_cue_names_the_other_side(scenario):
    persona = Persona("Grace Liu", "anxious", "e-reader", "Quinn")
    assert "Quinn" in scenario.opening_cue("customer", persona)
    assert "Grace Liu" in scenario.opening_cue("agent", persona)


def test_list_files_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "moods.txt"
    path.write_text("# a comment\n\nangry\n  calm   # trailing comment\n#\n", encoding="utf-8")
    assert read_list(path) == ("angry", "calm")


def test_empty_list_file_is_an_error(tmp_path):
    path = tmp_path / "moods.txt"
    path.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match="no entries"):
        read_list(path)


def test_scenario_loads_from_a_path(tmp_path):
    folder = tmp_path / "my-shop"
    shutil.copytree(PROMPTS_ROOT / "electronics", folder)
    cards = (folder / "cards.yaml").read_text(encoding="utf-8")
    start, end = cards.index("moods:"), cards.index("reference:")
    cards = cards[:start] + "moods:\n  - gloomy\n\n" + cards[end:]
    (folder / "cards.yaml").write_text(cards, encoding="utf-8")
    scenario = Scenario.load(str(folder))
    assert scenario.name == "my-shop"
    assert scenario.draw_persona(random.Random(0)).mood == "gloomy"


def test_unknown_scenario_names_the_known_ones():
    with pytest.raises(ScenarioError, match="electronics"):
        Scenario.load("no-such-scenario")


def test_missing_file_is_reported(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(PROMPTS_ROOT / "travel", folder)
    (folder / "agent_names.txt").unlink()
    with pytest.raises(ScenarioError, match="agent_names.txt"):
        Scenario.load(folder)
    shutil.copy(PROMPTS_ROOT / "travel" / "agent_names.txt", folder)
    (folder / "cards.yaml").unlink()
    with pytest.raises(ScenarioError, match="cards.yaml"):
        Scenario.load(folder)


def test_literal_backslash_n_in_a_prompt_file_is_rejected(tmp_path):
    folder = tmp_path / "escaped"
    shutil.copytree(PROMPTS_ROOT / "electronics", folder)
    (folder / "agent.yaml").write_text(
        "_type: prompt\ninput_variables: [agent_name, customer_name]\n"
        'template: "You are {agent_name}.\\\\nHelp {customer_name}."\n',
        encoding="utf-8",
    )
    with pytest.raises(ScenarioError, match="literal"):
        Scenario.load(folder)


@pytest.mark.parametrize("name", ["electronics", "travel"])
@pytest.mark.parametrize("role", ["customer", "agent"])
def test_conversations_share_their_system_prompt_up_to_the_persona(name, role):
    scenario = Scenario.load(name)
    one = scenario.system_prompt(role, Persona("Ada Lovelace", "sarcastic", "laptop", "Sam"))
    other = scenario.system_prompt(role, Persona("Omar Haddad", "polite", "kettle", "Riley"))
    shared = len(os.path.commonprefix([one, other]))
    # only the last paragraph, which names the persona, differs: the rest is reused as evaluated
    assert shared >= one.rindex("\n\n") + 2
    assert shared > 0.8 * len(one)
