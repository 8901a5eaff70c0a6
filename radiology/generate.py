"""Generate stage: image (+ instruction) -> description, whole, batched or streamed. Used by the app,
evaluation and this command line:

    python -m radiology.generate --model runs/r1/merged --image chest.png
    python -m radiology.generate --model google/gemma-3-4b-pt --adapter runs/r1 --load_in_4bit --image chest.png --stream
    python -m radiology.generate --model runs/r1/merged --image pa.png --image lateral.png --prior last_year.png
    python -m radiology.generate --model runs/r1/merged --image ct_series/ --max_images 8 --window multi
    python -m radiology.generate --model runs/r1/merged --image study.zip --series 2 --slices 20-60

Works from a merged folder, from a base model plus an adapter, and in 4-bit. Batches pad on the
left, so that every row's answer starts right after its prompt; greedy answers are the same as one
image at a time.
"""

from __future__ import annotations

import argparse
import gc
import math
import numbers
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    PreTrainedModel,
    ProcessorMixin,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from radiology.data import DEFAULT_INSTRUCTION, REPORT_FORMATS, Dialogue, control_token_in, decode_image, with_report_format
from radiology.dicom import has_dicom_preamble, read_dicom_image
from radiology.series import (
    ALL_WINDOWS,
    DEFAULT_MAX_IMAGES,
    SeriesError,
    describe_indices,
    load_series,
    parse_slice_range,
    render_series,
    sample_indices,
)
from radiology.modeling import check_vision_language_model, load_processor
from radiology.tokens import StreamedText, never_generated, special_ids, stop_ids

__all__ = [
    "GenerationSettings",
    "ImageInput",
    "AnsweringModel",
    "LoadedModel",
    "SideBySideTexts",
    "StopSignal",
    "StreamedText",
    "StudyImages",
    "StudyInput",
    "add_generation_arguments",
    "build_batch_inputs",
    "build_inputs",
    "describe_study",
    "generate_batch",
    "generate_text",
    "load_for_generation",
    "paced",
    "read_study",
    "settings_from_args",
    "stream_side_by_side",
    "stream_text",
    "study_images",
    "warm_up",
]


_MAX_SEED = 2**32 - 1  # the largest seed every generator takes (NumPy's is 32-bit)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class GenerationSettings:
    """Decoding settings. Greedy by default (deterministic); sampling when do_sample is set."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        # Each check names the setting (the command line's flag without "--") and its valid range.
        if not _is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be above 0 when sampling, got {self.temperature!r} "
                             "(or turn sampling off for greedy decoding)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number, 0 (off) or more, got {self.top_k!r}")
        if self.seed is not None and (not _is_integer(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise ValueError(f"seed must be a whole number from 0 to {_MAX_SEED} (or none for a random one), "
                             f"got {self.seed!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
            "max_new_tokens": self.max_new_tokens,
        }

    def describe(self) -> str:
        if not self.do_sample:
            return f"greedy, max {self.max_new_tokens} new tokens"
        seed = "random seed" if self.seed is None else f"seed {self.seed}"
        return (
            f"sampling: temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k}, "
            f"max {self.max_new_tokens} new tokens, {seed}"
        )


@dataclass
class LoadedModel:
    """A model ready to generate. ``close()`` (or leaving a ``with`` block) frees it:

        with load_for_generation("runs/r1/merged") as loaded:
            print(generate_text(loaded, "chest.png"))
    """

    model: PreTrainedModel
    processor: ProcessorMixin
    name: str
    precision: str
    device: str
    stop_token_ids: list[int] = field(default_factory=list)
    engine: Any = None  # radiology.engine.DecodeEngine when fast decoding is on

    def close(self) -> None:
        """Free the model: end the decode engine (its worker thread holds the model), drop the model
        and processor, and hand cached GPU memory back. Generating afterwards is refused."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.model = None  # type: ignore[assignment]
        self.processor = None  # type: ignore[assignment]
        gc.collect()  # the model's own reference cycles: freed now, before the cache is emptied
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def closed(self) -> bool:
        return self.model is None

    def stream_answer(
        self,
        images: StudyImages,
        instruction: str | None = None,
        settings: GenerationSettings | None = None,
        context: str | None = None,
        stop: threading.Event | None = None,
        prior: ImageInput | None = None,
        dialogue: Dialogue | None = None,
    ) -> Iterator[str]:
        """``stream_text`` on this model (the method ``AnsweringModel`` names)."""
        return stream_text(self, images, instruction, settings, context, stop, prior, dialogue=dialogue)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _require_open(loaded: LoadedModel) -> None:
    if loaded.closed:
        raise RuntimeError(f"the model {loaded.name} was closed; load it again with load_for_generation")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_generation(
    model: str,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    device: str | None = None,
    processor_name_or_path: str | None = None,
    attn_implementation: str | None = None,
    fast: bool = True,
    max_batch: int = 4,
) -> LoadedModel:
    """Load a merged folder, a hub id, or a base + LoRA adapter, in bf16 or 4-bit NF4.

    With ``fast`` (the default) generation runs through radiology.engine: a static KV cache,
    CUDA-graph decode steps on a GPU, and concurrent requests decoded together (up to max_batch).
    The engine's worker thread keeps the model alive: ``close()`` the result (or use it in a
    ``with`` block) to free it.
    """
    device = device or _default_device()
    check_vision_language_model(model)  # a text-only checkpoint is refused before any weights load
    if load_in_4bit and device == "cpu":
        # bitsandbytes runs NF4 on CPU, slowly; allowed for checks, said out loud.
        print("note: 4-bit on CPU is slow; it is meant for tests", file=sys.stderr)
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        if load_in_4bit
        else None
    )
    loaded = AutoModelForImageTextToText.from_pretrained(
        model,
        dtype=torch.bfloat16,
        quantization_config=quantization,
        attn_implementation=attn_implementation,
        device_map={"": device} if device != "cpu" or load_in_4bit else None,
    )
    processor_source = model
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter)
        if (Path(adapter) / "processor_config.json").exists():
            processor_source = adapter
    processor = load_processor(processor_source, processor_name_or_path)
    loaded.eval()
    name = Path(model).name if Path(model).exists() else model
    if adapter:
        name += f" + {Path(adapter).name}"
    result = LoadedModel(
        model=loaded,
        processor=processor,
        name=name,
        precision="4-bit NF4" if load_in_4bit else "bf16",
        device=str(device),
        stop_token_ids=stop_ids(processor),
    )
    if fast:
        from radiology.engine import DecodeEngine

        result.engine = DecodeEngine(result, max_batch=max_batch)
    return result


def warm_up(loaded: LoadedModel, settings: GenerationSettings | None = None) -> float:
    """Run the first generations now (CUDA-graph capture for every batch size), so the first user
    does not wait for them; returns the seconds spent."""
    from PIL import Image

    _require_open(loaded)
    start = time.perf_counter()
    inputs = build_inputs(loaded.processor, Image.new("RGB", (64, 64)), DEFAULT_INSTRUCTION)
    settings = settings or GenerationSettings(max_new_tokens=4)
    if loaded.engine is not None:
        loaded.engine.warm_up(inputs, settings)
    else:
        generate_text(loaded, Image.new("RGB", (64, 64)), settings=settings)
    return time.perf_counter() - start


ImageInput = Image.Image | str | Path
# One prompt's images: one image, or several of one study in order (slices of a series, two views).
StudyImages = ImageInput | Sequence[ImageInput]


def study_images(images: StudyImages) -> list[ImageInput]:
    """One prompt's images as a list (a single image, path or string is one image)."""
    if isinstance(images, (Image.Image, str, Path)):
        return [images]
    listed = list(images)
    if not listed:
        raise ValueError("no image: a prompt needs at least one")
    return listed


def _prompt(processor: ProcessorMixin, instruction: str | None, context: str | None, images: int = 1,
            prior: bool = False, dialogue: Dialogue | None = None) -> str:
    messages = (dialogue or Dialogue()).messages(instruction or DEFAULT_INSTRUCTION, context, images, prior)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _decoded(image: ImageInput) -> Image.Image:
    return decode_image(image if not isinstance(image, Path) else str(image))


def build_batch_inputs(
    processor: ProcessorMixin,
    images: Sequence[StudyImages],
    instruction: str | None = None,
    contexts: Sequence[str | None] | None = None,
    priors: Sequence[ImageInput | None] | None = None,
    dialogues: Sequence[Dialogue | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenized prompts + pixel values, one prompt per item of ``images`` (one image, or a study's
    several), padded on the left. ``priors``: a prior study's image per prompt (or None), placed first
    and labelled as the prior in the prompt. ``dialogues``: per prompt, a question that replaces the
    instruction and the earlier turns of a conversation (radiology.data.Dialogue; None: the instruction)."""
    if contexts is None:
        contexts = [None] * len(images)
    if priors is None:
        priors = [None] * len(images)
    if dialogues is None:
        dialogues = [None] * len(images)
    if len(contexts) != len(images) or len(priors) != len(images) or len(dialogues) != len(images):
        raise ValueError(f"{len(contexts)} contexts, {len(priors)} priors and {len(dialogues)} dialogues for "
                         f"{len(images)} prompts: give one of each per prompt (or none)")
    pictures = [
        ([_decoded(prior)] if prior is not None else []) + [_decoded(image) for image in study_images(row)]
        for row, prior in zip(images, priors)
    ]
    prompts = [
        _prompt(processor, instruction, context, len(row), prior is not None, dialogue)
        for row, context, prior, dialogue in zip(pictures, contexts, priors, dialogues)
    ]
    # Left padding: generation appends after the last column, so every prompt must end there.
    return processor(
        text=prompts,
        images=pictures,
        return_tensors="pt",
        add_special_tokens=False,
        padding=True,
        padding_side="left",
    )


def build_inputs(
    processor: ProcessorMixin,
    image: StudyImages,
    instruction: str | None = None,
    context: str | None = None,
    prior: ImageInput | None = None,
    dialogue: Dialogue | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenized prompt + pixel values for one image (or one study's several, and a prior; with ``dialogue``, a
    question or a conversation's next question), exactly as the training collator builds prompts."""
    return build_batch_inputs(processor, [image], instruction, [context], [prior], [dialogue])


class StopSignal(StoppingCriteria):
    """A stopping criterion that a UI button (or anything holding the event) can set."""

    def __init__(self, event: threading.Event | None = None):
        self.event = event or threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_kwargs(
    loaded: LoadedModel,
    inputs: dict[str, torch.Tensor],
    settings: GenerationSettings,
    stop: threading.Event | None,
) -> dict[str, Any]:
    device = loaded.model.device
    moved = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(torch.bfloat16)
    kwargs: dict[str, Any] = dict(
        **moved,
        **settings.generate_kwargs(),
        eos_token_id=loaded.stop_token_ids,
        pad_token_id=special_ids(loaded.processor).pad,
        suppress_tokens=never_generated(loaded.processor),
    )
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopSignal(stop)])
    return kwargs


def _seed(settings: GenerationSettings) -> None:
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(settings.seed)


def generate_batch(
    loaded: LoadedModel,
    images: Sequence[StudyImages],
    instruction: str | None = None,
    settings: GenerationSettings | None = None,
    contexts: Sequence[str | None] | None = None,
    stop: threading.Event | None = None,
    priors: Sequence[ImageInput | None] | None = None,
    dialogues: Sequence[Dialogue | None] | None = None,
) -> list[str]:
    """The model's descriptions for several prompts in one batch, in order: one per item of ``images``
    (one image, or a study's several; with ``priors``, each prompt's prior study image or None; with
    ``dialogues``, each prompt's question or conversation, see build_batch_inputs).

    Greedy answers equal those of one prompt at a time; sampled ones depend on the batch's make-up.
    """
    if not images:
        return []
    _require_open(loaded)
    settings = settings or GenerationSettings()
    if contexts is not None and len(contexts) != len(images):
        raise ValueError(f"{len(contexts)} contexts for {len(images)} prompts: give one per prompt (or none)")
    if priors is not None and len(priors) != len(images):
        raise ValueError(f"{len(priors)} priors for {len(images)} prompts: give one per prompt (or none)")
    if dialogues is not None and len(dialogues) != len(images):
        raise ValueError(f"{len(dialogues)} dialogues for {len(images)} prompts: give one per prompt (or none)")
    if loaded.engine is not None:
        contexts = list(contexts) if contexts is not None else [None] * len(images)
        listed_priors = list(priors) if priors is not None else [None] * len(images)
        listed_dialogues = list(dialogues) if dialogues is not None else [None] * len(images)
        prompts = [build_inputs(loaded.processor, image, instruction, context, prior, dialogue)
                   for image, context, prior, dialogue in zip(images, contexts, listed_priors, listed_dialogues)]
        # Prompts whose answers could pass the engine's cache go to plain generate, which handles the
        # sliding window: an answer is never cut short.
        if all(loaded.engine.fits(p["input_ids"].shape[1], settings.max_new_tokens) for p in prompts):
            ids = loaded.engine.generate_many(prompts, settings, stop)
            return [loaded.processor.decode(row, skip_special_tokens=True).strip() for row in ids]
    inputs = build_batch_inputs(loaded.processor, images, instruction, contexts, priors, dialogues)
    prompt_length = inputs["input_ids"].shape[1]  # (B, T): all prompts end at column T (left padding)
    _seed(settings)
    with torch.inference_mode():
        output = loaded.model.generate(**_generate_kwargs(loaded, inputs, settings, stop))
    # Rows that stopped early are filled with pad, a special token that decoding skips.
    return [
        loaded.processor.decode(row[prompt_length:], skip_special_tokens=True).strip() for row in output
    ]


def generate_text(
    loaded: LoadedModel,
    image: StudyImages,
    instruction: str | None = None,
    settings: GenerationSettings | None = None,
    context: str | None = None,
    stop: threading.Event | None = None,
    prior: ImageInput | None = None,
) -> str:
    """The model's description of one image (or one study's several, with an optional prior)."""
    return generate_batch(loaded, [image], instruction, settings, [context], stop, [prior])[0]


class _TokenCount(StoppingCriteria):
    """Counts the tokens generate adds (never stops it): the last one, when it is a stop token, is not counted."""

    def __init__(self, prompt_length: int, stop_token_ids: Sequence[int]):
        self.prompt_length, self.stop_token_ids, self.new_tokens = prompt_length, set(stop_token_ids), 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.new_tokens = input_ids.shape[1] - self.prompt_length - int(input_ids[0, -1].item() in self.stop_token_ids)
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


def stream_text(
    loaded: LoadedModel,
    image: StudyImages,
    instruction: str | None = None,
    settings: GenerationSettings | None = None,
    context: str | None = None,
    stop: threading.Event | None = None,
    prior: ImageInput | None = None,
    dialogue: Dialogue | None = None,
) -> Iterator[StreamedText]:
    """Yields the description as it grows (each item is the text so far, a StreamedText that counts its
    tokens). With ``dialogue``, the answer to a question or to a conversation's next question (see
    build_batch_inputs). Setting ``stop`` ends generation at the next token; closing the iterator early sets it too."""
    _require_open(loaded)
    settings = settings or GenerationSettings()
    stop = stop or threading.Event()
    inputs = build_inputs(loaded.processor, image, instruction, context, prior, dialogue=dialogue)
    if loaded.engine is not None and loaded.engine.fits(inputs["input_ids"].shape[1], settings.max_new_tokens):
        yield from loaded.engine.stream(inputs, settings, stop)
        return
    streamer = TextIteratorStreamer(
        loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
    )
    kwargs = _generate_kwargs(loaded, inputs, settings, stop)
    counter = _TokenCount(inputs["input_ids"].shape[1], loaded.stop_token_ids)
    kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []), counter])
    errors: list[BaseException] = []

    def work() -> None:
        _seed(settings)
        try:
            with torch.inference_mode():
                loaded.model.generate(**kwargs, streamer=streamer)
        except BaseException as err:  # re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield StreamedText(text.strip(), counter.new_tokens)
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    yield StreamedText(text.strip(), counter.new_tokens)  # the count after the last token


class AnsweringModel(Protocol):
    """What ``stream_side_by_side`` (and the demo) use of a model: a description, and the answer
    streamed as it grows, ending at ``stop``. A ``LoadedModel`` here, or a served model
    (``radiology.remote.RemoteModel``): either can stand beside the other."""

    @property
    def name(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def device(self) -> str: ...

    def stream_answer(
        self,
        images: StudyImages,
        instruction: str | None = None,
        settings: GenerationSettings | None = None,
        context: str | None = None,
        stop: threading.Event | None = None,
        prior: ImageInput | None = None,
        dialogue: Dialogue | None = None,
    ) -> Iterator[str]: ...


class SideBySideTexts(list):
    """One item of ``stream_side_by_side``: every model's text so far (a list of str, "" for those
    not started), with each model's ``states`` ("waiting", "generating", "done", "cut" (done at max_new_tokens),
    "stopped" or "not run") and ``seconds`` spent generating (None before it starts)."""

    def __init__(self, texts: Sequence[str], states: Sequence[str], seconds: Sequence[float | None]):
        super().__init__(texts)
        self.states = list(states)
        self.seconds = list(seconds)


def paced(items: Iterable[SideBySideTexts], interval_s: float) -> Iterator[SideBySideTexts]:
    """``items`` at most one every ``interval_s`` seconds, except that an item whose states differ from
    the last one passed on (a model starting or ending) and the last item always pass. A fast model
    writes hundreds of tokens a second; a page that redraws the whole answer for each of them falls
    behind and stops answering clicks, Stop included."""
    last_sent = -float("inf")
    sent_states: list[str] | None = None
    pending: SideBySideTexts | None = None
    for item in items:
        now = time.perf_counter()
        if item.states != sent_states or now - last_sent >= interval_s:
            yield item
            last_sent, sent_states, pending = now, list(item.states), None
        else:
            pending = item
    if pending is not None:
        yield pending


def stream_side_by_side(
    models: Sequence[AnsweringModel],
    image: StudyImages,
    instruction: str | None = None,
    settings: GenerationSettings | None = None,
    context: str | None = None,
    stop: threading.Event | None = None,
    prior: ImageInput | None = None,
    dialogue: Dialogue | Sequence[Dialogue | None] | None = None,
) -> Iterator[SideBySideTexts]:
    """Streams several models' answers to one image with the same prompt and settings; with ``dialogue``,
    to a conversation's next question (one Dialogue for every model, or one per model: each holds that
    model's own earlier answers). A model is loaded here (``LoadedModel``) or served elsewhere
    (``radiology.remote.RemoteModel``), in any mix.

    The models run one after the other (two at once would share one GPU's time and memory). An
    item comes when a model starts, with each piece of its answer, and when it ends. Setting
    ``stop`` ends the current model's answer at its next token ("stopped") and skips the rest
    ("not run"); this function never sets ``stop`` itself, so a set ``stop`` always means a stop
    was asked for. An answer that reached max_new_tokens ends "cut".
    """
    stop = stop or threading.Event()
    settings = settings or GenerationSettings()
    count = len(models)
    dialogues = list(dialogue) if dialogue is not None and not isinstance(dialogue, Dialogue) else [dialogue] * count
    if len(dialogues) != count:
        raise ValueError(f"{len(dialogues)} dialogues for {count} models: give one Dialogue, or one per model")
    texts, states = [""] * count, ["waiting"] * count
    seconds: list[float | None] = [None] * count

    def item() -> SideBySideTexts:
        return SideBySideTexts(texts, states, seconds)

    for i, loaded in enumerate(models):
        if stop.is_set():
            states[i:] = ["not run"] * (count - i)
            yield item()
            return
        states[i], started = "generating", time.perf_counter()
        yield item()
        # stream_text sets its event when it finishes, so each model gets its own; ours is relayed.
        own = threading.Event()
        # closing(): a caller that stops listening ends the running generation, not only this loop.
        new_tokens = 0
        with closing(loaded.stream_answer(image, instruction, settings, context, own, prior,
                                          dialogue=dialogues[i])) as stream:
            for text in stream:
                texts[i], seconds[i] = str(text), time.perf_counter() - started
                new_tokens = getattr(text, "new_tokens", new_tokens)
                yield item()
                if stop.is_set():
                    own.set()
        if stop.is_set():
            states[i] = "stopped"
        else:
            states[i] = "cut" if new_tokens >= settings.max_new_tokens else "done"
        seconds[i] = time.perf_counter() - started
        yield item()


def add_generation_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int = 256, seed: int | None = None
) -> None:
    """Decoding flags shared by every command that generates (this one, evaluation)."""
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="implies --do_sample")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--seed", type=int, default=seed)


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """GenerationSettings from the flags of ``add_generation_arguments``."""
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample or args.temperature is not None,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def _refuse_control_tokens(instruction: str, context: str | None) -> None:
    """A Gemma 3 control token in a flag (e.g. "<end_of_turn><start_of_turn>model") would rewrite the
    prompt's turns or open an image block without pixels."""
    for flag, text in (("--instruction", instruction), ("--context", context)):
        token = control_token_in(text) if text else None
        if token is not None:
            raise ValueError(f"{flag} contains the chat control token {token}, which would change the prompt's "
                             "structure; remove it")


def describe_study(images: int, slices: str | None = None, prior: bool = False) -> str:
    """What a prompt was given, for a settings line or the command line's log: ``images: 1``,
    ``images: 7 (slices 1-7 of 7)``, ``images: 2 + prior`` (the prior study's image comes on top)."""
    text = f"images: {images}"
    if slices:
        text += f" ({slices})"
    return text + (" + prior" if prior else "")


@dataclass(frozen=True)
class StudyInput:
    """One prompt's images as the command line read them: the study's images in order, the prior
    study's image (or None), and lines that say what they are (no header value, no file name)."""

    images: list[Image.Image]
    prior: Image.Image | None
    description: str  # describe_study's line
    series: str | None = None  # a series' description and window, when the study is one


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fp:
            return has_dicom_preamble(fp.read(132))
    except OSError:
        return False


def _is_series(path: Path) -> bool:
    """A folder, a .zip, or a multi-frame DICOM file: a series, sampled and rendered as such."""
    if path.is_dir():
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as fp:
        if fp.read(4) in (b"PK\x03\x04", b"PK\x05\x06"):
            return True
    if not _looks_like_dicom(path):
        return False
    try:
        return len(load_series(path)) > 1  # headers only: a multi-frame file is a series of its frames
    except SeriesError:
        return False  # one image after all; reading it says what is wrong with it


def _read_image(path: Path, window: str | None) -> Image.Image:
    """One image file as the model gets it; a DICOM file with ``window`` (None: its own)."""
    if window is not None and _looks_like_dicom(path):
        return read_dicom_image(path, window=window).image
    return decode_image(str(path))


def read_study(
    images: Sequence[str | Path],
    prior: str | Path | None = None,
    window: str | None = None,
    series: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    slices: tuple[int, int] | None = None,
) -> StudyInput:
    """The command line's ``--image`` values (and ``--prior``) as one prompt's images.

    Several ``--image`` files are one study's images in the order given (two views, today's and
    another projection); a folder, a .zip or a multi-frame DICOM file is a DICOM series, given
    alone: ``series`` picks one when it holds several, then ``max_images`` evenly spaced slices of
    ``slices`` (1-based, inclusive; default: all) are rendered with ``window`` (None: the series'
    default, multi for grayscale CT). ``window`` also renders DICOM files given one by one and a
    DICOM prior (None: each file's own window). ValueError (ImageDecodeError, SeriesError) names
    the problem and the flag that fixes it.
    """
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("no --image: give an image file, a DICOM series' folder or .zip")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError("--max_images must be a whole number from 1")
    if window is not None and window not in ALL_WINDOWS:
        raise ValueError(f"--window must be one of {', '.join(ALL_WINDOWS)}")
    series_given = [_is_series(p) for p in paths]
    prior_image = _read_image(Path(prior), window) if prior is not None else None
    if any(series_given):
        if len(paths) > 1:
            raise ValueError(
                "a DICOM series (a folder, a .zip or a multi-frame DICOM file) is a study of its own: give it as the "
                "only --image (and an earlier study as --prior)"
            )
        chosen = load_series(paths[0], series)
        indices = sample_indices(len(chosen), max_images, slices)
        rendered = render_series(chosen, indices, window)
        used = window or chosen.default_window
        return StudyInput(rendered, prior_image,
                          describe_study(len(rendered), describe_indices(indices, len(chosen)), prior is not None),
                          series=f"{chosen.description}; window: {used}")
    if series is not None or slices is not None:
        raise ValueError("--series and --slices choose within a DICOM series: give its folder, .zip or multi-frame "
                         "file as the only --image")
    if len(paths) > max_images:
        raise ValueError(f"{len(paths)} images given, above --max_images {max_images}: give fewer, or raise "
                         "--max_images")
    read = [_read_image(path, window) for path in paths]
    return StudyInput(read, prior_image, describe_study(len(read), prior=prior is not None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Describe a radiology image, study or DICOM series with a "
                                     "(fine-tuned) Gemma 3.")
    parser.add_argument("--model", required=True, help="merged model folder, hub id, or base model for --adapter")
    parser.add_argument("--image", required=True, action="append", metavar="PATH",
                        help="an image file (PNG, JPEG, TIFF, DICOM, ...); repeat it for several images of one study, "
                             "in order (e.g. two views). A folder, a .zip or a multi-frame DICOM file is a DICOM "
                             "series, given alone")
    parser.add_argument("--prior", default=None, metavar="PATH",
                        help="an image (or DICOM file) of a prior study, placed first in the prompt for comparison")
    parser.add_argument("--series", type=int, default=None,
                        help="which series (1-based) when the folder or .zip holds several; without it they are listed")
    parser.add_argument("--max_images", type=int, default=DEFAULT_MAX_IMAGES,
                        help="slices of a series sent to the model, evenly spaced, first and last included "
                             "(default: %(default)s); also the most --image files taken")
    parser.add_argument("--slices", type=parse_slice_range, default=None, metavar="A-B",
                        help="sample the series' slices A to B only (1-based, inclusive), e.g. 3-9")
    parser.add_argument("--window", default=None, choices=ALL_WINDOWS,
                        help="DICOM window for every DICOM image (default: multi for a CT series, else each file's "
                             "own window)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to apply to --model")
    parser.add_argument("--load_in_4bit", action="store_true", help="load the weights in 4-bit NF4")
    parser.add_argument("--context", default=None, help="optional clinical context for the prompt")
    add_generation_arguments(parser)
    parser.add_argument("--report_format", choices=REPORT_FORMATS, default="free",
                        help="findings_impression: the instruction asks for \"Findings:\" and \"Impression:\" sections")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = parser.parse_args(argv)

    try:
        # Bad flags and bad images fail in a second, before the model loads.
        settings = settings_from_args(args)
        _refuse_control_tokens(args.instruction, args.context)
        instruction = with_report_format(args.instruction, args.report_format)
        study = read_study(args.image, args.prior, args.window, args.series, args.max_images, args.slices)
        if study.series:
            print(f"series: {study.series}", file=sys.stderr)
        print(study.description, file=sys.stderr)
        images = study.images  # one image makes the one-image prompt the model was trained on
        loaded = load_for_generation(args.model, args.adapter, args.load_in_4bit, args.device)
        if not args.stream:
            print(generate_text(loaded, images, instruction, settings, context=args.context, prior=study.prior))
            return
        shown = ""
        for text in stream_text(loaded, images, instruction, settings, context=args.context, prior=study.prior):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        sys.stdout.write("\n")
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
