"""`huayu serve` under hostile or unlucky requests: no request fails its neighbours, holds up the
event loop, outlives its client or overfills the queue, and every error is OpenAI's JSON. The server
runs in-process (uvicorn in a thread) so that the tests can watch and patch its Service."""

import http.client
import json
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from huayu.errors import HuayuError
from huayu.generation import Generator
from huayu.serve.engine import Engine, Request
from huayu.serve.protocol import Decoding
from huayu.serve.sampling import SamplingParams
from huayu.serve.server import ServeConfig, available_cpus, build_service, create_app

USER = [{"role": "user", "content": "今天天气怎么样？"}]
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def service(lively_model_dir):
    return build_service(ServeConfig(model=lively_model_dir, served_model_name="tiny", max_batch_size=2, max_queue=2,
                                     max_request_bytes=LIMIT, max_messages=8))


@pytest.fixture(scope="module")
def server(service):
    """The server's URL on 127.0.0.1 (a free port)."""
    live = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    while not live.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{live.servers[0].sockets[0].getsockname()[1]}"
    live.should_exit = True
    thread.join(timeout=10)


def chat(server, timeout=30, **body):
    return httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": USER, **body},
                      timeout=timeout)


def assert_openai_error(response, status: int, **expected) -> dict:
    """The response's error, checked to be OpenAI's shape with `expected` fields (param=..., code=...)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert {k: error[k] for k in expected} == expected
    return error


def wait_for(server, condition, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while not condition(health := httpx.get(f"{server}/health").json()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return health


# -- 1. one request fails only itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"seed": 2 ** 70}, "seed"), ({"seed": -2 ** 70}, "seed"), ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"stop": ["句" * 300]}, "stop"), ({"stop": "句" * 300}, "stop"), ({"stop": ["。"] * 5}, "stop"),
    ({"max_tokens": 10 ** 30}, "max_tokens"), ({"n": 10 ** 6}, "n")])
def test_extreme_sampling_values_are_refused_naming_the_field(server, extra, param):
    assert_openai_error(chat(server, **extra), 400, param=param)


@pytest.mark.parametrize("extra", [{"top_k": 10 ** 30}, {"temperature": 1e-300}, {"seed": 2 ** 63 - 1, "n": 2},
                                   {"seed": -2 ** 63}, {"stop": "今天天气好"}])
def test_extreme_values_that_have_a_meaning_decode(server, extra):
    """A top_k beyond the vocabulary is all of it, a tiny temperature is greedy, a seed plus the
    choice's index may pass 64 bits, one stop string may be longer than 4 characters."""
    r = chat(server, max_tokens=4, **extra)
    assert r.status_code == 200, r.text
    if "temperature" in extra:
        greedy = chat(server, max_tokens=4, temperature=0)
        assert r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_a_prompt_of_no_tokens_is_refused(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": ["你好", ""]}, timeout=30)
    assert_openai_error(r, 400, param="prompt", code="invalid_value")


@pytest.mark.parametrize("body,param", [(rb'{"model": "tiny", "prompt": "a\ud800b"}', "prompt"),
                                        (rb'{"model": "\ud800", "prompt": "a"}', "model")], ids=["prompt", "model"])
def test_half_a_surrogate_pair_is_refused(server, body, param):
    """JSON can escape it; no tokenizer or reply can encode it."""
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, param=param, code="invalid_value")


def test_a_row_whose_sampling_fails_fails_alone(lively_model_dir):
    """Rows whose parameters overflow (never admitted by the server's validation), one prefilled with
    the others, one joining while they decode: the others decode as they would alone."""
    gen = Generator.load(lively_model_dir)
    prompt = gen.encode_text("你好")

    def make(**params):
        events = []
        return Request(prompt, SamplingParams(max_tokens=8, ignore_eos=True, **params), events.append), events

    def decode(*requests, later=()):
        engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions, max_batch_size=8)
        engine.submit(*requests)
        engine.step()
        engine.submit(*later)
        while engine.step():
            pass
        return engine

    fine = [dict(temperature=0), dict(temperature=1.0, top_k=50, seed=5)]
    good = [make(**params) for params in fine]
    bad = [make(temperature=1.0, repetition_penalty=1e-300), make(temperature=float("nan"))]
    engine = decode(good[0][0], bad[0][0], good[1][0], later=[bad[1][0]])
    for (r, events), params in zip(good, fine):
        alone, _ = make(**params)
        decode(alone)
        assert r.out == alone.out and r.finish_reason == "length" and r.error is None
        assert "".join(e.text for e in events) == r.text and not any(e.error for e in events)
    for r, events in bad:
        assert r.finish_reason is None and events[-1].error.startswith("generation failed: ValueError")
    assert engine.counters["failed"] == 2 and engine.counters["finished"] == 2
    assert engine.running == [] and engine.cache is None


def test_an_engine_error_answers_its_own_request_only(server, service, monkeypatch):
    """Non-streaming: a JSON 500; streaming: an SSE error event; the neighbour finishes normally."""
    sampling = Decoding.sampling
    monkeypatch.setattr(Decoding, "sampling", lambda body, limit: SamplingParams(
        **{**vars(sampling(body, limit)), **({"temperature": float("nan")} if body.user == "poison" else {})}))
    results = {}
    good = threading.Thread(target=lambda: results.update(good=chat(server, max_tokens=100, ignore_eos=True)))
    good.start()
    wait_for(server, lambda h: h["running"] == 1)
    bad = chat(server, user="poison")
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": USER, "user": "poison", "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    good.join(timeout=30)
    assert_openai_error(bad, 500, type="server_error")
    assert events[-1]["error"]["type"] == "server_error" and "generation failed" in events[-1]["error"]["message"]
    assert results["good"].status_code == 200 and results["good"].json()["choices"][0]["finish_reason"] == "length"


# -- 2. nothing holds up the event loop -------------------------------------------------------------------------

def send_head(server, headers: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=5)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in {"Content-Type": "application/json", **headers}.items():
        conn.putheader(name, value)
    conn.endheaders()
    return conn


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    declared = send_head(server, {"Content-Length": str(100 * LIMIT)})
    declared.send(b'{"model": "tiny", "messages": [')  # and never the rest
    chunked = send_head(server, {"Transfer-Encoding": "chunked"})
    for _ in range(2):
        piece = b" " * (LIMIT // 2 + 1)
        chunked.send(b"%x\r\n%s\r\n" % (len(piece), piece))  # and never the last chunk
    for conn in (declared, chunked):
        response = conn.getresponse()
        assert response.status == 413
        error = json.loads(response.read())["error"]
        assert set(error) == {"message", "type", "param", "code"} and str(LIMIT) in error["message"]
        conn.close()


def test_too_many_messages_are_refused(server):
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "你好"} for i in range(9)]
    assert_openai_error(chat(server, messages=many), 400, param="messages", code="invalid_value")


def test_health_answers_while_a_prompt_is_encoded(server, service, monkeypatch):
    encode = service.generator.encode_chat
    monkeypatch.setattr(service.generator, "encode_chat", lambda *a, **k: time.sleep(2) or encode(*a, **k))
    slow = threading.Thread(target=chat, args=(server,), kwargs={"max_tokens": 2})
    slow.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 1  # not after the encoding
    slow.join(timeout=30)


# -- 3. a client that goes cancels its requests -----------------------------------------------------------------

def test_a_non_streaming_client_that_disconnects_is_cancelled(server):
    before = httpx.get(f"{server}/health").json()
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 900, "ignore_eos": True, "temperature": 0})
    conn = send_head(server, {"Content-Length": str(len(body))})
    conn.send(body.encode())
    wait_for(server, lambda h: h["generated_tokens"] > before["generated_tokens"] + 5)
    conn.close()
    health = wait_for(server, lambda h: h["cancelled"] > before["cancelled"], seconds=3)
    assert health["cancelled"] == before["cancelled"] + 1 and health["running"] == 0
    assert health["generated_tokens"] - before["generated_tokens"] < 300  # 900 take about 20 s


# -- 4. the queue counts choices ---------------------------------------------------------------------------------

def test_the_queue_counts_every_choice(server):
    """Batch 2 and queue 2: with 2 choices running, 3 more would leave 3 waiting."""
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": USER, "n": 2, "max_tokens": 900, "ignore_eos": True, "stream": True}):
        wait_for(server, lambda h: h["running"] == 2)
        assert_openai_error(chat(server, n=3, timeout=5), 503, type="server_error", code="queue_full")
        assert_openai_error(chat(server, n=5, timeout=5), 400, param="n", code="invalid_value")  # never fits
        assert httpx.get(f"{server}/health").json()["waiting"] == 0
    wait_for(server, lambda h: h["running"] == 0)


# -- 5. small ones -----------------------------------------------------------------------------------------------

def test_an_empty_body_is_named_empty(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
    message = assert_openai_error(r, 400)["message"]
    assert "empty" in message and "None" not in message


def test_schema_pages_are_off_behind_an_api_key(service):
    open_, keyed = TestClient(create_app(service)), TestClient(create_app(service, api_key="sk-test"))
    for page in ("/docs", "/redoc", "/openapi.json"):
        assert open_.get(page).status_code == 200
        assert_openai_error(keyed.get(page), 404)


def test_threads_are_set_as_configured(lively_model_dir):
    before = torch.get_num_threads()
    try:
        build_service(ServeConfig(model=lively_model_dir, threads=1))
        assert torch.get_num_threads() == 1
        build_service(ServeConfig(model=lively_model_dir))
        assert torch.get_num_threads() == available_cpus() >= 1
        with pytest.raises(HuayuError, match="--threads must be at least 1"):
            build_service(ServeConfig(model=lively_model_dir, threads=0))
    finally:
        torch.set_num_threads(before)


# -- 6. special tokens in completions prompts ---------------------------------------------------------------------

def test_special_token_text_in_a_prompt_is_plain_text_unless_asked(server, service, monkeypatch):
    def prompt_tokens():
        r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "你好</s>", "max_tokens": 1},
                       timeout=30)
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens() == len("你好</s>")
    monkeypatch.setattr(service.cfg, "special_tokens_in_prompts", True)
    assert prompt_tokens() == 3


def test_32_concurrent_streaming_clients_all_succeed(lively_model_dir):
    """The load the server is promised to carry: 32 clients streaming at once, 0 failures."""
    from concurrent.futures import ThreadPoolExecutor

    service = build_service(ServeConfig(model=lively_model_dir, served_model_name="tiny", max_batch_size=16,
                                        max_queue=64))
    live = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    while not live.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{live.servers[0].sockets[0].getsockname()[1]}/v1/chat/completions"

    def stream(i: int) -> bool:
        body = {"model": "tiny", "messages": USER, "stream": True, "max_tokens": 8, "seed": i, "ignore_eos": True}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        return response.status_code == 200 and lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)

    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(stream, range(32)))
    finally:
        live.should_exit = True
        thread.join(timeout=10)
    assert results.count(False) == 0
    assert service.engine.stats()["failed"] == 0
