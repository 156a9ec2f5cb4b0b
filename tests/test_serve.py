"""`huayu serve` on 127.0.0.1 driven by the official openai client and by raw HTTP: response and
chunk shapes, every error case, the API key, concurrency, the bounded queue, disconnects."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from huayu.generation import DecodingArgs, Generator

KEY = "sk-huayu-test"
USER = [{"role": "user", "content": "今天天气怎么样？"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir: str, *flags: str):
    """`huayu serve MODEL_DIR FLAGS` on a free port, its URL once /health answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "huayu.cli", "serve", model_dir, "--port", str(port),
                             "--log-level", "warning", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(lively_model_dir):
    with serving(lively_model_dir, "--api-key", KEY, "--served-model-name", "tiny", "--max-batch-size", "2",
                 "--max-queue", "2") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(server, path, body, key=KEY):
    content = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)


def sse_events(response) -> list:
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_completion_shape_usage_and_greedy_matches_the_python_api(client, lively_model_dir):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    again = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert again.choices[0].message.content == choice.message.content  # temperature 0 is deterministic
    gen = Generator.load(lively_model_dir)
    prompt = gen.encode_chat(USER)
    assert choice.message.content == gen.generate_ids([prompt], DecodingArgs(max_new_tokens=8))[0]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_chunks(server, client):
    whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0)
    body = {"model": "tiny", "messages": USER, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    first, *middle, last, usage = events
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["choices"][0]["finish_reason"] is None and set(e["choices"][0]["delta"]) == {"content"} for e in middle)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": whole.choices[0].finish_reason}
    assert "".join(e["choices"][0]["delta"]["content"] for e in middle) == whole.choices[0].message.content
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)
    assert len({e["id"] for e in events}) == 1
    # and the official client reads the same stream
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=10, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].message.content


def test_completions_batched_prompts_with_n_choices(client):
    r = client.completions.create(model="tiny", prompt=["春天来了，", "我们一起"], max_tokens=5, n=2, temperature=0.9,
                                  seed=3, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" and c.text for c in r.choices)
    assert r.usage.completion_tokens == 20
    greedy = [client.completions.create(model="tiny", prompt="春天来了，", max_tokens=6, temperature=0).choices[0].text
              for _ in range(2)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="春天来了，", max_tokens=6, temperature=0, stream=True))
    assert greedy[0] == greedy[1] == streamed


def test_stop_sequence_truncates_the_reply(client):
    full = client.completions.create(model="tiny", prompt="春天", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt="春天", max_tokens=10, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


LONG = "你好" * 600
ERRORS = [
    ("{not json", 400, None, "invalid_json"),
    ({"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "critic", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages.0.content", "missing_required_parameter"),
    ({"model": "tiny", "messages": USER, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "messages": USER, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "messages": USER, "n": 9}, 400, "n", "invalid_value"),
    ({"model": "tiny", "messages": USER, "presence_penalty": -3}, 400, "presence_penalty", "invalid_value"),
    ({"model": "tiny", "messages": USER, "temprature": 1}, 400, "temprature", "unknown_parameter"),
    ({"model": "tiny", "messages": USER, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, 400, "tool_choice", "unsupported_value"),
    ({"messages": USER}, 400, "model", "missing_required_parameter"),
    ({"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ({"model": "tiny", "messages": USER, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,param,code", ERRORS)
def test_bad_chat_requests_get_openai_errors_naming_the_field(server, body, status, param, code):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_bad_completion_requests(server, client):
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": LONG}).json()["error"]["code"] == \
        "context_length_exceeded"
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}).json()["error"]["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="你好", temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"


def test_api_key(server):
    assert post(server, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key=None).status_code == 401
    wrong = post(server, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key="sk-wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # health needs no key
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["message"] == "Not Found"


def long_stream(client, log: list, name: str, tokens: int):
    for chunk in client.chat.completions.create(model="tiny", messages=USER, max_tokens=tokens, stream=True,
                                                temperature=0, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            log.append(name)


def test_two_concurrent_streams_interleave(client):
    log: list[str] = []
    threads = [threading.Thread(target=long_stream, args=(client, log, name, 120)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert log.count("a") > 50 and log.count("b") > 50
    switches = sum(x != y for x, y in zip(log, log[1:]))
    assert switches > 10, "".join(log)  # batched together: both grow step by step, not one after the other


def test_full_queue_answers_503(server, client):
    results: list = []

    def call():
        try:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=600, temperature=0,
                                           extra_body={"ignore_eos": True})
            results.append(200)
        except openai.APIStatusError as exc:
            results.append((exc.status_code, exc.body["code"], exc.body["type"]))

    threads = [threading.Thread(target=call) for _ in range(5)]  # 2 run, 2 wait, 1 has no room
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    assert sorted(results, key=str) == sorted([200] * 4 + [(503, "queue_full", "server_error")], key=str)


def test_client_disconnect_frees_its_slot(server):
    before = httpx.get(f"{server}/health").json()
    body = {"model": "tiny", "messages": USER, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 6:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(f"{server}/health").json()
        if health["running"] == 0 and health["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert health["running"] == 0 and health["cancelled"] == before["cancelled"] + 1
    assert health["generated_tokens"] - before["generated_tokens"] < 900
