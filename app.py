"""Radiology image description demo for clinicians (Gradio): upload an image, read the draft as it streams.

    python app.py                                    # the embedded tiny model: meaningless text, for a first look
    python app.py --model runs/r1/merged             # a merged fine-tuned model (train.py's OUTPUT_DIR/merged)
    python app.py --model google/gemma-3-4b-pt --adapter runs/r1 --load_in_4bit
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
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from radiology.data import DEFAULT_INSTRUCTION
from radiology.generate import GenerationSettings, LoadedModel, stream_text
from radiology.serve import (
    UPLOAD_SUFFIXES,
    DemoModel,
    StopRegistry,
    UploadError,
    describe_model,
    free_accelerator_memory,
    is_out_of_memory,
    load_for_demo,
    read_upload,
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
MAX_INSTRUCTION_CHARS = 2000
# ZeroGPU Spaces: running Stop as a cancellation too, because the generation runs in a worker
# process that the stop event of this process cannot reach.
ON_ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


# --------------------------------------------------------------------------- options


@dataclass
class AppConfig:
    """How the app is served. ``parse_args`` fills it from flags and RADIOLOGY_* variables."""

    model: str | None = None
    adapter: str | None = None
    load_in_4bit: bool = False
    device: str | None = None
    require_model: bool = False
    cache_dir: str | None = None
    host: str | None = None
    port: int | None = None
    share: bool = False
    auth: list[tuple[str, str]] | None = None
    concurrency: int = 1
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
    ("--concurrency", "RADIOLOGY_CONCURRENCY", _positive_int, "generations running at once on the GPU (default 1)"),
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
    mode: str,
    temperature: float,
    top_p: float,
    top_k: float,
    max_new_tokens: float,
    seed: float | None,
    max_new_tokens_limit: int,
) -> GenerationSettings:
    """GenerationSettings from the controls' values (API callers can send anything, so check)."""
    if mode not in ("greedy", "sampling"):
        raise ValueError(f"decoding must be 'greedy' or 'sampling', got {mode!r}")
    if max_new_tokens is None or not 1 <= int(max_new_tokens) <= max_new_tokens_limit:
        raise ValueError(f"max new tokens must be between 1 and {max_new_tokens_limit}")
    if seed is not None and seed != "" and not 0 <= int(seed) < 2**32:
        raise ValueError("the seed must be between 0 and 4294967295, or empty for a random one")
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        do_sample=mode == "sampling",
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        seed=None if seed is None or seed == "" else int(seed),
    )


def _gpu_function(fn: Callable[..., Iterator[str]], duration: int) -> Callable[..., Iterator[str]]:
    """``spaces.GPU`` on Hugging Face Spaces (it reserves a ZeroGPU slice per call and does nothing
    on other hardware); the function itself where `spaces` is not installed."""
    return spaces.GPU(duration=duration)(fn) if spaces is not None else fn


def make_generate(
    loaded: LoadedModel, stops: StopRegistry, config: AppConfig
) -> Callable[..., Iterator[tuple[str, str]]]:
    """The Generate button's handler for one model: streams (text so far, the line under it)."""

    # Only picklable arguments (a key, not the event): on ZeroGPU this runs in a worker process.
    def stream_on_gpu(key: str, image: Image.Image, instruction: str, settings: GenerationSettings) -> Iterator[str]:
        yield from stream_text(loaded, image, instruction, settings, stop=stops.event(key))

    stream_on_gpu = _gpu_function(stream_on_gpu, config.gpu_duration)

    def generate(
        upload: str | None,
        instruction: str,
        mode: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        seed: float | None,
        request: gr.Request,
    ) -> Iterator[tuple[str, str]]:
        try:
            image = read_upload(upload)
            settings = settings_from_ui(mode, temperature, top_p, top_k, max_new_tokens, seed, config.max_new_tokens)
            instruction = (instruction or "").strip() or DEFAULT_INSTRUCTION
            if len(instruction) > MAX_INSTRUCTION_CHARS:
                raise ValueError(f"the instruction is longer than {MAX_INSTRUCTION_CHARS} characters; shorten it")
        except (ValueError, TypeError) as err:  # UploadError is a ValueError; TypeError: a missing value
            raise gr.Error(str(err), print_exception=False) from None
        about = f"{loaded.name} · {loaded.precision} · {loaded.device} · {settings.describe()}"
        text, started = "", time.perf_counter()
        with stops.running(request.session_hash) as (key, stop):
            try:
                with closing(stream_on_gpu(key, image, instruction, settings)) as pieces:
                    for text in pieces:
                        yield text, f"{about} · generating…"
            except Exception as err:
                if is_out_of_memory(err):
                    free_accelerator_memory()
                    logger.warning("generation ran out of GPU memory; memory freed")
                    raise gr.Error(OUT_OF_MEMORY, print_exception=False) from None
                logger.exception("generation failed")  # the traceback holds code paths, no upload data
                raise gr.Error(
                    f"Generation failed ({type(err).__name__}). Try again; if it keeps failing, the server log "
                    "has the details.",
                    print_exception=False,
                ) from None
        ending = "stopped by user" if stop.requested else "done"
        yield text, f"{about} · {ending} in {time.perf_counter() - started:.1f} s"

    return generate


def show_preview(upload: str | None) -> Image.Image | None:
    """The image exactly as the model will get it (grayscale, 16-bit and TIFF files included)."""
    if upload is None:
        return None
    try:
        return read_upload(upload)
    except UploadError as err:
        gr.Warning(str(err))
        return None


# --------------------------------------------------------------------------- UI


def _banner(text: str, elem_id: str, background: str, border: str) -> gr.HTML:
    style = (
        f"background:{background};border:2px solid {border};border-radius:8px;padding:12px 16px;"
        "color:#111;font-size:1.05em;line-height:1.45"
    )
    return gr.HTML(f'<div role="note" style="{style}">{html.escape(text)}</div>', elem_id=elem_id)


def _banners(served: DemoModel) -> None:
    _banner(DISCLAIMER, "disclaimer", "#fff4d6", "#d89b00")
    if served.placeholder:
        reason = (served.reason or "no model is configured").rstrip(".")
        _banner(PLACEHOLDER_NOTICE.format(reason=reason[:1].upper() + reason[1:]), "demo-model-notice",
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


def _input_panel() -> InputPanel:
    # A file input, not gr.Image: gr.Image decodes uploads itself (its own errors, no TIFF preview),
    # while every upload here goes through read_upload. DICOM joins through the same door.
    upload = gr.File(label="Image", file_types=list(UPLOAD_SUFFIXES), type="filepath", elem_id="upload")
    preview = gr.Image(label="What the model sees", type="pil", format="png", interactive=False, height=320,
                       elem_id="preview")
    return InputPanel(upload=upload, preview=preview)


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
        mode = gr.Radio([("Greedy (deterministic)", "greedy"), ("Sampling", "sampling")], value="greedy",
                        label="Method")
        max_new_tokens = gr.Slider(1, config.max_new_tokens, value=min(defaults.max_new_tokens, config.max_new_tokens),
                                   step=1, label="Max new tokens", elem_id="max-new-tokens")
        with gr.Group(visible=False) as sampling_only:
            temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="Top-p")
            top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0: off)")
            seed = gr.Number(value=None, precision=0, label="Seed (empty: random)")
    mode.change(lambda m: gr.Group(visible=m == "sampling"), mode, sampling_only,
                api_visibility="private", concurrency_limit=None, queue=False)
    return DecodingControls(mode, temperature, top_p, top_k, max_new_tokens, seed)


def build_demo(served: DemoModel, config: AppConfig | None = None, stops: StopRegistry | None = None) -> gr.Blocks:
    """The whole UI for one served model. Launch it with ``launch(demo, config)``."""
    config = config or AppConfig()
    stops = StopRegistry() if stops is None else stops  # (an empty registry is falsy: it has a length)
    loaded = served.loaded
    # Uploads (and previews made from them) are deleted from Gradio's cache once upload_ttl old.
    delete_cache = (min(60, config.upload_ttl), config.upload_ttl)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=delete_cache) as demo:
        _banners(served)
        gr.Markdown(f"# {TITLE}\nUpload an image (PNG, JPEG, WebP, BMP, TIFF or GIF) or pick an example, "
                    "adjust the instruction if you like, and press **Generate**.")
        with gr.Row(equal_height=False):
            with gr.Column():
                panel = _input_panel()
                _examples_gallery(panel.upload)
            with gr.Column():
                instruction = gr.Textbox(DEFAULT_INSTRUCTION, label="Instruction", lines=2,
                                         max_length=MAX_INSTRUCTION_CHARS, elem_id="instruction")
                decoding = _decoding_controls(config)
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                answer = gr.Textbox(label="Draft description (model output)", lines=10, interactive=False,
                                    buttons=["copy"], autoscroll=True, elem_id="answer")
                about = gr.Markdown(elem_id="answer-settings")
                gr.Markdown(describe_model(loaded), elem_id="model-panel")

        panel.upload.change(show_preview, panel.upload, panel.preview, api_name="preview", concurrency_limit=None)
        run = generate_button.click(
            make_generate(loaded, stops, config),
            [panel.upload, instruction, *decoding.inputs()],
            [answer, about],
            api_name="generate",
            # Every GPU-bound event shares one concurrency group: the limit is per GPU, not per button.
            concurrency_id="gpu",
            concurrency_limit=config.concurrency,
        )

        def stop(request: gr.Request) -> None:
            stops.stop(request.session_hash)

        # Not limited by the GPU group: a Stop must run while generations occupy every slot.
        stop_button.click(stop, None, None, api_name="stop", concurrency_limit=None,
                          cancels=[run] if ON_ZERO_GPU else None)
        demo.unload(stop)  # a closed tab gives its GPU slot back at once
    return demo


def launch(demo: gr.Blocks, config: AppConfig, **overrides: Any) -> Any:
    """Queue (limits from ``config``) and serve; ``overrides`` go to ``Blocks.launch``."""
    demo.queue(max_size=config.max_queue, default_concurrency_limit=config.concurrency)
    options: dict[str, Any] = dict(
        server_name=config.host,
        server_port=config.port,
        share=config.share,
        auth=config.auth,
        max_file_size=config.max_file_size,
        allowed_paths=[str(ASSETS)],
    )
    return demo.launch(**{**options, **overrides})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # httpx logs every request URL at INFO, file URLs included: kept to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = parse_args(argv)
    try:
        served = load_for_demo(config.model, config.adapter, config.load_in_4bit, config.device,
                               config.cache_dir, config.require_model)
    except Exception as err:  # only reached with --require_model
        print(f"error: {config.model} could not be loaded: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if served.placeholder:
        logger.warning("serving the tiny demo model (%s): its output is meaningless", served.reason)
    logger.info("model: %s, %s on %s", served.loaded.name, served.loaded.precision, served.loaded.device)
    launch(build_demo(served, config), config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
