"""What `supportsim up`'s options set for the bots, and where `up` can run."""

import os

from supportsim.cli import bot_env, build_parser
from supportsim.local.stack import DEFAULT_BOT_THREADS


def up_env(*argv: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    return bot_env(build_parser().parse_args(["up", *argv]), environ or {})


def test_llm_url_runs_the_bots_against_a_server_instead_of_a_local_model():
    env = up_env("--llm-url", "http://gpu-host:8000/v1", "--model", "Qwen/Qwen2.5-7B-Instruct")
    assert env["LLM_BACKEND"] == "openai"
    assert env["LLM_BASE_URL"] == "http://gpu-host:8000/v1"
    assert env["LLM_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "LLM_N_THREADS" not in env  # no model is loaded: no llama.cpp threads to share


def test_local_bots_use_every_core_unless_llm_n_threads_is_set():
    assert (os.cpu_count() or 1) == DEFAULT_BOT_THREADS
    assert up_env()["LLM_N_THREADS"] == str(DEFAULT_BOT_THREADS)
    assert "LLM_BACKEND" not in up_env()
    assert "LLM_N_THREADS" not in up_env(environ={"LLM_N_THREADS": "4"})


def test_up_outside_a_checkout_says_so_before_starting_anything(tmp_path, monkeypatch, capsys):
    from supportsim import cli
    from supportsim.local import stack

    def no_start(self, *args, **kwargs):
        raise AssertionError("started the broker outside a checkout")

    monkeypatch.setattr(stack, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(stack.LocalBroker, "start", no_start)
    status = cli.main(["up", "--run-dir", str(tmp_path / "run"), "--duration", "1"])
    assert status == 1
    assert "checkout of the repository" in capsys.readouterr().err


def test_the_bots_of_one_stack_share_one_core_lock_in_its_run_folder(tmp_path):
    from supportsim.local.stack import CORE_LOCK_FILE, Stack

    stack = Stack(tmp_path / "run", redis_url="redis://127.0.0.1:6379/0", say=lambda _: None)
    assert stack.env()["LLM_CORE_LOCK"] == str(tmp_path / "run" / CORE_LOCK_FILE)
