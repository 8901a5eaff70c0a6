"""Radiology image description demo for clinicians (Gradio): upload an image, a study's views or a DICOM
series (and a prior study to compare with), read the draft as it streams.

    python app.py                                    # the embedded tiny model: random characters, for a first look
    python app.py --model runs/r1/merged             # a merged fine-tuned model (train.py's OUTPUT_DIR/merged)
    python app.py --model google/gemma-3-4b-pt --adapter runs/r1 --load_in_4bit
    python app.py --model runs/r1/merged --baseline google/gemma-3-4b-pt   # both answers side by side
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
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from radiology.data import DEFAULT_INSTRUCTION
from radiology.generate import GenerationSettings, LoadedModel, SideBySideTexts, paced, stream_side_by_side
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
    "Demo model: random weights, its output is random characters — start with --model to use a real one. "
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


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be 1 or more, got {number}")
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
    return AppConfig(**vars(parser.parse_args(argv)))


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
            "stopped": "stopped by user in {seconds:.1f} s", "not run": "not run (stopped by user)"}


def _status_lines(abouts: Sequence[str], item: SideBySideTexts) -> list[str]:
    return [f"{about} · {_ENDINGS[state].format(seconds=seconds or 0.0)}"
            for about, state, seconds in zip(abouts, item.states, item.seconds)]


def make_generate(
    models: Sequence[LoadedModel], stops: StopRegistry, config: AppConfig
) -> Callable[..., Iterator[tuple[str, ...]]]:
    """The Generate button's handler. It streams the models' answers (the served one, then a
    baseline) through ``stream_side_by_side``: (text so far, the line under it) for each model, all
    pairs in every update. It gets the controls' values unprocessed and checks each of them."""
    models = list(models)

    # Only picklable arguments (a key, not the event): on ZeroGPU this runs in a worker process.
    def stream_on_gpu(
        key: str, images: list[Image.Image], prior: Image.Image | None, instruction: str, context: str | None,
        settings: GenerationSettings,
    ) -> Iterator[SideBySideTexts]:
        yield from stream_side_by_side(models, images, instruction, settings, context, stop=stops.event(key),
                                       prior=prior)

    stream_on_gpu = _gpu_function(stream_on_gpu, config.gpu_duration)

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
    ) -> Iterator[tuple[str, ...]]:
        try:
            settings = settings_from_ui(mode, temperature, top_p, top_k, max_new_tokens, seed, config.max_new_tokens)
            instruction = clean_instruction(instruction)
            context = clean_context(context)
            viewer = read_viewer(window_center, window_width, send=send_window)
            study = read_study(upload, window, frame, prior, series, max_images, first_slice, last_slice,
                               custom_window=viewer.model_window)
        except ValueError as err:  # UploadError and ControlError are ValueErrors
            raise refuse(err, "generate") from None
        notes = _input_notes(study, context)
        prior_image = study.prior.image if study.prior is not None else None
        abouts = [f"{m.name} · {m.precision} · {m.device} · {settings.describe()}{notes}" for m in models]
        session = request.session_hash if request is not None else None
        with stops.running(session) as (key, _):
            try:
                with closing(stream_on_gpu(key, list(study.images), prior_image, instruction, context,
                                           settings)) as items:
                    for item in paced(items, UPDATE_INTERVAL_S):
                        yield tuple(x for pair in zip(item, _status_lines(abouts, item)) for x in pair)
            except Exception as err:
                if is_out_of_memory(err):
                    free_accelerator_memory()
                    logger.warning("generation ran out of GPU memory; memory freed")
                    raise gr.Error(OUT_OF_MEMORY, print_exception=False) from None
                logger.exception("generation failed")  # the traceback holds code paths, no upload data
                raise gr.Error(
                    f"Generation failed ({type(err).__name__}). Try again; if it keeps failing, the server "
                    "log has the details.",
                    print_exception=False,
                ) from None

    return generate


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
        return StudyView(study, _shown_index(study, shown), fell_back=True)
    except UploadError as err:
        warning(str(err))
        return StudyView(None, problem=str(err))
    return StudyView(study, _shown_index(study, shown))


def _shown_index(study: UploadedStudy, shown: object) -> int:
    """The 0-based item to show: the slider's (1-based) number within the study, else the middle one."""
    number = read_number(shown, "Slice", 1, whole=True, empty="the middle one")
    return study.total // 2 if number is None else min(int(number), study.total) - 1


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
        slider = gr.Slider(minimum=1, maximum=study.total, value=number, step=1, label=_slice_label(study, number),
                           visible=True)
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


def show_new_study(upload: object, window: object, max_images: object, prior: object) -> tuple[Any, ...]:
    """After a new upload: the slider at the middle slice, the images sent, the series to choose
    from; the series choice and the slice range of the previous upload are cleared; the viewer
    starts again from the model's view (the window sliders at its window, not inverted, not sent)."""
    view = _view_study(upload, window, None, prior, None, max_images, None, None, warn=False)  # /preview warned
    return (*_study_outputs(view, keep_series=False)[1:], None, None,
            *_viewer_outputs(view, ViewerSettings(), None, follow=True), gr.Image(label=ViewerSettings().describe()))


def _viewed(
    controls: tuple[object, ...], shown: object, viewer: ViewerSettings, keep_series: bool, follow: bool,
) -> tuple[Any, ...]:
    """``_study_outputs`` for the study as the model gets it (the sliders' window when it is sent),
    the preview replaced by the reader's view, then the viewer's outputs."""
    view = _view_study(*controls, shown, custom_window=viewer.model_window)
    outputs = list(_study_outputs(view, keep_series))
    reader = _reader_view(controls, view, viewer)
    # The label too: it says whether the preview is the model's view.
    outputs[0] = reader if reader is not None else gr.Image(value=outputs[0], label=viewer.describe())
    return (*outputs, *_viewer_outputs(view, viewer, reader, follow))


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


def _viewer_outputs(view: StudyView, viewer: ViewerSettings, reader: Any, follow: bool) -> tuple[Any, ...]:
    """Values for (model's view, window center, window width, invert, send, viewer controls,
    adjusted): the model's view beside the preview when they differ; with ``follow`` the window
    sliders take the shown image's window and range (after a new upload or a window choice)."""
    item = view.study.item(view.shown) if view.study is not None else None
    if reader is not None and item is not None:
        model_view = gr.Image(value=item.image, visible=True)
    else:
        model_view = gr.Image(value=None, visible=False)
    setup = slider_setup(item.dicom if item is not None else None)
    if follow and setup is not None:
        center = gr.Slider(minimum=setup.center_range[0], maximum=setup.center_range[1], value=setup.center)
        width = gr.Slider(minimum=setup.width_range[0], maximum=setup.width_range[1], value=setup.width)
    else:
        center = width = gr.skip()
    controls = gr.Group(visible=setup is not None)
    return model_view, center, width, viewer.invert, viewer.send, controls, viewer.adjusted


def show_study(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, shown: object, center: object = None, width: object = None,
    invert: object = False, send: object = False, adjusted: object = False,
) -> tuple[Any, ...]:
    """The study again after a control changed (series, max images, slice range, prior); the
    viewer's settings stay, and the sliders follow the image's window until the reader moves them."""
    viewer = read_viewer(center, width, invert, send, adjusted)
    controls = (upload, window, frame, prior, series, max_images, first_slice, last_slice)
    return _viewed(controls, shown, viewer, keep_series=True, follow=not (viewer.adjusted or viewer.send))


def show_window_choice(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, shown: object, center: object = None, width: object = None,
    invert: object = False, send: object = False, adjusted: object = False,
) -> tuple[Any, ...]:
    """A DICOM window chosen from the selector: the model gets it (the sliders' window is no longer
    sent) and the sliders move to it."""
    viewer = dataclasses.replace(read_viewer(center, width, invert, send, adjusted), send=False, adjusted=False)
    controls = (upload, window, frame, prior, series, max_images, first_slice, last_slice)
    return _viewed(controls, shown, viewer, keep_series=True, follow=True)


def show_adjusted_window(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, shown: object, center: object = None, width: object = None,
    invert: object = False, send: object = False, adjusted: object = False,
) -> tuple[Any, ...]:
    """The reader moved a window slider: the preview shows the sliders' window (and the model gets
    it too where it is sent)."""
    viewer = dataclasses.replace(read_viewer(center, width, invert, send, adjusted), adjusted=True)
    controls = (upload, window, frame, prior, series, max_images, first_slice, last_slice)
    return _viewed(controls, shown, viewer, keep_series=True, follow=False)


def show_slice(
    upload: object, window: object, frame: object, prior: object, series: object, max_images: object,
    first_slice: object, last_slice: object, shown: object, center: object = None, width: object = None,
    invert: object = False, send: object = False, adjusted: object = False,
) -> tuple[Any, ...]:
    """The slice the slider points at, as the reader set the viewer, beside it as the model would
    get it where they differ, and whether it is sent."""
    viewer = read_viewer(center, width, invert, send, adjusted)
    controls = (upload, window, frame, None, series, max_images, first_slice, last_slice)
    view = _view_study(*controls, shown, render=False, custom_window=viewer.model_window)
    if view.study is None:
        return gr.skip(), gr.skip(), gr.skip()
    image = view.study.item(view.shown).image
    reader = _reader_view(controls, view, viewer)
    model_view = gr.Image(value=image, visible=True) if reader is not None else gr.Image(value=None, visible=False)
    preview = reader if reader is not None else gr.Image(value=image, label=viewer.describe())
    return preview, gr.Slider(label=_slice_label(view.study, view.shown + 1)), \
        model_view


# --------------------------------------------------------------------------- UI


def _banner(text: str, elem_id: str, background: str, border: str) -> gr.HTML:
    # top-banner: one line once read (radiology.viewer's page code and CSS); a tap opens it again.
    return gr.HTML(_banner_html(text, background, border, css_class="top-banner"), elem_id=elem_id)


def _banners(served: DemoModel) -> None:
    _banner(DISCLAIMER, "disclaimer", "#fff4d6", "#d89b00")
    if served.placeholder:
        reason = (served.reason or "no model is configured").rstrip(".")
        _banner(PLACEHOLDER_NOTICE.format(reason=reason[:1].upper() + reason[1:]), "demo-model-notice",
                "#ffe1e1", "#c62828")
    if served.baseline_reason:
        reason = served.baseline_reason.rstrip(".")
        _banner(BASELINE_NOTICE.format(reason=reason[:1].upper() + reason[1:]), "baseline-notice",
                "#ffe1e1", "#c62828")


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
        """In the order of ``show_study``'s values."""
        return [*self.preview_outputs(), self.slice, self.sent, self.series]

    def study_inputs(self) -> list[gr.components.Component]:
        """In the order of ``show_study``'s (and ``show_slice``'s) parameters."""
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
        """In the order of the viewer parameters of ``show_study`` and ``show_slice``."""
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


def _wire_viewer(panel: InputPanel, previews: dict[str, Any]) -> None:
    """The events of a person changing the view: the study's controls, the slice slider, the
    viewer's window, invert and send, and the zoom buttons (page code only, no request)."""
    outputs = panel.study_outputs() + panel.viewer.outputs()
    options = dict(api_visibility="private", trigger_mode="always_last", **previews)
    # (select: a dropdown choice fires input twice.)
    panel.window.select(_refusing("preview", show_window_choice), panel.study_inputs(), outputs, **options)
    for event in (panel.series.select, panel.max_images.release, panel.first_slice.input, panel.last_slice.input,
                  panel.prior.change, panel.viewer.invert.input, panel.viewer.send.input):
        event(_refusing("preview", show_study), panel.study_inputs(), outputs, **options)
    for slider in (panel.viewer.center, panel.viewer.width):
        slider.release(_refusing("preview", show_adjusted_window), panel.study_inputs(), outputs, **options)
    panel.slice.input(_refusing("preview", show_slice), panel.study_inputs(),
                      [panel.preview, panel.slice, panel.viewer.model_view], **options)
    for button, action in ((panel.viewer.zoom_in, "in"), (panel.viewer.zoom_out, "out"),
                           (panel.viewer.zoom_reset, "reset")):
        button.click(None, None, None, js=zoom_js(action), api_visibility="private", queue=False)
    # A new upload (or example) starts at the whole image.
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
        _banners(served)
        gr.Markdown(f"# {TITLE}\nUpload an image (PNG, JPEG, WebP, BMP, TIFF, GIF or DICOM), several of one study "
                    "(two views, a DICOM series' files or its .zip) or pick an example; add a prior study and the "
                    "clinical history if you like, and press **Generate**.")
        with gr.Row(equal_height=False):
            with gr.Column():
                panel = _input_panel()
                _examples_gallery(panel.upload)
            with gr.Column():
                instruction = gr.Textbox(DEFAULT_INSTRUCTION, label="Instruction", lines=2,
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
                panel_text = gr.Markdown(model_panel(served), elem_id="model-panel")
        if served.baseline is not None:
            # Side by side, full width: the served model on the left, the baseline on the right.
            with gr.Row(equal_height=True):
                with gr.Column():
                    answers = _answer_box(f"Draft description: {served.loaded.name}", "answer", "answer-settings")
                with gr.Column():
                    answers += _answer_box(f"Baseline, for comparison: {served.baseline.name}", "baseline-answer",
                                           "baseline-answer-settings")

        # Every event that reads the controls gets their values unprocessed (preprocess=False) and
        # checks them itself: Gradio's own checks answer bad API values with tracebacks that quote the
        # value, and gr.File's leaves an empty temporary file behind on every call.
        # Previews share one concurrency group: each decodes a whole upload, so a few at a time.
        previews = dict(preprocess=False, concurrency_id="preview", concurrency_limit=PREVIEW_CONCURRENCY)
        uploaded = panel.upload.change(_refusing("preview", preview_upload), [panel.upload, panel.window],
                                       panel.preview_outputs(), api_name="preview", **previews)
        uploaded.then(_refusing("preview", show_new_study),
                      [panel.upload, panel.window, panel.max_images, panel.prior],
                      panel.study_outputs()[1:] + [panel.first_slice, panel.last_slice] + panel.viewer.outputs()
                      + [panel.preview],
                      api_visibility="private", **previews)
        _wire_viewer(panel, previews)
        generate_inputs = [panel.upload, instruction, *decoding.inputs(), context, panel.window, panel.frame,
                           *panel.generate_inputs()]
        # Values the API took before studies: the rest may be left out of a request (their defaults).
        demo.required_values["generate"] = generate_inputs.index(panel.frame) + 1
        run = generate_button.click(
            make_generate(served.models, stops, config),
            generate_inputs,
            answers,
            api_name="generate",
            preprocess=False,
            # Every GPU-bound event shares one concurrency group: the limit is per GPU, not per button.
            concurrency_id="gpu",
            concurrency_limit=concurrency,
        )
        # The GPU's memory in use: read again on each page load and after each answer.
        def refresh_panel() -> str:
            return model_panel(served)

        demo.load(refresh_panel, None, panel_text, api_visibility="private", concurrency_limit=None)
        run.then(refresh_panel, None, panel_text, api_visibility="private", concurrency_limit=None)

        def stop(request: gr.Request) -> None:
            stops.stop(request.session_hash)

        # Not limited by the GPU group: a Stop must run while generations occupy every slot.
        stop_button.click(stop, None, None, api_name="stop", concurrency_limit=None,
                          cancels=[run] if ON_ZERO_GPU else None)
        demo.unload(stop)  # a closed tab gives its GPU slot back at once
    return demo


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
    try:
        served = load_for_demo(config.model, config.adapter, config.load_in_4bit, config.device,
                               config.cache_dir, config.require_model, baseline=config.baseline)
    except BaselineError as err:  # only reached with --require_model
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # only reached with --require_model
        print(f"error: {config.model} could not be loaded: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if served.placeholder:
        logger.warning("serving the tiny demo model (%s): random weights, its output is random characters", served.reason)
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
