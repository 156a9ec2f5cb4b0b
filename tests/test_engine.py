"""The continuous-batching engine: the same tokens as transformers' generate(), whoever shares
the batch and whenever a request joins it; stops, cancellation, seeds and penalties."""

import pytest
import torch

from huayu.errors import HuayuError
from huayu.generation import Generator
from huayu.serve.engine import Engine, QueueFull, Request
from huayu.serve.sampling import SamplingParams, apply_penalties

PROMPTS = ["你好", "今天天气怎么样？我们一起去公园", "春天来了，花都开了。我们"]


@pytest.fixture(scope="module", params=["decoder", "glm"])
def gen(request, lively_model_dir, lively_glm_dir):
    """A Llama-style decoder, and a GLM (2D positions, its prompt ending in [gMASK] <sop>)."""
    return Generator.load(lively_model_dir if request.param == "decoder" else lively_glm_dir)


def reference(gen, prompt, n):
    """transformers' greedy tokens with eos banned, as the engine's ignore_eos requests decode."""
    out = gen.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             suppress_tokens=gen.eos_ids, pad_token_id=gen.tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def request(prompt, events=None, **params):
    sink = events.append if events is not None else (lambda e: None)
    return Request(prompt, SamplingParams(**{"temperature": 0, "ignore_eos": True, **params}), sink)


def run(engine):
    while engine.step():
        pass


def test_requests_joining_mid_flight_decode_exactly_as_alone(gen):
    prompts = [gen.encode_text(t) for t in PROMPTS]
    engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions, max_batch_size=4)
    reqs = [request(p, max_tokens=12) for p in prompts]
    engine.submit(reqs[0])
    for _ in range(3):
        engine.step()
    engine.submit(reqs[1])
    engine.step()
    assert len(engine.running) == 2 and len(reqs[0].out) == 4  # joined the next step, not the end
    engine.submit(reqs[2])
    run(engine)
    for r, p in zip(reqs, prompts):
        assert r.out == reference(gen, p, 12) and r.finish_reason == "length"
    assert len(set(tuple(r.out) for r in reqs)) == 3 and len(set(reqs[1].out)) > 3  # not degenerate
    assert engine.counters["largest_batch"] == 3 and engine.cache is None


def test_compiled_engine_decodes_what_the_eager_one_does(lively_model_dir, lively_glm_dir):
    """Requests joining and leaving, two long enough to outgrow the static cache's first room
    (never fewer than 2 in the batch: a batch of 1 is a second compilation, for the benchmark)."""
    gen = Generator.load(lively_model_dir)
    prompts = [gen.encode_text(t) for t in PROMPTS]
    outputs = []
    for compile in (False, True):
        engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions, max_batch_size=4, compile=compile)
        reqs = [request(p, max_tokens=n) for p, n in zip(prompts, (140, 140, 12))]
        engine.submit(reqs[0], reqs[1])
        for _ in range(3):
            engine.step()
        engine.submit(reqs[2])
        run(engine)
        outputs.append([r.out for r in reqs])
    assert outputs[0] == outputs[1] and len(outputs[1][0]) == 140
    assert outputs[1][2] == reference(gen, prompts[2], 12)
    glm = Generator.load(lively_glm_dir)
    with pytest.raises(HuayuError, match="--compile needs a decoder-only model"):
        Engine(glm.model, glm.tokenizer, glm.eos_ids, glm.max_positions, compile=True)


def test_streamed_text_is_the_decoded_output(gen):
    events = []
    r = request(gen.encode_text(PROMPTS[1]), events, max_tokens=10)
    engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions)
    engine.submit(r)
    run(engine)
    assert "".join(e.text for e in events) == r.text == gen.tokenizer.decode(r.out, skip_special_tokens=True)
    assert [e.finish_reason for e in events][-1] == "length" and all(e.finish_reason is None for e in events[:-1])


def test_stop_strings_and_eos_end_a_request(gen):
    engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions)
    full = request(gen.encode_text(PROMPTS[1]), max_tokens=12)
    engine.submit(full)
    run(engine)
    stop = full.text[4:6]
    events = []
    cut = request(gen.encode_text(PROMPTS[1]), events, max_tokens=12, stop=[stop])
    with torch.no_grad():  # the unconstrained greedy first token
        first = int(gen.model(torch.tensor([gen.encode_text(PROMPTS[1])])).logits[0, -1].argmax())
    eos = Request(gen.encode_text(PROMPTS[1]), SamplingParams(max_tokens=12, temperature=0), lambda e: None)
    engine_eos = Engine(gen.model, gen.tokenizer, [first], gen.max_positions)  # its first token is "eos"
    engine.submit(cut)
    engine_eos.submit(eos)
    run(engine)
    run(engine_eos)
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(e.text for e in events) == cut.text  # the held-back stop prefix never leaked out
    assert eos.finish_reason == "stop" and eos.out == [first] and eos.text == ""


def test_cancel_frees_the_slot_and_the_queue_is_bounded(gen):
    engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions, max_batch_size=1, max_waiting=1)
    a, b = request(gen.encode_text("你好"), max_tokens=50), request(gen.encode_text("晚安"), max_tokens=5)
    engine.submit(a)
    engine.step()
    engine.submit(b)
    with pytest.raises(QueueFull):
        engine.submit(request(gen.encode_text("谢谢"), max_tokens=5))
    engine.step()
    assert engine.running == [a] and list(engine.waiting) == [b]
    a.cancel()
    engine.step()
    assert engine.running == [b] and engine.counters["cancelled"] == 1 and len(a.out) == 2
    run(engine)
    assert b.finish_reason == "length" and engine.stats()["running"] == 0


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(gen):
    prompt = gen.encode_text(PROMPTS[0])

    def sample(companions):
        engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions)
        r = request(prompt, max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7)
        for c in companions:
            engine.submit(request(gen.encode_text(c), max_tokens=10, temperature=1.0))
        engine.submit(r)
        run(engine)
        return r.out

    alone = sample([])
    assert sample(["今天天气怎么样？", "晚安"]) == alone
    engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions)
    other = request(prompt, max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=8)
    engine.submit(other)
    run(engine)
    assert other.out != alone


def test_top_k_one_is_greedy_and_penalties_follow_their_definitions(gen):
    prompt = gen.encode_text(PROMPTS[2])
    engine = Engine(gen.model, gen.tokenizer, gen.eos_ids, gen.max_positions)
    r = request(prompt, max_tokens=8, temperature=1.5, top_k=1, seed=1)
    engine.submit(r)
    run(engine)
    assert r.out == reference(gen, prompt, 8)
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)]
    got = apply_penalties(logits, params, histories=[[0, 1, 3]], outputs=[[3, 3]])
    # seen 0 and 1: 2/2, -2*2; token 3 seen and generated twice: 0.5/2 - 2*0.5 - 0.25
    assert torch.allclose(got, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
