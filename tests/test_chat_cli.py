"""`huayu chat` driven through a pipe: one reply per line on stdout, commands act (their messages: stderr)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from huayu.chat import ChatConfig, ChatSession
from huayu.generation import DecodingArgs, Generator


def chat(model_dir, text, *flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "huayu.cli", "chat", model_dir, "--max-new-tokens", "6", *flags],
                          input=text, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_piped_chat_one_reply_per_line(tiny_model_dir):
    lines = chat(tiny_model_dir, "你好\n\nseed 3\n你是谁？\nclear\n晚安\nexit\n不会被回答\n", "--beam")
    assert len(lines) == 3  # 你好, 你是谁？, 晚安; blank line, seed and clear: nothing on stdout; exit stops


def test_clear_and_seed_make_replies_reproducible(tiny_model_dir):
    sampled = chat(tiny_model_dir, "seed 5\n你好\nclear\nseed 5\n你好\nclear\nseed 6\n你好\n", "--temperature", "1.5")
    assert sampled[0] == sampled[1]
    beam = chat(tiny_model_dir, "你好\n你好\nclear\n你好\n", "--beam")
    assert beam[0] == beam[2]


def test_session_history_and_clear(tiny_model_dir):
    session = ChatSession(Generator.load(tiny_model_dir), ChatConfig(model=tiny_model_dir, system="你是助手",
                          decoding=DecodingArgs(max_new_tokens=3)))
    "".join(session.reply("你好"))
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert session.command("clear") == "(new dialogue)"
    assert session.history == [{"role": "system", "content": "你是助手"}]
    assert session.command("seed 7") == "(seed 7)" and session.command("seeds") is None


def test_bad_decoding_option_is_a_clear_error(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "huayu.cli", "chat", tiny_model_dir, "--top-p", "1.5"],
                          input="你好\n", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "--top-p must be in (0, 1]" in proc.stderr


@pytest.mark.parametrize("flags", [dict(do_sample=False), dict(num_beams=3), dict(do_sample=True, top_k=5, top_p=0.8)])
def test_batched_generation_matches_one_by_one_for_greedy_and_runs_for_others(tiny_model_dir, flags):
    gen = Generator.load(tiny_model_dir)
    d = DecodingArgs(max_new_tokens=5, **flags)
    prompts = [gen.encode_text("你好"), gen.encode_text("今天天气怎么样")]
    batched = gen.generate_ids(prompts, d)
    assert len(batched) == 2
    if not d.do_sample:
        assert batched == [gen.generate_ids([p], d)[0] for p in prompts]
