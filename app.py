"""Radiology image description demo for clinicians (Gradio): upload an image, read the draft as it streams.

    python app.py                                    # the embedded tiny model: meaningless text, for a first look
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
from radiology.dicom import HEADER_WINDOW, WINDOW_CHOICES
from radiology.generate import GenerationSettings, LoadedModel, SideBySideTexts, stream_side_by_side
from radiology.serve import (
    MAX_CONTEXT_CHARS,
    MAX_INSTRUCTION_CHARS,
    UPLOAD_SUFFIXES,
    BaselineError,
    ControlError,
    DemoModel,
    StopRegistry,
    UploadedImage,
    UploadError,
    UploadOptionError,
    clean_context,
    clean_instruction,
    default_concurrency,
    free_accelerator_memory,
    is_out_of_memory,
    load_for_demo,
    load_upload,
    model_panel,
    read_choice,
    read_number,
    upload_path,
    warm_up_on_gpu,
    window_choices,
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
    "Demo model: the output is meaningless text. {reason}, so this page runs a tiny, randomly initialised "
    "Gemma 3 that strings radiology words together at random. To serve a fine-tuned model, start the app "
    "with --model FOLDER_OR_HUB_ID (or set RADIOLOGY_MODEL; add --adapter / RADIOLOGY_ADAPTER for a LoRA "
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


def read_view(window: object, frame: object) -> tuple[str, int | None]:
    """The DICOM window and frame controls' values, checked (they are ignored for other images)."""
    window = read_choice(window, "DICOM window", WINDOW_CHOICES, default=HEADER_WINDOW)
    frame = read_number(frame, "Frame", 1, whole=True, empty="the middle frame")
    return window, frame


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


def _input_notes(shown: UploadedImage, context: str | None) -> str:
    """What the settings line adds about the input: the DICOM window and frame, whether context was given."""
    notes = ""
    if shown.dicom is not None:
        notes += f" · DICOM window: {shown.dicom.window}"
        if shown.dicom.frames > 1:
            notes += f", frame {shown.dicom.frame + 1} of {shown.dicom.frames}"
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
        key: str, image: Image.Image, instruction: str, context: str | None, settings: GenerationSettings
    ) -> Iterator[SideBySideTexts]:
        yield from stream_side_by_side(models, image, instruction, settings, context, stop=stops.event(key))

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
        window: object = HEADER_WINDOW,
        frame: object = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[str, ...]]:
        try:
            settings = settings_from_ui(mode, temperature, top_p, top_k, max_new_tokens, seed, config.max_new_tokens)
            instruction = clean_instruction(instruction)
            context = clean_context(context)
            shown = load_upload(upload_path(upload), *read_view(window, frame))
        except ValueError as err:  # UploadError and ControlError are ValueErrors
            raise refuse(err, "generate") from None
        notes = _input_notes(shown, context)
        abouts = [f"{m.name} · {m.precision} · {m.device} · {settings.describe()}{notes}" for m in models]
        session = request.session_hash if request is not None else None
        with stops.running(session) as (key, _):
            try:
                with closing(stream_on_gpu(key, shown.image, instruction, context, settings)) as items:
                    for item in items:
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


def _banner_html(text: str, background: str, border: str, role: str = "note") -> str:
    style = (
        f"background:{background};border:2px solid {border};border-radius:8px;padding:12px 16px;"
        "color:#111;font-size:1.05em;line-height:1.45"
    )
    return f'<div role="{role}" style="{style}">{html.escape(text)}</div>'


def _markdown_text(text: str) -> str:
    """``text`` with Markdown's markup characters escaped (``CHEST_ABDOMEN`` stays as written)."""
    return "".join(f"\\{c}" if c in "\\`*_[]|~" else c for c in html.escape(text, quote=False))


def dicom_summary(shown: UploadedImage) -> str:
    """The technical attribute list of a DICOM upload, as Markdown (empty for other images)."""
    if shown.dicom is None:
        return ""
    items = " · ".join(f"{_markdown_text(k)}: {_markdown_text(v)}" for k, v in shown.dicom.attributes.items())
    return f"**DICOM** (technical attributes only) · {items}"


def _preview_outputs(shown: UploadedImage | None, set_controls: bool = True, window: str | None = None) -> tuple[Any, ...]:
    """Values for (preview, burned-in warning, window, frame, DICOM attributes). ``set_controls``:
    show or hide the DICOM controls and put the frame shown into the frame box (off when the person
    is changing them); ``window``: a value to put into the window selector."""
    dicom = shown.dicom if shown is not None else None
    warning = dicom.warning if dicom is not None else None
    banner = gr.HTML(_banner_html(warning, "#ffe1e1", "#c62828", role="alert") if warning else "",
                     visible=warning is not None)
    summary = gr.Markdown(dicom_summary(shown) if shown is not None else "", visible=dicom is not None)
    window_box: Any = gr.skip()
    frame_box: Any = gr.skip()
    if set_controls:
        window_box = gr.Dropdown(visible=dicom is not None)
        frame_box = gr.Number(visible=False)
        if dicom is not None:
            frame_box = gr.Number(value=dicom.frame + 1, label=f"Frame (1 to {dicom.frames})",
                                  visible=dicom.frames > 1)
    if window is not None:
        window_box = gr.Dropdown(value=window, visible=True)
    image = shown.image if shown is not None else None
    return image, banner, window_box, frame_box, summary


def show_preview(
    upload: object, window: object = HEADER_WINDOW, frame: object = None, new_file: bool = False
) -> tuple[Any, ...]:
    """The image exactly as the model will get it (grayscale, 16-bit, TIFF and DICOM files included),
    with a DICOM file's technical attributes and burned-in annotation warning. A window or frame
    that does not fit the file gets a warning and the nearest view that fits. The controls' values
    come unprocessed, as for Generate."""
    try:
        upload = upload_path(upload)
        window, frame = read_view(window, frame)
    except ControlError as err:
        raise refuse(err, "preview") from None
    if upload is None:
        return _preview_outputs(None)
    try:
        return _preview_outputs(load_upload(upload, window, frame), set_controls=new_file)
    except UploadOptionError as err:
        problem = str(err)
    except UploadError as err:
        gr.Warning(str(err))
        return _preview_outputs(None)
    # Keep what fits: the window with the middle frame, else the file's own window with the frame.
    for fallback_window, fallback_frame, instead in (
        (window, None, "the middle frame"),
        (HEADER_WINDOW, frame, "the file's own window"),
        (HEADER_WINDOW, None, "the file's own window and the middle frame"),
    ):
        try:
            shown = load_upload(upload, fallback_window, fallback_frame)
        except UploadError:
            continue
        gr.Warning(f"{problem} Showing {instead} instead.")
        return _preview_outputs(shown, set_controls=True, window=fallback_window)
    gr.Warning(problem)
    return _preview_outputs(None)


def preview_upload(upload: object, window: object = HEADER_WINDOW) -> tuple[Any, ...]:
    """A new upload's preview: the chosen window (when it fits), the middle frame of a multi-frame file."""
    return show_preview(upload, window, None, new_file=True)


# --------------------------------------------------------------------------- UI


def _banner(text: str, elem_id: str, background: str, border: str) -> gr.HTML:
    return gr.HTML(_banner_html(text, background, border), elem_id=elem_id)


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

    def preview_outputs(self) -> list[gr.components.Component]:
        """In the order of ``show_preview``'s values."""
        return [self.preview, self.burned_in, self.window, self.frame, self.dicom_summary]


def _input_panel() -> InputPanel:
    # A file input, not gr.Image: gr.Image decodes uploads itself (its own errors, no TIFF or DICOM
    # preview), while every upload here goes through load_upload.
    upload = gr.File(label="Image", file_types=list(UPLOAD_SUFFIXES), type="filepath", elem_id="upload")
    burned_in = gr.HTML("", visible=False, elem_id="burned-in-warning")
    # No Share button: it would post a patient's image to a public discussion page.
    preview = gr.Image(label="What the model sees", type="pil", format="png", interactive=False, height=320,
                       buttons=["download", "fullscreen"], elem_id="preview")
    # DICOM only: shown once a DICOM file is uploaded.
    with gr.Row():
        window = gr.Dropdown(window_choices(), value=HEADER_WINDOW, label="DICOM window", visible=False,
                             elem_id="window")
        frame = gr.Number(value=None, precision=0, label="Frame", visible=False, elem_id="frame")
    dicom_summary = gr.Markdown(visible=False, elem_id="dicom-attributes")
    return InputPanel(upload, preview, burned_in, window, frame, dicom_summary)


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

    def pick(event: gr.SelectData) -> str:
        return examples[event.index]["path"]

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


class DemoBlocks(gr.Blocks):
    """gr.Blocks that refuses a malformed request (too few values, a file reference that is not an
    upload of this app, a value a component cannot take) with a short message naming the event's
    controls, instead of Gradio's traceback in the log that quotes the values and paths sent."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        event = block_fn.api_name or block_fn.name
        controls = ", ".join(str(getattr(block, "label", None) or type(block).__name__) for block in block_fn.inputs)
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
        gr.Markdown(f"# {TITLE}\nUpload an image (PNG, JPEG, WebP, BMP, TIFF, GIF or DICOM) or pick an example, "
                    "add the clinical history if you like, and press **Generate**.")
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
                with gr.Row():
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
        panel.upload.change(preview_upload, [panel.upload, panel.window], panel.preview_outputs(),
                            api_name="preview", preprocess=False, concurrency_id="preview",
                            concurrency_limit=PREVIEW_CONCURRENCY)
        # A person choosing another window or frame (select: a dropdown choice fires input twice).
        view_inputs = [panel.upload, panel.window, panel.frame]
        for event in (panel.window.select, panel.frame.input):
            event(show_preview, view_inputs, panel.preview_outputs(), api_visibility="private", preprocess=False,
                  concurrency_id="preview", concurrency_limit=PREVIEW_CONCURRENCY, trigger_mode="always_last")
        run = generate_button.click(
            make_generate(served.models, stops, config),
            [panel.upload, instruction, *decoding.inputs(), context, panel.window, panel.frame],
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
        logger.warning("serving the tiny demo model (%s): its output is meaningless", served.reason)
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
