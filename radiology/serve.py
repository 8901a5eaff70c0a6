"""Serve stage: what the demo (``app.py``) needs from the package besides generation itself.

    python app.py                                  # the demo, on the embedded tiny model
    python app.py --model runs/r1/merged           # the demo, on a fine-tuned model

- ``load_upload`` / ``read_upload``: the one door for uploaded files (extension, format, size guard,
  decoding); DICOM goes through ``radiology.dicom`` with the chosen window and frame.
- ``clean_context``: the optional clinical history / question, checked as the prompt will use it.
- ``load_for_demo``: the configured model (and a baseline to compare with), or the embedded tiny
  model with the reason why.
- ``StopRegistry``: Stop buttons (separate requests) reach the generation they should end.
- ``model_panel``: the models, the GPU with its memory in use, and each model's footprint.
- ``default_concurrency``, ``warm_up_on_gpu``: serving on a GPU.
- ``is_out_of_memory``, ``free_accelerator_memory``.

Nothing here logs image content, file names or image metadata: uploads may carry patient data. Of a
DICOM header only ``DicomImage.attributes`` (modality, body part, view, size, frames, window) leaves.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, UnidentifiedImageError

from radiology.data import DEFAULT_INSTRUCTION, ImageDecodeError, build_messages, decode_image
from radiology.dicom import (
    FULL_RANGE,
    HEADER_WINDOW,
    WINDOW_CHOICES,
    WINDOW_PRESETS,
    DicomError,
    DicomImage,
    DicomOptionError,
    has_dicom_preamble,
    read_dicom_image,
)
from radiology.generate import LoadedModel, load_for_generation, warm_up
from radiology.memory import MemoryStatus, format_bytes, model_footprint, read_gpu_memory

__all__ = [
    "DEMO_MODEL_NAME",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_CONTEXT_CHARS",
    "UPLOAD_SUFFIXES",
    "BaselineError",
    "DemoModel",
    "StopRegistry",
    "UploadError",
    "UploadOptionError",
    "UploadedImage",
    "UserStop",
    "clean_context",
    "default_cache_dir",
    "default_concurrency",
    "demo_model_dir",
    "describe_memory",
    "describe_model",
    "free_accelerator_memory",
    "is_out_of_memory",
    "load_for_demo",
    "load_upload",
    "model_panel",
    "read_upload",
    "warm_up_on_gpu",
    "window_choices",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- uploads

# File names the upload accepts: images Pillow decodes, and DICOM.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
UPLOAD_SUFFIXES: tuple[str, ...] = (*IMAGE_SUFFIXES, *DICOM_SUFFIXES)
# Pillow decoders allowed to run on uploaded bytes, whatever the file is named: every other
# Pillow plugin (PSD, EPS, FITS, ...) is attack surface that a radiology demo does not need.
# (Pillow's JPEG opener also reads the MPO files that many phones and cameras write.)
_UPLOAD_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP, TIFF or GIF"
_UPLOAD_NAMES = "PNG, JPEG, WebP, BMP, TIFF, GIF or DICOM (.dcm)"
# The clinical history / question: a few sentences, not a whole record.
MAX_CONTEXT_CHARS = 1000


class UploadError(ValueError):
    """An upload that cannot be used; the message tells the user what to do. It never contains
    the file's name or content (names of medical images often carry patient identity)."""


class UploadOptionError(UploadError):
    """A DICOM window or frame that does not fit the uploaded file (a CT preset on an MR image,
    a frame the file does not have). The file itself is fine with the default view."""


@dataclass(frozen=True)
class UploadedImage:
    """An upload as the model gets it; for DICOM also what the page may show about it (the
    technical attributes, the frame shown and the burned-in annotation flag, nothing else)."""

    image: Image.Image
    dicom: DicomImage | None = None


def _sentence(text: str) -> str:
    """``"the file ends early; copy it again"`` -> ``"The file ends early; copy it again."``"""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _is_dicom(suffix: str, data: bytes) -> bool:
    # By name, or by the 'DICM' marker whatever the name (a DICOM file saved as .png still opens).
    return suffix in DICOM_SUFFIXES or has_dicom_preamble(data)


def window_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the window selector; the values are radiology.dicom's WINDOW_CHOICES."""
    labels = {HEADER_WINDOW: "header: the file's own window", FULL_RANGE: "full: the frame's whole range"}
    for name, (center, width) in WINDOW_PRESETS.items():
        labels[name] = f"{name}: C {center:g} / W {width:g} (CT only)"
    return [(labels[value], value) for value in WINDOW_CHOICES]


def _frame_index(frame_number: float | None) -> int | None:
    """The 0-based frame for a 1-based frame number (as a viewer counts), None for the middle one."""
    if frame_number is None or frame_number == "":
        return None
    if float(frame_number) != int(float(frame_number)) or int(float(frame_number)) < 1:
        raise UploadOptionError("The frame must be a whole number from 1 (or empty for the middle frame).")
    return int(float(frame_number)) - 1


def _read_dicom(data: bytes, window: str | None, frame_number: float | None) -> DicomImage:
    # A named in-memory file: the reader's messages then say "named .dcm" where that helps, and
    # the real file name (which may carry the patient's) never reaches it.
    def source() -> io.BytesIO:
        buffer = io.BytesIO(data)
        buffer.name = "upload.dcm"
        return buffer

    if window is not None and window not in WINDOW_CHOICES:
        raise UploadOptionError(f"Unknown window {str(window)[:40]!r}: choose one of {', '.join(WINDOW_CHOICES)}.")
    index = _frame_index(frame_number)
    try:
        return read_dicom_image(source(), window=window or HEADER_WINDOW, frame=index)
    except DicomOptionError as err:
        if index is not None:
            # The reader counts frames from 0; people count from 1, as the page does.
            frames = read_dicom_image(source()).frames
            if index >= frames:
                raise UploadOptionError(
                    f"Frame {index + 1} does not exist: this file has {frames} frame(s), numbered 1 to {frames}."
                ) from None
        raise UploadOptionError(_sentence(str(err))) from None
    except DicomError as err:  # messages name the cause and the fix, never a header value
        raise UploadError(_sentence(str(err))) from None


def load_upload(
    path: str | Path | None, window: str | None = None, frame_number: float | None = None
) -> UploadedImage:
    """An uploaded file as the 8-bit RGB image the model gets, or UploadError saying why not.

    DICOM (a ``.dcm``/``.dicom`` name, or the 'DICM' marker under any name; preamble-less files
    too when named ``.dcm``) is rendered by ``radiology.dicom`` with ``window`` (one of
    WINDOW_CHOICES; default: the file's own) and ``frame_number`` (1-based; default: the middle
    frame); both are ignored for other images. Pillow's decompression-bomb guard
    (``Image.MAX_IMAGE_PIXELS``) stays on: a small file that claims a huge size is refused before
    its pixels are decoded.
    """
    if path is None or not str(path).strip():
        raise UploadError(f"No image: upload a {_UPLOAD_NAMES} file first.")
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        shown = suffix if 0 < len(suffix) <= 8 else "(none)"
        raise UploadError(
            f"Unsupported file type {shown}: upload a {_UPLOAD_NAMES} file (a DICOM file without a name "
            "ending, such as IM000001 from a DICOMDIR, can be renamed to .dcm)."
        )
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise UploadError(
            "The uploaded file is no longer on the server (uploads are deleted after a while): upload it again."
        ) from None
    if _is_dicom(suffix, data):
        shown_dicom = _read_dicom(data, window, frame_number)
        return UploadedImage(image=shown_dicom.image, dicom=shown_dicom)
    Image.init()  # registers the plugins that the allow-list names
    # Opened from bytes, not from the path, so that no error message carries the file name.
    try:
        with Image.open(io.BytesIO(data), formats=_UPLOAD_FORMATS):
            pass  # the header alone says whether it is one of the allowed formats, and how big
    except Image.DecompressionBombError as err:
        raise UploadError(
            f"The image is too large to decode safely ({err}). Downscale it before uploading."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadError(
            f"The file is not a readable {_FORMAT_NAMES} image: it may be corrupt, or another kind of "
            "file renamed. Export the image again and upload that."
        ) from None
    try:
        return UploadedImage(image=decode_image(data))
    except ImageDecodeError as err:
        cause = err.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise UploadError(
            f"The image could not be decoded{detail}: the file may be truncated or corrupt. "
            "Export the image again and upload that."
        ) from None


def read_upload(path: str | Path | None, window: str | None = None, frame_number: float | None = None) -> Image.Image:
    """The image of ``load_upload``: what the model gets."""
    return load_upload(path, window, frame_number).image


def clean_context(text: str | None, limit: int = MAX_CONTEXT_CHARS) -> str | None:
    """The clinical history / question as the prompt will carry it: None when blank (the prompt is
    then exactly the instruction alone); ValueError when too long or when it holds a chat control
    token (the rule of ``radiology.data.build_messages``)."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if len(text) > limit:
        raise ValueError(f"The clinical history is longer than {limit} characters; shorten it.")
    try:
        build_messages(DEFAULT_INSTRUCTION, context=text)
    except ValueError as err:
        raise ValueError(_sentence(str(err))) from None
    return text


# --------------------------------------------------------------------------- models

DEMO_MODEL_NAME = "tiny demo model (random weights)"


def default_cache_dir() -> Path:
    """Where the embedded demo model is built: $RADIOLOGY_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("RADIOLOGY_CACHE_DIR"):
        return Path(os.environ["RADIOLOGY_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "radiology-gemma"


def _demo_model_key() -> str:
    # The folder is rebuilt whenever the tiny model's recipe or the transformers version changes,
    # so that a stale cache can never load against newer code.
    from radiology import tiny

    source = Path(tiny.__file__).read_bytes() + transformers.__version__.encode()
    return hashlib.sha256(source).hexdigest()[:12]


def demo_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The embedded tiny model's folder, built on first use (a second or two, no download)."""
    from radiology.tiny import write_tiny_model

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-gemma3-{_demo_model_key()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: two apps starting at once never load a
    # half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        write_tiny_model(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class BaselineError(RuntimeError):
    """The configured baseline could not be loaded (raised only where the model is required)."""


@dataclass
class DemoModel:
    """The model the demo serves. ``placeholder`` is set when it is the embedded tiny model, and
    ``reason`` then says why (none configured, or the configured one failed to load). ``baseline``
    is a second model whose answer is shown beside it; ``baseline_reason`` says why a configured
    baseline is missing."""

    loaded: LoadedModel
    placeholder: bool
    reason: str | None = None
    baseline: LoadedModel | None = None
    baseline_reason: str | None = None

    @property
    def models(self) -> list[LoadedModel]:
        """The models that answer each request, in the order they run: the served one, then the baseline."""
        return [self.loaded] if self.baseline is None else [self.loaded, self.baseline]

    def close(self) -> None:
        """Free the model and the baseline (their decode engines' threads end); the app calls it when
        the server stops."""
        for loaded in self.models:
            loaded.close()


def load_for_demo(
    model: str | None,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    require_model: bool = False,
    baseline: str | None = None,
) -> DemoModel:
    """The configured model; without one, or when it cannot be loaded (not found, no network to
    the hub, gated), the embedded tiny model, unless ``require_model`` asks to fail instead.

    ``baseline`` (a folder or hub id) is loaded the same way (precision, device) to answer beside
    it; when it cannot be loaded the demo serves the model alone and says why, unless
    ``require_model`` asks to fail.
    """
    served = _load_served(model, adapter, load_in_4bit, device, cache_dir, require_model)
    if baseline:
        try:
            served.baseline = load_for_generation(baseline, load_in_4bit=load_in_4bit, device=device)
        except Exception as err:  # same choice as for the model: go on without it, or stop
            reason = f"the baseline {baseline} could not be loaded ({type(err).__name__}: {_first_line(err)})"
            if require_model:
                raise BaselineError(reason) from err
            served.baseline_reason = reason
            logger.warning("%s; serving the model alone", reason)
    return served


def _load_served(
    model: str | None,
    adapter: str | None,
    load_in_4bit: bool,
    device: str | None,
    cache_dir: str | Path | None,
    require_model: bool,
) -> DemoModel:
    reason: str
    if model:
        try:
            return DemoModel(load_for_generation(model, adapter, load_in_4bit, device), placeholder=False)
        except Exception as err:  # any failure to load leads to the same choice: fall back, or stop
            if require_model:
                raise
            reason = f"{model} could not be loaded ({type(err).__name__}: {_first_line(err)})"
            logger.warning("%s; serving the tiny demo model instead", reason)
    else:
        reason = "no model is configured"
    loaded = load_for_generation(str(demo_model_dir(cache_dir)), device=device)
    return DemoModel(dataclasses.replace(loaded, name=DEMO_MODEL_NAME), placeholder=True, reason=reason)


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_model(loaded: LoadedModel, role: str = "Model") -> str:
    """One line of Markdown: the model in use, its precision and the device it runs on."""
    device = loaded.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"**{role}:** `{loaded.name}` · **precision:** {loaded.precision} · **device:** {device}"


def _cuda_index(device: str) -> int | None:
    """The CUDA device index of ``"cuda"``/``"cuda:1"`` (None: the current one)."""
    return torch.device(device).index


def describe_memory(models: Sequence[LoadedModel]) -> str:
    """The GPU the models run on with its memory in use (or that there is none), and each model's
    footprint. Readings only: without CUDA no GPU number is shown."""
    first = models[0]
    if first.device.startswith("cuda") and torch.cuda.is_available():
        gpu = MemoryStatus(gpu=read_gpu_memory(_cuda_index(first.device)), model_footprint=None).describe()
    elif torch.cuda.is_available():
        gpu = "GPU: not used (the model runs on the CPU)"
    else:
        gpu = MemoryStatus(gpu=None, model_footprint=None).describe()
    roles = ["model footprint", "baseline footprint"]
    sizes = [f"{role}: {format_bytes(model_footprint(m.model))}" for role, m in zip(roles, models)]
    return " · ".join([gpu, *sizes])


def model_panel(served: DemoModel) -> str:
    """The model panel's Markdown: each model (name, precision, device), then the GPU with its
    memory in use and the models' footprints. Read again on every page load and after each answer."""
    lines = [describe_model(served.loaded)]
    if served.baseline is not None:
        lines.append(describe_model(served.baseline, role="Baseline"))
    lines.append(describe_memory(served.models))
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- serving on a GPU


def default_concurrency(loaded: LoadedModel) -> int:
    """Generations at once when none is configured: on a GPU the decode engine's batch (requests
    that arrive together are decoded in one batch, at about the cost of one); on the CPU one, since
    one generation already keeps every core busy."""
    if loaded.engine is not None and loaded.device.startswith("cuda"):
        return int(loaded.engine.max_batch)
    return 1


def warm_up_on_gpu(loaded: LoadedModel) -> float | None:
    """Run the first generations now on CUDA (the engine captures its CUDA graphs for every batch
    size), so the first user does not wait for them; returns the seconds spent. None on the CPU,
    where there is nothing to capture."""
    if not loaded.device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return warm_up(loaded)


# --------------------------------------------------------------------------- faults


def is_out_of_memory(err: BaseException) -> bool:
    """True for the accelerator running out of memory (torch's own error, or a library's
    RuntimeError that wraps it, as bitsandbytes kernels do)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_accelerator_memory() -> None:
    """Give the memory of a failed request back, so that the next request starts clean."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


# --------------------------------------------------------------------------- stopping


class UserStop(threading.Event):
    """A stop event that remembers whether a person asked for it: ``stream_text`` also sets the
    event when generation ends on its own, so the event alone cannot say why it ended."""

    def __init__(self) -> None:
        super().__init__()
        self.requested = False

    def request(self) -> None:
        self.requested = True
        self.set()


class StopRegistry:
    """Stop events of running generations, found by key (a string, so that it crosses process
    boundaries such as ZeroGPU's worker) and by session (what a Stop button knows)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, UserStop] = {}
        self._by_session: dict[str, set[str]] = {}

    @contextmanager
    def running(self, session: str | None) -> Iterator[tuple[str, UserStop]]:
        """Register one generation for ``session`` while the block runs; yields (key, event)."""
        key, event, session = uuid.uuid4().hex, UserStop(), session or ""
        with self._lock:
            self._by_key[key] = event
            self._by_session.setdefault(session, set()).add(key)
        try:
            yield key, event
        finally:
            with self._lock:
                self._by_key.pop(key, None)
                keys = self._by_session.get(session)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_session[session]

    def event(self, key: str) -> UserStop:
        """The event registered under ``key``; a fresh one where the registry is another
        process's copy (generation then runs to its end or is cancelled by its caller)."""
        with self._lock:
            return self._by_key.get(key) or UserStop()

    def renew(self, key: str) -> UserStop:
        """A fresh event under ``key`` for the next model of the same request (``stream_text`` sets
        the event when its generation ends); the old one if a person already asked to stop, so that
        a Stop pressed between two models still ends the request."""
        with self._lock:
            old = self._by_key.get(key)
            if old is None or old.requested:
                return old or UserStop()
            self._by_key[key] = fresh = UserStop()
            return fresh

    def stop(self, session: str | None) -> int:
        """Ask every generation of ``session`` to stop; returns how many were running."""
        with self._lock:
            events = [self._by_key[k] for k in self._by_session.get(session or "", ()) if k in self._by_key]
            for event in events:  # under the lock: a concurrent renew() then sees the request
                event.request()
        return len(events)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)
