"""Serve stage: what the demo (``app.py``) needs from the package besides generation itself.

    python app.py                                  # the demo, on the embedded tiny model
    python app.py --model runs/r1/merged           # the demo, on a fine-tuned model

- ``read_upload``: the one door for uploaded files (extension, format, size guard, decoding).
- ``load_for_demo``: the configured model, or the embedded tiny model with the reason why.
- ``StopRegistry``: Stop buttons (separate requests) reach the generation they should end.
- ``describe_model``, ``is_out_of_memory``, ``free_accelerator_memory``.

Nothing here logs image content, file names or image metadata: uploads may carry patient data.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, UnidentifiedImageError

from radiology.data import ImageDecodeError, decode_image
from radiology.generate import LoadedModel, load_for_generation

__all__ = [
    "DEMO_MODEL_NAME",
    "UPLOAD_SUFFIXES",
    "DemoModel",
    "StopRegistry",
    "UploadError",
    "UserStop",
    "default_cache_dir",
    "demo_model_dir",
    "describe_model",
    "free_accelerator_memory",
    "is_out_of_memory",
    "load_for_demo",
    "read_upload",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- uploads

# File names the upload accepts. DICOM (.dcm) joins here once the DICOM reader exists.
UPLOAD_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Pillow decoders allowed to run on uploaded bytes, whatever the file is named: every other
# Pillow plugin (PSD, EPS, FITS, ...) is attack surface that a radiology demo does not need.
# (Pillow's JPEG opener also reads the MPO files that many phones and cameras write.)
_UPLOAD_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP, TIFF or GIF"


class UploadError(ValueError):
    """An upload that cannot be used; the message tells the user what to do. It never contains
    the file's name or content (names of medical images often carry patient identity)."""


def read_upload(path: str | Path | None) -> Image.Image:
    """An uploaded file as the 8-bit RGB image the model gets, or UploadError saying why not.

    Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on: a small file that
    claims a huge size is refused before its pixels are decoded.
    """
    if path is None or not str(path).strip():
        raise UploadError(f"No image: upload a {_FORMAT_NAMES} file first.")
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        shown = suffix if 0 < len(suffix) <= 8 else "(none)"
        raise UploadError(f"Unsupported file type {shown}: upload a {_FORMAT_NAMES} file.")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise UploadError(
            "The uploaded file is no longer on the server (uploads are deleted after a while): upload it again."
        ) from None
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
        return decode_image(data)
    except ImageDecodeError as err:
        cause = err.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise UploadError(
            f"The image could not be decoded{detail}: the file may be truncated or corrupt. "
            "Export the image again and upload that."
        ) from None


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


@dataclass
class DemoModel:
    """The model the demo serves. ``placeholder`` is set when it is the embedded tiny model, and
    ``reason`` then says why (none configured, or the configured one failed to load)."""

    loaded: LoadedModel
    placeholder: bool
    reason: str | None = None


def load_for_demo(
    model: str | None,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    require_model: bool = False,
) -> DemoModel:
    """The configured model; without one, or when it cannot be loaded (not found, no network to
    the hub, gated), the embedded tiny model, unless ``require_model`` asks to fail instead."""
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


def describe_model(loaded: LoadedModel) -> str:
    """One line of Markdown: the model in use, its precision and the device it runs on."""
    device = loaded.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"**Model:** `{loaded.name}` · **precision:** {loaded.precision} · **device:** {device}"


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

    def stop(self, session: str | None) -> int:
        """Ask every generation of ``session`` to stop; returns how many were running."""
        with self._lock:
            events = [self._by_key[k] for k in self._by_session.get(session or "", ()) if k in self._by_key]
        for event in events:
            event.request()
        return len(events)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)
