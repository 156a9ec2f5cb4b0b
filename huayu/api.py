"""The Python API: `huayu.load(path)` and a model object that chats the way ChatGLM's does.

    import huayu
    model = huayu.load("out/sft")                       # or adapter="out/lora", quantization="int8"
    response, history = model.chat("你好")
    response, history = model.chat("你是谁？", history)
    for response, history in model.stream_chat("讲个故事", history):
        print(response)                                  # the reply so far, growing
    model.generate(["春天来了，", "从前有座山，"], max_new_tokens=20)

History is a list of OpenAI-style messages ({"role", "content"}); ChatGLM-style [query, response]
pairs are accepted too. Decoding options are the fields of `huayu.generation.DecodingArgs`; chat's
start from huayu's sampling defaults with the model's generation_config.json on top (`model.decoding`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from huayu.data.chat_templates import with_system
from huayu.data.templates import ROLES
from huayu.errors import HuayuError
from huayu.generation import DecodingArgs, Generator


def chat_decoding() -> DecodingArgs:
    """What chat uses unless told otherwise: EVA's sampling with a milder repetition penalty."""
    from huayu.generation import EVA_SAMPLE

    return DecodingArgs(**{**EVA_SAMPLE, "repetition_penalty": 1.2})


def model_chat_decoding(generator: Generator) -> DecodingArgs:
    """chat_decoding() under what the model's generation_config.json sets: its authors' choice for this
    model beats huayu's general one. GenerationConfig's defaults are all None, so what differs was set."""
    known = {f.name for f in dataclasses.fields(DecodingArgs)}
    own = {k: v for k, v in generator.model.generation_config.to_diff_dict().items() if k in known}
    return dataclasses.replace(chat_decoding(), **own)


def decoding_args(base: DecodingArgs, options: dict) -> DecodingArgs:
    """`base` with `options` applied; an unknown option is an error naming it."""
    known = {f.name for f in dataclasses.fields(DecodingArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise HuayuError(f"unknown decoding option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **options)


def as_messages(history) -> list[dict]:
    """Messages from a history of messages or of ChatGLM-style (query, response) pairs."""
    messages = []
    for i, item in enumerate(history or []):
        if isinstance(item, dict):
            if item.get("role") not in ROLES or not isinstance(item.get("content"), str):
                raise HuayuError(f"history[{i}]: a message needs a role ({', '.join(ROLES)}) and string content")
            messages.append({"role": item["role"], "content": item["content"]})
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            messages += [{"role": "user", "content": str(item[0])}, {"role": "assistant", "content": str(item[1])}]
        else:
            raise HuayuError(f"history[{i}]: expected a message dict or a (query, response) pair, got {item!r}")
    return messages


class ChatModel:
    """A loaded model with chat, streaming chat and batched generation."""

    def __init__(self, generator: Generator, path: str, max_source_length: int | None = None,
                 system: str | None = None):
        self.generator, self.path, self.system = generator, path, system
        self.tokenizer, self.model = generator.tokenizer, generator.model
        self.max_source_length = max_source_length or generator.max_positions // 2
        self.decoding = model_chat_decoding(generator)  # what chat() decodes with unless told otherwise

    @property
    def template_problem(self) -> str | None:
        """Why the chat template may not be the one the model was trained with (None: it is)."""
        return self.generator.template_problem

    def _prompt(self, query: str, history, system: str | None):
        """The messages and prompt ids of `query` after `history`; `system` (default: the one
        given to load()) is added unless the history has a system message."""
        messages = with_system(as_messages(history), self.system if system is None else system)
        messages = messages + [{"role": "user", "content": query}]
        return messages, self.generator.encode_chat(messages, self.max_source_length)

    def stream_chat(self, query: str, history=None, system: str | None = None,
                    **decoding) -> Iterator[tuple[str, list[dict]]]:
        """Yield (reply so far, history with it) as the reply grows; the last is the whole reply."""
        messages, prompt = self._prompt(query, history, system)
        d, response = decoding_args(self.decoding, decoding), ""
        for piece in self.generator.stream_ids(prompt, d):
            response += piece
            yield response, messages + [{"role": "assistant", "content": response}]
        response = response.strip()
        yield response, messages + [{"role": "assistant", "content": response}]

    def chat(self, query: str, history=None, system: str | None = None, **decoding) -> tuple[str, list[dict]]:
        """(reply, history + [query, reply]) of one turn; `history` itself is left unchanged."""
        messages, prompt = self._prompt(query, history, system)
        response = self.generator.generate_ids([prompt], decoding_args(self.decoding, decoding))[0].strip()
        return response, messages + [{"role": "assistant", "content": response}]

    def fill(self, text: str, **decoding) -> str:
        """GLM: `text` with each [MASK] filled in (`huayu.load(glm).fill("今天[MASK]很好")`)."""
        return self.generator.fill(text, decoding_args(DecodingArgs(), decoding))

    def generate(self, prompts: list[str] | str, batch_size: int = 8, **decoding) -> list[str]:
        """The continuation of each raw-text prompt (no chat template), decoded `batch_size` at a time."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        d, out = decoding_args(DecodingArgs(), decoding), []
        for start in range(0, len(prompts), batch_size):
            batch = [self.generator.encode_text(p) for p in prompts[start:start + batch_size]]
            out += self.generator.generate_ids(batch, d)
        return out


def load(path: str, adapter: str | None = None, quantization: str | None = None, dtype=None,
         max_source_length: int | None = None, template: str | None = None, system: str | None = None,
         device: str = "auto", quantization_bit: int | None = None, attn_implementation: str | None = None,
         trust_remote_code: bool = False) -> ChatModel:
    """The model at `path` (a model directory, or an adapter directory whose base is known here),
    with `adapter` applied. `device`: auto (a CUDA GPU when there is one), cpu or cuda; `dtype`: a
    torch dtype or its name ("bfloat16"; default: as stored); `quantization_bit` 4 or 8 loads through
    bitsandbytes on CUDA, `quantization` ("int8", "int4": huayu's weight-only kernels) quantizes on
    the CPU. `max_source_length` caps the dialogue history fed to the model (default: half its
    context), cut from the oldest turn. `template` replaces the tokenizer's chat template (a name of
    huayu.data.chat_templates.TEMPLATES or a .jinja file); `system` is the system message of chats
    whose history has none (chat()'s own `system` wins). `trust_remote_code`: run a checkpoint's own
    Python code (its `auto_map`) — for this process, as the CLI's --trust-remote-code."""
    import os

    from huayu.models.loading import TRUST_REMOTE_CODE_ENV, InferenceArgs

    if trust_remote_code:
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    named = isinstance(dtype, str)
    placement = InferenceArgs(torch_dtype=dtype if named else "auto", attn_implementation=attn_implementation,
                              quantization_bit=quantization_bit, device=device)
    generator = Generator.load(path, dtype=None if named else dtype, adapter=adapter, quantization=quantization,
                               template=template, placement=placement)
    return ChatModel(generator, path, max_source_length, system)
