"""Serve stage: what the demo (``app.py``) needs from the package besides generation itself.

    python app.py                                  # the demo, on the embedded tiny model
    python app.py --model runs/r1/merged           # the demo, on a fine-tuned model

- ``load_upload`` / ``read_upload``: the one door for uploaded files (extension, format, size guard,
  decoding); DICOM goes through ``radiology.dicom`` with the chosen window and frame.
- ``load_study``: the door for a request's several files: one image, a study's views in upload order,
  or a DICOM series (its files, a .zip, a multi-frame file) sampled and rendered through
  ``radiology.series``, and a prior study's image; ``study_paths`` reads the upload control's value.
- ``clean_instruction``, ``clean_context``: the instruction and the optional clinical history /
  question, checked as the prompt will use them.
- ``read_number``, ``read_choice``, ``upload_path``: the demo's other controls as a request sends
  them (any JSON value), checked; ``ControlError`` names the control and what it takes, never the value.
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
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, UnidentifiedImageError

from radiology.data import DEFAULT_INSTRUCTION, build_messages, control_token_in, decode_image
from radiology.dicom import (
    BURNED_IN_WARNING,
    FULL_RANGE,
    HEADER_WINDOW,
    MULTI_WINDOW,
    WINDOW_PRESETS,
    DicomError,
    DicomImage,
    DicomOptionError,
    has_dicom_preamble,
    read_dicom_image,
)
from radiology.generate import AnsweringModel, LoadedModel, describe_study, load_for_generation, warm_up
from radiology.images import ImageDecodeError
from radiology.series import (
    ALL_WINDOWS,
    DEFAULT_MAX_IMAGES,
    MixedSeriesError,
    MultipleSeriesError,
    NoSlicesError,
    Series,
    SeriesLimits,
    describe_indices,
    load_series,
    read_series_slices,
    sample_indices,
)
from radiology.memory import MemoryStatus, format_bytes, model_footprint, read_gpu_memory
from radiology.remote import RemoteModel

__all__ = [
    "AUTO_WINDOW",
    "DEMO_MODEL_NAME",
    "DEMO_WINDOWS",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_CONTEXT_CHARS",
    "MAX_INSTRUCTION_CHARS",
    "MAX_UPLOAD_PIXELS",
    "WORKING_PIXELS",
    "UPLOAD_SUFFIXES",
    "STUDY_SUFFIXES",
    "MAX_STUDY_IMAGES",
    "STUDY_PIXELS",
    "SERVER_CONCURRENCY",
    "BaselineError",
    "ControlError",
    "DemoModel",
    "SeriesChoiceError",
    "ServerError",
    "StopRegistry",
    "UploadError",
    "UploadOptionError",
    "UploadedImage",
    "UploadedStudy",
    "UserStop",
    "Window",
    "clean_context",
    "clean_instruction",
    "default_cache_dir",
    "default_concurrency",
    "demo_model_dir",
    "describe_memory",
    "describe_model",
    "free_accelerator_memory",
    "is_out_of_memory",
    "load_for_demo",
    "load_study",
    "load_upload",
    "model_panel",
    "read_choice",
    "read_number",
    "read_upload",
    "study_paths",
    "upload_path",
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
MAX_INSTRUCTION_CHARS = 2000
# Pixel budgets for uploaded (non-DICOM) images. Larger than any radiograph (a mammogram is about
# 4000 x 5000) and well below Pillow's own bomb guard, whose limit lets a 13000 x 13000 16-bit PNG
# through at about 1 GB of working memory. Images above WORKING_PIXELS are scaled down right after
# decoding, before any conversion or float copy (the model sees 896 x 896 at most anyway); images
# above MAX_UPLOAD_PIXELS are refused from their header, before any pixel is decoded.
MAX_UPLOAD_PIXELS = 64_000_000
WORKING_PIXELS = 4096 * 4096


class UploadError(ValueError):
    """An upload that cannot be used; the message tells the user what to do. It never contains
    the file's name or content (names of medical images often carry patient identity)."""


class ControlError(ValueError):
    """A control's value that the demo refuses (out of range, not a number, not a choice). The
    message names the control and what it takes, never the value sent (an API caller can put
    anything there); ``control`` is the control's name, which is all the server log gets."""

    def __init__(self, message: str, control: str):
        super().__init__(message)
        self.control = control


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


# A DICOM window: a name (one of ALL_WINDOWS) or a custom (center, width), as radiology.dicom takes it.
Window = str | tuple[float, float]
# The demo's default window: the study's own default (multi for a grayscale CT series, else header).
AUTO_WINDOW = "auto"
DEMO_WINDOWS: tuple[str, ...] = (AUTO_WINDOW, *ALL_WINDOWS)


def window_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the window selector: DEMO_WINDOWS, i.e. auto, then radiology.dicom's
    WINDOW_CHOICES, then multi."""
    labels = {AUTO_WINDOW: "auto: multi for a CT series, else the file's own window",
              HEADER_WINDOW: "header: the file's own window", FULL_RANGE: "full: the frame's whole range",
              MULTI_WINDOW: "multi: three CT windows in R, G, B, as MedGemma reads CT (CT only)"}
    for name, (center, width) in WINDOW_PRESETS.items():
        labels[name] = f"{name}: C {center:g} / W {width:g} (CT only)"
    return [(labels[value], value) for value in DEMO_WINDOWS]


def _frame_index(frame_number: float | None) -> int | None:
    """The 0-based frame for a 1-based frame number (as a viewer counts), None for the middle one."""
    if frame_number is None or frame_number == "":
        return None
    if float(frame_number) != int(float(frame_number)) or int(float(frame_number)) < 1:
        raise UploadOptionError("The frame must be a whole number from 1 (or empty for the middle frame).")
    return int(float(frame_number)) - 1


def _read_dicom(data: bytes, window: Window | None, frame_number: float | None) -> DicomImage:
    # A named in-memory file: the reader's messages then say "named .dcm" where that helps, and
    # the real file name (which may carry the patient's) never reaches it.
    def source() -> io.BytesIO:
        buffer = io.BytesIO(data)
        buffer.name = "upload.dcm"
        return buffer

    if isinstance(window, str) and window not in ALL_WINDOWS:
        raise UploadOptionError(f"Unknown window {str(window)[:40]!r}: choose one of {', '.join(ALL_WINDOWS)}.")
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
    path: str | Path | None, window: Window | None = None, frame_number: float | None = None
) -> UploadedImage:
    """An uploaded file as the 8-bit RGB image the model gets, or UploadError saying why not.

    DICOM (a ``.dcm``/``.dicom`` name, or the 'DICM' marker under any name; preamble-less files
    too when named ``.dcm``) is rendered by ``radiology.dicom`` with ``window`` (one of
    ALL_WINDOWS; default: the file's own) and ``frame_number`` (1-based; default: the middle
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
        with warnings.catch_warnings():
            # Pillow warns from 89 megapixels; MAX_UPLOAD_PIXELS, below that, refuses such images here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=_UPLOAD_FORMATS)
    except Image.DecompressionBombError as err:
        raise UploadError(
            f"The image is too large to decode safely ({err}). Downscale it before uploading."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadError(
            f"The file is not a readable {_FORMAT_NAMES} image: it may be corrupt, or another kind of "
            "file renamed. Export the image again and upload that."
        ) from None
    # (Not closed with a ``with``: closing would free the pixels of an image returned as it is; the
    # file is in memory, so there is no descriptor to give back.)
    width, height = opened.size  # from the header: nothing decoded yet
    if width * height > MAX_UPLOAD_PIXELS:
        raise UploadError(
            f"The image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); this app "
            f"takes images of up to {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels. Downscale it before uploading."
        )
    try:
        return UploadedImage(image=decode_image(_within_working_pixels(opened)))
    except (ImageDecodeError, OSError, SyntaxError, ValueError) as err:
        cause = err.__cause__ if isinstance(err, ImageDecodeError) else err
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        raise UploadError(
            f"The image could not be decoded{detail}: the file may be truncated or corrupt. "
            "Export the image again and upload that."
        ) from None


def _within_working_pixels(image: Image.Image) -> Image.Image:
    """``image`` decoded, scaled down to WORKING_PIXELS when it has more: JPEGs are decoded at a
    reduced scale (``draft``), other formats are reduced right after decoding, so that the float
    copy of a 16-bit image and the RGB copy are made at the reduced size."""
    width, height = image.size
    if width * height <= WORKING_PIXELS:
        image.load()  # decode fully now: a truncated file fails here
        return image
    scale = (WORKING_PIXELS / (width * height)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    if image.format == "JPEG":
        image.draft(image.mode, size)  # decodes at 1/2, 1/4 or 1/8 scale, never below ``size``
    # BOX: each output pixel is the mean of the input pixels it covers (no aliasing of fine lines);
    # it works in every mode, 16-bit grayscale included.
    return image.resize(size, Image.Resampling.BOX)


def read_upload(path: str | Path | None, window: Window | None = None, frame_number: float | None = None) -> Image.Image:
    """The image of ``load_upload``: what the model gets."""
    return load_upload(path, window, frame_number).image


# --------------------------------------------------------------------------- studies: several files, a series, a prior

# A request's files: images, DICOM, and a zipped DICOM series.
STUDY_SUFFIXES: tuple[str, ...] = (*UPLOAD_SUFFIXES, ".zip")
# Images one prompt may carry (256 tokens each): a series is sampled down to the chosen number.
MAX_STUDY_IMAGES = 16
# Pixels of all the images one request sends (a series' slices from their headers, before decoding):
# 64 megapixels hold 16 slices of 2000 x 2000 and keep a request's working memory near 200 MB.
STUDY_PIXELS = 64_000_000
# Files and bytes of one request (the study and its prior), checked before any file is read.
STUDY_LIMITS = SeriesLimits(max_files=1000, max_slices=1000, max_total_bytes=2 * 2**30)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class SeriesChoiceError(UploadOptionError):
    """The upload holds several DICOM series and none was chosen; ``choices`` are (number, line)
    pairs to choose from (modality, orientation, slices, size: nothing else from the headers)."""

    def __init__(self, message: str, choices: Sequence[tuple[int, str]]):
        super().__init__(message)
        self.choices = list(choices)


@dataclass(frozen=True)
class UploadedStudy:
    """A request's files as the model gets them, and what the page may show about them.

    ``kind``: "image" (one file, as ``load_upload`` reads it), "views" (several single images, in
    upload order) or "series" (a DICOM series' slices in anatomical order). ``total`` counts the
    items a viewer can step through (slices, views, or 1), ``sent`` the 0-based ones the model
    gets, and ``images`` are those images in order (empty when not rendered). ``prior`` is a prior
    study's image, placed first in the prompt. ``attributes`` and ``window`` are technical values
    only; ``warning`` is set when a file declares burned-in annotation.
    """

    kind: str
    total: int
    sent: tuple[int, ...]
    images: tuple[Image.Image, ...]
    attributes: dict[str, str]
    window: str | None  # the DICOM window's label, None without DICOM
    # the window that rendered it (one of ALL_WINDOWS, or a custom (center, width)), None without DICOM
    window_name: Window | None
    warning: str | None
    prior: UploadedImage | None = None
    single: UploadedImage | None = None  # kind "image"
    views: tuple[UploadedImage, ...] = ()  # kind "views"
    series: Series | None = None  # kind "series"

    def describe(self) -> str:
        """The settings line's part: ``images: 8 (slices 1, 44, ... of 300) + prior``."""
        slices = describe_indices(self.sent, self.total) if self.kind == "series" else None
        return describe_study(len(self.sent), slices, self.prior is not None)

    def item(self, index: int) -> UploadedImage:
        """Item ``index`` (0-based: a slice, a view) exactly as the model gets it when it is sent."""
        if not 0 <= index < self.total:
            raise UploadOptionError(f"There is no image {index + 1}: this study has {self.total}, numbered 1 to "
                                    f"{self.total}.")
        if self.single is not None:
            return self.single
        if self.views:
            return self.views[index]
        assert self.series is not None
        (shown,) = _render_slices(self.series, [index], self.window_name)
        return UploadedImage(image=shown.image, dicom=shown)


def study_paths(payload: object) -> list[str]:
    """The server-side paths of the upload control's value as Gradio hands it over unprocessed:
    a file-data dict (one file, as scripts send it) or a list of them, in upload order. An empty
    list when nothing was sent; ControlError for anything else."""
    if payload is None:
        return []
    items = payload if isinstance(payload, list) else [payload]
    paths = [upload_path(item) for item in items]
    if any(path is None for path in paths):
        raise ControlError(
            "The image must be a file uploaded to this app (the page's upload button, or gradio_client's "
            "handle_file).", "image"
        )
    return [path for path in paths if path is not None]


def _numbered(number: int, count: int, message: str) -> str:
    """``File 2 of 3: <message>`` where a request holds several files (files are named by number)."""
    return message if count == 1 else f"File {number} of {count}: {message[:1].lower()}{message[1:]}"


def _check_study_files(paths: Sequence[str], prior: str | None, limits: SeriesLimits) -> None:
    """The checks that need no reading: the number of files, their names, their bytes together."""
    count = len(paths) + (prior is not None)
    if count > limits.max_files:
        raise UploadError(f"This request holds {count} files; this app takes at most {limits.max_files}: upload the "
                          "series as a .zip, or fewer files.")
    sizes = []
    for number, path in enumerate(paths, start=1):
        suffix = Path(path).suffix.lower()
        if suffix not in STUDY_SUFFIXES:
            shown = suffix if 0 < len(suffix) <= 8 else "(none)"
            raise UploadError(_numbered(number, len(paths), (
                f"Unsupported file type {shown}: upload a {_UPLOAD_NAMES} file (or several), or a DICOM series as a "
                ".zip (a DICOM file without a name ending, such as IM000001 from a DICOMDIR, can be renamed to .dcm).")))
        try:
            sizes.append(Path(path).stat().st_size)
        except FileNotFoundError:
            raise UploadError(
                "The uploaded file is no longer on the server (uploads are deleted after a while): upload it again."
            ) from None
    total = sum(sizes) + (Path(prior).stat().st_size if prior is not None and Path(prior).is_file() else 0)
    if total > limits.max_total_bytes:
        raise UploadError(f"This request holds {total / 2**20:,.0f} MiB of files; this app takes at most "
                          f"{limits.max_total_bytes / 2**20:,.0f} MiB at once: upload fewer slices (a part of the "
                          "series, or fewer series in the .zip).")


def _head(path: str) -> bytes:
    with open(path, "rb") as fp:
        return fp.read(132)


def _render_slices(series: Series, indices: Sequence[int], window: Window | None) -> list[DicomImage]:
    try:
        return read_series_slices(series, indices, window)
    except DicomOptionError as err:  # a window the series cannot take (SeriesOptionError included)
        raise UploadOptionError(_sentence(str(err))) from None
    except DicomError as err:  # names slices and files by number, never a header value
        raise UploadError(_sentence(str(err))) from None


def _open_series(source: str | list[str], series: int | None, limits: SeriesLimits) -> Series:
    try:
        return load_series(source, series, limits=limits)
    except MultipleSeriesError as err:
        raise _choice_error(err) from None
    except DicomOptionError as err:  # a series number that is not there
        raise UploadOptionError(_sentence(str(err))) from None
    except DicomError as err:
        raise UploadError(_sentence(str(err))) from None


def _choice_error(err: MultipleSeriesError) -> SeriesChoiceError:
    choices = [(c.number, c.line().split(": ", 1)[1]) for c in err.choices]
    listing = "; ".join(f"{number}: {line}" for number, line in choices)
    return SeriesChoiceError(f"This upload holds {len(choices)} DICOM series; choose one under Series (series= in "
                             f"the API): {listing}.", choices)


def _grouped_series(paths: list[str], series: int | None, max_images: int, limits: SeriesLimits) -> Series | None:
    """The DICOM files of an upload of several files as one series; None, where no series was
    chosen, for files that are no series but views: single images of different series (e.g. a PA
    and a lateral film), a few images of one series that cannot be stacked (their sizes or
    orientations differ: again two views), or no DICOM image at all (each file's own reading then
    says what is wrong with it)."""
    try:
        found = load_series(paths, series, limits=limits)  # headers only
    except MultipleSeriesError as err:
        if all(choice.slices == 1 for choice in err.choices):
            return None
        raise _choice_error(err) from None
    except NoSlicesError:
        return None
    except MixedSeriesError as err:
        if series is None and len(paths) <= max_images:
            return None
        raise UploadError(_sentence(str(err))) from None
    except DicomOptionError as err:
        raise UploadOptionError(_sentence(str(err))) from None
    except DicomError as err:
        raise UploadError(_sentence(str(err))) from None
    return found if len(found) > 1 or series is not None else None


def _slice_span(first: int | None, last: int | None, total: int) -> tuple[int, int]:
    start, end = first or 1, last or total
    if not 1 <= start <= end <= total:
        raise UploadOptionError(
            f"The slice range {start} to {end} does not fit this series: its slices are numbered 1 to {total}; give a "
            "first slice no later than the last (or leave them empty for the whole series)."
        )
    return start, end


def _series_study(
    series: Series, window: Window | None, max_images: int, first: int | None, last: int | None, render: bool,
) -> UploadedStudy:
    total = len(series)
    sent = sample_indices(total, max_images, _slice_span(first, last, total))
    pixels = series.rows * series.columns * len(sent)
    if pixels > STUDY_PIXELS:
        fits = max(1, STUDY_PIXELS // (series.rows * series.columns))
        raise UploadOptionError(
            f"{len(sent)} slices of {series.rows} x {series.columns} are {pixels / 1e6:.0f} megapixels, above this "
            f"app's {STUDY_PIXELS / 1e6:.0f} per request: set Max images to {fits} or fewer."
        )
    name = window or series.default_window
    shown = _render_slices(series, sent, name) if render else []
    labels = {s.window for s in shown}
    label = labels.pop() if len(labels) == 1 else ("from each file" if labels else name)
    attributes = {
        "Modality": series.modality or "not given",
        "Orientation": series.orientation,
        "Slices": f"{total}, ordered by {series.ordered_by}",
        "Rows x columns": f"{series.rows} x {series.columns}",
        "Window": label,
    }
    if series.series_count > 1:
        attributes["Series"] = f"{series.number} of {series.series_count}"
    if series.skipped:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(series.skipped.items()))
        attributes["Skipped files"] = f"{sum(series.skipped.values())} of {series.files} ({counts})"
    return UploadedStudy(
        kind="series", total=total, sent=tuple(sent), images=tuple(s.image for s in shown), attributes=attributes,
        window=label, window_name=name, warning=BURNED_IN_WARNING if series.burned_in_annotation else None,
        series=series,
    )


def _views_study(paths: Sequence[str], window: Window | None, max_images: int) -> UploadedStudy:
    if len(paths) > max_images:
        raise UploadOptionError(f"{len(paths)} images uploaded; the model gets at most {max_images} at once (Max "
                                "images): raise it, or upload fewer.")
    views, pixels = [], 0
    for number, path in enumerate(paths, start=1):
        try:
            view = load_upload(path, window)
        except UploadError as err:
            raise type(err)(_numbered(number, len(paths), str(err))) from None
        views.append(view)
        pixels += view.image.width * view.image.height
        if pixels > STUDY_PIXELS:  # each image is bounded on its own; this bounds the request
            raise UploadError(f"These images hold more than {STUDY_PIXELS / 1e6:.0f} megapixels together, this "
                              "app's limit per request: upload fewer or smaller images.")
    labels = {v.dicom.window for v in views if v.dicom is not None}
    label = (labels.pop() if len(labels) == 1 else "from each file") if labels else None
    attributes = {"Images": f"{len(views)}, in upload order"}
    if label is not None:
        attributes["Window"] = label
    return UploadedStudy(
        kind="views", total=len(views), sent=tuple(range(len(views))), images=tuple(v.image for v in views),
        attributes=attributes, window=label, window_name=(window or HEADER_WINDOW) if label else None,
        warning=BURNED_IN_WARNING if any(v.dicom is not None and v.dicom.warning for v in views) else None,
        views=tuple(views),
    )


def _single_study(shown: UploadedImage, window: Window | None) -> UploadedStudy:
    dicom = shown.dicom
    return UploadedStudy(
        kind="image", total=1, sent=(0,), images=(shown.image,),
        attributes=dict(dicom.attributes) if dicom is not None else {},
        window=dicom.window if dicom is not None else None, window_name=window if dicom is not None else None,
        warning=dicom.warning if dicom is not None else None, single=shown,
    )


def _load_prior(path: str, window: Window | None) -> UploadedImage:
    """The prior study's image: the study's window where the file takes it, else the file's own."""
    try:
        try:
            return load_upload(path, window)
        except UploadOptionError:
            return load_upload(path)
    except UploadError as err:
        raise type(err)(f"Prior study: {str(err)[:1].lower()}{str(err)[1:]}") from None


def load_study(
    paths: Sequence[str],
    window: Window | None = None,
    frame_number: float | None = None,
    series: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    first_slice: int | None = None,
    last_slice: int | None = None,
    prior: str | None = None,
    limits: SeriesLimits = STUDY_LIMITS,
    render: bool = True,
) -> UploadedStudy:
    """A request's uploaded files as one study, or UploadError saying why not.

    - One file: as ``load_upload`` reads it, except a multi-frame DICOM file without ``frame_number``,
      which is a series of its frames, and a .zip, which holds a DICOM series.
    - Several files: DICOM files are grouped into a series (``radiology.series``: ordered by their
      geometry; ``series`` picks one where they hold several, else SeriesChoiceError lists them);
      several single images (PNG, JPEG, single-image DICOM files of different series, or up to
      ``max_images`` DICOM files that do not stack, e.g. two views) stay in upload order. A series
      with other images, or a .zip with other files, is refused.
    - A series is sampled to ``max_images`` evenly spaced slices of ``first_slice``..``last_slice``
      (1-based; None: the ends) and rendered with ``window`` (None: multi for grayscale CT, else
      the files' own). ``render=False`` leaves a series' slices unrendered (a viewer's step).
    - ``prior``: one image or DICOM file of a prior study, with the study's window where it fits.

    Every file passes the checks of one upload: the allowed names, ``limits`` (files and bytes of
    the request, one file's bytes, slices), each DICOM header read without its pixels, the
    decoders' own guards, and STUDY_PIXELS for the images sent. Messages name files by number.
    """
    if not paths:
        raise UploadError(f"No image: upload a {_UPLOAD_NAMES} file (or several, or a DICOM series as a .zip) first.")
    _check_study_files(paths, prior, limits)
    suffixes = [Path(p).suffix.lower() for p in paths]
    heads = [_head(p) for p in paths]
    if ".zip" in suffixes or any(head[:4] in _ZIP_MAGIC for head in heads):
        if len(paths) > 1:
            raise UploadError("Upload a .zip alone (one DICOM series, or a study to choose a series from), or the "
                              "files themselves, not both.")
        study = _series_study(_open_series(paths[0], series, limits), window, max_images, first_slice, last_slice,
                              render)
    elif len(paths) == 1:
        shown = load_upload(paths[0], window, frame_number)
        if shown.dicom is not None and shown.dicom.frames > 1 and frame_number is None:
            study = _series_study(_open_series(paths[0], series, limits), window, max_images, first_slice,
                                  last_slice, render)
        else:
            study = _single_study(shown, window or HEADER_WINDOW)
    else:
        dicom = [p for p, suffix, head in zip(paths, suffixes, heads) if _is_dicom(suffix, head)]
        grouped = _grouped_series(dicom, series, max_images, limits) if dicom else None
        if grouped is not None:
            if len(dicom) < len(paths):
                raise UploadError("This upload mixes a DICOM series with other images: upload the series alone (its "
                                  "files or a .zip), and an earlier study as the prior.")
            study = _series_study(grouped, window, max_images, first_slice, last_slice, render)
        else:
            study = _views_study(paths, window, max_images)
    if prior is None:
        return study
    prior_image = _load_prior(prior, study.window_name or window)
    warning = study.warning or (prior_image.dicom.warning if prior_image.dicom is not None else None)
    return dataclasses.replace(study, prior=prior_image, warning=warning)


def clean_instruction(text: object, limit: int = MAX_INSTRUCTION_CHARS, default: str = DEFAULT_INSTRUCTION) -> str:
    """The instruction as the prompt will carry it: ``default`` when blank; ControlError
    when it is not text or too long; ValueError when it holds a chat control token (a stray
    ``<start_of_image>`` asks for an image that is not there, ``<end_of_turn>`` ends the turn)."""
    if text is None:
        return default
    if not isinstance(text, str) or len(text.strip()) > limit:
        raise ControlError(f"The instruction must be text of at most {limit} characters; shorten it.",
                           "instruction")
    text = text.strip()
    token = control_token_in(text)
    if token is not None:
        raise ValueError(
            f"The instruction contains the chat control token {token}, which would change the prompt's "
            "structure; remove it from the instruction."
        )
    return text or default


def clean_context(text: object, limit: int = MAX_CONTEXT_CHARS) -> str | None:
    """The clinical history / question as the prompt will carry it: None when blank (the prompt is
    then exactly the instruction alone); ControlError when it is not text or too long; ValueError
    when it holds a chat control token (the rule of ``radiology.data.build_messages``)."""
    if text is None:
        return None
    if not isinstance(text, str) or len(text.strip()) > limit:
        raise ControlError(f"The clinical history must be text of at most {limit} characters; shorten it.",
                           "clinical history")
    text = text.strip()
    if not text:
        return None
    try:
        build_messages(DEFAULT_INSTRUCTION, context=text)
    except ValueError as err:
        raise ValueError(_sentence(str(err))) from None
    return text


def read_number(
    value: object,
    control: str,
    low: float,
    high: float | None = None,
    whole: bool = False,
    empty: str | None = None,
) -> float | int | None:
    """A numeric control's value as a request sent it (any JSON value): a finite number from ``low``
    to ``high`` (no upper bound when None), a whole one when ``whole``; None for an empty value
    where ``empty`` says what empty means. Anything else is a ControlError saying what the control
    takes, e.g. "Temperature must be a number from 0.05 to 2."."""
    if empty is not None and (value is None or value == ""):
        return None
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is not None and math.isfinite(number) and low <= number and (high is None or number <= high):
        if not whole:
            return float(number)
        if float(number).is_integer():
            return int(number)
    kind = "a whole number" if whole else "a number"
    span = f"from {_plain(low)} to {_plain(high)}" if high is not None else f"from {_plain(low)}"
    also = f", or empty for {empty}" if empty is not None else ""
    raise ControlError(f"{control} must be {kind} {span}{also}.", control)


def _plain(number: float) -> str:
    """``4294967295`` for 4294967295.0 (not 4.29497e+09), ``0.05`` for 0.05."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def read_choice(value: object, control: str, choices: Sequence[str], default: str | None = None) -> str:
    """A choice control's value: one of ``choices`` (``default`` when None and one is given), else
    a ControlError listing them."""
    if value is None and default is not None:
        return default
    if isinstance(value, str) and value in choices:
        return value
    raise ControlError(f"{control} must be one of: {', '.join(choices)}.", control)


def upload_path(payload: object, control: str = "image") -> str | None:
    """The server-side path of an upload control's value as Gradio hands it over without its own
    preprocessing (a file-data dict; Gradio has already checked that the file was uploaded here).
    None when no file was sent; ControlError (naming ``control``: "image", "prior study") for
    anything else."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, str) or not path:
        raise ControlError(
            f"The {control} must be a file uploaded to this app (the page's upload button, or gradio_client's "
            "handle_file).", control
        )
    return path


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


class ServerError(RuntimeError):
    """A configured model server failed its start-up check (raised only where the model is required)."""


@dataclass
class DemoModel:
    """The model the demo serves. ``placeholder`` is set when it is the embedded tiny model, and
    ``reason`` then says why (none configured, or the configured one failed to load). ``baseline``
    is a second model whose answer is shown beside it; ``baseline_reason`` says why a configured
    baseline is missing. Either may be served elsewhere (``RemoteModel``); ``server_problem`` then
    holds why a server failed its last check or request (None: it answered), shown on the page."""

    loaded: AnsweringModel
    placeholder: bool
    reason: str | None = None
    baseline: AnsweringModel | None = None
    baseline_reason: str | None = None
    server_problem: str | None = None

    @property
    def models(self) -> list[AnsweringModel]:
        """The models that answer each request, in the order they run: the served one, then the baseline."""
        return [self.loaded] if self.baseline is None else [self.loaded, self.baseline]

    @property
    def remotes(self) -> list[RemoteModel]:
        """The models that a server answers for."""
        return [m for m in self.models if isinstance(m, RemoteModel)]

    def close(self) -> None:
        """Free the models (their decode engines' threads end; a served one's connections close); the
        app calls it when the server stops."""
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
    remote: RemoteModel | None = None,
    baseline_remote: RemoteModel | None = None,
) -> DemoModel:
    """The configured model; without one, or when it cannot be loaded (not found, no network to
    the hub, gated), the embedded tiny model, unless ``require_model`` asks to fail instead.

    ``baseline`` (a folder or hub id) is loaded the same way (precision, device) to answer beside
    it; when it cannot be loaded the demo serves the model alone and says why, unless
    ``require_model`` asks to fail.

    ``remote`` (``baseline_remote``) is a served model that answers instead of a loaded one: nothing
    is loaded for it. Each server is checked now (``RemoteModel.check``); a failed check is kept in
    ``server_problem`` for the page (each request tries the server again), or raises ServerError
    with ``require_model``.
    """
    if remote is not None:
        served = DemoModel(remote, placeholder=False)
    else:
        served = _load_served(model, adapter, load_in_4bit, device, cache_dir, require_model)
    if baseline_remote is not None:
        served.baseline = baseline_remote
    elif baseline:
        try:
            served.baseline = load_for_generation(baseline, load_in_4bit=load_in_4bit, device=device)
        except Exception as err:  # same choice as for the model: go on without it, or stop
            reason = f"the baseline {baseline} could not be loaded ({type(err).__name__}: {_first_line(err)})"
            if require_model:
                raise BaselineError(reason) from err
            served.baseline_reason = reason
            logger.warning("%s; serving the model alone", reason)
    problems = [problem for problem in (m.check() for m in served.remotes) if problem]
    if problems:
        if require_model:
            raise ServerError("; ".join(problems))
        served.server_problem = "; ".join(problems)
        logger.warning("model server check failed: %s; each request tries again", served.server_problem)
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


def describe_model(loaded: AnsweringModel, role: str = "Model") -> str:
    """One line of Markdown: the model in use, its precision and the device it runs on (for a
    served model: the server and the model's name there)."""
    if isinstance(loaded, RemoteModel):
        return f"**{role}:** {_markdown_literal(loaded.device)}"
    device = loaded.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"**{role}:** `{loaded.name}` · **precision:** {loaded.precision} · **device:** {device}"


def _markdown_literal(text: str) -> str:
    # A server's URL and model name, shown as written (no Markdown emphasis from their underscores).
    return "".join(f"\\{c}" if c in "\\`*_[]|~<>" else c for c in text)


def _cuda_index(device: str) -> int | None:
    """The CUDA device index of ``"cuda"``/``"cuda:1"`` (None: the current one)."""
    return torch.device(device).index


def describe_memory(models: Sequence[AnsweringModel]) -> str:
    """The GPU the models run on with its memory in use (or that there is none), and each model's
    footprint. Readings only: without CUDA no GPU number is shown. A served model's memory is the
    server's, not read here."""
    local = [m for m in models if isinstance(m, LoadedModel)]
    if not local:
        return "GPU: the model server's (not read here)"
    first = local[0]
    if first.device.startswith("cuda") and torch.cuda.is_available():
        gpu = MemoryStatus(gpu=read_gpu_memory(_cuda_index(first.device)), model_footprint=None).describe()
    elif torch.cuda.is_available():
        gpu = "GPU: not used (the model runs on the CPU)"
    else:
        gpu = MemoryStatus(gpu=None, model_footprint=None).describe()
    roles = ["model footprint", "baseline footprint"]
    sizes = [f"{role}: {format_bytes(model_footprint(m.model))}" if isinstance(m, LoadedModel)
             else f"{role}: on the server" for role, m in zip(roles, models)]
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


# Requests the demo sends a model server at once when --concurrency is not given: the server
# batches what arrives together (vLLM and SGLang by default), so waiting here would only add queueing.
SERVER_CONCURRENCY = 8


def default_concurrency(loaded: AnsweringModel) -> int:
    """Generations at once when none is configured: on a GPU the decode engine's batch (requests
    that arrive together are decoded in one batch, at about the cost of one); on the CPU one, since
    one generation already keeps every core busy; for a served model SERVER_CONCURRENCY."""
    if isinstance(loaded, RemoteModel):
        return SERVER_CONCURRENCY
    if loaded.engine is not None and loaded.device.startswith("cuda"):
        return int(loaded.engine.max_batch)
    return 1


def warm_up_on_gpu(loaded: AnsweringModel) -> float | None:
    """Run the first generations now on CUDA (the engine captures its CUDA graphs for every batch
    size), so the first user does not wait for them; returns the seconds spent. None on the CPU,
    where there is nothing to capture, and for a served model."""
    if not isinstance(loaded, LoadedModel) or not loaded.device.startswith("cuda") or not torch.cuda.is_available():
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
        self.superseded = False

    def request(self, superseded: bool = False) -> None:
        """``superseded``: the page moved on (a new study), so nothing of this generation is shown any more."""
        self.requested = True
        self.superseded = self.superseded or superseded
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

    def stop(self, session: str | None, superseded: bool = False) -> int:
        """Ask every generation of ``session`` to stop (``superseded``: and to show nothing more); returns how
        many were running."""
        with self._lock:
            events = [self._by_key[k] for k in self._by_session.get(session or "", ()) if k in self._by_key]
            for event in events:
                event.request(superseded)
        return len(events)

    def wait_ended(self, session: str | None, timeout_s: float) -> bool:
        """Wait until no generation of ``session`` runs (at most ``timeout_s``); whether none does."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if not self._by_session.get(session or ""):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)
