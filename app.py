"""Radiology image description demo for clinicians (Gradio): upload an image, a study's views or a DICOM
series (and a prior study to compare with), read the draft as it streams.

    python app.py                                    # the embedded tiny model: random characters, for a first look
    python app.py --model runs/r1/merged             # a merged fine-tuned model (train.py's OUTPUT_DIR/merged)
    python app.py --model google/gemma-3-4b-pt --adapter runs/r1 --load_in_4bit
    python app.py --model runs/r1/merged --baseline google/gemma-3-4b-pt   # both answers side by side
    python app.py --server_url http://gpu-box:8000/v1    # a model served by vLLM, SGLang or transformers serve
    RADIOLOGY_MODEL=your-org/your-model RADIOLOGY_CONCURRENCY=2 python app.py

Every option has a RADIOLOGY_* environment variable (a flag wins over it); `python app.py --help` lists
them. Importing this module launches nothing: tests and other scripts call ``build_demo`` and ``launch``.
"""

from __future__ import annotations

# ZeroGPU Spaces need `spaces` imported before torch touches CUDA; elsewhere it is optional and,
# when installed, its decorator changes nothing.
try:
    import spaces
except ImportError:
    spaces = None

import argparse
import dataclasses
import html
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from radiology.data import DEFAULT_INSTRUCTION, REPORT_FORMATS, Dialogue, with_report_format
from radiology.draft import (
    MAX_QUESTION_CHARS,
    Answer,
    Draft,
    Turn,
    clean_question,
    conversation_messages,
    find_draft,
    fitting_dialogue,
    history_choices,
    marked,
    prompt_fits,
    remember,
    sections_markdown,
    write_export,
)
from radiology.generate import (
    AnsweringModel,
    GenerationSettings,
    LoadedModel,
    SideBySideTexts,
    paced,
    stream_side_by_side,
)
from radiology.remote import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    RemoteModel,
    RemoteModelError,
    ServerArguments,
)
from radiology.series import DEFAULT_MAX_IMAGES
from radiology.serve import (
    MAX_CONTEXT_CHARS,
    MAX_INSTRUCTION_CHARS,
    MAX_STUDY_IMAGES,
    STUDY_SUFFIXES,
    UPLOAD_SUFFIXES,
    AUTO_WINDOW,
    DEMO_WINDOWS,
    BaselineError,
    ControlError,
    DemoModel,
    SeriesChoiceError,
    ServerError,
    StopRegistry,
    UploadedStudy,
    UploadError,
    UploadOptionError,
    clean_context,
    clean_instruction,
    default_concurrency,
    free_accelerator_memory,
    is_out_of_memory,
    load_for_demo,
    load_study,
    model_panel,
    read_choice,
    read_number,
    study_paths,
    upload_path,
    warm_up_on_gpu,
    window_choices,
)
from radiology.viewer import (
    VIEWER_CSS,
    VIEWER_JS,
    SliderSetup,
    ViewerSettings,
    read_viewer,
    reader_image,
    slider_setup,
    zoom_js,
)

logger = logging.getLogger("radiology.app")

ASSETS = Path(__file__).resolve().parent / "assets"
TITLE = "Radiology image description (Gemma 3)"

DISCLAIMER = (
    "Research demo, not a diagnosis. This software is not a medical device: its descriptions can be wrong "
    "or incomplete and must not guide patient care. A qualified clinician reads the image and makes every "
    "clinical decision."
)
PLACEHOLDER_NOTICE = (
    "Demo model: random weights, its output is random characters. "
    "{reason}, so this page runs a tiny, randomly initialised Gemma 3. To serve a fine-tuned model, start the "
    "app with --model FOLDER_OR_HUB_ID (or set RADIOLOGY_MODEL; add --adapter / RADIOLOGY_ADAPTER for a LoRA "
    "adapter): see the README, section Demo."
)
OUT_OF_MEMORY = (
    "The GPU ran out of memory on this request; its memory has been freed and the app keeps serving. "
    "Try fewer max new tokens or a smaller image, or start the app with --load_in_4bit (RADIOLOGY_4BIT=1)."
)
BASELINE_NOTICE = (
    "{reason}, so this page shows the model's answer alone. Check --baseline (RADIOLOGY_BASELINE): a merged "
    "model folder or a hub id reachable from this machine."
)
SERVER_NOTICE = (
    "The model server did not answer: {reason}. The page keeps serving and each Generate tries the server "
    "again; this note goes once it answers."
)
# The decoding controls' ranges: the sliders show them and every request is checked against them.
DECODING_MODES = ("greedy", "sampling")
TEMPERATURE_RANGE = (0.05, 2.0)
TOP_P_RANGE = (0.05, 1.0)
TOP_K_RANGE = (0, 200)
SEED_RANGE = (0, 2**32 - 1)
# Previews decode uploads at once, on any number of clicks: a few at a time bounds their memory
# (each is also bounded by serve.WORKING_PIXELS / MAX_UPLOAD_PIXELS).
PREVIEW_CONCURRENCY = 2
# ZeroGPU Spaces: running Stop as a cancellation too, because the generation runs in a worker
# process that the stop event of this process cannot reach.
ON_ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
# The page redraws the whole answer on each update: 20 a second reads as live and keeps it responsive.
UPDATE_INTERVAL_S = 0.05
# How long clearing the draft for a new study waits for the stopped generation to end (one token, usually).
CLEAR_WAIT_S = 5.0


# --------------------------------------------------------------------------- options


@dataclass
class AppConfig:
    """How the app is served. ``parse_args`` fills it from flags and RADIOLOGY_* variables."""

    model: str | None = None
    adapter: str | None = None
    baseline: str | None = None
    load_in_4bit: bool = False
    device: str | None = None
    require_model: bool = False
    cache_dir: str | None = None
    host: str | None = None
    port: int | None = None
    share: bool = False
    auth: list[tuple[str, str]] | None = None
    concurrency: int | None = None  # None: 1 on the CPU, the decode engine's batch on a GPU
    max_queue: int = 16
    max_file_size: str = "20mb"
    max_new_tokens: int = 1024
    upload_ttl: int = 900
    gpu_duration: int = 120
    server_url: str | None = None
    server_model: str | None = None
    server_api_key_env: str = DEFAULT_API_KEY_ENV
    server_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    server_read_timeout: float = DEFAULT_READ_TIMEOUT
    baseline_server_url: str | None = None
    baseline_model: str | None = None
    report_format: str = "free"


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false (or 1/0), got {value!r}")


def _parse_auth(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("expected user:password pairs separated by commas")
        pairs.append((user, password))
    return pairs


def _report_format(value: str) -> str:
    if value.strip() not in REPORT_FORMATS:
        raise ValueError(f"must be one of {', '.join(REPORT_FORMATS)}, got {value!r}")
    return value.strip()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be 1 or more, got {number}")
    return number


def _positive_seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be above 0 seconds, got {value}")
    return number


# (flag, environment variable, type, help). The flag's destination is the AppConfig field.
_OPTIONS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--model", "RADIOLOGY_MODEL", str, "merged model folder or hub id (default: the embedded tiny demo model)"),
    ("--adapter", "RADIOLOGY_ADAPTER", str, "LoRA adapter folder to apply to --model"),
    ("--baseline", "RADIOLOGY_BASELINE", str,
     "a second model (folder or hub id, e.g. the base model) whose answer is shown beside the model's"),
    ("--load_in_4bit", "RADIOLOGY_4BIT", _parse_bool, "load the weights in 4-bit NF4 instead of bf16"),
    ("--device", "RADIOLOGY_DEVICE", str, "cuda or cpu (default: cuda when present)"),
    ("--require_model", "RADIOLOGY_REQUIRE_MODEL", _parse_bool,
     "exit with an error if --model cannot be loaded, instead of serving the tiny demo model"),
    ("--cache_dir", "RADIOLOGY_CACHE_DIR", str,
     "where the tiny demo model is built (default: ~/.cache/radiology-gemma)"),
    ("--host", "RADIOLOGY_HOST", str, "address to listen on (default: Gradio's, 127.0.0.1; 0.0.0.0 for all)"),
    ("--port", "RADIOLOGY_PORT", _positive_int, "port to listen on (default: Gradio's, 7860)"),
    ("--share", "RADIOLOGY_SHARE", _parse_bool, "also serve through a temporary public gradio.live link"),
    ("--auth", "RADIOLOGY_AUTH", _parse_auth,
     "user:password[,user:password...] required to open the page (prefer the variable: flags show in ps)"),
    ("--concurrency", "RADIOLOGY_CONCURRENCY", _positive_int,
     "generations at once; on a GPU they are decoded together in one batch (default: 1 on the CPU, 4 on a GPU)"),
    ("--max_queue", "RADIOLOGY_MAX_QUEUE", _positive_int, "requests waiting at most; more are refused (default 16)"),
    ("--max_file_size", "RADIOLOGY_MAX_FILE_SIZE", str, "largest upload, e.g. 20mb (default 20mb)"),
    ("--max_new_tokens", "RADIOLOGY_MAX_NEW_TOKENS", _positive_int,
     "the largest answer a request may ask for, in tokens (default 1024)"),
    ("--upload_ttl", "RADIOLOGY_UPLOAD_TTL", _positive_int, "seconds an upload stays on the server (default 900)"),
    ("--gpu_duration", "RADIOLOGY_GPU_DURATION", _positive_int, "ZeroGPU seconds reserved per request (default 120)"),
    ("--server_url", "RADIOLOGY_SERVER_URL", str,
     "API base of an OpenAI-compatible server (vLLM, SGLang, transformers serve), e.g. http://localhost:8000/v1: "
     "generate there instead of loading a model"),
    ("--server_model", "RADIOLOGY_SERVER_MODEL", str, "the served model's name (default: the first the server lists)"),
    ("--server_api_key_env", "RADIOLOGY_SERVER_API_KEY_ENV", str,
     f"environment variable holding the servers' API key (default {DEFAULT_API_KEY_ENV}; unset: no key)"),
    ("--server_connect_timeout", "RADIOLOGY_SERVER_CONNECT_TIMEOUT", _positive_seconds,
     f"seconds to wait for a connection to a server (default {DEFAULT_CONNECT_TIMEOUT:g})"),
    ("--server_read_timeout", "RADIOLOGY_SERVER_READ_TIMEOUT", _positive_seconds,
     f"seconds to wait for each piece of a served answer (default {DEFAULT_READ_TIMEOUT:g})"),
    ("--baseline_server_url", "RADIOLOGY_BASELINE_SERVER_URL", str,
     "a server whose model answers beside the model's (default with --baseline_model: --server_url)"),
    ("--baseline_model", "RADIOLOGY_BASELINE_MODEL", str,
     "the served baseline's name (default: the first --baseline_server_url lists)"),
    ("--report_format", "RADIOLOGY_REPORT_FORMAT", _report_format,
     "free (default) or findings_impression: the instruction asks for Findings: and Impression: sections, and the "
     "page shows them as sections"),
]


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """AppConfig from flags, then RADIOLOGY_* variables, then defaults. Bad values exit with a
    message naming the flag or variable."""
    environ = os.environ if environ is None else environ
    defaults = AppConfig()
    parser = argparse.ArgumentParser(description=TITLE, epilog="Each flag's variable is named in brackets.")
    for flag, variable, kind, help_text in _OPTIONS:
        dest = flag[2:]
        default = getattr(defaults, dest)
        if variable in environ and environ[variable].strip():
            try:
                default = kind(environ[variable])
            except ValueError as err:
                parser.error(f"{variable}: {err}")
        if kind is _parse_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} [{variable}]")
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} [{variable}]")
    config = AppConfig(**vars(parser.parse_args(argv)))
    try:
        remote_models(config)
    except ValueError as err:
        parser.error(str(err))
    return config


def remote_models(config: AppConfig) -> tuple[RemoteModel | None, RemoteModel | None]:
    """The served model and the served baseline that ``config`` names (None: loaded here, or none).
    ValueError names the flags that do not fit together. Nothing is sent to a server here."""
    if config.server_url and (config.model or config.adapter):
        raise ValueError("--server_url serves the model from a server: leave out --model and --adapter "
                         "(RADIOLOGY_MODEL, RADIOLOGY_ADAPTER), or leave out --server_url to load the model here")
    baseline_url = config.baseline_server_url or (config.server_url if config.baseline_model else None)
    if config.baseline and baseline_url:
        raise ValueError("give the baseline once: --baseline (loaded here) or --baseline_server_url/--baseline_model "
                         "(served)")
    if config.baseline_model and not baseline_url:
        raise ValueError("--baseline_model names a model on a server: give --baseline_server_url (or --server_url)")
    server = ServerArguments(config.server_url, config.server_model, config.server_api_key_env,
                             config.server_connect_timeout, config.server_read_timeout)  # checks the URL
    if baseline_url is None:
        return server.remote(), None
    return server.remote(), server.remote(baseline_url, config.baseline_model, flag="--baseline_server_url")


# --------------------------------------------------------------------------- generation


def settings_from_ui(
    mode: object,
    temperature: object,
    top_p: object,
    top_k: object,
    max_new_tokens: object,
    seed: object,
    max_new_tokens_limit: int,
) -> GenerationSettings:
    """GenerationSettings from the controls' values as a request sent them: API callers can send
    anything (NaN, text, a list), so each is checked here; ControlError names the control and its range."""
    mode = read_choice(mode, "Decoding method", DECODING_MODES)
    return GenerationSettings(
        max_new_tokens=read_number(max_new_tokens, "Max new tokens", 1, max_new_tokens_limit, whole=True),
        do_sample=mode == "sampling",
        temperature=read_number(temperature, "Temperature", *TEMPERATURE_RANGE),
        top_p=read_number(top_p, "Top-p", *TOP_P_RANGE),
        top_k=read_number(top_k, "Top-k", *TOP_K_RANGE, whole=True),
        seed=read_number(seed, "Seed", *SEED_RANGE, whole=True, empty="a random one"),
    )


def read_view(window: object, frame: object) -> tuple[str | None, int | None]:
    """The DICOM window and frame controls' values, checked (they are ignored for other images).
    ``auto`` (or empty) is returned as None: the study's default, multi for a CT series, else the file's own."""
    window = read_choice(window, "DICOM window", DEMO_WINDOWS, default=AUTO_WINDOW)
    frame = read_number(frame, "Frame", 1, whole=True, empty="the middle frame")
    return (None if window == AUTO_WINDOW else window), frame


@dataclass(frozen=True)
class StudyControls:
    """The study controls' values, checked: which series, how many images, which slices."""

    series: int | None = None
    max_images: int = DEFAULT_MAX_IMAGES
    first_slice: int | None = None
    last_slice: int | None = None


def _slice_number(value: object, control: str, empty: str) -> int | None:
    # The page's number box sends 0 while it is empty (Gradio fills an empty number with 0 on
    # loading); no slice is numbered 0, so 0 means empty too.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return None
    return read_number(value, control, 1, whole=True, empty=empty)


def read_study_controls(series: object, max_images: object, first_slice: object, last_slice: object) -> StudyControls:
    """The Series, Max images, First slice and Last slice controls' values as a request sent them."""
    chosen = read_number(max_images, "Max images", 1, MAX_STUDY_IMAGES, whole=True, empty=f"{DEFAULT_MAX_IMAGES}")
    return StudyControls(
        series=read_number(series, "Series", 1, whole=True, empty="the only series"),
        max_images=DEFAULT_MAX_IMAGES if chosen is None else chosen,
        first_slice=_slice_number(first_slice, "First slice", "the series' first slice"),
        last_slice=_slice_number(last_slice, "Last slice", "the series' last slice"),
    )


def read_study(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, render: bool = True, custom_window: tuple[float, float] | None = None,
) -> UploadedStudy:
    """The study a request's controls describe, every value checked (ControlError) and every file
    read through serve.load_study (UploadError). ``custom_window`` (checked by radiology.viewer's
    read_viewer) replaces the DICOM window selector's."""
    paths = study_paths(upload)
    prior_path = upload_path(prior, "prior study")
    window, frame = read_view(window, frame)
    window = custom_window if custom_window is not None else window
    controls = read_study_controls(series, max_images, first_slice, last_slice)
    return load_study(paths, window, frame, controls.series, controls.max_images, controls.first_slice,
                      controls.last_slice, prior_path, render=render)


def refuse(err: ValueError, event: str) -> gr.Error:
    """The message for a request refused before it ran. The log gets the control's name only: the
    value may be anything a caller typed, and an upload's name may carry a patient's."""
    if isinstance(err, ControlError):
        logger.info("%s request refused: bad value for %s", event, err.control)
    return gr.Error(str(err), print_exception=False)


def _gpu_function(fn: Callable[..., Iterator[Any]], duration: int) -> Callable[..., Iterator[Any]]:
    """``spaces.GPU`` on Hugging Face Spaces (it reserves a ZeroGPU slice per call and does nothing
    on other hardware); the function itself where `spaces` is not installed."""
    return spaces.GPU(duration=duration)(fn) if spaces is not None else fn


def _input_notes(study: UploadedStudy, context: str | None) -> str:
    """What the settings line adds about the input: the images sent (slices of a series, a prior),
    the DICOM window (and frame), whether context was given."""
    notes = f" · {study.describe()}"
    if study.window is not None:
        notes += f" · DICOM window: {study.window}"
        dicom = study.single.dicom if study.single is not None else None
        if dicom is not None and dicom.frames > 1:
            notes += f", frame {dicom.frame + 1} of {dicom.frames}"
    prior = study.prior.dicom if study.prior is not None else None
    if prior is not None and prior.window != study.window:
        notes += f" · prior's DICOM window: {prior.window}"
    if context is not None:
        notes += " · with clinical history"
    return notes


_ENDINGS = {"waiting": "waiting", "generating": "generating…", "done": "done in {seconds:.1f} s",
            "cut": "done in {seconds:.1f} s, cut at max new tokens",
            "stopped": "stopped by user in {seconds:.1f} s", "not run": "not run (stopped by user)"}
_FINISHED = ("done", "cut", "stopped", "not run")


def _status_lines(abouts: Sequence[str], item: SideBySideTexts) -> list[str]:
    return [f"{about} · {_ENDINGS[state].format(seconds=seconds or 0.0)}"
            for about, state, seconds in zip(abouts, item.states, item.seconds)]


def _shown_texts(item: SideBySideTexts, settings: GenerationSettings) -> list[str]:
    """Each answer as its box shows it: marked once it was stopped or cut (see radiology.draft.marked)."""
    return [marked(text, state, settings.max_new_tokens) for text, state in zip(item, item.states)]


def _finished(item: SideBySideTexts) -> bool:
    return all(state in _FINISHED for state in item.states)


def make_streamer(
    models: Sequence[AnsweringModel], stops: StopRegistry, config: AppConfig,
    on_server: Callable[[str | None], None] | None = None,
) -> Callable[..., Iterator[SideBySideTexts]]:
    """The one stream loop of Generate and follow-up questions, for one request: ``stream_side_by_side`` over the
    models (the first one alone with ``first_only``), on a ZeroGPU slice where there is one and a model is loaded
    here; registered for the session's Stop, paced for the page, ended without another item once a new study
    supersedes it, and a failure turned into the page's message (``on_server`` hears how a model server fared)."""
    models = list(models)

    # Only picklable arguments (a key, not the event): on ZeroGPU this runs in a worker process.
    def stream_on_gpu(
        key: str, images: list[Image.Image], prior: Image.Image | None, instruction: str, context: str | None,
        settings: GenerationSettings, dialogue: Dialogue | None = None, first_only: bool = False,
    ) -> Iterator[SideBySideTexts]:
        yield from stream_side_by_side(models[:1] if first_only else models, images, instruction, settings, context,
                                       stop=stops.event(key), prior=prior, dialogue=dialogue)

    if any(isinstance(m, LoadedModel) for m in models):  # a served model needs no GPU of this machine
        stream_on_gpu = _gpu_function(stream_on_gpu, config.gpu_duration)

    def stream_request(
        request: gr.Request | None, images: list[Image.Image], prior: Image.Image | None, instruction: str,
        context: str | None, settings: GenerationSettings, dialogue: Dialogue | None = None, first_only: bool = False,
    ) -> Iterator[SideBySideTexts]:
        with stops.running(request.session_hash if request is not None else None) as (key, event):
            try:
                with closing(stream_on_gpu(key, images, prior, instruction, context, settings, dialogue,
                                           first_only)) as items:
                    for item in paced(items, UPDATE_INTERVAL_S):
                        if event.superseded:  # a new study is on the page: its cleared draft stays cleared
                            return
                        yield item
                answered = models[:1] if first_only else models
                if on_server is not None and any(isinstance(m, RemoteModel) for m in answered):
                    on_server(None)  # the server answered: a problem seen before is gone
            except RemoteModelError as err:
                raise _server_failed(err, on_server) from None
            except Exception as err:
                raise _generation_failed(err) from None

    return stream_request


def _generation_failed(err: Exception) -> gr.Error:
    """The message for a generation that failed while it ran (memory freed when it ran out of it)."""
    if is_out_of_memory(err):
        free_accelerator_memory()
        logger.warning("generation ran out of GPU memory; memory freed")
        return gr.Error(OUT_OF_MEMORY, print_exception=False)
    logger.exception("generation failed")  # the traceback holds code paths, no upload data
    return gr.Error(
        f"Generation failed ({type(err).__name__}). Try again; if it keeps failing, the server "
        "log has the details.",
        print_exception=False,
    )


def _server_failed(err: RemoteModelError, on_server: Callable[[str | None], None] | None) -> gr.Error:
    """The message for a model server that could not answer; ``on_server`` (the banner) hears it too."""
    # The message names the server and what to do; it holds no request text or image data.
    logger.warning("a model server failed: %s", err)
    if on_server is not None:
        on_server(str(err))
    return gr.Error(f"The model server could not answer: {err}", print_exception=False)


def make_generate(
    models: Sequence[AnsweringModel], stops: StopRegistry, config: AppConfig,
    on_server: Callable[[str | None], None] | None = None,
) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """The Generate button's handler. It streams the models' answers (the served one, then a
    baseline; each loaded here or served elsewhere) through ``stream_side_by_side``: (text so far,
    the line under it) for each model, all pairs in every update, then the draft (radiology.draft.Draft;
    None until every answer ended). It gets the controls' values unprocessed and checks each of them.
    ``on_server`` hears, after each request that reached a model server, why the server failed (None: it
    answered)."""
    models = list(models)
    stream_request = make_streamer(models, stops, config, on_server)
    default_instruction = with_report_format(DEFAULT_INSTRUCTION, config.report_format)

    def generate(
        upload: object,
        instruction: object,
        mode: object,
        temperature: object,
        top_p: object,
        top_k: object,
        max_new_tokens: object,
        seed: object,
        context: object = None,
        window: object = AUTO_WINDOW,
        frame: object = None,
        prior: object = None,
        series: object = None,
        max_images: object = DEFAULT_MAX_IMAGES,
        first_slice: object = None,
        last_slice: object = None,
        window_center: object = None,
        window_width: object = None,
        send_window: object = False,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        try:
            settings = settings_from_ui(mode, temperature, top_p, top_k, max_new_tokens, seed, config.max_new_tokens)
            instruction = clean_instruction(instruction, default=default_instruction)
            context = clean_context(context)
            viewer = read_viewer(window_center, window_width, send=send_window)
            study = read_study(upload, window, frame, prior, series, max_images, first_slice, last_slice,
                               custom_window=viewer.model_window)
        except ValueError as err:  # UploadError and ControlError are ValueErrors
            raise refuse(err, "generate") from None
        notes = _input_notes(study, context)
        prior_image = study.prior.image if study.prior is not None else None
        abouts = [f"{m.name} · {m.precision} · {m.device} · {settings.describe()}{notes}" for m in models]
        # closing(): a page that goes away (cancel, closed tab) ends the generation at once.
        with closing(stream_request(request, list(study.images), prior_image, instruction, context,
                                    settings)) as items:
            for item in items:
                shown, lines = _shown_texts(item, settings), _status_lines(abouts, item)
                draft = None
                if _finished(item):
                    draft = Draft(study.images, prior_image, study.describe(), instruction, context,
                                  tuple(Answer(m.name, text, box, line)
                                        for m, text, box, line in zip(models, item, shown, lines)),
                                  config.report_format)
                yield (*(x for pair in zip(shown, lines) for x in pair), draft)

    return generate


def make_follow_up(
    models: Sequence[AnsweringModel], stops: StopRegistry, config: AppConfig,
    on_server: Callable[[str | None], None] | None = None,
) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """The Ask button's handler: the served model answers a question about the draft's images as the next turn of
    its conversation (the first answer and the earlier follow-ups), streamed like Generate's answers. Yields the
    conversation (chat messages), the line under it and, once the answer ended, the draft with the new turn."""
    served = models[0]
    stream_request = make_streamer(models, stops, config, on_server)

    def follow_up(
        question: object,
        mode: object,
        temperature: object,
        top_p: object,
        top_k: object,
        max_new_tokens: object,
        seed: object,
        draft: Draft | None = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        try:
            settings = settings_from_ui(mode, temperature, top_p, top_k, max_new_tokens, seed, config.max_new_tokens)
            question = clean_question(question)
            dialogue, dropped = fitting_dialogue(
                draft, question, lambda d: prompt_fits(served, draft, d, settings.max_new_tokens))
        except ValueError as err:  # ControlError and FollowUpError are ValueErrors
            raise refuse(err, "follow_up") from None
        assert draft is not None
        number = len(draft.follow_ups) + 1
        about = f"{served.name} · {served.precision} · {served.device} · {settings.describe()} · follow-up {number}"
        if dropped:
            about += f" · the {dropped} earliest follow-up(s) left out of the prompt to fit the model's context"
        with closing(stream_request(request, list(draft.images), draft.prior, draft.instruction, draft.context,
                                    settings, dialogue, True)) as items:
            for item in items:
                (shown,), (line,) = _shown_texts(item, settings), _status_lines([about], item)
                if not _finished(item):
                    yield conversation_messages(draft, (question, shown)), line, gr.skip()
                    continue
                asked = draft.with_turn(Turn(question, Answer(served.name, item[0], shown, line)))
                yield conversation_messages(asked), line, asked

    return follow_up


def export_draft(draft: Draft | None) -> Iterator[str]:
    """The Export button's handler: the draft as a .zip (report.md, report.txt, the images as the model saw them),
    written to a temporary folder that is deleted once Gradio has taken its copy to serve."""
    if draft is None:
        raise gr.Error("There is no draft to export: press Generate first (or restore one from the history).",
                       print_exception=False)
    folder = Path(tempfile.mkdtemp(prefix="radiology-draft-"))
    try:
        yield str(write_export(draft, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- preview


def _banner_html(text: str, background: str, border: str, role: str = "note", css_class: str = "") -> str:
    style = (
        f"background:{background};border:2px solid {border};border-radius:8px;padding:12px 16px;"
        "color:#111;font-size:1.05em;line-height:1.45"
    )
    classes = f' class="{css_class}"' if css_class else ""
    return f'<div role="{role}"{classes} style="{style}">{html.escape(text)}</div>'


def _markdown_text(text: str) -> str:
    """``text`` with Markdown's markup characters escaped (``CHEST_ABDOMEN`` stays as written)."""
    return "".join(f"\\{c}" if c in "\\`*_[]|~" else c for c in html.escape(text, quote=False))


def study_summary(study: UploadedStudy | None) -> str:
    """The technical attribute list of a study, as Markdown: a DICOM file's, a series' (modality,
    orientation, slices, size, window), a set of views'; empty for one plain image."""
    if study is None or not study.attributes:
        return ""
    title = {"series": "DICOM series", "views": "Study"}.get(study.kind, "DICOM")
    items = " · ".join(f"{_markdown_text(k)}: {_markdown_text(v)}" for k, v in study.attributes.items())
    return f"**{title}** (technical attributes only) · {items}"


def _slice_label(study: UploadedStudy, number: int) -> str:
    """The slider's label: which slice (or view) is shown and whether the model gets it."""
    noun = "Slice" if study.kind == "series" else "Image"
    if number - 1 in study.sent:
        return f"{noun} {number} of {study.total}: sent to the model"
    return f"{noun} {number} of {study.total}: not sent (the model gets {len(study.sent)} of {study.total})"


def _sent_gallery(study: UploadedStudy | None) -> Any:
    """The images the model gets, in prompt order (the prior first), each with its slice number."""
    if study is None:
        return gr.Gallery(value=None, visible=False)
    noun = "slice" if study.kind == "series" else "image"
    items = [(study.prior.image, "prior study")] if study.prior is not None else []
    items += [(image, f"{noun} {index + 1}") for image, index in zip(study.images, study.sent)]
    label = f"Sent to the model, in order: {study.describe().removeprefix('images: ')}"
    return gr.Gallery(value=items, label=label, visible=len(items) > 1)


@dataclass(frozen=True)
class StudyView:
    """What the input panel shows: the study (None when there is none to show), the item shown
    (0-based), and the series to choose from when the upload holds several."""

    study: UploadedStudy | None
    shown: int = 0
    choices: list[tuple[int, str]] | None = None
    problem: str | None = None  # the message for a study that cannot be shown
    fell_back: bool = False  # the view asked for did not fit: the default one is shown
    moved: bool = True  # the item shown is not the one the slider asked for (none asked, or beyond the study)


def _view_study(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, shown: object = None, render: bool = True, warn: bool = True,
    custom_window: tuple[float, float] | None = None,
) -> StudyView:
    """The study for the input panel. A view that does not fit (a CT window on MR, a slice range
    beyond the series) gets a warning (unless ``warn`` is off: another event already gave it) and
    the default view instead; ControlError goes to the caller."""
    warning = gr.Warning if warn else (lambda message: None)
    controls = (upload, window, frame, prior, series, max_images, first_slice, last_slice)
    try:
        study = read_study(*controls, render=render, custom_window=custom_window)
    except SeriesChoiceError as err:
        return StudyView(None, choices=err.choices, problem=str(err))
    except UploadOptionError as err:
        problem = str(err)
        try:  # the files' own view: default window, middle frame, the whole series
            study = read_study(upload, None, None, prior, series, max_images, None, None, render=render)
        except UploadError as again:
            warning(str(again))
            return StudyView(None, problem=str(again))
        warning(f"{problem} Showing the default view instead.")
        return _shown_item(study, shown, fell_back=True)
    except UploadError as err:
        warning(str(err))
        return StudyView(None, problem=str(err))
    return _shown_item(study, shown)


def _shown_item(study: UploadedStudy, shown: object, fell_back: bool = False) -> StudyView:
    """The view of ``study`` at the slider's (1-based) number ``shown``: that item when the study has
    it, else the last one; the middle one when ``shown`` is empty."""
    number = read_number(shown, "Slice", 1, whole=True, empty="the middle one")
    index = study.total // 2 if number is None else min(int(number), study.total) - 1
    return StudyView(study, index, fell_back=fell_back, moved=number is None or index != number - 1)


def _view_outputs(view: StudyView) -> tuple[Any, ...]:
    """Values for (preview, burned-in warning, window, frame, attributes): /preview's outputs."""
    study = view.study
    item = study.item(view.shown) if study is not None else None
    warning = (study.warning if study is not None else None) or (item.dicom.warning if item and item.dicom else None)
    banner = gr.HTML(_banner_html(warning, "#ffe1e1", "#c62828", role="alert") if warning else "",
                     visible=warning is not None)
    if study is not None and study.images == () and item is not None and item.dicom is not None:
        # Slices not rendered yet (a first look): the window as the slice shown says it.
        study = dataclasses.replace(study, attributes={**study.attributes, "Window": item.dicom.window})
    if study is None and view.problem is not None:  # said where the study would be, until it changes
        summary = gr.Markdown(_markdown_text(view.problem), visible=True)
    else:
        summary = gr.Markdown(study_summary(study), visible=bool(study_summary(study)))
    has_dicom = study is not None and study.window_name is not None
    # After a view that did not fit, the selector says what is shown: the default.
    window = gr.Dropdown(value=AUTO_WINDOW, visible=has_dicom) if view.fell_back else gr.Dropdown(visible=has_dicom)
    # The frame box serves the API (one frame of a multi-frame file); the page steps through frames with the slider.
    return item.image if item is not None else None, banner, window, gr.Number(value=None, visible=False), summary


def _study_outputs(view: StudyView, keep_series: bool) -> tuple[Any, ...]:
    """``_view_outputs``, then the slice slider, the sent images and the series selector."""
    study = view.study
    if study is not None and study.total > 1:
        number = view.shown + 1
        # The slider keeps its place unless it must move: a person may have stepped it further since
        # this view was asked for, and that step's own view follows this one.
        position = {"value": number} if view.moved else {}
        slider = gr.Slider(minimum=1, maximum=study.total, step=1, label=_slice_label(study, number), visible=True,
                           **position)
    else:
        slider = gr.Slider(minimum=1, maximum=2, value=1, visible=False)
    if view.choices:
        series = gr.Dropdown(choices=[(line, number) for number, line in view.choices], value=None, visible=True,
                             label=f"Series: this upload holds {len(view.choices)}, choose one")
    elif keep_series and study is not None and study.series is not None and study.series.series_count > 1:
        series = gr.skip()
    else:
        series = gr.Dropdown(choices=[], value=None, visible=False)
    return (*_view_outputs(view), slider, _sent_gallery(study), series)


def _refusing(event: str, fn: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    """``fn`` with a ControlError (a bad value sent through the API) answered by a message."""
    def checked(*args: Any) -> tuple[Any, ...]:
        try:
            return fn(*args)
        except ControlError as err:
            raise refuse(err, event) from None

    checked.__name__ = fn.__name__
    return checked


def preview_upload(upload: object, window: object = AUTO_WINDOW) -> tuple[Any, ...]:
    """A new upload's preview: the image as the model gets it (a series' middle slice), with the
    technical attributes and the burned-in annotation warning; the window, when it fits (auto: the
    study's default). The values come unprocessed, as for Generate."""
    return _view_outputs(_view_study(upload, window, None, None, None, None, None, None, render=False))


StudyKey = tuple[tuple[str, ...], str | None, int | None, str | None, StudyControls, tuple[float, float] | None]


def study_key(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, custom_window: tuple[float, float] | None = None,
) -> StudyKey:
    """What the study controls ask for (with ``custom_window``, the viewer's window sent to the model),
    checked (ControlError) and in one form (an empty number box and no value alike): two requests
    with equal keys describe the same study as the model gets it."""
    window_name, frame_number = read_view(window, frame)
    return (tuple(study_paths(upload)), window_name, frame_number, upload_path(prior, "prior study"),
            read_study_controls(series, max_images, first_slice, last_slice), custom_window)


def show_new_study(upload: object, window: object, max_images: object, prior: object) -> tuple[Any, ...]:
    """After a new upload: the slider at the middle slice, the images sent, the series to choose
    from; the series choice and the slice range of the previous upload are cleared; the viewer
    starts again from the model's view (the window sliders at its window, not inverted, not sent).
    The last value is what the panel now shows (``show_view``'s state)."""
    view = _view_study(upload, window, None, prior, None, max_images, None, None, warn=False)  # /preview warned
    viewer = ViewerSettings()
    key = study_key(upload, window, None, prior, None, max_images, None, None) if _settled(view) else None
    on_page = OnPage(key, None if view.fell_back else read_view(window, None)[0], _slider_values(view, viewer, True))
    return (*_study_outputs(view, keep_series=False)[1:], None, None,
            *_viewer_outputs(view, viewer, None, follow=True, reset=True), gr.Image(label=viewer.describe()), on_page)


def _settled(view: StudyView) -> bool:
    # A study shown as asked: a fallback or a problem leaves controls that describe another view.
    return view.study is not None and not view.fell_back


@dataclass(frozen=True)
class OnPage:
    """What the input panel shows, as the last view event (or upload) left it: ``show_view``'s state.
    One event serves every control and Gradio runs it once more, with the page's values then, for
    triggers that came while it ran (always_last): which control changed is told from this, not
    from the trigger."""

    study: StudyKey | None  # the study shown (study_key); None: not the one asked for, render it whole
    window: str | None  # the DICOM window selector's value (read_view's: None for auto)
    sliders: tuple[float, float] | None  # the window sliders' (center, width); None: not known


def _reader_view(controls: tuple[object, ...], view: StudyView, viewer: ViewerSettings) -> Any:
    """The preview as the reader set it (the sliders' window not sent, inverted), None where it is
    the model's view. A window that does not fit the image (colour) is said, and the model's view shown."""
    if view.study is None or not viewer.differs:
        return None
    image = view.study.item(view.shown).image
    if viewer.reader_window is not None:
        seen = _view_study(*controls, view.shown + 1, render=False, custom_window=viewer.reader_window)
        if seen.study is not None and not seen.fell_back:
            image = seen.study.item(seen.shown).image
    return gr.Image(value=reader_image(image, viewer.invert), label=viewer.describe())


def _slider_setup(view: StudyView) -> SliderSetup | None:
    """The window sliders for the image shown (None: no image, or one no window applies to)."""
    return slider_setup(view.study.item(view.shown).dicom) if view.study is not None else None


def _slider_values(view: StudyView, viewer: ViewerSettings, follow: bool) -> tuple[float, float] | None:
    """The window sliders' (center, width) once ``_viewer_outputs`` is on the page."""
    setup = _slider_setup(view)
    if follow and setup is not None:
        return setup.center, setup.width
    return viewer.custom_window


def _model_view(view: StudyView, reader: Any) -> Any:
    """The model's view beside the preview while the reader's view differs from it, else hidden."""
    if reader is None or view.study is None:
        return gr.Image(value=None, visible=False)
    return gr.Image(value=view.study.item(view.shown).image, visible=True)


def _viewer_outputs(view: StudyView, viewer: ViewerSettings, reader: Any, follow: bool,
                    reset: bool = False) -> tuple[Any, ...]:
    """Values for (model's view, window center, window width, invert, send, viewer controls,
    adjusted): the model's view beside the preview when they differ; with ``follow`` the window
    sliders take the shown image's window and range (after a new upload or a window choice). Invert
    and send are written only with ``reset`` (a new upload, a window choice): written back from a
    request, they would undo a click made while it ran."""
    setup = _slider_setup(view)
    if follow and setup is not None:
        center = gr.Slider(minimum=setup.center_range[0], maximum=setup.center_range[1], value=setup.center)
        width = gr.Slider(minimum=setup.width_range[0], maximum=setup.width_range[1], value=setup.width)
    else:
        center = width = gr.skip()
    flags = (viewer.invert, viewer.send) if reset else (gr.skip(), gr.skip())
    return (_model_view(view, reader), center, width, *flags, gr.Group(visible=setup is not None), viewer.adjusted)


def _what_changed(window: str | None, viewer: ViewerSettings, on_page: OnPage | None) -> tuple[ViewerSettings, bool]:
    """The viewer as the person's last change leaves it, and whether that change was a window picked
    from the selector (then the model gets that window, the sliders' is no longer sent, and the
    sliders move to it). A window slider moved: the preview shows the sliders' window (the model gets
    it too where it is sent), and the sliders no longer follow the image's window."""
    if on_page is None:
        return viewer, False
    if window != on_page.window:
        return dataclasses.replace(viewer, send=False, adjusted=False), True
    if on_page.sliders is not None and viewer.custom_window != on_page.sliders:
        return dataclasses.replace(viewer, adjusted=True), False
    return viewer, False


def show_view(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, shown: object, center: object = None, width: object = None,
    invert: object = False, send: object = False, adjusted: object = False, on_page: OnPage | None = None,
) -> tuple[Any, ...]:
    """The input panel after a study control (window, series, max images, slice range, prior), the
    slice slider or the viewer (window sliders, invert, send) changed: ``_study_outputs``' values
    (the preview as the reader set the viewer), ``_viewer_outputs``', then what the panel now shows
    (this event's state). When the study as the model gets it is still ``on_page``'s, only the slice
    the slider points at is rendered (stepping through a series, or a window not sent, stays quick);
    otherwise the whole study is, and the sliders follow the image's window until the reader moves them."""
    chosen = read_view(window, frame)[0]
    viewer, picked = _what_changed(chosen, read_viewer(center, width, invert, send, adjusted), on_page)
    controls = (upload, window, frame, prior, series, max_images, first_slice, last_slice)
    key = study_key(*controls, custom_window=viewer.model_window)
    if on_page is None or key != on_page.study:
        follow = picked or not (viewer.adjusted or viewer.send)
        view = _view_study(*controls, shown, custom_window=viewer.model_window)
        outputs = list(_study_outputs(view, keep_series=True))
        reader = _reader_view(controls, view, viewer)
        # The label too: it says whether the preview is the model's view.
        outputs[0] = reader if reader is not None else gr.Image(value=outputs[0], label=viewer.describe())
        now = OnPage(key if _settled(view) else None, None if view.fell_back else chosen,
                     _slider_values(view, viewer, follow))
        return (*outputs, *_viewer_outputs(view, viewer, reader, follow, reset=picked), now)
    controls = (upload, window, frame, None, series, max_images, first_slice, last_slice)
    view = _view_study(*controls, shown, render=False, custom_window=viewer.model_window)
    if view.study is None:
        return (gr.skip(),) * 16
    number = view.shown + 1
    slider = gr.Slider(label=_slice_label(view.study, number), **({"value": number} if view.moved else {}))
    reader = _reader_view(controls, view, viewer)
    preview = reader if reader is not None else gr.Image(value=view.study.item(view.shown).image,
                                                         label=viewer.describe())
    # The preview, the slider and the model's view; the rest of the panel already shows this study.
    return (preview, *(gr.skip(),) * 4, slider, gr.skip(), gr.skip(), _model_view(view, reader),
            *(gr.skip(),) * 5, viewer.adjusted, OnPage(on_page.study, chosen, viewer.custom_window))


# --------------------------------------------------------------------------- UI


def _banner(text: str, elem_id: str, background: str, border: str) -> gr.HTML:
    # top-banner: one line once read (radiology.viewer's page code and CSS); a tap opens it again.
    return gr.HTML(_banner_html(text, background, border, css_class="top-banner"), elem_id=elem_id)


def server_notice(served: DemoModel) -> Any:
    """The server banner's update: why a model server failed its last check or request, hidden while
    the servers answer."""
    problem = served.server_problem
    if not problem:
        return gr.HTML("", visible=False)
    return gr.HTML(_banner_html(SERVER_NOTICE.format(reason=problem.rstrip(".")), "#ffe1e1", "#c62828", role="alert"),
                   visible=True)


def _banners(served: DemoModel) -> gr.HTML | None:
    """The banners above the page; returns the server banner (None where no model is served elsewhere)."""
    _banner(DISCLAIMER, "disclaimer", "#fff4d6", "#d89b00")
    if served.placeholder:
        reason = (served.reason or "no model is configured").rstrip(".")
        _banner(PLACEHOLDER_NOTICE.format(reason=reason[:1].upper() + reason[1:]), "demo-model-notice",
                "#ffe1e1", "#c62828")
    if served.baseline_reason:
        reason = served.baseline_reason.rstrip(".")
        _banner(BASELINE_NOTICE.format(reason=reason[:1].upper() + reason[1:]), "baseline-notice",
                "#ffe1e1", "#c62828")
    if not served.remotes:
        return None
    notice = server_notice(served)
    return gr.HTML(notice.value, visible=notice.visible, elem_id="server-notice")


def load_examples(folder: Path = ASSETS) -> list[dict[str, str]]:
    """The example images listed in ``folder/examples.json`` that exist (file, caption, source, licence)."""
    manifest = folder / "examples.json"
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text())
    return [dict(entry, path=str(folder / entry["file"])) for entry in entries if (folder / entry["file"]).is_file()]


@dataclass
class InputPanel:
    upload: gr.File
    preview: gr.Image
    burned_in: gr.HTML
    window: gr.Dropdown
    frame: gr.Number
    dicom_summary: gr.Markdown
    slice: gr.Slider
    sent: gr.Gallery
    series: gr.Dropdown
    max_images: gr.Slider
    first_slice: gr.Number
    last_slice: gr.Number
    prior: gr.File
    viewer: ViewerControls

    def preview_outputs(self) -> list[gr.components.Component]:
        """In the order of ``preview_upload``'s values (the /preview API's outputs)."""
        return [self.preview, self.burned_in, self.window, self.frame, self.dicom_summary]

    def study_outputs(self) -> list[gr.components.Component]:
        """In the order of ``show_view``'s values (before its state)."""
        return [*self.preview_outputs(), self.slice, self.sent, self.series]

    def study_inputs(self) -> list[gr.components.Component]:
        """In the order of ``show_view``'s parameters (before its state)."""
        return [self.upload, self.window, self.frame, self.prior, self.series, self.max_images, self.first_slice,
                self.last_slice, self.slice, *self.viewer.inputs()]

    def generate_inputs(self) -> list[gr.components.Component]:
        """The study's inputs of Generate, after the window and frame (their order in the API), then
        the viewer's window and whether it is sent."""
        return [self.prior, self.series, self.max_images, self.first_slice, self.last_slice, self.viewer.center,
                self.viewer.width, self.viewer.send]


@dataclass
class ViewerControls:
    """The preview's viewer: the model's view beside a reader's view that differs, zoom buttons
    (page code only), and for grayscale DICOM the window sliders, invert and send."""

    model_view: gr.Image
    center: gr.Slider
    width: gr.Slider
    invert: gr.Checkbox
    send: gr.Checkbox
    group: gr.Group
    adjusted: gr.Checkbox  # the reader moved a window slider since the last upload or window choice
    zoom_in: gr.Button
    zoom_out: gr.Button
    zoom_reset: gr.Button

    def inputs(self) -> list[gr.components.Component]:
        """In the order of the viewer parameters of ``show_view``."""
        return [self.center, self.width, self.invert, self.send, self.adjusted]

    def outputs(self) -> list[gr.components.Component]:
        """In the order of ``_viewer_outputs``'s values."""
        return [self.model_view, self.center, self.width, self.invert, self.send, self.group, self.adjusted]


def _input_panel() -> InputPanel:
    # A file input, not gr.Image: gr.Image decodes uploads itself (its own errors, no TIFF or DICOM
    # preview), while every upload here goes through serve.load_study.
    upload = gr.File(label="Image, study or DICOM series: one file, several (a study's views, a series' slices) "
                     "or a .zip", file_count="multiple", file_types=list(STUDY_SUFFIXES), type="filepath",
                     elem_id="upload")
    burned_in = gr.HTML("", visible=False, elem_id="burned-in-warning")
    # No Share button: it would post a patient's image to a public discussion page.
    with gr.Row(equal_height=True):
        preview = gr.Image(label=ViewerSettings().describe(), type="pil", format="png", interactive=False,
                           height=320, buttons=["download", "fullscreen"], elem_id="preview", scale=2)
        # Beside the preview while the reader's view differs from what the model gets.
        model_view = gr.Image(label="What the model gets", type="pil", format="png", interactive=False, height=320,
                              buttons=["fullscreen"], visible=False, elem_id="model-view", scale=1)
    with gr.Row(elem_id="viewer-zoom"):
        zoom_in = gr.Button("Zoom in", size="sm", elem_id="zoom-in")
        zoom_out = gr.Button("Zoom out", size="sm", elem_id="zoom-out")
        zoom_reset = gr.Button("Reset zoom", size="sm", elem_id="zoom-reset")
    # Several images (a series, views): a slider over all of them, and the ones the model gets.
    slider = gr.Slider(minimum=1, maximum=2, value=1, step=1, label="Slice", visible=False, elem_id="slice")
    sent = gr.Gallery(label="Sent to the model, in order", visible=False, columns=8, height=150, format="png",
                      object_fit="contain", allow_preview=True, interactive=False,
                      buttons=["download", "fullscreen"], elem_id="sent")
    with gr.Row():
        # DICOM only: shown once a DICOM file is uploaded.
        window = gr.Dropdown(window_choices(), value=AUTO_WINDOW, label="DICOM window", visible=False,
                             elem_id="window")
        series = gr.Dropdown(choices=[], value=None, label="Series", visible=False, elem_id="series")
        # One frame of a multi-frame file, for API callers; the page steps through frames with the slider.
        frame = gr.Number(value=None, precision=0, label="Frame", visible=False, elem_id="frame")
    # Grayscale DICOM only: the reader's window (ranges set per image), shown once such a file is uploaded.
    with gr.Group(visible=False, elem_id="viewer-window") as viewer_group:
        with gr.Row():
            center = gr.Slider(-1024, 3071, value=40, step=1, label="Window center (level)", elem_id="window-center")
            width = gr.Slider(1, 4096, value=400, step=1, label="Window width", elem_id="window-width")
        with gr.Row():
            invert = gr.Checkbox(False, label="Invert (viewing only)", elem_id="invert")
            send = gr.Checkbox(False, label="Send this window to the model", elem_id="send-window")
    # Whether the reader moved a window slider since the last upload or window choice (a hidden
    # checkbox: the page keeps it per tab, as it keeps the other controls).
    adjusted = gr.Checkbox(False, visible=False, label="Window adjusted", elem_id="window-adjusted")
    viewer = ViewerControls(model_view, center, width, invert, send, viewer_group, adjusted, zoom_in, zoom_out,
                            zoom_reset)
    dicom_summary = gr.Markdown(visible=False, elem_id="dicom-attributes")
    with gr.Accordion("Study: images sent, prior study", open=True):
        with gr.Row():
            max_images = gr.Slider(1, MAX_STUDY_IMAGES, value=DEFAULT_MAX_IMAGES, step=1, label="Max images",
                                   info="a series is sampled evenly, first and last slice included",
                                   elem_id="max-images", scale=2)
            first_slice = gr.Number(value=None, precision=0, label="First slice (empty: 1)",
                                    elem_id="first-slice")
            last_slice = gr.Number(value=None, precision=0, label="Last slice (empty: the last)",
                                   elem_id="last-slice")
        prior = gr.File(label="Prior study (optional): one earlier image or DICOM file, placed first for comparison",
                        file_count="single", file_types=list(UPLOAD_SUFFIXES), type="filepath", elem_id="prior")
    return InputPanel(upload, preview, burned_in, window, frame, dicom_summary, slider, sent, series, max_images,
                      first_slice, last_slice, prior, viewer)


def _wire_zoom(panel: InputPanel) -> None:
    """The zoom buttons: page code only, no request. A new upload (or example) starts at the whole image."""
    for button, action in ((panel.viewer.zoom_in, "in"), (panel.viewer.zoom_out, "out"),
                           (panel.viewer.zoom_reset, "reset")):
        button.click(None, None, None, js=zoom_js(action), api_visibility="private", queue=False)
    panel.upload.change(None, None, None, js=zoom_js("reset"), api_visibility="private", queue=False)


def _examples_gallery(upload: gr.File) -> None:
    examples = load_examples()
    if not examples:
        return
    gallery = gr.Gallery(
        [(e["path"], e["caption"]) for e in examples], label="Examples: click one to use it", columns=4,
        height=180, allow_preview=False, interactive=False, object_fit="contain", elem_id="examples",
    )
    gr.Markdown(
        "Example images are public DICOM test images bundled with pydicom (NEMA WG04 and GDCM samples); "
        "sources and licences in `assets/README.md`.",
        elem_id="examples-sources",
    )

    def pick(event: gr.SelectData) -> list[str]:
        return [examples[event.index]["path"]]

    gallery.select(pick, None, upload, api_visibility="private", concurrency_limit=None)


@dataclass
class DecodingControls:
    mode: gr.Radio
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    max_new_tokens: gr.Slider
    seed: gr.Number

    def inputs(self) -> list[gr.components.Component]:
        """In the order of the generate handler's parameters."""
        return [self.mode, self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.seed]


def _decoding_controls(config: AppConfig) -> DecodingControls:
    defaults = GenerationSettings()
    with gr.Accordion("Decoding", open=False):
        mode = gr.Radio(list(zip(("Greedy (deterministic)", "Sampling"), DECODING_MODES)), value="greedy",
                        label="Method")
        max_new_tokens = gr.Slider(1, config.max_new_tokens, value=min(defaults.max_new_tokens, config.max_new_tokens),
                                   step=1, label="Max new tokens", elem_id="max-new-tokens")
        with gr.Group(visible=False) as sampling_only:
            temperature = gr.Slider(*TEMPERATURE_RANGE, value=defaults.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(*TOP_P_RANGE, value=defaults.top_p, step=0.01, label="Top-p")
            top_k = gr.Slider(*TOP_K_RANGE, value=defaults.top_k, step=1, label="Top-k (0: off)")
            seed = gr.Number(value=None, precision=0, label="Seed (empty: random)")
    mode.change(lambda m: gr.Group(visible=m == "sampling"), mode, sampling_only,
                api_visibility="private", concurrency_limit=None, queue=False)
    return DecodingControls(mode, temperature, top_p, top_k, max_new_tokens, seed)


def _answer_box(label: str, elem_id: str, settings_id: str) -> list[gr.components.Component]:
    """The streamed answer (copyable) and the line under it naming the model and the settings."""
    answer = gr.Textbox(label=label, lines=10, interactive=False, buttons=["copy"], autoscroll=True, elem_id=elem_id)
    return [answer, gr.Markdown(elem_id=settings_id)]


# Ctrl+Enter (Cmd+Enter) presses Ask in the question box and Generate elsewhere; Esc presses Stop.
KEYBOARD_JS = """() => {
  document.addEventListener('keydown', (event) => {
    const press = (id) => { const button = document.getElementById(id); if (button) { event.preventDefault(); button.click(); } };
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      press(event.target.closest && event.target.closest('#question') ? 'ask' : 'generate');
    } else if (event.key === 'Escape') {
      press('stop');
    }
  });
}"""


@dataclass
class DraftPanel:
    """Everything about the draft besides its answer boxes: the Findings / Impression rendering, follow-up
    questions, export, and this browser session's drafts (gr.State: never on disk)."""

    sections: gr.Markdown
    question: gr.Textbox
    ask: gr.Button
    ask_stop: gr.Button
    conversation: gr.Chatbot
    follow_settings: gr.Markdown
    export: gr.Button
    export_file: gr.File
    history_list: gr.Dropdown
    restore: gr.Button
    draft: gr.State
    history: gr.State

    def cleared(self, answers: Sequence[gr.components.Component]) -> list[gr.components.Component]:
        """What a new study empties: in the order of ``_cleared_values``' values."""
        return [*answers, self.sections, self.conversation, self.follow_settings, self.draft, self.export_file]


def _cleared_values(answers: Sequence[gr.components.Component]) -> tuple[Any, ...]:
    return (*[""] * len(answers), "", [], "", None, None)


def _draft_panel(config: AppConfig) -> DraftPanel:
    sections = gr.Markdown(visible=config.report_format == "findings_impression", elem_id="answer-sections")
    with gr.Accordion("Follow-up questions about this draft", open=True):
        conversation = gr.Chatbot(label="Follow-up questions (the model answers about the same images)", height=260,
                                  buttons=["copy"], elem_id="conversation")
        follow_settings = gr.Markdown(elem_id="follow-up-settings")
        question = gr.Textbox(label="Question (Ctrl+Enter asks; Esc stops)", lines=1, max_length=MAX_QUESTION_CHARS,
                              placeholder="e.g. Is there a pleural effusion?", elem_id="question")
        with gr.Row():
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            ask_stop = gr.Button("Stop", variant="stop", elem_id="ask-stop")
    with gr.Accordion("Export and history", open=False):
        export = gr.Button("Export draft (.zip: report.md, report.txt, images)", elem_id="export")
        export_file = gr.File(label="Draft export (AI-generated draft, not reviewed)", interactive=False,
                              elem_id="export-file")
        with gr.Row():
            history_list = gr.Dropdown(choices=[], value=None, label="Drafts of this session (kept in this tab only)",
                                       elem_id="history", scale=3)
            restore = gr.Button("Restore", elem_id="restore", scale=1)
    return DraftPanel(sections, question, ask, ask_stop, conversation, follow_settings, export, export_file,
                      history_list, restore, gr.State(None), gr.State([]))


def _takes_files(block: Any) -> bool:
    return isinstance(block, gr.File) and block.file_count == "multiple"


class DemoBlocks(gr.Blocks):
    """gr.Blocks that refuses a malformed request (too few values, a file reference that is not an
    upload of this app, a value a component cannot take) with a short message naming the event's
    controls, instead of Gradio's traceback in the log that quotes the values and paths sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per API name, the values a request must send: inputs added later take their defaults.
        self.required_values: dict[str, int] = {}

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        event = block_fn.api_name or block_fn.name
        controls = ", ".join(str(getattr(block, "label", None) or type(block).__name__) for block in block_fn.inputs)
        if self.required_values.get(event, len(block_fn.inputs)) <= len(inputs) < len(block_fn.inputs):
            inputs = [*inputs, *[None] * (len(block_fn.inputs) - len(inputs))]
        # A script's one file where the page sends a list (the upload takes several).
        inputs = [[value] if isinstance(value, dict) and _takes_files(block) else value
                  for block, value in zip(block_fn.inputs, inputs)] + list(inputs[len(block_fn.inputs):])
        if len(inputs) < len(block_fn.inputs):
            logger.info("%s request refused: %d of its %d values sent", event, len(inputs), len(block_fn.inputs))
            raise gr.Error(f"This request sent {len(inputs)} values; it takes {len(block_fn.inputs)}: {controls}.",
                           print_exception=False)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception as err:
            logger.info("%s request refused: its values could not be read (%s)", event, type(err).__name__)
            raise gr.Error(
                f"This request's values could not be read; it takes: {controls}. The image must be a file "
                "uploaded to this app (the page's upload button, or gradio_client's handle_file).",
                print_exception=False,
            ) from None


def build_demo(served: DemoModel, config: AppConfig | None = None, stops: StopRegistry | None = None) -> gr.Blocks:
    """The whole UI for the served model (and its baseline, side by side). Launch it with ``launch(demo, config)``."""
    config = config or AppConfig()
    stops = StopRegistry() if stops is None else stops  # (an empty registry is falsy: it has a length)
    concurrency = config.concurrency or default_concurrency(served.loaded)
    # Uploads (and previews made from them) are deleted from Gradio's cache once upload_ttl old.
    delete_cache = (min(60, config.upload_ttl), config.upload_ttl)
    with DemoBlocks(title=TITLE, analytics_enabled=False, delete_cache=delete_cache) as demo:
        server_banner = _banners(served)
        gr.Markdown(f"# {TITLE}\nUpload an image (PNG, JPEG, WebP, BMP, TIFF, GIF or DICOM), several of one study "
                    "(two views, a DICOM series' files or its .zip) or pick an example; add a prior study and the "
                    "clinical history if you like, and press **Generate**.")
        with gr.Row(equal_height=False):
            with gr.Column():
                panel = _input_panel()
                _examples_gallery(panel.upload)
            with gr.Column():
                instruction = gr.Textbox(with_report_format(DEFAULT_INSTRUCTION, config.report_format),
                                         label="Instruction", lines=2,
                                         max_length=MAX_INSTRUCTION_CHARS, elem_id="instruction")
                context = gr.Textbox(label="Clinical history / question (optional)", lines=2,
                                     placeholder="e.g. 58-year-old smoker, cough for 3 weeks",
                                     max_length=MAX_CONTEXT_CHARS, elem_id="context")
                decoding = _decoding_controls(config)
                # (On phones this row stays at the bottom of the screen: radiology.viewer's CSS.)
                with gr.Row(elem_id="generate-row"):
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                if served.baseline is None:
                    answers = _answer_box("Draft description (model output)", "answer", "answer-settings")
                    draft_panel = _draft_panel(config)
                panel_text = gr.Markdown(model_panel(served), elem_id="model-panel")
        if served.baseline is not None:
            # Side by side, full width: the served model on the left, the baseline on the right.
            with gr.Row(equal_height=True):
                with gr.Column():
                    answers = _answer_box(f"Draft description: {served.loaded.name}", "answer", "answer-settings")
                with gr.Column():
                    answers += _answer_box(f"Baseline, for comparison: {served.baseline.name}", "baseline-answer",
                                           "baseline-answer-settings")
            draft_panel = _draft_panel(config)

        # Every event that reads the controls gets their values unprocessed (preprocess=False) and
        # checks them itself: Gradio's own checks answer bad API values with tracebacks that quote the
        # value, and gr.File's leaves an empty temporary file behind on every call.
        # Previews share one concurrency group: each decodes a whole upload, so a few at a time.
        previews = dict(preprocess=False, concurrency_id="preview", concurrency_limit=PREVIEW_CONCURRENCY)
        uploaded = panel.upload.change(_refusing("preview", preview_upload), [panel.upload, panel.window],
                                       panel.preview_outputs(), api_name="preview", **previews)
        on_page = gr.State(None)  # what the panel shows (OnPage), so a slider step renders one slice
        uploaded.then(_refusing("preview", show_new_study),
                      [panel.upload, panel.window, panel.max_images, panel.prior],
                      panel.study_outputs()[1:] + [panel.first_slice, panel.last_slice] + panel.viewer.outputs()
                      + [panel.preview, on_page],
                      api_visibility="private", **previews)
        # A person changing the view (select: a dropdown choice fires input twice), stepping the slider or
        # setting the viewer (window sliders, invert, send). One event for all of them, so that the page
        # runs them one at a time: a trigger while one runs runs once more after it, with the values then
        # on the page (always_last). As separate events they ran side by side, and a whole study's view
        # (Max images' box fires on losing focus) could land after a slider step's and put back the slice
        # before it. show_view tells what changed from its state, the view it last put on the page.
        gr.on([panel.window.select, panel.series.select, panel.max_images.release, panel.first_slice.input,
               panel.last_slice.input, panel.prior.change, panel.slice.input, panel.viewer.center.release,
               panel.viewer.width.release, panel.viewer.invert.input, panel.viewer.send.input],
              _refusing("preview", show_view), [*panel.study_inputs(), on_page],
              [*panel.study_outputs(), *panel.viewer.outputs(), on_page],
              api_visibility="private", trigger_mode="always_last", show_progress_on=panel.preview, **previews)
        generate_inputs = [panel.upload, instruction, *decoding.inputs(), context, panel.window, panel.frame,
                           *panel.generate_inputs()]
        # Values the API took before studies: the rest may be left out of a request (their defaults).
        demo.required_values["generate"] = generate_inputs.index(panel.frame) + 1
        run = generate_button.click(
            make_generate(served.models, stops, config,
                          on_server=lambda problem: setattr(served, "server_problem", problem)),
            generate_inputs,
            [*answers, draft_panel.draft],
            api_name="generate",
            preprocess=False,
            # Every GPU-bound event shares one concurrency group: the limit is per GPU, not per button.
            concurrency_id="gpu",
            concurrency_limit=concurrency,
        )
        # The GPU's memory in use (and whether the model server answers): read again on each page load
        # and after each answer.
        refreshed = [panel_text] if server_banner is None else [panel_text, server_banner]

        def refresh_panel() -> Any:
            return model_panel(served) if server_banner is None else (model_panel(served), server_notice(served))

        demo.load(refresh_panel, None, refreshed, api_visibility="private", concurrency_limit=None)
        run.then(refresh_panel, None, refreshed, api_visibility="private", concurrency_limit=None)

        def stop(request: gr.Request) -> None:
            stops.stop(request.session_hash)

        # Not limited by the GPU group: a Stop must run while generations occupy every slot.
        stop_button.click(stop, None, None, api_name="stop", concurrency_limit=None,
                          cancels=[run] if ON_ZERO_GPU else None)
        demo.unload(stop)  # a closed tab gives its GPU slot back at once
        _wire_draft(demo, panel, draft_panel, answers, decoding, generate_button, run, served, stops, config,
                    concurrency)
        # After the draft's: on a new upload, the draft's clearing (which stops a generation) goes first.
        _wire_zoom(panel)
    return demo


def _wire_draft(
    demo: gr.Blocks, panel: InputPanel, draft_panel: DraftPanel, answers: Sequence[gr.components.Component],
    decoding: DecodingControls, generate_button: gr.Button, run: Any, served: DemoModel, stops: StopRegistry,
    config: AppConfig, concurrency: int,
) -> None:
    """The draft's events: follow-up questions (/follow_up), export (/export), the session's history, the
    Findings / Impression rendering, clearing on a new study, and the keyboard."""
    dp = draft_panel
    private = dict(api_visibility="private", concurrency_limit=None)

    def remember_draft(draft: Draft | None, history: list[Draft] | None) -> tuple[list[Draft], Any]:
        kept = remember(history, draft)
        return kept, gr.Dropdown(choices=history_choices(kept), value=draft.id if draft is not None else None)

    # A new Generate starts a new conversation and export.
    generate_button.click(lambda: ([], "", None, ""), None, [dp.conversation, dp.follow_settings, dp.export_file,
                                                             dp.sections], queue=False, **private)
    run.then(remember_draft, [dp.draft, dp.history], [dp.history, dp.history_list], **private)
    on_server = lambda problem: setattr(served, "server_problem", problem)  # noqa: E731 (the banner's state)
    asked = dp.ask.click(make_follow_up(served.models, stops, config, on_server),
                         [dp.question, *decoding.inputs(), dp.draft],
                         [dp.conversation, dp.follow_settings, dp.draft], api_name="follow_up", preprocess=False,
                         concurrency_id="gpu", concurrency_limit=concurrency)
    asked.then(remember_draft, [dp.draft, dp.history], [dp.history, dp.history_list], **private)
    asked.success(lambda: "", None, dp.question, **private)

    def stop(request: gr.Request) -> None:
        stops.stop(request.session_hash)

    dp.ask_stop.click(stop, None, None, concurrency_limit=None, api_visibility="private",
                      cancels=[asked] if ON_ZERO_GPU else None)
    dp.export.click(export_draft, dp.draft, dp.export_file, api_name="export", concurrency_id="preview",
                    concurrency_limit=PREVIEW_CONCURRENCY)

    def restore(draft_id: object, history: list[Draft] | None) -> tuple[Any, ...]:
        draft = find_draft(history, draft_id)
        if draft is None:
            raise gr.Error("Choose a draft of this session in the list first, then press Restore.",
                           print_exception=False)
        boxes = [x for answer in draft.answers for x in (answer.shown, answer.about)]
        return (*boxes, sections_markdown(draft.answers[0].shown), conversation_messages(draft), "", draft, None)

    dp.restore.click(restore, [dp.history_list, dp.history], dp.cleared(answers), **private)

    # A new study (upload, window, series, slices, prior) empties the draft at once: an answer about the previous
    # image never stays beside the new one. A generation still running for it is stopped.
    def clear_draft(request: gr.Request) -> tuple[Any, ...]:
        # Cleared once the stopped generation has ended: an update it sent before stopping then reaches the
        # page before the cleared boxes do, and it sends none after (superseded).
        if stops.stop(request.session_hash, superseded=True):
            stops.wait_ended(request.session_hash, CLEAR_WAIT_S)
        return _cleared_values(answers)

    for event in (panel.upload.change, panel.window.select, panel.series.select, panel.max_images.release,
                  panel.first_slice.input, panel.last_slice.input, panel.prior.change):
        event(clear_draft, None, dp.cleared(answers), queue=False, cancels=[run, asked], **private)
    if config.report_format == "findings_impression":
        answers[0].change(sections_markdown, answers[0], dp.sections, queue=False, show_progress="hidden", **private)
    demo.load(None, None, None, js=KEYBOARD_JS)


def launch(demo: gr.Blocks, config: AppConfig, **overrides: Any) -> Any:
    """Queue (limits from ``config``) and serve; ``overrides`` go to ``Blocks.launch``."""
    # Every event sets its own limit (Generate: --concurrency); this default only covers any other.
    demo.queue(max_size=config.max_queue, default_concurrency_limit=config.concurrency or 1)
    options: dict[str, Any] = dict(
        server_name=config.host,
        server_port=config.port,
        share=config.share,
        auth=config.auth,
        max_file_size=config.max_file_size,
        # The example images alone, not the whole folder (its script and notes are no one's business).
        allowed_paths=[example["path"] for example in load_examples()],
        # The viewer's zoom and pan, the banners that collapse once read, the phone layout.
        css=VIEWER_CSS,
        js=VIEWER_JS,
    )
    return demo.launch(**{**options, **overrides})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # httpx logs every request URL at INFO, file URLs included: kept to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = parse_args(argv)
    remote, baseline_remote = remote_models(config)
    try:
        served = load_for_demo(config.model, config.adapter, config.load_in_4bit, config.device,
                               config.cache_dir, config.require_model, baseline=config.baseline,
                               remote=remote, baseline_remote=baseline_remote)
    except (BaselineError, ServerError) as err:  # only reached with --require_model
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # only reached with --require_model
        print(f"error: {config.model} could not be loaded: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if served.placeholder:
        logger.warning("serving the tiny demo model (%s): random weights, its output is random characters",
                       served.reason)
    if served.server_problem:
        logger.warning("serving with the model server's problem on the page; each request tries it again")
    for role, loaded in zip(("model", "baseline"), served.models):
        logger.info("%s: %s, %s on %s", role, loaded.name, loaded.precision, loaded.device)
        seconds = warm_up_on_gpu(loaded)  # CUDA only: the first user would otherwise wait for graph capture
        if seconds is not None:
            logger.info("%s warmed up in %.1f s (CUDA graphs captured)", role, seconds)
    # SIGTERM (docker stop, systemd, Spaces) ends serving as Ctrl+C does, so that the models are freed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(build_demo(served, config), config)
    except KeyboardInterrupt:  # one that landed outside Gradio's serving loop, which catches its own
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        served.close()  # ends the decode engines' threads, which hold the models
        logger.info("stopped; the models are freed")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
