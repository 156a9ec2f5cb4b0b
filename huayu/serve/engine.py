"""Continuous batching for decoder models: one forward pass per step for every request in flight.

Requests that arrive while others are generating are prefilled at the next step and join the
running batch there, instead of waiting for the batch to finish; finished or cancelled requests
leave it at once, freeing their slot. The running batch shares one key/value cache, left-padded:
each row has its own length, an attention mask hides its padding and position ids count its real
tokens (the model family says how: GLM's are 2D), so every row computes what it would compute alone.

A failure is confined to the requests it concerns: a failed forward pass fails the requests in it
(a failed decode step, the running batch, whose cache is then gone), and a row whose sampling or
text fails ends alone with an error event while its neighbours go on.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from huayu.errors import HuayuError
from huayu.generation import DecoderLoop, DecodingArgs, growing_cache, model_device
from huayu.models.families import cache_argument, family_of
from huayu.serve.sampling import SamplingParams, choose_tokens


class QueueFull(Exception):
    """Admitting these requests would leave more waiting than the engine was told to hold."""


@dataclass
class Event:
    """What the engine tells a request's owner: new text, the end (with why), or a failure."""
    text: str = ""
    finish_reason: str | None = None   # "stop", "length"
    error: str | None = None


@dataclass
class Request:
    """One sequence to generate; `emit` is called from the engine's thread."""
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0                       # characters of `text` already emitted
    finish_reason: str | None = None
    error: str | None = None            # why it failed; it leaves the batch like a finished one
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine drops it at its next step."""
        self.cancelled = True


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string (or an incomplete character)."""
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(held, 1 if text.endswith("\ufffd") else 0)


def _left_pad(kv, mask, width: int):
    extra = width - mask.shape[1]
    if extra == 0:
        return kv, mask
    pad = [(torch.nn.functional.pad(k, (0, 0, extra, 0)), torch.nn.functional.pad(v, (0, 0, extra, 0))) for k, v in kv]
    return pad, torch.nn.functional.pad(mask, (extra, 0))


class Engine:
    """Admits requests into a running batch of at most `max_batch_size`; `submit` raises QueueFull
    rather than leave more than `max_waiting` waiting for a slot."""

    def __init__(self, model, tokenizer, eos_ids: list[int], max_positions: int,
                 max_batch_size: int = 16, max_waiting: int = 64, compile: bool = False):
        self.model, self.tokenizer, self.eos_ids = model.eval(), tokenizer, list(eos_ids)
        self.device = model_device(model)  # the batch's ids, mask, cache and seeded generators live there
        self.cache_argument = cache_argument(model)
        self.family = family_of(model.config)
        # compiled: decode steps run over a static cache, rebuilt only when the batch changes
        self.loop = DecoderLoop(model) if compile else None
        if compile and not DecoderLoop.supports(model, self.family):
            raise HuayuError(f"--compile needs a decoder-only model; {model.config.model_type} decodes eagerly")
        self.max_positions, self.max_batch_size, self.max_waiting = max_positions, max_batch_size, max_waiting
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.waiting: deque[Request] = deque()
        self.admitting: list[Request] = []  # out of the queue, not yet in the batch: being prefilled
        self.running: list[Request] = []
        self.cache = None                   # the running batch's key/value cache
        self.room = 0                       # columns of the static cache, when compiled
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None   # each row's position ids of its last token
        self.wakeup = threading.Condition()
        self.counters = dict(steps=0, generated_tokens=0, finished=0, cancelled=0, failed=0, largest_batch=0)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the owner's side ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Requests held at most: running and waiting."""
        return self.max_batch_size + self.max_waiting

    def submit(self, *requests: Request) -> None:
        """Queue `requests` (e.g. the n choices of one API call) together, or none of them when
        more than `max_waiting` would then wait for a slot."""
        if any(not r.prompt for r in requests):
            raise ValueError("a request needs a prompt of at least one token")
        with self.wakeup:
            held = len(self.running) + len(self.admitting) + len(self.waiting)
            if held + len(requests) > self.capacity:
                raise QueueFull(f"{held} requests are running or waiting, of at most {self.capacity}")
            for r in requests:
                if r.params.seed is not None:  # any integer: torch takes 64 bits
                    r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed % 2 ** 64)
                self.waiting.append(r)
            self.wakeup.notify()

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), **self.counters}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="huayu-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self._stopping = True
            self.wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        while not self._stopping:
            if not self.step():
                with self.wakeup:
                    if not self.waiting and not self._stopping:
                        self.wakeup.wait(timeout=0.5)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> bool:
        """Decode one token for every running request and prefill those admitted now; False when
        there was nothing to do."""
        self._retire(cancelled_too=True)
        with self.wakeup:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self.counters["cancelled"] += 1
            free = self.max_batch_size - len(self.running)
            self.admitting = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not self.admitting and not self.running:
            return False
        with torch.inference_mode():
            if self.running and not self._guarded(self.running, self._decode):
                self._retire()  # the whole batch failed: its cache goes with it
            if self.admitting:
                self._guarded(self.admitting, self._prefill)
        self.admitting = []
        self.counters["steps"] += 1
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(self.running))
        self._retire()
        return True

    def _forward(self, ids, mask, positions, cache):
        """Last-position logits; `cache` grows by the new positions."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_argument: cache})
        return out.logits[:, -1]

    def _kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values of the filled columns (a static cache has room beyond)."""
        width = self.mask.shape[1]
        return [(layer.keys[:, :, :width], layer.values[:, :, :width]) for layer in self.cache.layers]

    def _guarded(self, rows: list[Request], work: Callable[[], None]) -> bool:
        """Run `work`; if it raises, fail `rows` (they leave the batch at the next retire) and say so."""
        try:
            work()
            return True
        except Exception as exc:
            for r in rows:
                r.error = f"generation failed: {type(exc).__name__}: {exc}"
                r.emit(Event(error=r.error))
            self.counters["failed"] += len(rows)
            return False

    def _decode(self) -> None:
        rows = self.running
        ids = torch.tensor([[r.out[-1]] for r in rows], device=self.device)
        width = self.mask.shape[1]
        mask = torch.cat([self.mask, torch.ones(len(rows), 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        positions = self.family.next_positions(self.positions)
        if self.loop is None:
            logits = self._forward(ids, mask, positions, self.cache)
        else:
            rebuilt = self._make_static(width + 1)
            step = self.loop.decode_step(DecodingArgs(compile=True), dynamic=True)
            with self.loop.guards_checked_once(DecodingArgs(compile=True), first_step=rebuilt):
                logits = step(ids, torch.nn.functional.pad(mask, (0, self.room - width - 1), value=1), positions,
                              torch.tensor([width], device=self.device), self.cache)
        self.mask, self.positions = mask, positions
        self._advance(rows, logits)

    def _make_static(self, width: int) -> bool:
        """Move the running batch's keys and values into a static cache with room for `width`
        columns (rounded up to 128), unless they are in one already; whether they were moved."""
        from transformers import StaticCache

        if isinstance(self.cache, StaticCache) and self.room >= width:
            return False
        kv = self._kv()
        self.room = -(-width // 128) * 128
        cache = StaticCache(config=self.loop.model.config, max_cache_len=self.room)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i, {"cache_position": torch.arange(k.shape[2], device=self.device)})
        self.cache = cache
        return True

    def _prefill(self) -> None:
        """Prefill the admitted requests and join them to the batch; the batch is changed only once
        all is computed, so that a failure here leaves the running requests as they were."""
        new = self.admitting
        width = max(len(r.prompt) for r in new)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + r.prompt for r in new], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in new], device=self.device)
        positions = self.family.prefill_positions(self.model, ids, mask)
        cache = growing_cache()
        logits = self._forward(ids, mask, positions, cache)
        last = positions[..., -1:]
        if self.cache is not None:
            width = max(self.mask.shape[1], mask.shape[1])
            (old_kv, old_mask) = _left_pad(self._kv(), self.mask, width)
            new_kv, mask = _left_pad([(layer.keys, layer.values) for layer in cache.layers], mask, width)
            cache = growing_cache([(torch.cat([k0, k1]), torch.cat([v0, v1]))
                                   for (k0, v0), (k1, v1) in zip(old_kv, new_kv)])
            mask, last = torch.cat([old_mask, mask]), torch.cat([self.positions, last])
        self.cache, self.mask, self.positions, self.running = cache, mask, last, self.running + new
        self._advance(new, logits)

    def _choose(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        return choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows],
                             [r.prompt + r.out for r in rows], [r.out for r in rows], self.eos_ids)

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Each row's next token, chosen for all rows at once; when that fails, row by row, so that
        only the rows at fault fail."""
        try:
            tokens = self._choose(rows, logits)
        except Exception:
            for i, r in enumerate(rows):
                self._guarded([r], lambda: self._append(r, self._choose([r], logits[i:i + 1])[0]))
        else:
            for r, token in zip(rows, tokens):
                self._guarded([r], lambda: self._append(r, token))

    def _append(self, r: Request, token: int) -> None:
        r.out.append(token)
        self.counters["generated_tokens"] += 1
        p = r.params
        if token in self.eos_ids and not p.ignore_eos:
            r.finish_reason = "stop"
        else:
            r.text = self.tokenizer.decode(r.out, skip_special_tokens=True)
            hits = [i for i in (r.text.find(s) for s in p.stop) if i >= 0]
            if hits:
                r.text, r.finish_reason = r.text[:min(hits)], "stop"
            elif len(r.out) >= p.max_tokens or len(r.prompt) + len(r.out) >= self.max_positions:
                r.finish_reason = "length"
        end = len(r.text) if r.finish_reason else len(r.text) - held_back(r.text, p.stop)
        if end > r.sent or r.finish_reason:
            r.emit(Event(text=r.text[r.sent:end], finish_reason=r.finish_reason))
            r.sent = max(r.sent, end)

    def _retire(self, cancelled_too: bool = False) -> None:
        """Drop finished (and cancelled) rows from the batch and its cache; trim shared padding."""
        gone = [i for i, r in enumerate(self.running)
                if r.finish_reason or r.error or (cancelled_too and r.cancelled)]
        if not gone:
            return
        for i in gone:
            if not self.running[i].error:  # failures are counted as they happen
                self.counters["finished" if self.running[i].finish_reason else "cancelled"] += 1
        keep = [i for i in range(len(self.running)) if i not in set(gone)]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.positions = None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask, self.positions = self.mask[index], self.positions[index]
        first = int(mask.any(0).nonzero()[0])
        self.cache = growing_cache([(k[index, :, first:], v[index, :, first:]) for k, v in self._kv()])
        self.mask = mask[:, first:]

