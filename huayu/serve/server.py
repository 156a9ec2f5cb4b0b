"""`huayu serve`: an OpenAI-compatible HTTP API over the continuous-batching engine.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events ending in
`data: [DONE]`, or whole), GET /v1/models and /health. A chat request with `tools` gets the calls
its reply makes as `message.tool_calls` (finish_reason "tool_calls"); streamed, the reply's text
goes out as it comes until a call begins, and the calls go out whole when the reply is done
(docs/tools.md). Every error is OpenAI's JSON shape. A client that disconnects, streaming or not,
cancels its requests, which leave the batch at the next step. Prompts are rendered and tokenized
off the event loop, and request bodies are bounded before they are read, so that no request holds
up the others (or /health).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Request as HTTPRequest  # at module level: FastAPI resolves annotations here
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.data.chat import renders_tools, tool_templates
from huayu.data.chat_templates import TEMPLATE_HELP, with_system
from huayu.errors import HuayuError
from huayu.models.loading import InferenceArgs
from huayu.serve.engine import Engine, Event, QueueFull, Request
from huayu.serve.protocol import APIError, ChatRequest, CompletionRequest, Decoding, validation_error
from huayu.tools import ReplyStream, parse_reply, with_tools


@dataclass
class ServeConfig:
    model: str = field_doc("model directory (or an adapter directory whose base is known); default: huayu's bundled "
                           "chat model", positional=True,
                           default=None)
    adapter: str | None = field_doc("LoRA or prefix adapter directory applied on top of MODEL", default=None)
    quantization: str | None = field_doc("quantize on loading: int8 or int4 (weight-only; or serve a huayu quantize "
                                         "output)", default=None)
    compile: bool = field_doc("decoders: torch.compile the decode step over a static cache (a one-off 3-30 s, then "
                              "about twice the tokens/s)", default=False)
    host: str = field_doc("address to listen on", default="127.0.0.1")
    port: int = field_doc("port to listen on", default=8000)
    api_key: str | None = field_doc("require `Authorization: Bearer KEY` on /v1/*", default=None)
    served_model_name: str | None = field_doc("the model id clients pass (default: MODEL's directory name)",
                                              default=None)
    max_batch_size: int = field_doc("requests decoded together at most", default=16)
    max_queue: int = field_doc("requests (each of n choices counts) waiting for a batch slot at most; beyond "
                               "it: 503", default=64)
    default_max_tokens: int = field_doc("max_tokens of a request that gives none (capped by the context)",
                                        default=512)
    max_request_bytes: int = field_doc("request bodies larger than this are refused (413) before they are read",
                                       default=4 * 2 ** 20)
    max_messages: int = field_doc("chat requests with more messages than this are refused (400)", default=256)
    template: str | None = field_doc(TEMPLATE_HELP, default=None)
    placement: InferenceArgs = field_doc("where the model runs", default_factory=InferenceArgs)
    system: str | None = field_doc("system message of chat requests that bring none", default=None)
    special_tokens_in_prompts: bool = field_doc("completions: let special-token text in a prompt (e.g. </s>, "
                                                "<|im_start|>) become control tokens; off: encoded as plain text",
                                                default=False)
    threads: int | None = field_doc("torch threads; default: the CPUs this process may use (its affinity, "
                                    "within a container's CPU quota)", default=None)
    log_level: str = field_doc("uvicorn log level", default="info")


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's
    --cpus), which os.cpu_count() and torch's default both ignore."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2, or no quota ("max")
        pass
    return cpus


class Service:
    """The loaded model behind the endpoints: prompt encoding, limits, and running requests."""

    def __init__(self, generator, engine: Engine, name: str, cfg: ServeConfig):
        self.generator, self.engine, self.name, self.cfg = generator, engine, name, cfg
        self.renders_tools = renders_tools(generator.tokenizer)

    def check_model(self, body: Decoding) -> None:
        if body.model != self.name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def encode_chat(self, body: ChatRequest) -> list[int]:
        if len(body.messages) > self.cfg.max_messages:
            raise APIError(400, f"messages: {len(body.messages)} messages, more than this server takes "
                           f"({self.cfg.max_messages})", param="messages", code="invalid_value")
        tools = body.offered_tools()
        if tools and not self.renders_tools:
            raise APIError(400, "tools: this model's chat template does not render tools; serve a model fine-tuned "
                           f"with one that does (--template {', '.join(tool_templates())}: docs/tools.md)",
                           param="tools", code="invalid_value")
        try:
            messages = with_tools(with_system(body.messages_for_template(), self.cfg.system), tools)
            return self.generator.encode_chat(messages, max_source_length=10 ** 9)
        except Exception as exc:  # the model's own Jinja template refusing these messages
            raise APIError(400, f"messages: the model's chat template cannot render them: {exc}", param="messages",
                           code="invalid_value") from None

    def encode_prompts(self, body: CompletionRequest) -> list[list[int]]:
        return [self.generator.encode_text(p, parse_special_tokens=self.cfg.special_tokens_in_prompts)
                for p in body.prompts()]

    def max_tokens(self, prompt: list[int], requested: int | None, param: str) -> int:
        context, used = self.engine.max_positions, len(prompt)
        if not prompt:
            raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")
        if used >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has {used}",
                           param=param, code="context_length_exceeded")
        if requested is not None and used + requested > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has {used} "
                           f"and max_tokens asks for {requested} more", param="max_tokens",
                           code="context_length_exceeded")
        return requested if requested is not None else min(self.cfg.default_max_tokens, context - used)

    def start(self, prompts: list[list[int]], body: Decoding, max_tokens: list[int]):
        """Submit every choice (each prompt n times); (queue of (choice, Event), requests)."""
        if len(prompts) * body.n > self.engine.capacity:
            raise APIError(400, f"n: {len(prompts) * body.n} choices (n × prompts), more than this server holds at "
                           f"once ({self.engine.capacity})", param="n", code="invalid_value")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        for p, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
            for j in range(body.n):
                index = p * body.n + j
                params = body.sampling(limit)
                if params.seed is not None:
                    params.seed += index
                emit = (lambda ev, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))
                requests.append(Request(list(prompt), params, emit))
        try:
            self.engine.submit(*requests)
        except QueueFull as exc:
            raise APIError(503, f"the server is busy ({exc}); retry later", type="server_error",
                           code="queue_full") from None
        return queue, requests


def usage(prompts: list[list[int]], requests: list[Request]) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(r.out) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def openai_calls(calls: list[dict], indexed: bool = False) -> list[dict]:
    """huayu's calls as OpenAI's `tool_calls` (each with a new id; `indexed`: a stream's delta)."""
    return [{**({"index": i} if indexed else {}), "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for i, c in enumerate(calls)]


class Reply:
    """The shape of one endpoint's answers: chat (`message` / `delta`) or text completions; with
    `tool_calls`, a chat reply's calls are read out of its text."""

    def __init__(self, chat: bool, model: str, tool_calls: bool = False):
        self.chat, self.model, self.tool_calls = chat, model, tool_calls
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              calls: list[dict] | None = None) -> dict:
        if self.chat:
            if role:
                delta = {"role": "assistant", "content": ""}
            elif calls:
                delta = {"tool_calls": openai_calls(calls, indexed=True)}
            else:
                delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": None,
                                                   "finish_reason": finish}])

    def usage_chunk(self, counts: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=counts)

    def message(self, r: Request) -> tuple[dict, str]:
        """A finished chat choice's message and finish reason: "tool_calls" when it made calls."""
        content, calls = parse_reply(r.text) if self.tool_calls else (r.text, [])
        if not calls:
            return {"role": "assistant", "content": r.text}, r.finish_reason
        return {"role": "assistant", "content": content or None, "tool_calls": openai_calls(calls)}, "tool_calls"

    def whole(self, requests: list[Request], counts: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                       for i, (message, finish) in enumerate(map(self.message, requests))]
            return self._envelope("chat.completion", choices, usage=counts)
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(requests)]
        return self._envelope("text_completion", choices, usage=counts)


async def stream_events(reply: Reply, queue, requests, prompts, include_usage: bool):
    """Server-sent events of every choice as the engine produces them, then usage and [DONE]: a
    chat choice's calls whole once it is done, its text up to them as it comes. However the stream
    ends (a client gone included), its unfinished requests are cancelled."""
    try:
        if reply.chat:
            for i in range(len(requests)):
                yield sse(reply.chunk(i, role=True))
        streams = [ReplyStream(reply.tool_calls) for _ in requests]
        done = 0
        while done < len(requests):
            index, event = await queue.get()
            if event.error:
                yield sse(APIError(500, event.error, type="server_error").body())
                break
            shown = streams[index].feed(event.text)
            if shown:
                yield sse(reply.chunk(index, text=shown))
            if event.finish_reason:
                rest, _, calls = streams[index].finish()
                if rest:
                    yield sse(reply.chunk(index, text=rest))
                if calls:
                    yield sse(reply.chunk(index, calls=calls))
                yield sse(reply.chunk(index, finish="tool_calls" if calls else event.finish_reason))
                done += 1
        if include_usage:
            yield sse(reply.usage_chunk(usage(prompts, requests)))
        yield sse("[DONE]")
    finally:
        for r in requests:
            r.cancel()


# what `collect` finds in its queue once the client is gone
DISCONNECTED = Event(error="client disconnected")


async def report_disconnect(http_request, queue) -> None:
    """Put DISCONNECTED in `queue` when the client goes: once the body is read, the server's
    `receive` answers only that (or the end of the response, when this is cancelled anyway)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait((None, DISCONNECTED))


async def collect(http_request, queue, requests) -> None:
    """Wait for every choice to finish; however this ends (a client gone included), the unfinished
    requests are cancelled."""
    watcher = asyncio.create_task(report_disconnect(http_request, queue))
    try:
        done = 0
        while done < len(requests):
            _, event = await queue.get()
            if event is DISCONNECTED:
                raise APIError(499, event.error)
            if event.error:
                raise APIError(500, event.error, type="server_error")
            done += bool(event.finish_reason)
    finally:
        watcher.cancel()
        for r in requests:
            r.cancel()


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes an HTTPException on from reading the body (anything
    else becomes a 400), to the handler that answers it in OpenAI's shape."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server takes ({limit} bytes)")


def limit_body(app, limit: int):
    """ASGI middleware refusing a body over `limit` bytes before it is read: at once by its
    Content-Length, or as a chunked body's pieces add up."""
    async def limited(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        declared, received = Headers(scope=scope).get("content-length", ""), 0

        async def receive_within_limit():
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        await app(scope, receive_within_limit, send)
    return limited


def create_app(service: Service, api_key: str | None = None):
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    async def lifespan(app):
        service.engine.start()
        yield
        service.engine.stop()

    # with an API key, the schema pages (a map of every endpoint) are off rather than open to all
    pages = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="huayu serve", lifespan=lifespan, **pages)
    app.add_middleware(limit_body, limit=service.cfg.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return await api_error(_, validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return await api_error(_, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        """A bug, still answered in OpenAI's shape (uvicorn logs its traceback)."""
        return await api_error(_, APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def authorize(http_request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = http_request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise APIError(401, "You didn't provide an API key: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def respond(http_request, body: Decoding, reply: Reply, prompts, limits):
        queue, requests = service.start(prompts, body, limits)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_events(reply, queue, requests, prompts, include),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await collect(http_request, queue, requests)
        return reply.whole(requests, usage(prompts, requests))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, http_request: HTTPRequest):
        service.check_model(body)
        prompt = await asyncio.to_thread(service.encode_chat, body)
        limit = service.max_tokens(prompt, body.max_completion_tokens or body.max_tokens, "messages")
        # n choices of one prompt: the prompt counts once in usage
        reply = Reply(True, service.name, tool_calls=bool(body.offered_tools()))
        return await respond(http_request, body, reply, [prompt], [limit])

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http_request: HTTPRequest):
        service.check_model(body)
        prompts = await asyncio.to_thread(service.encode_prompts, body)
        limits = [service.max_tokens(p, body.max_tokens, "prompt") for p in prompts]
        return await respond(http_request, body, Reply(False, service.name), prompts, limits)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "huayu"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, **service.engine.stats()}

    return app


def build_service(cfg: ServeConfig) -> Service:
    from huayu.generation import Generator

    least = dict(max_batch_size=1, default_max_tokens=1, max_request_bytes=1, max_messages=1, threads=1, max_queue=0)
    wrong = [f"--{name.replace('_', '-')} must be at least {n}" for name, n in least.items()
             if getattr(cfg, name) is not None and getattr(cfg, name) < n]
    if wrong:
        raise HuayuError("; ".join(wrong))
    torch.set_num_threads(cfg.threads or available_cpus())
    gen = Generator.load(cfg.model, adapter=cfg.adapter, quantization=cfg.quantization, template=cfg.template,
                         placement=cfg.placement)
    if gen.model.config.is_encoder_decoder:
        raise HuayuError(f"'{cfg.model}' is an encoder-decoder model, which huayu serve does not batch yet")
    if gen.template_problem:
        print(f"huayu serve: warning: {gen.template_problem}")
    model = gen.model
    if hasattr(model, "peft_config"):  # LoRA lives inside the base model's layers: run those directly
        if model.active_peft_config.is_prompt_learning:
            raise HuayuError(f"'{cfg.adapter or cfg.model}' is a prefix (P-Tuning v2) adapter, whose virtual tokens "
                             "the batching server does not handle yet: merge-free prefix adapters work with "
                             "huayu chat, huayu webui and huayu.load()")
        model = model.get_base_model()
    engine = Engine(model, gen.tokenizer, gen.eos_ids, gen.max_positions, cfg.max_batch_size, cfg.max_queue,
                    compile=cfg.compile)
    name = cfg.served_model_name or Path(cfg.adapter or cfg.model).resolve().name
    return Service(gen, engine, name, cfg)


def add_arguments(parser) -> None:
    add_config_arguments(parser, ServeConfig)


def run(args) -> None:
    import uvicorn

    from huayu.models.loading import model_or_bundled

    cfg = config_from_args(ServeConfig, args)
    cfg.model = model_or_bundled(cfg.model)
    service = build_service(cfg)
    print(f"huayu serve: '{service.name}' at http://{cfg.host}:{cfg.port}/v1 (OpenAI-compatible; batch <= "
          f"{cfg.max_batch_size}, queue <= {cfg.max_queue}, {torch.get_num_threads()} torch threads"
          f"{', API key required' if cfg.api_key else ''})", flush=True)
    uvicorn.run(create_app(service, cfg.api_key), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
