"""The bundled chat model (huayu/bundled/chat-small): its files match the checksums its model card
records, it loads with plain transformers, and `huayu chat` (piped) and `huayu serve` with no model
argument answer a Chinese greeting with Chinese text."""

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from huayu.models.loading import BUNDLED_CHAT_MODEL

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
CHINESE = re.compile(r"[\u4e00-\u9fff]")


def test_files_match_the_checksums_of_the_model_card():
    sums = (BUNDLED_CHAT_MODEL / "SHA256SUMS").read_text(encoding="utf-8")
    card = (BUNDLED_CHAT_MODEL / "README.md").read_text(encoding="utf-8")
    assert f"```\n{sums}```" in card
    listed = dict(reversed(line.split("  ", 1)) for line in sums.splitlines())
    on_disk = {p.name for p in BUNDLED_CHAT_MODEL.iterdir() if p.is_file()} - {"SHA256SUMS", "README.md"}
    assert set(listed) == on_disk and "model.safetensors" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((BUNDLED_CHAT_MODEL / name).read_bytes()).hexdigest() == digest, name
    assert sum((BUNDLED_CHAT_MODEL / n).stat().st_size for n in on_disk) < 60 * 2**20


def test_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_CHAT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_CHAT_MODEL)
    assert 9_000_000 < sum(p.numel() for p in model.parameters()) < 25_000_000
    assert tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)


def test_piped_chat_without_a_model_answers_in_chinese():
    proc = subprocess.run([sys.executable, "-m", "huayu.cli", "chat", "--max-new-tokens", "24"], input="你好\n",
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bundled chat model" in proc.stderr
    assert CHINESE.search(proc.stdout.strip()), proc.stdout


def test_serve_without_a_model_answers_in_chinese():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "huayu.cli", "serve", "--port", str(port), "--log-level", "warning"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 120
        while True:
            try:
                models = httpx.get(f"{url}/models", timeout=30).json()["data"]
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert [m["id"] for m in models] == ["chat-small"]
        response = httpx.post(f"{url}/chat/completions", timeout=60, json={
            "model": "chat-small", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 24})
        assert response.status_code == 200, response.text
        assert CHINESE.search(response.json()["choices"][0]["message"]["content"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
