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

Options that make the step faster (each off by default until measured on the GPU; see
bench/generate_speed.notes.md):
  compile_step      the decode step through torch.compile (inductor fuses the norms, rotary, casts and
                    masks into few kernels), still captured in the engine's own CUDA graph
  decode_attention  "model": the model's own attention over the whole cache (the default); "filled": the
                    engine runs Gemma 3's layers itself with an attention that reads only the cache slots
                    filled so far, rounded up to attention_chunk (one graph per such length)
  choose_in_graph   greedy choice and sampling inside the graph: only the chosen ids (B ints) reach the
                    host, while the next step already runs; sampling draws reproducible noise from the seed
  compile_vision    the image encoder through torch.compile (first token)

    engine = DecodeEngine(loaded)            # loaded = radiology.generate.load_for_generation(...)
    engine.warm_up(image)                    # captures the graphs before the first user arrives
    for text in engine.stream(inputs, settings, stop):   # text so far, as it grows
        ...
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from radiology.tokens import StreamedText, never_generated, special_ids

__all__ = ["COMPILE_MODES", "DECODE_ATTENTIONS", "DecodeEngine", "EngineRequest", "static_cache_bytes",
           "uniform_noise"]

logger = logging.getLogger(__name__)

_DONE = object()
_DEFAULT_MAX_LEN = 8192  # the largest cache by default: 4.25 GiB for Gemma 3 4B at batch 4
DECODE_ATTENTIONS = ("model", "filled")
# torch.compile modes that add no CUDA graphs of their own: the engine captures the step itself.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class EngineRequest:
    inputs: dict[str, torch.Tensor]  # one prompt: input_ids (1, L), attention_mask, token_type_ids, pixel_values
    settings: Any  # radiology.generate.GenerationSettings
    stop: threading.Event
    out: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # for benchmarks: first_put (a perf_counter), handover_s
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


def _multimodal_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose get_image_features runs the vision tower and projector, under PEFT or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


# ---------------------------------------------------------------------- noise for sampling in a graph


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 that has its bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors. Multiplication wraps modulo 2**64; the right shifts are
    arithmetic on int64, so each is masked to the bits a logical shift keeps."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _signed(0x94D049BB133111EB)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, draw: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) float32 numbers in (0, 1), a function of each row's seed, the draw number and the
    token id only: no generator state, so a captured graph draws fresh numbers on every replay (draw
    is a buffer it advances) and a seeded request repeats whatever else shares its batch."""
    row = _mix(seeds * _GOLDEN + draw)
    ids = torch.arange(1, vocab + 1, device=seeds.device)
    bits = _mix(row[:, None] + ids * _GOLDEN)
    # 23 bits and a half: exact in float32, so never 0 or 1 (whose logarithms would be infinite).
    return (((bits >> 41) & ((1 << 23) - 1)).float() + 0.5) * 2.0**-23


def _choose_on_device(logits: torch.Tensor, suppress: torch.Tensor, sampled: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor, draw: torch.Tensor,
                      any_sampled: bool) -> torch.Tensor:
    """Next token per row (B,) from logits (B, V), on the device: greedy (the first highest logit, as
    argmax over plain generate's float32 copy picks it) or, in rows with ``sampled``, a draw from the
    distribution that temperature, top-k then top-p leave (the Gumbel-max trick on uniform_noise)."""
    greedy = logits.masked_fill(suppress, float("-inf")).argmax(-1)
    if not any_sampled:
        return greedy
    scores = logits.float().masked_fill(suppress, float("-inf")) / temperature[:, None]
    vocab = scores.shape[-1]
    ordered, order = scores.sort(-1, descending=True)
    keep = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = ordered.gather(-1, (keep - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th stay, as in topk
    probs = ordered.softmax(-1)
    # Keep the token that crosses top_p; top_p 1 keeps all (rounding must not drop the tail).
    drop = (probs.cumsum(-1) - probs > top_p[:, None]) & (top_p[:, None] < 1)
    ordered = ordered.masked_fill(drop, float("-inf"))
    kept = torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, draw, vocab)))
    return torch.where(sampled, (kept + gumbel).argmax(-1), greedy)


# ---------------------------------------------------------------------- decode steps


def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                      scaling: float, softcap: float | None) -> torch.Tensor:
    """One new token's attention over the given cache slots, in float32: query (B, Hq, 1, D), keys and
    values (B, Hkv, L, D), visible (B, 1, 1, L). Query heads are grouped by their KV head (no repeated
    copy of the cache); returns (B, 1, Hq * D) in the query's dtype."""
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, keys.shape[1], heads // keys.shape[1], dim).float()
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(scores.softmax(-1), values.float())
    return out.to(query.dtype).reshape(batch, 1, heads * dim)


def _model_logits(slot: _Slot, visible: torch.Tensor) -> torch.Tensor:
    """The decode step through the text model's own forward (its attention over the whole cache)."""
    hidden = slot.language_model(
        input_ids=slot.tokens, attention_mask=slot.decode_masks(visible),
        position_ids=slot.positions, cache=slot.cache, use_cache=True,
    ).last_hidden_state
    return slot.head(hidden[:, -1])


def _filled_logits(slot: _Slot, visible: torch.Tensor) -> torch.Tensor:
    """The decode step with Gemma 3's layers run here, their modules called as the model calls them
    (LoRA and 4-bit layers included), and an attention that reads only the first ``visible.shape[1]``
    cache slots. The new token's keys and values go to slot ``cursor``."""
    lm, length = slot.language_model, visible.shape[1]
    hidden = lm.embed_tokens(slot.tokens)
    rotary = {kind: lm.rotary_emb(hidden, slot.positions, kind) for kind in dict.fromkeys(slot.layer_kinds)}
    masks = slot.decode_masks(visible, boolean=True)
    at = slot.cursor.view(1)
    for index, layer in enumerate(lm.layers[: len(slot.layer_kinds)]):
        kind, attention = slot.layer_kinds[index], layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attention.head_dim)
        query = attention.q_norm(attention.q_proj(x).view(shape).transpose(1, 2))
        key = attention.k_norm(attention.k_proj(x).view(shape).transpose(1, 2))
        value = attention.v_proj(x).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rotary[kind])
        cache = slot.cache.layers[index]
        cache.keys.index_copy_(2, at, key)
        cache.values.index_copy_(2, at, value)
        x = _decode_attention(query, cache.keys[:, :, :length], cache.values[:, :, :length], masks[kind],
                              attention.scaling, attention.attn_logit_softcapping)
        hidden = residual + layer.post_attention_layernorm(attention.o_proj(x))
        residual = hidden
        hidden = residual + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    return slot.head(lm.norm(hidden)[:, -1])


def _check_filled_attention(model: torch.nn.Module) -> None:
    """decode_attention="filled" runs Gemma 3's decoder layers itself: refuse other layouts up front."""
    language_model, _ = _text_parts(model)
    config = model.config.get_text_config()
    layer = language_model.layers[0]
    needed = ["self_attn.q_norm", "self_attn.k_norm", "self_attn.scaling", "self_attn.head_dim",
              "pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_layernorm"]
    missing = [name for name in needed if not _has_path(layer, name)]
    if missing or not getattr(config, "layer_types", None) or not hasattr(language_model, "rotary_emb"):
        raise ValueError(f"decode_attention='filled' runs Gemma 3's decoder layers; this model's layers lack "
                         f"{', '.join(missing) or 'layer_types/rotary_emb'}. Use decode_attention='model'")


def _has_path(module: Any, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(module, name):
            return False
        module = getattr(module, name)
    return True


@dataclass
class _Greedy:
    """Greedy settings with the fields the engine reads (radiology.generate.GenerationSettings')."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class _Marks:
    """Named points in time for last_timings: CUDA events on a GPU (read after the first token's sync,
    so measuring adds none), the host's clock on the CPU (whose ops finish before they return)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points[name] = event
        else:
            self.points[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        first, last = self.points[start], self.points[end]
        return first.elapsed_time(last) / 1000 if self.cuda else last - first


class _TokenReader:
    """Each step's chosen ids (B ints) copied to the host behind the step that chose them, in two
    alternating pinned buffers: the host reads step t while the device already runs step t + 1."""

    def __init__(self, tokens: torch.Tensor):
        self.source = tokens
        cuda = tokens.device.type == "cuda"
        self.buffers = [torch.empty(tokens.numel(), dtype=tokens.dtype, pin_memory=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self.written = self.read = 0

    def reset(self) -> None:
        self.written = self.read = 0

    def enqueue(self) -> None:
        index = self.written % 2
        self.buffers[index].copy_(self.source.view(-1), non_blocking=True)
        if self.events is not None:
            self.events[index].record()
        self.written += 1

    def take(self) -> list[int]:
        index = self.read % 2
        if self.events is not None:
            self.events[index].synchronize()
        self.read += 1
        return self.buffers[index].tolist()


class _Slot:
    """A static cache of one length for one batch size, the buffers its decode step reads and writes,
    and the step's CUDA graphs (one per attention length and kind of choice)."""

    def __init__(self, engine: DecodeEngine, batch: int, max_len: int):
        model = engine.model
        self.model, self.batch, self.max_len, self.use_graphs = model, batch, max_len, engine.use_graphs
        self.language_model, self.head = _text_parts(model)
        self.filled, self.chunk = engine.decode_attention == "filled", engine.attention_chunk
        self.choose_in_graph, self.compiled = engine.choose_in_graph, engine.compile_step
        self.logits_fn = engine.logits_fn
        self.image_features = engine.image_features
        device = next(model.parameters()).device
        text_config = model.config.get_text_config()
        self.layer_kinds = list(getattr(text_config, "layer_types", None) or [])[: text_config.num_hidden_layers]
        # Full-length static layers everywhere, sliding ones included: every size and offset stays a
        # tensor or a constant (a captured graph cannot follow Python counters, which transformers'
        # sliding static layers keep), and the decode mask below applies the window.
        self.cache = Cache(layers=[StaticLayer(max_cache_len=max_len) for _ in range(text_config.num_hidden_layers)])
        self.eager = text_config._attn_implementation == "eager"
        self.dtype = next(self.head.parameters()).dtype
        window = getattr(text_config, "sliding_window", None)
        # Below the window the sliding mask equals the full one: such a cache needs no second mask. A
        # compiled step builds it anyway (it changes nothing there), so that every cache length shares
        # one compile.
        self.window = window if window is not None and (max_len > window or self.compiled) else None
        # Static buffers: a captured graph reads and writes these same addresses on every replay.
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, max_len), dtype=torch.long, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)  # the slot the new token is written to
        self.slots = torch.arange(max_len, device=device)
        # Sampling settings per row and the draw number, for the choice inside the graph.
        self.suppress = engine.suppress_mask
        self.sampled = torch.zeros(batch, dtype=torch.bool, device=device)
        self.temperature = torch.ones(batch, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)
        self.draw = torch.zeros((), dtype=torch.long, device=device)
        self.any_sampled = False
        self.reader = _TokenReader(self.tokens)
        # (attention length, any row sampled) -> (graph, its output: float32 logits, or None when the
        # graph writes the chosen tokens into `tokens` itself)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}

    # -------------------------------------------------------------- masks

    def decode_masks(self, visible: torch.Tensor, boolean: bool = False) -> dict[str, torch.Tensor]:
        """(B, 1, 1, L) per layer type, for the first L = visible.shape[1] slots: each new token sees every
        filled cache slot of its row; in the sliding layers only the last `window` of them (its own
        included), as plain generate's sliding cache and mask do. Built from buffers only, so that a
        captured graph rebuilds it."""
        seen = visible[:, None, None, :].bool()
        sliding = seen
        if self.window is not None:
            sliding = seen & (self.slots[: visible.shape[1]] > self.cursor - self.window)
        if boolean:
            return {"full_attention": seen, "sliding_attention": sliding}
        return {"full_attention": self._attention_mask(seen), "sliding_attention": self._attention_mask(sliding)}

    def _attention_mask(self, visible: torch.Tensor) -> torch.Tensor:
        if not self.eager:
            return visible  # sdpa takes a boolean mask
        return torch.zeros(visible.shape, dtype=self.dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min)

    # -------------------------------------------------------------- prefill

    def reset(self) -> None:
        self.cache.reset()
        self.mask.zero_()

    def prefill(self, inputs: dict[str, torch.Tensor], marks: _Marks) -> torch.Tensor:
        """Run the whole prompt (images included) into the cache; returns the last logits (B, V).

        transformers builds the prefill's masks itself, in cache-slot coordinates, and applies the
        sliding window there whatever the cache layers (an and-mask on the sliding layers' mask),
        so a prompt longer than the window is exact as it is."""
        self.reset()
        length = inputs["input_ids"].shape[1]
        attention = inputs["attention_mask"]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from 0
        text = {key: value for key, value in inputs.items() if key != "pixel_values"}
        marks.mark("vision_start")
        if "pixel_values" in inputs:
            # The encoder's output handed to the model as it would compute it itself: the same features,
            # timed apart (and compiled, with compile_vision).
            features = self.image_features(inputs["pixel_values"])
            text["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        marks.mark("vision_end")
        out = self.model(**text, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        marks.mark("prefill_end")
        self.mask[:, :length] = attention
        self.positions.copy_(positions[:, -1:] + 1)
        self.cursor.fill_(length)
        return out.logits[:, -1]

    # -------------------------------------------------------------- choice on the device

    def set_sampling(self, settings: Sequence[Any]) -> None:
        """Each row's decoding settings (one per row) for choose(); a row without a seed gets a random one."""
        sampled = [bool(s.do_sample) for s in settings]
        self.any_sampled = any(sampled)
        seeds = [(s.seed if s.seed is not None else secrets.randbits(62)) if s.do_sample else 0 for s in settings]
        device = self.sampled.device
        self.sampled.copy_(torch.tensor(sampled, device=device))
        self.temperature.copy_(torch.tensor([float(s.temperature) if s.do_sample else 1.0 for s in settings]))
        self.top_k.copy_(torch.tensor([int(s.top_k) if s.do_sample else 0 for s in settings]))
        self.top_p.copy_(torch.tensor([float(s.top_p) if s.do_sample else 1.0 for s in settings]))
        self.seeds.copy_(torch.tensor(seeds))
        self.draw.zero_()

    def choose(self, logits: torch.Tensor, any_sampled: bool) -> None:
        """The next tokens from logits (B, V) into `tokens`, on the device; advances the draw number."""
        chosen = _choose_on_device(logits, self.suppress, self.sampled, self.temperature, self.top_k, self.top_p,
                                   self.seeds, self.draw, any_sampled)
        self.tokens.copy_(chosen.view(-1, 1))
        self.draw.add_(1)

    # -------------------------------------------------------------- decode

    def attention_length(self, position: int) -> int:
        """The cache slots the step at ``position`` reads: all of them, or with the filled attention the
        slots up to ``position`` rounded up to the chunk."""
        if not self.filled:
            return self.max_len
        return min(self.max_len, -(-(position + 1) // self.chunk) * self.chunk)

    def feed(self, next_tokens: torch.Tensor) -> None:
        """The tokens the next step writes (when the choice is made on the host's side of the graph)."""
        self.tokens.copy_(next_tokens.view(-1, 1))

    def advance(self, position: int) -> torch.Tensor | None:
        """One decode step for the tokens in `tokens`, written at cache slot ``position`` (which the
        buffers already point at). Returns float32 logits (B, V), or None with choose_in_graph, where the
        step itself writes the next tokens into `tokens`."""
        key = (self.attention_length(position), self.any_sampled)
        if not self.use_graphs:
            return self._step(*key)
        if key not in self.graphs:
            self._capture(*key)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _step(self, length: int, any_sampled: bool) -> torch.Tensor | None:
        """The work of one step, all of it on the device (what a graph captures): the new token's slot
        becomes visible, the model runs, the choice (with choose_in_graph), then the cursor and the
        positions move on."""
        self.mask.index_fill_(1, self.cursor.view(1), 1)
        visible = self.mask[:, :length]
        if self.compiled:
            self._mark_dynamic(visible)
        logits = self.logits_fn(self, visible)
        out = None
        if self.choose_in_graph:
            self.choose(logits, any_sampled)
        else:
            out = logits.float()
        self.cursor.add_(1)
        self.positions.add_(1)
        return out

    def _capture(self, length: int, any_sampled: bool) -> None:
        # Warm up on a side stream (allocator, kernel selection, and the compile with compile_step),
        # then capture. The warm-up step changes the buffers it advances; they are put back, and the
        # cache slot it wrote is written again by the real step.
        saved = self._state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(length, any_sampled)
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(length, any_sampled)
        self.graphs[(length, any_sampled)] = (graph, out)

    def _mark_dynamic(self, visible: torch.Tensor) -> None:
        """Tell torch.compile that the attention length and the cache length vary, so that one compile
        serves them all (batch size 1 is always compiled apart, and the first larger batch once more):
        otherwise each new length would compile the step again, at app start-up or mid-request."""
        for tensor in [self.slots, *(t for layer in self.cache.layers for t in (layer.keys, layer.values))]:
            torch._dynamo.maybe_mark_dynamic(tensor, 2 if tensor.dim() > 1 else 0)
        torch._dynamo.maybe_mark_dynamic(self.mask, 1)
        torch._dynamo.maybe_mark_dynamic(visible, 1)

    def _state(self) -> list[torch.Tensor]:
        buffers = [self.tokens, self.positions, self.mask, self.cursor, self.draw]
        buffers += [layer.cumulative_length for layer in self.cache.layers if hasattr(layer, "cumulative_length")]
        return [buffer.clone() for buffer in buffers]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        buffers = [self.tokens, self.positions, self.mask, self.cursor, self.draw]
        buffers += [layer.cumulative_length for layer in self.cache.layers if hasattr(layer, "cumulative_length")]
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


class DecodeEngine:
    """Owns the model on one device; serves requests from a worker thread, in batches.

    ``max_len`` caps the cache (default: 8192 positions, or the model's max_position_embeddings if
    smaller): a prompt plus max_new_tokens above it is refused here (``fits``) and radiology.generate
    gives it to plain generate. ``min_len`` is the smallest cache (default 1024), the one that
    ``warm_up`` captures for every batch size; longer requests take the next doubling.

    The speed options (module docstring) are off by default: ``compile_step`` with ``compile_mode``
    (one of COMPILE_MODES), ``decode_attention`` ("model" or "filled") with ``attention_chunk``,
    ``choose_in_graph``, ``compile_vision``. Each keeps greedy answers those of plain generate up to
    float rounding (the tests check token equality on the tiny model).
    """

    def __init__(self, loaded: Any, max_batch: int = 4, max_len: int | None = None, use_graphs: bool | None = None,
                 batch_wait_s: float = 0.01, min_len: int = 1024, *, compile_step: bool = False,
                 compile_mode: str = "default", decode_attention: str = "model", attention_chunk: int = 256,
                 choose_in_graph: bool = False, compile_vision: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        if min_len < 1 or (max_len is not None and max_len < 1):
            raise ValueError(f"the engine's cache lengths must be at least 1 position, got min_len={min_len}, "
                             f"max_len={max_len}; leave them out for 1024 and 8192")
        if decode_attention not in DECODE_ATTENTIONS:
            raise ValueError(f"decode_attention={decode_attention!r} is not one of {', '.join(DECODE_ATTENTIONS)}; "
                             "leave it out for the model's own attention")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r}: the engine captures the step in its own CUDA graph, so "
                             f"the mode must add none of its own; use one of {', '.join(COMPILE_MODES)}")
        if attention_chunk < 1:
            raise ValueError(f"attention_chunk must be at least 1 slot, got {attention_chunk}; leave it out for 256")
        if decode_attention == "filled":
            _check_filled_attention(self.model)
        self.compile_step, self.compile_mode, self.compile_vision = compile_step, compile_mode, compile_vision
        self.decode_attention, self.attention_chunk = decode_attention, attention_chunk
        self.choose_in_graph = choose_in_graph
        self.logits_fn: Callable[..., torch.Tensor] = _filled_logits if decode_attention == "filled" else _model_logits
        self.image_features: Callable[[torch.Tensor], torch.Tensor] = self._image_features
        if compile_step or compile_vision:
            # One compile per shape family: batch 1, then (automatically) dynamic batch sizes and cache
            # lengths; bf16 and 4-bit models of a benchmark each add theirs. Past the limit dynamo would
            # quietly run the step eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if compile_step:
            self.logits_fn = torch.compile(self.logits_fn, mode=compile_mode)
        if compile_vision:
            self.image_features = torch.compile(self._image_features, mode=compile_mode)
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
        vocab = text_config.vocab_size  # the width of the logits
        self.suppress_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppress_mask[self.suppress[self.suppress < vocab]] = True
        self.tokenizer = loaded.processor.tokenizer
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()  # (batch, length), least recent first
        self._pending: queue.Queue[EngineRequest] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.ignore_stop_tokens = False  # benchmarks force a fixed number of new tokens
        # Each token goes to its reader as soon as it is chosen. (Handing them over in 40 ms batches
        # was tried: single-request decode did not change and 4 concurrent requests got slower.)
        self.flush_s = 0.0
        # The last batch's first token, in seconds: queue_s (submission to the worker's start, batch_wait_s
        # included), collate_s (padding and the copy to the device), vision_s (image encoder and
        # projector), prefill_s (the text model over the prompt), first_choice_s (choosing the first
        # token and reading it on the host), prefill_and_first_token_s (the last three and the copy),
        # handover_s (the worker's hand-over to the reading thread).
        self.last_timings: dict[str, float] = {}
        self.batch_sizes: Counter[int] = Counter()  # how many requests each decoded batch carried

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected image features (images, tokens per image, hidden) the model itself computes."""
        return _multimodal_model(self.model).get_image_features(pixel_values=pixel_values, return_dict=True
                                                                ).pooler_output

    # ------------------------------------------------------------------ public API

    def stream(self, inputs: dict[str, torch.Tensor], settings: Any, stop: threading.Event | None = None
               ) -> Iterator[str]:
        """Yields the answer as it grows. Setting ``stop`` (or closing the iterator) ends it early."""
        (request,) = self._submit([inputs], settings, stop or threading.Event())
        ids: list[int] = []
        try:
            for chunk in self._answer(request):
                ids.extend(chunk)
                yield StreamedText(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids))
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

    def warm_up(self, inputs: dict[str, torch.Tensor], settings: Any, batch_sizes: Sequence[int] | None = None
                ) -> float:
        """Capture every batch size's graph now (or those of ``batch_sizes``), so that no user pays for it
        (nor for the compiles, with compile_step or compile_vision); returns seconds. These are the graphs
        of the first cache length (min_len), which short prompts use; a request that needs a longer cache,
        or with decode_attention="filled" a longer stretch of it, captures its graph when it first arrives.

        It runs on the worker thread itself: CUDA libraries create their per-thread handles and
        workspaces on a thread's first use, which would otherwise land on the first user's request.
        """
        start = time.perf_counter()
        if batch_sizes is None:
            batch_sizes = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i <= self.max_batch]
        for size in batch_sizes:
            self.generate_many([inputs] * size, settings)  # submitted together: one batch of `size`
        return time.perf_counter() - start

    @torch.inference_mode()
    def time_steps(self, inputs: dict[str, torch.Tensor], steps: int = 16, trace: Any = None) -> float:
        """Seconds per greedy decode step after prefilling one prompt, the steps run back to back on the
        calling thread with no token read on the host in between: the device's time per token (the
        graph, and the choice wherever it is made) without the per-token hand-over. ``trace``: a
        torch.profiler.profile, started and stopped around the timed steps only. For benchmarks and
        profiles; call it while no request is being served."""
        request = EngineRequest(inputs=inputs, settings=_Greedy(steps + 1), stop=threading.Event())
        batch_inputs = self._collate([request], 1)
        prompt_len = batch_inputs["input_ids"].shape[1]
        slot = self._slot(1, self._length_bucket(prompt_len + steps + 2))
        logits = slot.prefill(batch_inputs, _Marks(self.device))

        def step(position: int, logits: torch.Tensor | None) -> torch.Tensor | None:
            if not self.choose_in_graph:
                slot.feed(self._choose(logits.float(), [request], [None]))
            return slot.advance(position)

        if self.choose_in_graph:
            slot.set_sampling([request.settings])
            slot.choose(logits, False)
        logits = step(prompt_len, logits)  # captures the graph (and compiles) outside the timing
        self._synchronize()
        if trace is not None:
            trace.start()
        start = time.perf_counter()
        for position in range(prompt_len + 1, prompt_len + 1 + steps):
            logits = step(position, logits)
        self._synchronize()
        seconds = (time.perf_counter() - start) / steps
        if trace is not None:
            trace.stop()
        return seconds

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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

    def _answer(self, request: EngineRequest) -> Iterator[list[int]]:
        """The request's new token ids, chunk by chunk as the worker hands them over, until it is
        done; a failure in the worker is raised here, in the caller's thread."""
        while (item := request.out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if "handover_s" not in request.timings and "first_put" in request.timings:
                request.timings["handover_s"] = time.perf_counter() - request.timings["first_put"]
                self.last_timings["handover_s"] = request.timings["handover_s"]
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
        self._slots[key] = _Slot(self, batch, length)
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
        picked = time.perf_counter()
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
        generators = [] if self.choose_in_graph else [self._generator(r.settings) for r in requests]
        started = time.perf_counter()
        marks = _Marks(self.device)
        logits = slot.prefill(inputs, marks)
        if self.choose_in_graph:
            # Rows past len(requests) repeat the last request (see _collate), its settings included.
            slot.set_sampling([r.settings for r in requests] + [requests[-1].settings] * (batch - len(requests)))
            slot.choose(logits, slot.any_sampled)
            # Marked before the copy whose completion the host waits for: the event is then complete too.
            marks.mark("first_choice")
            slot.reader.reset()
            slot.reader.enqueue()
        else:
            tokens = self._choose(logits.float(), requests, generators)
            marks.mark("first_choice")
        finished = [False] * len(requests)
        counts = [0] * len(requests)
        for step in range(budget):
            last = step == budget - 1
            if self.choose_in_graph:
                if not last:
                    # The next step runs on the device while this step's tokens are handed over.
                    slot.advance(prompt_len + step)
                    slot.reader.enqueue()
                chosen = slot.reader.take()
            else:
                chosen = tokens.tolist()  # one sync per step: the tokens are needed on the host to stream
            if step == 0:
                self._record_first_token(requests, picked, started, marks)
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
            if all(finished) or last:
                break
            if not self.choose_in_graph:
                slot.feed(tokens)
                logits = slot.advance(prompt_len + step)
                tokens = self._choose(logits, requests, generators)
        for request in requests:
            self._flush(request, force=True)
            request.out.put(_DONE)

    def _record_first_token(self, requests: list[EngineRequest], picked: float, started: float, marks: _Marks
                            ) -> None:
        """last_timings for this batch; called once its first tokens are on the host (so every event is
        complete)."""
        now = time.perf_counter()
        self.last_timings = {
            "queue_s": picked - requests[0].submitted,
            "collate_s": started - picked,
            "vision_s": marks.seconds("vision_start", "vision_end"),
            "prefill_s": marks.seconds("vision_end", "prefill_end"),
            "first_choice_s": marks.seconds("prefill_end", "first_choice"),
            "prefill_and_first_token_s": now - started,
        }
        requests[0].timings["first_put"] = now  # the request whose queue_s this is

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
