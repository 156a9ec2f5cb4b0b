"""Decoding for chat, eval and generate behind one small interface.

Greedy, beam search and sampling (temperature, top-k, top-p), repetition penalty, max new tokens,
stop at EOS, batched prompts with left padding, and token streaming.

Decoder-only models decode greedily or by sampling in huayu's own loop: per step one forward and
one token choice, with no logits-processor machinery. With `compile` the forward runs over a
preallocated (static) key/value cache, so it has fixed shapes and is torch.compile'd once: about
2.3× the tokens/s of transformers' `generate()` for a 10M model on a CPU
(benchmarks/decode_speed.py), with the same greedy outputs.
Beam search, n-gram bans, encoder-decoders, GLM and prefix adapters go through `generate()`.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

from huayu.config import field_doc
from huayu.errors import HuayuError
from huayu.models.families import BLANK


@dataclass
class DecodingArgs:
    max_new_tokens: int = field_doc("maximum tokens to generate", default=64)
    do_sample: bool = field_doc("sample instead of greedy/beam search", default=False)
    num_beams: int = field_doc("beam width (1: no beam search)", default=1)
    temperature: float = field_doc("sampling temperature", default=1.0)
    top_k: int = field_doc("sample from the k most likely tokens (0: off)", default=0)
    top_p: float = field_doc("nucleus sampling mass (1.0: off)", default=1.0)
    repetition_penalty: float = field_doc("penalty for repeating tokens (1.0: off)", default=1.0)
    no_repeat_ngram_size: int = field_doc("forbid repeating n-grams of this size (0: off)", default=0)
    length_penalty: float = field_doc("beam-search length penalty", default=1.0)
    compile: bool = field_doc("torch.compile the decode step: a one-off 3-30 s, then about twice the tokens/s",
                              default=False)


# EVA's interactive scripts: eva_inference_interactive_beam.sh and ..._no_beam.sh
EVA_BEAM = dict(do_sample=False, num_beams=4, length_penalty=1.6, repetition_penalty=1.6)
EVA_SAMPLE = dict(do_sample=True, num_beams=1, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.6)


def check_decoding(d: DecodingArgs) -> None:
    """Reject out-of-range decoding options with a message naming the option."""
    rules = [("max_new_tokens", d.max_new_tokens >= 1, "at least 1"),
             ("num_beams", d.num_beams >= 1, "at least 1"),
             ("temperature", d.temperature > 0, "positive"),
             ("top_k", d.top_k >= 0, "0 or more"),
             ("top_p", 0 < d.top_p <= 1, "in (0, 1]"),
             ("repetition_penalty", d.repetition_penalty > 0, "positive"),
             ("no_repeat_ngram_size", d.no_repeat_ngram_size >= 0, "0 or more")]
    for name, ok, what in rules:
        if not ok:
            raise HuayuError(f"--{name.replace('_', '-')} must be {what}, got {getattr(d, name)}")


class TemplateWarning(UserWarning):
    """The chat template used at inference may not be the one the model was fine-tuned with."""


def chat_template_problem(tokenizer, weights_dir: str) -> str | None:
    """What is wrong with rendering chats for the weights in `weights_dir` with `tokenizer`'s
    template, or None. A tokenizer without any template gets huayu's default (said so)."""
    from huayu.data.chat import ensure_chat_template
    from huayu.data.templates import template_mismatch

    problem = template_mismatch(tokenizer, weights_dir)
    if not tokenizer.chat_template:
        ensure_chat_template(tokenizer)
        problem = problem or (f"'{weights_dir}' has no chat template, so it was not fine-tuned for chat: "
                              "using huayu's default template (<|user|>…</s><|assistant|>)")
    return problem


class Generator:
    """A model and its tokenizer, ready to decode."""

    def __init__(self, model, tokenizer):
        from huayu.data.chat_templates import reply_stop_id
        from huayu.models.families import family_of

        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model_device(model)
        self.family = family_of(model.config)
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", 1024)
        # a reply also ends at its chat template's reply-ending token (<|im_end|>, GLM's <|user|>)
        eos = {tokenizer.eos_token_id, reply_stop_id(tokenizer)} | set(_as_list(model.generation_config.eos_token_id))
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.template_problem: str | None = None
        self._warned = False
        self.loop = DecoderLoop(model) if DecoderLoop.supports(model, self.family) else None

    @classmethod
    def load(cls, path: str, dtype=None, adapter: str | None = None, quantization: str | None = None,
             template: str | None = None, placement=None) -> "Generator":
        """The model at `path` (a model directory, or an adapter directory whose base is known),
        with `adapter` (LoRA or prefix) applied when given, and optionally quantized on loading.
        `template` (--template) replaces the tokenizer's chat template: a registry name or a .jinja file.
        `placement` (InferenceArgs: --device, --torch-dtype, --quantization-bit, ...): default, auto."""
        from huayu.data.chat_templates import use_template
        from huayu.models.loading import InferenceArgs, load_for_inference, quantize_for_inference, resolve_adapter

        placement = placement or InferenceArgs()
        if quantization and placement.device == "auto":  # huayu's int8/int4 kernels are the CPU's
            placement = dataclasses.replace(placement, device="cpu")
        base, adapter = resolve_adapter(path, adapter)
        tokenizer, model = load_for_inference(base, adapter, dtype=dtype, placement=placement)
        use_template(tokenizer, template)
        if not model.can_generate():
            raise HuayuError(f"the model at '{path}' ({model.config.model_type}) cannot generate text; an encoder "
                             "(BERT, ERNIE) classifies instead: huayu finetune-cls, then huayu predict")
        generator = cls(quantize_for_inference(model, quantization), tokenizer)
        generator.template_problem = chat_template_problem(tokenizer, adapter or base)
        return generator

    def _config(self, d: DecodingArgs):
        from transformers import GenerationConfig

        check_decoding(d)
        kwargs = dataclasses.asdict(d)
        kwargs.pop("compile")
        if not d.do_sample:  # sampling knobs are meaningless (and warned about) without sampling
            for key in ("temperature", "top_k", "top_p"):
                kwargs.pop(key)
        elif d.top_k == 0:
            kwargs["top_k"] = None
        return GenerationConfig(**kwargs, eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id)

    def _budget(self, prompt: list[int], d: DecodingArgs) -> list[int]:
        """Keep the newest tokens of `prompt` so that prompt + new tokens fit the context."""
        room = self.max_positions - (0 if self.family.seq2seq else d.max_new_tokens)
        if room < 1:
            raise HuayuError(f"--max-new-tokens {d.max_new_tokens} leaves no room for the prompt in the "
                             f"model's context of {self.max_positions} tokens")
        return prompt[-room:]

    def _inputs(self, prompts: list[list[int]], d: DecodingArgs) -> dict:
        import torch

        prompts = [self._budget(p, d) for p in prompts]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def new_ids(self, prompts: list[list[int]], d: DecodingArgs) -> list[list[int]]:
        """Decode a batch of token-id prompts (left-padded); the new ids of each, up to its first
        end token (excluded)."""
        import torch

        inputs = self._inputs(prompts, d)
        if self._own_loop_for(d):
            rows = [[] for _ in prompts]
            for tokens in self.loop.decode(inputs, d, self.eos_ids):
                for row, t in zip(rows, tokens):
                    row.append(t)
        else:
            with torch.no_grad():
                out = self.model.generate(**inputs, generation_config=self._config(d))
            rows = self.family.new_tokens(out, inputs["input_ids"].shape[1]).tolist()
        ends = set(self.eos_ids)
        return [row[:next((i for i, t in enumerate(row) if t in ends), len(row))] for row in rows]

    def _own_loop_for(self, d: DecodingArgs) -> bool:
        """Whether huayu's own loop decodes with `d` (else transformers' generate())."""
        check_decoding(d)
        return self.loop is not None and d.num_beams == 1 and d.no_repeat_ngram_size == 0

    def generate_ids(self, prompts: list[list[int]], d: DecodingArgs) -> list[str]:
        """Decode a batch of token-id prompts (left-padded); return the new text of each."""
        return self.tokenizer.batch_decode(self.new_ids(prompts, d), skip_special_tokens=True)

    def fill(self, text: str, d: DecodingArgs) -> str:
        """`text` with each [MASK] (or [sMASK], [gMASK]) filled by a GLM, left to right: the k-th
        blank's span is generated after the spans before it, as in pre-training's Part B."""
        if self.family.layout != BLANK:
            raise HuayuError(f"blank filling needs a GLM model; this one is {self.model.config.model_type}")
        special = self.family.special_ids(self.tokenizer)
        blank_ids = {special[k] for k in ("mask_token_id", "smask_token_id", "gmask_token_id")}
        part_a = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        blanks = [i for i, t in enumerate(part_a) if t in blank_ids]
        if not blanks:
            raise HuayuError(f"nothing to fill: the text has no [MASK], [sMASK] or [gMASK]: {text!r}")
        part_b, spans = [], []
        for _ in blanks:
            span = self.new_ids([part_a + part_b + [special["sop_token_id"]]], d)[0]
            part_b += [special["sop_token_id"]] + span
            spans.append(span)
        filled = list(part_a)
        for position, span in sorted(zip(blanks, spans), reverse=True):
            filled[position:position + 1] = span
        return self.tokenizer.decode(filled, skip_special_tokens=True)

    def stream_ids(self, prompt: list[int], d: DecodingArgs) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as they are generated. Closing the
        iterator early (a web page cleared, a client gone) stops the generation too.

        Beam search only knows its best sequence at the end, so it yields the whole reply at once.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if d.num_beams > 1:
            yield self.generate_ids([prompt], d)[0]
            return
        if self._own_loop_for(d):
            yield from self._stream_own_loop(prompt, d)
            return
        abandoned = threading.Event()

        class Abandoned(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), abandoned.is_set(), dtype=torch.bool)

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**self._inputs([prompt], d), generation_config=self._config(d), streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([Abandoned()]))
        failure: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surface it in the caller instead of hanging the stream
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            abandoned.set()
            thread.join()
        if failure:
            raise failure[0]

    def _stream_own_loop(self, prompt: list[int], d: DecodingArgs) -> Iterator[str]:
        """Text pieces as the loop makes tokens; a piece ending inside a character waits."""
        out, sent = [], 0
        for (token,) in self.loop.decode(self._inputs([prompt], d), d, self.eos_ids):
            if token in self.eos_ids:
                break
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            end = len(text) - (1 if text.endswith("\ufffd") else 0)
            if end > sent:
                yield text[sent:end]
                sent = end
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        if len(text) > sent:
            yield text[sent:]

    def encode_text(self, text: str, parse_special_tokens: bool = False) -> list[int]:
        """The prompt that continues raw `text` (for GLM: the text, [gMASK], <sop>); special-token
        text in it (`</s>`) is plain text unless `parse_special_tokens`."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special_tokens,
                             verbose=False)["input_ids"]
        return self.family.continuation_prompt(self.tokenizer, ids)

    def encode_chat(self, messages: list[dict], max_source_length: int | None = None) -> list[int]:
        """The prompt ids for the assistant's next turn after `messages`; the first call warns if the
        chat template is not the one the model was fine-tuned with."""
        if self.template_problem and not self._warned:
            warnings.warn(self.template_problem, TemplateWarning, stacklevel=2)
            self._warned = True
        return self.family.encode_prompt(self.tokenizer, messages, max_source_length or self.max_positions)


class DecoderLoop:
    """Greedy or sampled decoding of a decoder-only model, one forward and one token choice per
    step. Eagerly the key/value cache grows in place; compiled, it is transformers' StaticCache,
    allocated once per call for prompt + new tokens, so that every step has the same shapes and the
    step compiled once is replayed."""

    def __init__(self, model):
        from huayu.models.families import cache_argument

        peft = hasattr(model, "get_base_model")
        self.model = model.get_base_model() if peft else model  # LoRA layers live inside the base
        self.cache_argument = cache_argument(self.model)
        self.compiled = {}  # dynamic shapes or not -> the compiled step

    @staticmethod
    def supports(model, family) -> bool:
        """A decoder-only model whose forward takes a cache object and compiles whole; not a prefix
        (prompt-learning) adapter, which brings a cache of its own."""
        from huayu.models.families import CAUSAL, cache_argument

        if getattr(getattr(model, "peft_config", {}).get("default"), "is_prompt_learning", False):
            return False
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return family.layout == CAUSAL and getattr(base, "_can_compile_fullgraph", False) and \
            cache_argument(base) is not None

    def _step(self, ids, mask, positions, cache_position, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache_position=cache_position,
                         use_cache=True, logits_to_keep=1, **{self.cache_argument: cache})
        return out.logits[:, -1].float()

    def decode_step(self, d: DecodingArgs, dynamic: bool = False):
        """The step (ids, mask, positions, cache_position, cache) -> last logits, compiled if
        d.compile: for one call's fixed shapes, or `dynamic` for a batch that changes (the server's)."""
        if not d.compile:
            return self._step
        if dynamic not in self.compiled:
            import torch

            # the C++ wrapper calls the generated kernels without a Python frame per op: most of the gain
            self.compiled[dynamic] = torch.compile(self._step, dynamic=dynamic or None, options={"cpp_wrapper": True})
        return self.compiled[dynamic]

    @staticmethod
    def guards_checked_once(d: DecodingArgs, first_step: bool):
        """After the first step over a cache, every step has the shapes and objects the compiled
        step was checked against, so dynamo's per-call guard checks (a fifth of a step) are skipped."""
        import contextlib

        import torch

        if not d.compile or first_step:
            return contextlib.nullcontext()
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)

    def decode(self, inputs: dict, d: DecodingArgs, eos_ids: list[int]) -> Iterator[list[int]]:
        """Yield one token per row per step, until every row has ended or d.max_new_tokens."""
        import torch
        from transformers import StaticCache

        from huayu.serve.sampling import SamplingParams, choose_tokens

        ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
        rows, width = ids.shape
        length = -(-(width + d.max_new_tokens) // 128) * 128  # few distinct shapes: few compilations
        cache = StaticCache(config=self.model.config, max_cache_len=length) if d.compile else growing_cache()
        mask = torch.nn.functional.pad(prompt_mask, (0, length - width), value=1)  # the future: causally hidden
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        params = [SamplingParams(temperature=d.temperature if d.do_sample else 0, top_k=d.top_k, top_p=d.top_p,
                                 repetition_penalty=d.repetition_penalty)] * rows
        histories = [row[m.bool()].tolist() for row, m in zip(ids, prompt_mask)]
        outputs = [[] for _ in range(rows)]
        ended = [False] * rows
        step = self.decode_step(d)
        with torch.inference_mode():
            device = ids.device
            logits = self._step(ids, mask[:, :width], positions, torch.arange(width, device=device), cache)
            positions = positions[:, -1:]
            for t in range(d.max_new_tokens):
                tokens = choose_tokens(logits, params, [None] * rows, histories, outputs, [])
                tokens = [eos_ids[0] if e else token for token, e in zip(tokens, ended)]
                yield tokens
                for i, token in enumerate(tokens):
                    outputs[i].append(token)
                    histories[i].append(token)
                    ended[i] = ended[i] or token in eos_ids
                if all(ended) or t == d.max_new_tokens - 1:
                    return
                positions = positions + 1
                with self.guards_checked_once(d, first_step=t == 0):
                    visible = mask if d.compile else mask[:, :width + t + 1]  # a growing cache: what it holds
                    logits = step(torch.tensor(tokens, device=device).unsqueeze(1), visible, positions,
                                  torch.tensor([width + t], device=device), cache)


def _roomy_layer_class():
    """transformers' DynamicLayer appending into spare room instead of concatenating: a decode
    step writes one position in place, and the buffer doubles only when it is full."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.room = None
            used = self.keys.shape[-2] if self.keys.numel() else 0
            size = used + key_states.shape[-2]
            if self.room is None or size > self.room[0].shape[-2]:
                b, h, _, d = key_states.shape
                room = [torch.empty(b, h, max(2 * size, 64), d, dtype=t.dtype, device=t.device)
                        for t in (key_states, value_states)]
                if used:
                    room[0][:, :, :used], room[1][:, :, :used] = self.keys, self.values
                self.room = room
            self.room[0][:, :, used:size], self.room[1][:, :, used:size] = key_states, value_states
            self.keys, self.values = self.room[0][:, :, :size], self.room[1][:, :, :size]
            return self.keys, self.values

    return RoomyLayer


def growing_cache(kv=None):
    """A key/value cache of roomy layers (for steps of changing shapes: eager decoding, the serving
    engine's batch), holding `kv` (per layer (keys, values)) when given."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _roomy_layer_class()
    for i, (k, v) in enumerate(kv or []):
        cache.update(k, v, i)
    return cache


def model_device(model):
    """Where a model's weights are (a bitsandbytes model is placed by its loader): its inputs, key/value
    cache and sampling tensors go there."""
    return next(model.parameters()).device


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
