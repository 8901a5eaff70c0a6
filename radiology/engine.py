"""A decoding engine for the demo: static KV cache, CUDA-graph decode steps, batched requests.

Plain ``model.generate`` spends most of each step in Python and kernel launches (a 4B model needs
~3 ms of GPU time per token but takes ~80-120 ms). Here the prompt (image included) is prefilled
eagerly into a preallocated static cache; each following token runs one captured CUDA graph of the
text model's decode step, whose kernels are the eager ones, so greedy output matches plain
generate. Requests that arrive together are decoded as one batch: at batch 4 a step costs about
what it costs at batch 1, since the step reads all the weights either way.

The cache is sized for the request: the smallest of 1024, 2048, 4096, 8192 positions (up to the
model's max_position_embeddings, or the engine's max_len) that holds the prompt and max_new_tokens.
Prompts and answers pass Gemma 3's sliding window exactly: every layer keeps a full-length static
cache, and the sliding layers' mask also hides the slots more than a window behind the new token
(with left padding a row's tokens sit in consecutive slots, so slot distance is token distance).

    engine = DecodeEngine(loaded)            # loaded = radiology.generate.load_for_generation(...)
    engine.warm_up(image)                    # captures the graphs before the first user arrives
    for text in engine.stream(inputs, settings, stop):   # text so far, as it grows
        ...
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer

from radiology.tokens import never_generated, special_ids

__all__ = ["DecodeEngine", "EngineRequest", "static_cache_bytes"]

logger = logging.getLogger(__name__)

_DONE = object()
_DEFAULT_MAX_LEN = 8192  # the largest cache by default: 4.25 GiB for Gemma 3 4B at batch 4


@dataclass
class EngineRequest:
    inputs: dict[str, torch.Tensor]  # one prompt: input_ids (1, L), attention_mask, token_type_ids, pixel_values
    settings: Any  # radiology.generate.GenerationSettings
    stop: threading.Event
    out: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds after submission, for benchmarks
    unsent: list[int] = field(default_factory=list)
    last_flush: float = 0.0


def static_cache_bytes(text_config: Any, batch: int, length: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a full-length static KV cache: layers x (keys, values) x batch x KV heads x length x
    head_dim x element size. Gemma 3 4B (34 layers, 4 KV heads, head_dim 256) in bf16: 136 KiB a
    position and row; 8192 positions x 4 rows = 4.25 GiB."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return text_config.num_hidden_layers * 2 * batch * text_config.num_key_value_heads * length * head_dim * element


def _text_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The text decoder and LM head, under a PEFT wrapper or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.language_model, base.lm_head


class _Slot:
    """A static cache of one length plus the CUDA graph of one decode step, for one batch size."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, use_graphs: bool):
        self.model, self.batch, self.max_len, self.use_graphs = model, batch, max_len, use_graphs
        self.language_model, self.head = _text_parts(model)
        device = next(model.parameters()).device
        text_config = model.config.get_text_config()
        # Full-length static layers everywhere, sliding ones included: every size and offset stays a
        # tensor or a constant (a captured graph cannot follow Python counters, which transformers'
        # sliding static layers keep), and the decode mask below applies the window.
        self.cache = Cache(layers=[StaticLayer(max_cache_len=max_len) for _ in range(text_config.num_hidden_layers)])
        self.eager = text_config._attn_implementation == "eager"
        self.dtype = next(self.head.parameters()).dtype
        window = getattr(text_config, "sliding_window", None)
        # Below the window the sliding mask equals the full one: such a cache needs no second mask.
        self.window = window if window is not None and max_len > window else None
        # Static buffers: a captured graph reads and writes these same addresses on every replay.
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, max_len), dtype=torch.long, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # the slot the new token is written to
        self.slots = torch.arange(max_len, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _decode_masks(self) -> dict[str, torch.Tensor]:
        """(B, 1, 1, max_len) per layer type: each new token sees every filled cache slot of its row;
        in the sliding layers only the last `window` of them (its own included), as plain generate's
        sliding cache and mask do. Built from buffers only, so that a captured graph rebuilds it."""
        visible = self.mask[:, None, None, :].bool()
        sliding = visible
        if self.window is not None:
            sliding = visible & (self.slots > self.cursor - self.window)
        return {"full_attention": self._attention_mask(visible), "sliding_attention": self._attention_mask(sliding)}

    def _attention_mask(self, visible: torch.Tensor) -> torch.Tensor:
        if not self.eager:
            return visible  # sdpa takes a boolean mask
        return torch.zeros(visible.shape, dtype=self.dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min)

    def _step(self) -> torch.Tensor:
        hidden = self.language_model(
            input_ids=self.tokens, attention_mask=self._decode_masks(),
            position_ids=self.positions, cache=self.cache, use_cache=True,
        ).last_hidden_state
        return self.head(hidden[:, -1]).float()

    def reset(self) -> None:
        self.cache.reset()
        self.mask.zero_()

    def prefill(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the whole prompt (images included) into the cache; returns the last logits (B, V).

        transformers builds the prefill's masks itself, in cache-slot coordinates, and applies the
        sliding window there whatever the cache layers (an and-mask on the sliding layers' mask),
        so a prompt longer than the window is exact as it is."""
        self.reset()
        length = inputs["input_ids"].shape[1]
        attention = inputs["attention_mask"]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from 0
        out = self.model(**inputs, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.mask[:, :length] = attention
        self.positions.copy_(positions[:, -1:] + 1)
        return out.logits[:, -1].float()

    def decode(self, next_tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed one token per row at cache slot ``step``; returns logits (B, V)."""
        self.tokens.copy_(next_tokens.view(-1, 1))
        self.mask[:, step] = 1
        self.cursor.fill_(step)
        if not self.use_graphs:
            logits = self._step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.positions.add_(1)
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and kernel selection), then capture. The step writes
        # the cache in place, so capturing it writes garbage at the current position: harmless,
        # since replaying the graph right after rewrites the same position with the real token.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        saved = self.cache_lengths()
        with torch.cuda.stream(stream):
            self._step()
            self.restore_lengths(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.restore_lengths(saved)
        self.graph = graph

    def cache_lengths(self) -> list[torch.Tensor]:
        return [layer.cumulative_length.clone() for layer in self.cache.layers if hasattr(layer, "cumulative_length")]

    def restore_lengths(self, saved: list[torch.Tensor]) -> None:
        layers = [layer for layer in self.cache.layers if hasattr(layer, "cumulative_length")]
        for layer, value in zip(layers, saved):
            layer.cumulative_length.copy_(value)


class DecodeEngine:
    """Owns the model on one device; serves requests from a worker thread, in batches.

    ``max_len`` caps the cache (default: 8192 positions, or the model's max_position_embeddings if
    smaller): a prompt plus max_new_tokens above it is refused here (``fits``) and radiology.generate
    gives it to plain generate. ``min_len`` is the smallest cache (default 1024), the one that
    ``warm_up`` captures for every batch size; longer requests take the next doubling.
    """

    def __init__(self, loaded: Any, max_batch: int = 4, max_len: int | None = None, use_graphs: bool | None = None,
                 batch_wait_s: float = 0.01, min_len: int = 1024):
        self.loaded = loaded
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        if min_len < 1 or (max_len is not None and max_len < 1):
            raise ValueError(f"the engine's cache lengths must be at least 1 position, got min_len={min_len}, "
                             f"max_len={max_len}; leave them out for 1024 and 8192")
        text_config = self.model.config.get_text_config()
        positions = getattr(text_config, "max_position_embeddings", None) or _DEFAULT_MAX_LEN
        self.max_len = min(max_len or _DEFAULT_MAX_LEN, positions)
        # Cache lengths: min_len, doubled up to max_len. Each (batch size, length) gets its own cache
        # and graph, made when first needed; long ones are dropped again to stay within the budget.
        self.cache_lengths = [min(min_len, self.max_len)]
        while self.cache_lengths[-1] < self.max_len:
            self.cache_lengths.append(min(self.cache_lengths[-1] * 2, self.max_len))
        # Caches longer than min_len share this many bytes (least recently used dropped first): as
        # much as one cache of max_len for max_batch rows (4.25 GiB for Gemma 3 4B at 8192 x 4).
        self.long_cache_budget = self.cache_bytes(self._batch_bucket(max_batch), self.max_len)
        self.pad_id = special_ids(loaded.processor).pad
        self.suppress = torch.tensor(never_generated(loaded.processor), device=self.device)
        self.tokenizer = loaded.processor.tokenizer
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()  # (batch, length), least recent first
        self._pending: queue.Queue[EngineRequest] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.ignore_stop_tokens = False  # benchmarks force a fixed number of new tokens
        # Each token goes to its reader as soon as it is chosen. (Handing them over in 40 ms batches
        # was tried: single-request decode did not change and 4 concurrent requests got slower.)
        self.flush_s = 0.0
        self.last_timings: dict[str, float] = {}
        self.batch_sizes: Counter[int] = Counter()  # how many requests each decoded batch carried

    # ------------------------------------------------------------------ public API

    def stream(self, inputs: dict[str, torch.Tensor], settings: Any, stop: threading.Event | None = None
               ) -> Iterator[str]:
        """Yields the answer as it grows. Setting ``stop`` (or closing the iterator) ends it early."""
        (request,) = self._submit([inputs], settings, stop or threading.Event())
        ids: list[int] = []
        try:
            for chunk in self._answer(request):
                ids.extend(chunk)
                yield self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        finally:
            request.stop.set()

    def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
        """Whether a prompt and an answer of max_new_tokens fit the engine's largest cache (max_len),
        sliding window or not. Only requests above it go to plain generate (radiology.generate)."""
        return prompt_length + max_new_tokens <= self.max_len

    def cache_bytes(self, batch: int, length: int) -> int:
        """Bytes of one of this engine's caches (see static_cache_bytes)."""
        dtype = next(_text_parts(self.model)[1].parameters()).dtype
        return static_cache_bytes(self.model.config.get_text_config(), batch, length, dtype)

    def generate_ids(self, inputs: dict[str, torch.Tensor], settings: Any, stop: threading.Event | None = None
                     ) -> list[int]:
        """The new token ids for one prompt (blocking)."""
        (request,) = self._submit([inputs], settings, stop or threading.Event())
        return [token for chunk in self._answer(request) for token in chunk]

    def generate_many(self, prompts: list[dict[str, torch.Tensor]], settings: Any,
                      stop: threading.Event | None = None) -> list[list[int]]:
        """New token ids for several prompts, submitted together so that the worker batches them."""
        requests = self._submit(prompts, settings, stop or threading.Event())
        return [[token for chunk in self._answer(request) for token in chunk] for request in requests]

    def warm_up(self, inputs: dict[str, torch.Tensor], settings: Any) -> float:
        """Capture every batch size's graph now, so that no user pays for it; returns seconds. These are
        the graphs of the first cache length (min_len), which short prompts use; a request that needs a
        longer cache captures its graph when it first arrives.

        It runs on the worker thread itself: CUDA libraries create their per-thread handles and
        workspaces on a thread's first use, which would otherwise land on the first user's request.
        """
        start = time.perf_counter()
        size = 1
        while size <= self.max_batch:
            self.generate_many([inputs] * size, settings)  # submitted together: one batch of `size`
            size *= 2
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the worker thread and drop the cached graphs, so the model can be freed."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None and worker.is_alive():
            self._pending.put(None)  # type: ignore[arg-type]  # the worker's signal to end
            worker.join()
        self._slots.clear()

    # ------------------------------------------------------------------ worker

    def _submit(self, prompts: list[dict[str, torch.Tensor]], settings: Any, stop: threading.Event
                ) -> list[EngineRequest]:
        """Queue the prompts for the worker (together, so that it can batch them)."""
        for inputs in prompts:
            length = inputs["input_ids"].shape[1]
            if not self.fits(length, settings.max_new_tokens):
                raise ValueError(
                    f"the prompt ({length} tokens) and max_new_tokens={settings.max_new_tokens} need more "
                    f"positions than the engine's largest cache holds ({self.max_len}); lower max_new_tokens, "
                    "raise the engine's max_len, or generate through radiology.generate, which uses plain "
                    "generate then")
        requests = [EngineRequest(inputs=inputs, settings=settings, stop=stop) for inputs in prompts]
        self._ensure_worker()
        for request in requests:
            self._pending.put(request)
        return requests

    @staticmethod
    def _answer(request: EngineRequest) -> Iterator[list[int]]:
        """The request's new token ids, chunk by chunk as the worker hands them over, until it is
        done; a failure in the worker is raised here, in the caller's thread."""
        while (item := request.out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, name="decode-engine", daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.batch_wait_s
            closing = False
            while len(batch) < self.max_batch:
                try:
                    item = self._pending.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if closing:
                return

    def _batch_bucket(self, n: int) -> int:
        size = 1
        while size < n:
            size *= 2
        return min(size, max(self.max_batch, n))

    def _length_bucket(self, needed: int) -> int:
        """The shortest cache length that holds ``needed`` positions (fits() keeps it <= max_len)."""
        return next(length for length in self.cache_lengths if length >= needed)

    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        if length > self.cache_lengths[0]:
            self._make_room(self.cache_bytes(batch, length))
        self._slots[key] = _Slot(self.model, batch, length, self.use_graphs)
        return self._slots[key]

    def _make_room(self, needed: int) -> None:
        """Drop the least recently used long caches (and their graphs) until ``needed`` more bytes stay
        within long_cache_budget. The min_len caches, which warm_up captured, always stay."""
        long_keys = [key for key in self._slots if key[1] > self.cache_lengths[0]]
        held = sum(self.cache_bytes(*key) for key in long_keys)
        for key in long_keys:
            if held + needed <= self.long_cache_budget:
                break
            del self._slots[key]
            held -= self.cache_bytes(*key)

    def _collate(self, requests: list[EngineRequest], batch: int) -> dict[str, torch.Tensor]:
        """Left-pad the prompts into one batch (rows past len(requests) repeat the last prompt)."""
        rows = requests + [requests[-1]] * (batch - len(requests))
        width = max(r.inputs["input_ids"].shape[1] for r in rows)
        out: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for r in rows:
            pad = width - r.inputs["input_ids"].shape[1]
            for key, value in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
                tensor = r.inputs[key]
                out[key].append(torch.nn.functional.pad(tensor, (pad, 0), value=value))
        batch_inputs = {k: torch.cat(v).to(self.device) for k, v in out.items()}
        batch_inputs["pixel_values"] = torch.cat([r.inputs["pixel_values"] for r in rows]).to(
            self.device, torch.bfloat16)
        return batch_inputs

    def _fitting_groups(self, requests: list[EngineRequest]) -> list[list[EngineRequest]]:
        """The requests in batches whose widest prompt plus longest answer fits the cache: left padding
        makes every row as wide as the widest prompt, so two requests that fit alone may not together."""
        groups: list[list[EngineRequest]] = []
        for request in requests:
            group = next((g for g in groups if self._fits_together([*g, request])), None)
            if group is None:
                groups.append([request])
            else:
                group.append(request)
        return groups

    def _fits_together(self, requests: list[EngineRequest]) -> bool:
        return self.fits(max(r.inputs["input_ids"].shape[1] for r in requests),
                         max(r.settings.max_new_tokens for r in requests))

    def _run_batch(self, requests: list[EngineRequest]) -> None:
        for group in self._fitting_groups(requests):
            try:
                self._decode(group)
            except BaseException as err:  # reported to every waiting caller, the worker lives on
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                for request in group:
                    request.out.put(err)
                    request.out.put(_DONE)

    @torch.inference_mode()
    def _decode(self, requests: list[EngineRequest]) -> None:
        batch = self._batch_bucket(len(requests))
        self.batch_sizes[len(requests)] += 1
        inputs = self._collate(requests, batch)
        prompt_len = inputs["input_ids"].shape[1]
        limits = [r.settings.max_new_tokens for r in requests]
        budget = max(limits)
        if not self.fits(prompt_len, budget):  # _submit and _fitting_groups keep this from happening
            raise ValueError(f"the prompt ({prompt_len} tokens) and {budget} new tokens exceed the largest cache "
                             f"({self.max_len})")
        slot = self._slot(batch, self._length_bucket(prompt_len + budget))
        generators = [self._generator(r.settings) for r in requests]
        started = time.perf_counter()
        logits = slot.prefill(inputs)
        finished = [False] * len(requests)
        counts = [0] * len(requests)
        for step in range(budget):
            tokens = self._choose(logits, requests, generators)
            chosen = tokens.tolist()  # one sync per step: the tokens are needed on the host to stream
            for i, request in enumerate(requests):
                if finished[i]:
                    continue
                token = chosen[i]
                if token in self.loaded.stop_token_ids and not self.ignore_stop_tokens:
                    finished[i] = True
                    continue
                request.unsent.append(token)
                counts[i] += 1
                if counts[i] >= limits[i] or request.stop.is_set():
                    finished[i] = True
            for i, request in enumerate(requests):
                if not finished[i] and request.stop.is_set():
                    finished[i] = True
                self._flush(request, force=finished[i] or step == 0)
            if step == 0:
                self.last_timings = {"queue_s": started - requests[0].submitted,
                                     "prefill_and_first_token_s": time.perf_counter() - started}
            if all(finished) or step == budget - 1:
                break
            logits = slot.decode(tokens, prompt_len + step)
        for request in requests:
            self._flush(request, force=True)
            request.out.put(_DONE)

    def _flush(self, request: EngineRequest, force: bool) -> None:
        now = time.perf_counter()
        if request.unsent and (force or now - request.last_flush >= self.flush_s):
            request.out.put(request.unsent)
            request.unsent = []
            request.last_flush = now

    def _generator(self, settings: Any) -> torch.Generator | None:
        if not settings.do_sample:
            return None
        generator = torch.Generator(device=self.device)
        if settings.seed is not None:
            generator.manual_seed(settings.seed)
        else:
            generator.seed()
        return generator

    def _choose(self, logits: torch.Tensor, requests: list[EngineRequest],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        """Next token per row: greedy or sampled (temperature, top-k, top-p), never an image token."""
        logits = logits.clone()
        logits[:, self.suppress] = float("-inf")
        tokens = logits.argmax(-1)
        for i, (request, generator) in enumerate(zip(requests, generators)):
            if generator is None:
                continue
            tokens[i] = self._sample(logits[i], request.settings, generator)
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, settings: Any, generator: torch.Generator) -> torch.Tensor:
        scores = logits / settings.temperature
        if settings.top_k:
            kth = torch.topk(scores, min(settings.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if settings.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) > settings.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
