"""Decoding for chat, eval and generate: transformers' `generate()` behind one small interface.

Greedy, beam search and sampling (temperature, top-k, top-p), repetition penalty, max new tokens,
stop at EOS, batched prompts with left padding, and token streaming.
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
        from huayu.models.families import family_of

        self.model, self.tokenizer = model.eval(), tokenizer
        self.family = family_of(model.config)
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", 1024)
        eos = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.template_problem: str | None = None
        self._warned = False

    @classmethod
    def load(cls, path: str, dtype=None, adapter: str | None = None, quantization: str | None = None) -> "Generator":
        """The model at `path` (a model directory, or an adapter directory whose base is known),
        with `adapter` (LoRA or prefix) applied when given, and optionally quantized on loading."""
        from huayu.models.loading import load_for_inference, quantize_for_inference, resolve_adapter

        base, adapter = resolve_adapter(path, adapter)
        tokenizer, model = load_for_inference(base, adapter, dtype=dtype)
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
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return {"input_ids": ids, "attention_mask": mask}

    def new_ids(self, prompts: list[list[int]], d: DecodingArgs) -> list[list[int]]:
        """Decode a batch of token-id prompts (left-padded); the new ids of each, up to its first
        end token (excluded)."""
        import torch

        inputs = self._inputs(prompts, d)
        with torch.no_grad():
            out = self.model.generate(**inputs, generation_config=self._config(d))
        rows = self.family.new_tokens(out, inputs["input_ids"].shape[1]).tolist()
        ends = set(self.eos_ids)
        return [row[:next((i for i, t in enumerate(row) if t in ends), len(row))] for row in rows]

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

    def encode_text(self, text: str) -> list[int]:
        """The prompt that continues raw `text` (for GLM: the text, [gMASK], <sop>)."""
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return self.family.continuation_prompt(self.tokenizer, ids)

    def encode_chat(self, messages: list[dict], max_source_length: int | None = None) -> list[int]:
        """The prompt ids for the assistant's next turn after `messages`; the first call warns if the
        chat template is not the one the model was fine-tuned with."""
        if self.template_problem and not self._warned:
            warnings.warn(self.template_problem, TemplateWarning, stacklevel=2)
            self._warned = True
        return self.family.encode_prompt(self.tokenizer, messages, max_source_length or self.max_positions)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
