"""Bounded memory, loop (near-duplicate) detection, goodbye detection and reply cleaning.

Memory tests use a deterministic word counter in place of a model tokenizer.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from supportsim.bots.conversation import is_goodbye_turn
from supportsim.bots.llm import Completion, LLMConfig, clean_reply
from supportsim.bots.loops import (
    is_closing_line,
    is_goodbye,
    is_near_duplicate,
    is_thanks,
    normalise,
    similarity,
    sounds_like_agent,
    without_copied_sentences,
    without_cue_sentences,
)
from supportsim.bots.memory import ContextBudgetError, bounded_messages, chat_messages
from supportsim.bots.prompts import Persona, load_scenario
from supportsim.bots.turns import EmptyReplyError, generate_turn, own_labels, stop_sequences

SYSTEM = "You are a customer. Keep it short."  # 7 words
MESSAGE_OVERHEAD = 4


def count_words(messages: list[BaseMessage]) -> int:
    """Words plus a fixed per-message overhead, like a chat template's role markers."""
    return sum(len(str(m.content).split()) + MESSAGE_OVERHEAD for m in messages)


def conversation(turns: int, words: int = 10, first: str = "agent") -> list[dict]:
    roles = ("agent", "customer") if first == "agent" else ("customer", "agent")
    return [
        {"turn": i, "role": roles[i % 2], "text": f"line{i} " + " ".join(["word"] * (words - 1))}
        for i in range(turns)
    ]


# --- chat messages from one side's point of view ---------------------------------------------


def test_history_reaches_the_model_as_chat_messages_from_the_bots_side():
    history = [
        {"role": "agent", "text": "Hello, how can I help?"},
        {"role": "customer", "text": "My laptop is broken: it will not boot."},
        {"role": "agent", "text": "Sorry to hear that. What is the order number?"},
    ]
    as_customer = chat_messages(SYSTEM, history, "customer")
    assert [type(m) for m in as_customer] == [SystemMessage, HumanMessage, AIMessage, HumanMessage]
    assert as_customer[2].content == "My laptop is broken: it will not boot."
    as_agent = chat_messages(SYSTEM, history, "agent")
    assert [type(m) for m in as_agent] == [SystemMessage, AIMessage, HumanMessage, AIMessage]
    for message in as_customer + as_agent:
        assert isinstance(message.content, str)
        assert not message.content.startswith(("[", "{"))


def test_opening_cue_comes_first_when_the_bot_speaks_first():
    cue = "(Write your first message.)"
    assert [m.content for m in chat_messages(SYSTEM, [], "customer", opening_cue=cue)] == [
        SYSTEM,
        cue,
    ]
    own_first = [{"role": "customer", "text": "Hi"}, {"role": "agent", "text": "Hello"}]
    messages = chat_messages(SYSTEM, own_first, "customer", opening_cue=cue)
    assert [type(m) for m in messages] == [SystemMessage, HumanMessage, AIMessage, HumanMessage]
    other_first = [{"role": "agent", "text": "Hello"}]
    assert len(chat_messages(SYSTEM, other_first, "customer", opening_cue=cue)) == 2


def test_the_reminder_follows_the_message_being_answered_only():
    history = [{"role": "agent", "text": "Hello."}, {"role": "customer", "text": "Hi."}]
    as_agent = bounded_messages(
        SYSTEM,
        history,
        "agent",
        token_counter=count_words,
        max_tokens=100,
        opening_cue="(greet)",
        reminder="(be nice)",
    )
    kinds = [SystemMessage, HumanMessage, AIMessage, HumanMessage, SystemMessage]
    assert [type(m) for m in as_agent] == kinds
    assert as_agent[-1].content == "(be nice)" and as_agent[-2].content == "Hi."
    as_customer = bounded_messages(
        SYSTEM, history, "customer", token_counter=count_words, max_tokens=100, reminder="(x)"
    )
    assert all(m.content != "(x)" for m in as_customer)  # the last line is our own
    assert history == [{"role": "agent", "text": "Hello."}, {"role": "customer", "text": "Hi."}]


def test_consecutive_lines_of_one_side_are_joined_so_roles_alternate():
    history = [
        {"role": "agent", "text": "Hello."},
        {"role": "agent", "text": "Are you there?"},
        {"role": "customer", "text": "Yes."},
        {"role": "customer", "text": "  "},
    ]
    messages = chat_messages(SYSTEM, history, "customer")
    assert [type(m) for m in messages] == [SystemMessage, HumanMessage, AIMessage]
    assert messages[1].content == "Hello.\n\nAre you there?"


# --- token-bounded memory --------------------------------------------------------------------


def test_everything_is_kept_when_it_fits():
    history = conversation(4)
    messages = bounded_messages(
        SYSTEM, history, "customer", token_counter=count_words, max_tokens=1000
    )
    assert len(messages) == 5
    assert count_words(messages) <= 1000


def test_trimming_keeps_the_system_prompt_and_the_most_recent_lines():
    history = conversation(40)  # agent speaks on even turns: the last line (turn 39) is ours
    budget = 100
    messages = bounded_messages(
        SYSTEM, history, "agent", token_counter=count_words, max_tokens=budget
    )
    assert isinstance(messages[0], SystemMessage) and messages[0].content == SYSTEM
    assert count_words(messages) <= budget
    assert isinstance(messages[1], HumanMessage)  # the kept history starts with the other side
    assert messages[-1].content == history[-1]["text"]
    kept_turns = [int(str(m.content).split()[0][4:]) for m in messages[1:]]
    assert kept_turns == list(range(kept_turns[0], 40))
    assert len(kept_turns) >= 5  # as many as fit: (100 - 11) // 14 = 6, minus the odd start


@pytest.mark.parametrize("budget", [40, 64, 150, 333, 1000])
def test_sixty_long_turns_always_fit_the_budget(budget):
    history = conversation(61, words=25)  # ends with the agent: the customer answers it
    messages = bounded_messages(
        SYSTEM, history, "customer", token_counter=count_words, max_tokens=budget
    )
    assert count_words(messages) <= budget
    assert isinstance(messages[0], SystemMessage)
    assert isinstance(messages[1], HumanMessage)
    assert history[-1]["text"].split()[0] in str(messages[-1].content)


def test_a_newest_line_longer_than_the_budget_keeps_its_end():
    history = [{"role": "agent", "text": "start " + "blah " * 200 + "final question"}]
    messages = bounded_messages(
        SYSTEM, history, "customer", token_counter=count_words, max_tokens=40
    )
    assert len(messages) == 2
    assert count_words(messages) <= 40
    assert str(messages[1].content).startswith("...")
    assert str(messages[1].content).endswith("final question")


def test_the_reminder_survives_trimming_and_counts_against_the_budget():
    history = conversation(41, words=25)
    reminder = "(Reply as Dana, the angry customer, in one to three sentences.)"
    messages = bounded_messages(
        SYSTEM,
        history,
        "customer",
        token_counter=count_words,
        max_tokens=90,
        reminder=reminder,
    )
    assert count_words(messages) <= 90
    assert messages[-1] == SystemMessage(content=reminder)
    assert history[-1]["text"] in str(messages[-2].content)
    tiny = bounded_messages(
        SYSTEM, history, "customer", token_counter=count_words, max_tokens=45, reminder=reminder
    )
    assert count_words(tiny) <= 45 and tiny[-1] == SystemMessage(content=reminder)
    assert str(tiny[-2].content).startswith("...")


def test_a_system_prompt_larger_than_the_budget_is_a_configuration_error():
    with pytest.raises(ContextBudgetError, match="LLM_N_CTX"):
        bounded_messages(
            SYSTEM, conversation(2), "customer", token_counter=count_words, max_tokens=5
        )


def test_memory_works_on_plain_dicts_and_leaves_them_untouched():
    history = conversation(10)
    snapshot = [dict(line) for line in history]
    bounded_messages(SYSTEM, history, "customer", token_counter=count_words, max_tokens=60)
    assert history == snapshot


# --- loops: near-duplicates ------------------------------------------------------------------

LONG = (
    "I understand your frustration. Could you please share your order number so that I can "
    "look into a replacement for your laptop?"
)


@pytest.mark.parametrize(
    "reply",
    [
        LONG,
        LONG.upper(),
        LONG.replace(".", "!").replace("?", "..."),
        LONG.replace("Could you please", "Can you please"),
        f"Sure. {LONG}",
        f"As you said: \u201c{LONG}\u201d",
        "Could you please share your order number so that I can look into a replacement",
    ],
)
def test_near_duplicates_are_detected(reply):
    assert is_near_duplicate(reply, ["Hello there.", LONG])


@pytest.mark.parametrize(
    "reply",
    [
        "My order number is 12345, and I want a refund, not a replacement.",
        "Thank you!",
        "Yes.",
        "",
        "I understand. Your replacement laptop ships tomorrow; you will get a tracking link.",
    ],
)
def test_different_replies_are_not_duplicates(reply):
    assert not is_near_duplicate(reply, [LONG, "Okay."])


def test_a_reply_that_wraps_an_earlier_long_message_is_an_echo():
    agent = (
        "I would suggest checking that all of the parts are installed and working correctly. "
        "Additionally, I would recommend checking that the power supply is functioning properly."
    )
    customer = (
        "I'm sorry to hear that your coffee machine is not working as expected. I would suggest "
        "checking that all of the parts are installed and working correctly. Additionally, I "
        "would suggest checking that the power supply is functioning properly. If you continue "
        "to have problems with your coffee machine, please let me know."
    )
    assert is_near_duplicate(customer, [agent])


def test_restating_a_short_line_is_no_echo():
    customer = "My wireless headphones from Northwind Electronics stopped working."
    agent = (
        "I'm sorry your wireless headphones from Northwind Electronics stopped working, "
        "can you give me the order number?"
    )
    assert not is_near_duplicate(agent, [customer])


def test_short_texts_count_as_repeats_only_when_identical():
    assert is_near_duplicate("Thank you!", ["thank you"])
    assert not is_near_duplicate("Thanks a lot!", ["Thank you!"])


def test_threshold_controls_fuzzy_matching_and_zero_forces_a_repeat():
    a = "The screen flickers whenever I open the lid more than halfway."
    b = "The screen flickers each time the lid is opened more than halfway."
    assert 0.6 < similarity(a, b) < 0.95
    assert is_near_duplicate(a, [b], threshold=0.6)
    assert not is_near_duplicate(a, [b], threshold=0.95)
    assert is_near_duplicate("Anything at all.", ["Something else entirely"], threshold=0.0)
    assert not is_near_duplicate("anything", [], threshold=0.0)


def test_normalise_ignores_case_punctuation_accents_and_spacing():
    assert normalise("  Caf\u00e9 \u2014 it\u2019s   BROKEN!! ") == "cafe it's broken"


# --- goodbyes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Goodbye.",
        "Good bye!",
        "OK, bye.",
        "Bye bye",
        "Fine. I'm taking my business elsewhere. Goodbye!",
        "Thanks, that's all.",
        "That\u2019s all, thanks!",
        "No, that's all for now. Thank you!",
        "Have a nice day.",
        "Have a great day, Sam!",
        "Have a nice day, Mr. Smith.",
        "Thanks for your help. Have a nice day!",
        "I don't need anything else, goodbye!",
        "Great, the replacement is on its way. Take care!",
        "Bye! Thanks again.",
        "See you later.",
    ],
)
def test_goodbyes_are_detected(text):
    assert is_goodbye(text)


@pytest.mark.parametrize(
    "text",
    [
        "I don't want to say goodbye to my money.",
        "I'm not saying goodbye until this is fixed.",
        "You can say goodbye to me as a customer if this isn't fixed today",
        "Say bye to your five-star review unless you help me.",
        "Thanks for your help. When will the replacement arrive?",
        "I hope you can give me my options. Thank you for your help!",
        "Thank you so much for your help!",
        "Is that all you can offer?",
        "Goodbye? I only just got here!",
        "Maybe",
        "I've had a nice day until my laptop died.",
        "That's all very well, but what about my refund?",
        "",
    ],
)
def test_non_goodbyes_are_not_fooled(text):
    assert not is_goodbye(text)


@pytest.mark.parametrize(
    "text",
    [
        "Is there anything else I can help you with today?",
        "Your refund is on its way. If there's anything else I can do, please let me know.",
        "Do you have any other questions?",
        "Glad I could help. Any further issues, just reach out.",
        "The replacement ships tomorrow. Have a great day!",
    ],
)
def test_an_agent_winding_the_chat_up_is_a_closing_line(text):
    assert is_closing_line(text)


@pytest.mark.parametrize(
    "text",
    [
        "Could you give me your order number, please?",
        "Anything else you tried aside from restarting it? Let me check the logs. One moment.",
        "I'm sorry to hear that. Let me look into it.",
        "",
    ],
)
def test_a_line_that_goes_on_with_the_chat_is_no_closing_line(text):
    assert not is_closing_line(text)


AGENT_ADVICE = (
    "The screen of your tablet has become blurry. You should try restarting your tablet first. "
    "If this does not resolve the issue, you may need a replacement."
)


@pytest.mark.parametrize(
    ("reply", "kept"),
    [
        # an echo of the other side's sentences, then a line of its own
        (
            "The screen of my tablet has become blurry. You should try restarting your tablet "
            "first.\n\nThank Sam for your help!",
            "Thank Sam for your help!",
        ),
        # short stock phrases said again are no echo
        ("Thank you. My order number is 123.", "Thank you. My order number is 123."),
        ("I restarted it twice. It is still blurry!", "I restarted it twice. It is still blurry!"),
        (AGENT_ADVICE, ""),
    ],
)
def test_sentences_copied_from_earlier_lines_are_dropped(reply, kept):
    assert without_copied_sentences(reply, [AGENT_ADVICE, "Thank you."]) == kept


@pytest.mark.parametrize(
    "text",
    [
        # lines the 1.5B model wrote as the customer, in bench/quality.py runs
        "Thank you for reaching out to us, Liam! We are sorry to hear about your printer.",
        "Hi Hugo, thank you for reaching out to me. How can I assist you further today?",
        "I'm sorry to hear about your issue. I'll do my best to help you.",
        "Sure, go ahead and tell me what you need help with. I'm here to assist you.",
        "You're welcome! If you have any other questions, feel free to ask.",
        "I understand your frustration.",
        "Could you please provide me with more details so that I can help you better?",
        "I'm sorry, but I can't assist with that.",
        "I'm sorry, but as an AI language model, I am not able to view your situation.",
        # lines of a default bench/bots.py run, 2026-12-06
        "I'm sorry, but I can't assist you with that.",
        "I am sorry, but I cannot help you with that issue.",
        "You're welcome!",
        "I'm sorry to hear that. I understand your frustration.",
        "I'm glad I could help.",
    ],
)
def test_a_customer_line_in_the_agents_voice_is_spotted(text):
    assert sounds_like_agent(text)


@pytest.mark.parametrize(
    "text",
    [
        "My laptop will not boot and I want a refund now.",
        "Can you help me or not?",
        "How can I get a refund?",
        "Thanks for nothing. I'm sorry I ever bought this printer.",
        "I can send you the receipt so you can check the order.",
        "Thank you, Sam. Goodbye!",
    ],
)
def test_a_customer_asking_for_help_is_not_taken_for_the_agent(text):
    assert not sounds_like_agent(text)


@pytest.mark.parametrize(
    ("text", "thanks"),
    [
        ("Thank you for your help, I appreciate it.", True),
        ("Great, thanks Sam!", True),
        ("I'm grateful for your assistance with my smartwatch.", True),
        ("Thanks, but it still doesn't charge.", False),
        ("Thanks. When will the replacement arrive?", False),
        ("I don't appreciate being kept waiting.", False),
        ("My order number is 12345.", False),
    ],
)
def test_thanks_alone_is_told_from_thanks_that_goes_on(text, thanks):
    assert is_thanks(text) is thanks


@pytest.mark.parametrize(
    ("role", "answering", "text", "ends"),
    [
        ("customer", "Could you give me the order number?", "Goodbye!", True),
        ("customer", "Is there anything else I can help you with?", "Thank you, Sam.", True),
        ("customer", "The refund is on its way. Have a nice day!", "Thanks a lot!", True),
        ("customer", "You're welcome! I'm glad I could help.", "Thank you, Sam.", True),
        ("customer", "You're welcome, the label is in your inbox.", "Thanks again!", True),
        ("customer", "Could you give me the order number?", "Thank you, Sam.", False),
        ("customer", "Anything else I can do?", "Thanks, but my refund is still missing.", False),
        ("agent", "Thanks, goodbye!", "Goodbye, have a nice day!", False),
    ],
)
def test_a_customers_goodbye_or_thanks_after_a_closing_line_ends_the_chat(
    role, answering, text, ends
):
    assert is_goodbye_turn(role, text, answering) is ends


# --- reply cleaning ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Customer: My laptop will not boot.", "My laptop will not boot."),
        ("  **Dana:** Where is my refund?  ", "Where is my refund?"),
        ("CUSTOMER: Dana: Still broken.", "Still broken."),
        ("Dana (customer): Fine.", "Fine."),
        ("Assistant: Sure.", "Sure."),
        ('"I want a refund."', "I want a refund."),
        ("Hello<|im_end|>", "Hello"),
        ("I want a refund.\n(Reply as Dana Scully, the angry customer.)", "I want a refund."),
        ("(If your problem is solved, thank Sam and say goodbye.)", ""),
        # a stage direction begun and never closed (seen with the 1.5B model)
        ("(Thank you for the help! Goodbye Quinn.", "Thank you for the help! Goodbye Quinn."),
        ("(Still broken) and I want a refund.", "(Still broken) and I want a refund."),
    ],
)
def test_clean_reply_strips_labels_the_model_adds(raw, expected):
    assert clean_reply(raw, labels=["Dana Scully", "Dana"]) == expected


def test_clean_reply_keeps_everything_after_a_colon_inside_the_text():
    text = "Your options are: a repair, a replacement, or a refund. Which one: tell me."
    assert clean_reply(text) == text


def test_clean_reply_caps_the_length_at_a_sentence_end():
    text = "This is a sentence. " * 20 + "x" * 300
    capped = clean_reply(text, max_chars=200)
    assert len(capped) <= 200
    assert capped.endswith("sentence.")
    words = clean_reply("word " * 100, max_chars=50)
    assert len(words) <= 50 and words.endswith("\u2026")


def test_clean_reply_drops_an_unfinished_last_sentence_when_cut_by_the_token_limit():
    raw = "I can offer a replacement. Please follow these **steps**: first, check the"
    assert clean_reply(raw, truncated=True) == "I can offer a replacement."
    assert clean_reply(raw) == raw.replace("**", "")
    assert clean_reply("One short unfinished", truncated=True) == "One short unfinished\u2026"
    listed = "Options:\n\n1. A repair.\n\n2. A refund.\n\n3."
    assert clean_reply(listed, truncated=True) == "Options:\n\n1. A repair.\n\n2. A refund."


DIRECTIONS = load_scenario().directions


def test_stop_sequences_cover_the_other_side_only():
    persona = Persona("Grace Liu", "anxious", "e-reader", "Quinn")
    customer_stops = stop_sequences("customer", persona, DIRECTIONS)
    assert {"Agent:", "AGENT:", "Quinn:"} <= set(customer_stops)
    assert not any(s.startswith(("Customer", "Grace")) for s in customer_stops)
    agent_stops = stop_sequences("agent", persona, DIRECTIONS)
    assert {"Customer:", "CUSTOMER:", "Grace Liu:", "\nGrace:"} <= set(agent_stops)
    assert not any("Quinn" in s or s.startswith("Agent") for s in agent_stops)
    assert own_labels("customer", persona, DIRECTIONS)[:2] == ["Grace Liu", "Grace"]
    assert {"\n(", "(Reply as", "(Say something"} <= set(customer_stops) & set(agent_stops)


class ScriptedLLM:
    """A stand-in for ChatLLM that answers from a list, recording each call's sampling."""

    def __init__(self, texts: list[str], retries: int = 2) -> None:
        self.config = LLMConfig(model="smollm2-135m", retries=retries, temperature=0.8)
        self.max_prompt_tokens = 1500
        self.texts = list(texts)
        self.calls: list[float | None] = []
        self.prompts: list[list[BaseMessage]] = []

    def count_tokens(self, messages: list[BaseMessage]) -> int:
        return count_words(messages)

    def reply(self, messages, *, stop=(), labels=(), temperature=None, seed=None, **_):
        self.calls.append(temperature)
        self.prompts.append(messages)
        return Completion(self.texts.pop(0), prompt_tokens=100, completion_tokens=10, latency_ms=5)


ECHO = "I understand that you want a refund for the laptop you bought from us last week."


@pytest.mark.parametrize(
    ("answers", "attempts", "loop"),
    [
        (["Could you give me the order number, please?"], 1, False),
        ([ECHO, "Could you give me the order number, please?"], 2, False),
        ([ECHO, "", "Could you give me the order number, please?"], 3, False),
        ([ECHO, ECHO, ECHO], 3, True),
    ],
)
def test_a_repeat_is_retried_hotter_until_a_fresh_line_or_the_retries_run_out(
    answers, attempts, loop
):
    llm = ScriptedLLM(answers)
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": ECHO},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "agent", history)
    assert (reply.attempts, reply.loop) == (attempts, loop)
    assert reply.completion_tokens == 10 * attempts and reply.latency_ms == 5 * attempts
    # the first attempt uses the configured sampling; each retry is hotter than the one before
    assert llm.calls[0] is None
    assert llm.calls[1:] == sorted(set(llm.calls[1:]))
    assert all(t > 0.8 for t in llm.calls[1:])


@pytest.mark.parametrize(
    ("agent_line", "wrap_up"),
    [
        ("Your refund is on its way. Is there anything else I can help you with?", True),
        ("Done. Have a great day!", True),
        ("Could you give me the order number, please?", False),
    ],
)
def test_after_an_agents_closing_line_the_customer_is_told_it_may_say_goodbye(agent_line, wrap_up):
    llm = ScriptedLLM(["Thanks, Sam. Goodbye!"])
    history = [
        {"role": "customer", "text": "My laptop will not start and I want a refund."},
        {"role": "agent", "text": agent_line},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    generate_turn(llm, load_scenario(), persona, "customer", history)
    reminder = str(llm.prompts[0][-1].content)
    assert "Dana Reyes" in reminder
    assert ("thank Sam and say goodbye" in reminder) is wrap_up


@pytest.mark.parametrize(
    ("history", "first"),
    [
        ([{"role": "agent", "text": "Hello, Sam here. How can I help?"}], True),
        ([], True),
        (
            [
                {"role": "agent", "text": "Hello, Sam here. How can I help?"},
                {"role": "customer", "text": "My laptop will not start."},
                {"role": "agent", "text": "Could you give me the order number, please?"},
            ],
            False,
        ),
    ],
)
def test_the_customers_first_message_is_told_to_open_with_its_problem(history, first):
    llm = ScriptedLLM(["My laptop will not start and I want a refund."])
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    generate_turn(llm, load_scenario(), persona, "customer", history)
    reminder = str(llm.prompts[0][-1].content)
    assert reminder.startswith("(Reply as Dana Reyes, the angry customer")
    assert ("say what is wrong with your laptop" in reminder) is first
    # the agent is never given the customer's cue
    agent = ScriptedLLM(["Could you give me the order number, please?"])
    opening = [{"role": "customer", "text": "My laptop will not start."}]
    generate_turn(agent, load_scenario(), persona, "agent", opening)
    agent_reminder = str(agent.prompts[0][-1].content)
    assert "Reply as Sam" in agent_reminder and "defect" not in agent_reminder


def test_a_goodbye_as_the_customers_first_message_is_retried():
    llm = ScriptedLLM(["Goodbye, Sam.", "My laptop will not start. I want a refund."])
    history = [{"role": "agent", "text": "Hello, Sam here. How can I help?"}]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts) == ("My laptop will not start. I want a refund.", 2)
    # later in the chat a goodbye is kept at once
    later = ScriptedLLM(["Fine. Goodbye, Sam."])
    history += [
        {"role": "customer", "text": "My laptop will not start."},
        {"role": "agent", "text": "Please restart it."},
    ]
    assert generate_turn(later, load_scenario(), persona, "customer", history).attempts == 1


def test_a_customer_speaking_like_the_agent_is_retried():
    agent_voice = "Thank you for reaching out! How can I assist you today?"
    llm = ScriptedLLM([agent_voice, "My laptop is dead and I want my money back."])
    history = [{"role": "agent", "text": "Hello, Sam here. What seems to be the problem?"}]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts) == ("My laptop is dead and I want my money back.", 2)
    assert "ask for help, do not offer it" in str(llm.prompts[1][-1].content)


def test_a_customer_line_keeps_its_own_sentences_and_drops_the_helpers_without_a_retry():
    mixed = "Thank you for reaching out. My laptop is still dead, Sam. When do I get my refund?"
    llm = ScriptedLLM([mixed])
    history = [{"role": "agent", "text": "Hello, Sam here. What seems to be the problem?"}]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts) == (
        "My laptop is still dead, Sam. When do I get my refund?",
        1,
    )


def test_a_customer_offering_help_is_retried_as_the_customer():
    offer = "If you have any other questions, please let me know."
    llm = ScriptedLLM([offer, "So when exactly will the replacement ship?"])
    history = [
        {"role": "customer", "text": "My laptop will not start and I want a refund."},
        {"role": "agent", "text": "I have sent you a replacement laptop."},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts, reply.loop) == (
        "So when exactly will the replacement ship?",
        2,
        False,
    )
    retry_reminder = str(llm.prompts[1][-1].content)
    assert "You are the customer, Dana Reyes" in retry_reminder
    assert "do not repeat" not in retry_reminder


def test_a_customer_that_keeps_offering_help_keeps_talking_rather_than_looping():
    offer = "If you have any other questions, please let me know."
    llm = ScriptedLLM([offer, offer.replace("questions", "concerns"), offer.upper()])
    history = [{"role": "agent", "text": "Hello, Sam here. How can I help?"}]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert reply.attempts == 3 and not reply.loop
    assert reply.text == offer.upper()


def test_an_echo_with_a_line_of_its_own_keeps_only_that_line_without_a_retry():
    llm = ScriptedLLM([AGENT_ADVICE + " I restarted it twice and it is still blurry, Sam."])
    history = [
        {"role": "customer", "text": "My tablet screen is blurry."},
        {"role": "agent", "text": AGENT_ADVICE},
    ]
    persona = Persona("Dana Reyes", "angry", "tablet", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts, reply.loop) == (
        "I restarted it twice and it is still blurry, Sam.",
        1,
        False,
    )


def test_a_reply_that_parrots_its_stage_direction_is_retried():
    llm = ScriptedLLM(["Thank Sam and say goodbye.", "Thanks, Sam. That fixed it, bye!"])
    history = [
        {"role": "customer", "text": "My laptop will not start and I want a refund."},
        {"role": "agent", "text": "Refund sent. Is there anything else I can help you with?"},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts) == ("Thanks, Sam. That fixed it, bye!", 2)


def test_when_every_retry_has_a_problem_the_last_clean_attempt_is_kept():
    offer = "If you have any other questions, please let me know."
    llm = ScriptedLLM(["So where is my refund, Sam?", offer, offer])
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": "So where is my refund, Sam?"},
        {"role": "agent", "text": "Let me check that for you."},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    # the repeat is never chosen; of the two offers (not repeats) the last is kept, no loop
    assert (reply.text, reply.attempts, reply.loop) == (offer, 3, False)


def test_a_copied_stage_direction_is_kept_only_when_nothing_better_was_written():
    parrot = "If your problem is solved, thank Sam and say goodbye."
    agent_voice = "You're welcome! Feel free to ask me anything."
    history = [
        {"role": "customer", "text": "My laptop will not start and I want a refund."},
        {"role": "agent", "text": "Refund sent. Is there anything else I can help you with?"},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    # an attempt in the agent's voice beats a parroted cue, even an earlier one
    llm = ScriptedLLM([agent_voice, parrot, parrot])
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts, reply.loop) == (agent_voice, 3, False)
    # only parroted cues and repeats left: the bot is stuck, and its parroted "say goodbye" is
    # a loop, not a goodbye
    echo = "Is there anything else I can help you with?"
    llm = ScriptedLLM([echo, parrot, echo])
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.loop) == (parrot, True)


def test_sentences_that_copy_the_stage_direction_are_dropped():
    cue = "(Reply as Sam, the support agent.)\n(Say something new: do not repeat anything said.)"
    reply = "I can offer a repair under warranty. Do not repeat anything said in this chat."
    assert without_cue_sentences(reply, cue) == "I can offer a repair under warranty."
    assert without_cue_sentences("Do not repeat anything said.", cue) == ""
    assert without_cue_sentences("Please send your order number.", cue) == (
        "Please send your order number."
    )


def test_a_retry_that_ends_with_its_warning_is_kept_without_it():
    llm = ScriptedLLM(
        [ECHO, "Could you give me the order number? Do not repeat anything already said here."]
    )
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": ECHO},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "agent", history)
    assert (reply.text, reply.attempts) == ("Could you give me the order number?", 2)


def test_the_last_retry_against_a_loop_sees_only_the_message_it_answers():
    fresh = "Could you give me the order number, please?"
    llm = ScriptedLLM([ECHO, ECHO, fresh])
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": "My laptop will not start."},
        {"role": "agent", "text": ECHO},
        {"role": "customer", "text": "Yes, and I want it today."},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "agent", history)
    assert (reply.text, reply.attempts, reply.loop) == (fresh, 3, False)
    first, retry, last = llm.prompts
    assert len(first) == len(retry) == 7  # system, opening cue, four lines, reminder
    assert [str(m.content) for m in last[1:-1]] == ["Yes, and I want it today."]
    assert "do not repeat" in str(last[-1].content)


def test_every_attempt_empty_is_an_error():
    llm = ScriptedLLM(["", "", ""])
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    with pytest.raises(EmptyReplyError, match="3 times"):
        generate_turn(llm, load_scenario(), persona, "agent", [{"role": "agent", "text": "Hi"}])


LEAK = (
    "I still want my money back. Push back on vague answers: ask what exactly will happen next "
    "and when. Say no to what you will not accept.\nWhat you want:\na full refund"
)


def test_a_customer_line_that_recites_its_instructions_is_retried():
    fresh = "Which refund do you mean, and when will it reach my account?"
    llm = ScriptedLLM([LEAK, fresh])
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": "My laptop will not start. I want a refund."},
        {"role": "agent", "text": "We will look into it."},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert (reply.text, reply.attempts) == (fresh, 2)


def test_a_recital_of_instructions_that_every_attempt_makes_is_cut_from_the_line_kept():
    llm = ScriptedLLM([LEAK, LEAK, LEAK])
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": "My laptop will not start. I want a refund."},
        {"role": "agent", "text": "We will look into it."},
    ]
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    reply = generate_turn(llm, load_scenario(), persona, "customer", history)
    assert reply.text.startswith("I still want my money back.")
    assert "push back" not in reply.text.lower() and "what you" not in reply.text.lower()


def test_the_agent_may_use_the_words_of_its_own_instructions():
    # the agent's rules name its remedies, which it says on purpose: no instruction check
    scenario = load_scenario()
    persona = Persona("Dana Reyes", "angry", "laptop", "Sam")
    rules = scenario.system_prompt("agent", persona).rsplit("\n\n", 1)[0]
    line = " ".join(rules.split()[:12])  # a run of the rules, word for word
    llm = ScriptedLLM([line])
    history = [
        {"role": "agent", "text": "Hello, Sam here. How can I help?"},
        {"role": "customer", "text": "My laptop will not start. I want a refund."},
    ]
    reply = generate_turn(llm, scenario, persona, "agent", history)
    assert reply.attempts == 1
