"""DICOM stage: a DICOM file (path or bytes) -> the 8-bit RGB image the model gets, plus the few
technical attributes the demo may show. Nothing else from the header leaves this module.

    python -m radiology.dicom scan.dcm --out scan.png                 # the file's own window
    python -m radiology.dicom scan.dcm --window lung --out lung.png   # a CT preset

Grayscale follows the DICOM display pipeline (PS3.4 N.2): stored values -> modality LUT (rescale
slope/intercept or a Modality LUT) -> VOI (the file's VOI LUT or window, a CT preset, or the full
range of the frame) -> 8 bits, MONOCHROME1 inverted so that bone is white as on a viewer. Colour
(RGB, YBR_*, PALETTE COLOR) is converted to 8-bit RGB. Multi-frame files give one frame (the middle
one unless asked). Compressed transfer syntaxes decode through pydicom's pixel-data plugins.

Patient data: header values are never logged, printed or put into an error message; pydicom's own
warnings and log lines (which quote values it finds odd) are silenced while a file is read. The only
header-derived output is ``DicomImage.attributes``: modality, body part, view position, size,
frames and the window used.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import logging
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGTransferSyntaxes,
    JPEGLSTransferSyntaxes,
)

from radiology.gdcm_worker import GdcmWorkerError, decode_with_gdcm
from radiology.images import ImageDecodeError

__all__ = [
    "BURNED_IN_WARNING",
    "DEFAULT_MAX_BYTES",
    "FULL_RANGE",
    "HEADER_WINDOW",
    "MAX_BYTES_ENV",
    "MULTI_WINDOW",
    "MULTI_WINDOW_RANGES",
    "WINDOW_CHOICES",
    "WINDOW_PRESETS",
    "CorruptDicomError",
    "DicomError",
    "DicomImage",
    "DicomOptionError",
    "DicomTooLargeError",
    "MissingDecoderError",
    "NoPixelDataError",
    "NotDicomError",
    "TruncatedDicomError",
    "UnsupportedDicomError",
    "has_dicom_preamble",
    "read_dicom_frames",
    "read_dicom_image",
]

# --------------------------------------------------------------------------- settings

# Decoding a frame allocates rows x columns x samples x bytes, and the float pipeline a few times
# that; 512 MiB of declared pixel data is far above any clinical image (a 4k x 4k 16-bit
# mammogram is 32 MiB) yet well inside a small server's memory.
DEFAULT_MAX_BYTES = 512 * 2**20
MAX_BYTES_ENV = "RADIOLOGY_DICOM_MAX_BYTES"

# CT windows as (center, width) in Hounsfield units, the usual reading-room values.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),  # chest soft tissue
    "abdomen": (50.0, 400.0),  # abdominal soft tissue
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
HEADER_WINDOW = "header"  # the file's VOI LUT or window, else the full range (the default)
FULL_RANGE = "full"  # the frame's minimum..maximum, whatever the file says
WINDOW_CHOICES: tuple[str, ...] = (HEADER_WINDOW, FULL_RANGE, *WINDOW_PRESETS)

# Three CT windows in the R, G and B channels of one image, as MedGemma was trained to read CT:
# Google's notebook notebooks/high_dimensional_ct_hugging_face.ipynb (github.com/Google-Health/medgemma)
# clips Hounsfield units to each (lowest, highest) range below, scales it to 0..255 and rounds;
# Google-Health/medgemma issue 27 confirms this multi-window input is the intended preprocessing.
# Accepted as a window by read_dicom_image for CT images (kept out of WINDOW_CHOICES, the list of
# single-channel windows).
MULTI_WINDOW = "multi"
MULTI_WINDOW_RANGES: tuple[tuple[str, float, float], ...] = (
    ("wide", -1024.0, 1024.0),  # red: air to above bone
    ("soft tissue", -135.0, 215.0),  # green: fat to the start of bone
    ("brain", 0.0, 80.0),  # blue: water to brain
)

BURNED_IN_WARNING = (
    "This file declares burned-in annotation: text in the pixels may identify the patient. "
    "Check the image before sharing it or using it for training."
)

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"
# Every photometric interpretation the standard defines (current and retired): only these
# fixed words may appear in an error message, never a free value from the header.
_KNOWN_PHOTOMETRIC = {
    *_MONOCHROME, *_COLOUR, _PALETTE, "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK", "XYB",
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # the CS value representation (PS3.5 6.2)

# The attributes shown to the user are shown only when they hold a defined term of the standard,
# so that text typed into them (a name, a hospital) never reaches the screen. Unknown terms are
# left out of the list rather than shown.
_MODALITIES = frozenset("""
    AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX
    REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF
    STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
""".split())
_VIEW_POSITIONS = frozenset("""
    AP PA LL RL RLD LLD RLO LLO LAO RAO LPO RPO CC FB LM LMO ML MLO SIO ISO XCC XCCL XCCM AT
""".split())
_BODY_PARTS = frozenset("""
    ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AORTA ANKLE APPENDIX ARM AXILLA BACK BILEDUCT BLADDER BRAIN
    BREAST BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN
    CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM
    EAR ELBOW ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT FOREARM GALLBLADDER HAND HEAD
    HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE
    LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY
    PANCREAS PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM RIB SACRUM SCALP SCAPULA SCLERA SCROTUM
    SELLA SHOULDER SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THORAX THUMB
    THYMUS THYROID TIBIA TLSPINE TMJ TOE TONGUE TRACHEA TSPINE URETER URETHRA UTERUS VAGINA WHOLEBODY
    WRIST ZYGOMA
""".split())
_SHOWN_TERMS = {"Modality": _MODALITIES, "BodyPartExamined": _BODY_PARTS, "ViewPosition": _VIEW_POSITIONS}

# What to install when a transfer syntax has no decoder, chosen for permissive licences.
_INSTALL_GDCM = "python-gdcm (Apache-2.0; GDCM itself is BSD): pip install python-gdcm"
_INSTALL_OPENJPEG = "pylibjpeg-openjpeg (MIT): pip install pylibjpeg pylibjpeg-openjpeg"
_INSTALL_LIBJPEG = (
    "pylibjpeg-libjpeg, which is GPL-3.0 (check that its licence suits your use): "
    "pip install pylibjpeg pylibjpeg-libjpeg"
)
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "Pillow (pip install pillow) or " + _INSTALL_GDCM,
    "1.2.840.10008.1.2.4.51": "Pillow (8-bit) or " + _INSTALL_GDCM + "; 12-bit samples need " + _INSTALL_LIBJPEG,
    "1.2.840.10008.1.2.4.57": _INSTALL_GDCM,
    "1.2.840.10008.1.2.4.70": _INSTALL_GDCM,
    "1.2.840.10008.1.2.4.80": "pyjpegls (MIT): pip install pyjpegls, or " + _INSTALL_GDCM,
    "1.2.840.10008.1.2.4.81": "pyjpegls (MIT): pip install pyjpegls, or " + _INSTALL_GDCM,
    "1.2.840.10008.1.2.4.90": _INSTALL_OPENJPEG,
    "1.2.840.10008.1.2.4.91": _INSTALL_OPENJPEG,
    "1.2.840.10008.1.2.4.201": _INSTALL_OPENJPEG,
    "1.2.840.10008.1.2.4.202": _INSTALL_OPENJPEG,
    "1.2.840.10008.1.2.4.203": _INSTALL_OPENJPEG,
}
# GDCM aborts the whole process (a C++ assertion, not an exception) on some damaged JPEG streams
# and on headers that disagree with their stream. So every other plugin comes first, and GDCM
# (the only permissive JPEG Lossless decoder) decodes JPEG-family frames only, in a child process
# (radiology.gdcm_worker), after their frame header has been checked against the DICOM header.
_SAFE_FIRST = ("pydicom", "pylibjpeg", "pyjpegls", "pillow")
_GDCM = "gdcm"
_JPEG_FAMILY = {str(uid) for uid in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)}
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS

# Formats people rename to .dcm by mistake, recognised by their first bytes.
_SIGNATURES = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image", b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive", b"GIF8": "a GIF image", b"BM": "a BMP image",
}


# --------------------------------------------------------------------------- errors


class DicomError(ImageDecodeError):
    """A DICOM file that cannot be rendered. The message names the cause and the fix, and never
    quotes a value from the file's header."""

    reason = "unreadable DICOM file"


class NotDicomError(DicomError):
    """The data is not DICOM at all."""

    reason = "file named .dcm that is not DICOM"


class TruncatedDicomError(DicomError):
    """The file ends early: a copy or download was cut off."""

    reason = "truncated DICOM file"


class NoPixelDataError(DicomError):
    """A valid DICOM object without an image (an RT plan, a structured report, ...)."""

    reason = "DICOM without pixel data"


class MissingDecoderError(DicomError):
    """The pixel data is compressed with a transfer syntax no installed plugin decodes."""

    @property
    def reason(self) -> str:  # type: ignore[override]
        # The full message (which package to install) is worth counting under: it holds no header value.
        return str(self)


class DicomTooLargeError(DicomError):
    """The header declares more pixel data than the configured limit."""

    reason = "DICOM above the size limit"


class UnsupportedDicomError(DicomError):
    """The header describes pixels this reader cannot render (or describes them impossibly)."""

    reason = "DICOM pixel layout not supported"


class CorruptDicomError(DicomError):
    """The file is DICOM but its contents cannot be parsed or decoded."""

    reason = "damaged DICOM file"


class DicomOptionError(DicomError):
    """A requested frame or window that does not fit this file."""

    reason = "DICOM frame or window not available"


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class DicomImage:
    """A rendered DICOM frame and what the demo may show about it.

    ``attributes`` holds technical values only (no identifiers, dates, names or free text), with
    display labels as keys. ``frame`` is the 0-based index of the frame shown.
    """

    image: Image.Image
    attributes: dict[str, str]
    burned_in_annotation: bool
    frame: int
    frames: int
    window: str
    # For a viewer's window sliders (grayscale only): the linear (center, width) that rendered the
    # frame (a full range as its equivalent window; None for a VOI LUT or multi), and the frame's
    # lowest and highest value after the modality LUT (Hounsfield units for CT).
    linear_window: tuple[float, float] | None = None
    value_range: tuple[float, float] | None = None

    @property
    def warning(self) -> str | None:
        """The text to show next to the image, or None."""
        return BURNED_IN_WARNING if self.burned_in_annotation else None


# --------------------------------------------------------------------------- quiet pydicom

_QUIET = contextvars.ContextVar("radiology_dicom_quiet", default=False)
_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "gdcm", "jpeg_ls")


class _DropWhileReading(logging.Filter):
    """Drops log records while this thread reads a DICOM file: pydicom quotes odd header values
    (a malformed name, an invalid number) in its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


_DROP_FILTER = _DropWhileReading()


def _install_log_filter() -> None:
    # A filter on a logger only sees records logged on that very logger, so it goes on every
    # pydicom/decoder logger that exists (pydicom creates some per module, lazily).
    for name in (*_QUIET_LOGGERS, *list(logging.Logger.manager.loggerDict)):
        if name.split(".")[0] in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            if _DROP_FILTER not in logger.filters:
                logger.addFilter(_DROP_FILTER)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Silence pydicom's warnings and log records; yield the warnings for inspection (they tell
    a truncated file from a complete one), never for display.

    The log filter is per thread (a context variable); warnings.catch_warnings is process-wide
    before Python 3.14, so a warning raised by another thread meanwhile is swallowed too.
    """
    _install_log_filter()
    token = _QUIET.set(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        _QUIET.reset(token)


@contextlib.contextmanager
def _failure_as(error: type[DicomError], what: str) -> Iterator[None]:
    """Turn any unexpected exception in one stage into ``error`` naming the stage. The original
    message is dropped (``from None``): pydicom's messages may quote header values."""
    try:
        yield
    except DicomError:
        raise
    except Exception as err:  # noqa: BLE001 - hostile files raise anything; all end here
        raise error(f"{what} ({type(err).__name__})") from None


# --------------------------------------------------------------------------- reading


def has_dicom_preamble(data: bytes) -> bool:
    """True when ``data`` has the 'DICM' marker of a DICOM Part 10 file at byte 128."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _starts_like_bare_dataset(data: bytes) -> bool:
    # Preamble-less files (old exports, some DICOMDIR members) begin with an element of group
    # 0002 (file meta) or 0008 (identification), in either byte order.
    if len(data) < 8:
        return False
    group_le, group_be = struct.unpack("<H", data[:2])[0], struct.unpack(">H", data[:2])[0]
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _not_dicom(data: bytes, dcm_name: bool) -> NotDicomError:
    kind = next((label for magic, label in _SIGNATURES.items() if data.startswith(magic)), None)
    found = f"; it looks like {kind}" if kind else ""
    if dcm_name:
        return NotDicomError(
            f"the file is named .dcm but is not DICOM (no 'DICM' marker at byte 128 and no DICOM data "
            f"element at the start){found}. Rename it to its real format, or export it again as DICOM."
        )
    return NotDicomError(
        f"not a DICOM file (no 'DICM' marker at byte 128 and no DICOM data element at the start){found}"
    )


def _limit(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return max_bytes
    configured = os.environ.get(MAX_BYTES_ENV)
    if configured:
        try:
            return int(configured)
        except ValueError:
            raise ValueError(f"{MAX_BYTES_ENV} must be a whole number of bytes, e.g. {DEFAULT_MAX_BYTES}") from None
    return DEFAULT_MAX_BYTES


def _size(n: int) -> str:
    return f"{n / 2**10:,.0f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _read_source(source: str | os.PathLike[str] | bytes | bytearray | BinaryIO, limit: int) -> tuple[bytes, bool]:
    """The file's bytes and whether it was named .dcm. File names stay out of messages: they too
    can carry a patient's name."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), False
    if hasattr(source, "read"):
        data = source.read(limit + 1)  # type: ignore[union-attr]
        if len(data) > limit:
            raise DicomTooLargeError(f"the file is larger than the limit of {_size(limit)}; {_raise_limit_hint()}")
        return bytes(data), str(getattr(source, "name", "")).lower().endswith(".dcm")
    path = Path(source)
    if not path.is_file():
        raise DicomError("the DICOM file was not found (check the path)")
    size = path.stat().st_size
    if size > limit:
        raise DicomTooLargeError(f"the file is {_size(size)}, above the limit of {_size(limit)}; {_raise_limit_hint()}")
    return path.read_bytes(), path.suffix.lower() == ".dcm"


def _raise_limit_hint() -> str:
    return f"if you trust the file, raise the limit with max_bytes= or the {MAX_BYTES_ENV} environment variable"


def _short_elements(ds: Dataset) -> bool:
    # pydicom keeps a value cut off by the end of the file, shorter than its declared length.
    for elem in ds.elements():
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if isinstance(value, bytes) and isinstance(length, int) and length != 0xFFFFFFFF and len(value) < length:
            return True
    return False


def _partial_last_element(ds: Dataset, size: int) -> bool:
    # A file cut inside an element's 8-byte header leaves 1..7 bytes after the last element
    # read, which pydicom drops without a word.
    last = None
    for elem in ds.elements():
        last = elem
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if not isinstance(tell, int) or not isinstance(length, int) or length == 0xFFFFFFFF:
        return False
    return 0 < size - (tell + length) < 8


def _parse(data: bytes, dcm_name: bool) -> tuple[Dataset, bool]:
    """The dataset and whether the file ended early. Raises NotDicomError/CorruptDicomError."""
    preamble = has_dicom_preamble(data)
    if not preamble and not _starts_like_bare_dataset(data):
        raise _not_dicom(data, dcm_name)
    with _quiet_pydicom() as caught:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=not preamble)
        except InvalidDicomError:
            raise _not_dicom(data, dcm_name) from None
        except (EOFError, struct.error):
            raise TruncatedDicomError("the DICOM file ends in the middle of its header (it was cut off); copy it again") from None
        except Exception as err:  # noqa: BLE001
            raise CorruptDicomError(f"the DICOM header could not be parsed ({type(err).__name__}); the file is damaged") from None
        # pydicom stops quietly at an element cut by the end of the file: detect that here.
        with _failure_as(CorruptDicomError, "the DICOM header could not be parsed"):
            ended_early = (
                any("end of file" in str(w.message).lower() for w in caught)
                or _short_elements(ds)
                or _partial_last_element(ds, len(data))
            )
            if not preamble and not _has_plausible_elements(ds):
                raise _not_dicom(data, dcm_name)
    return ds, ended_early


def _has_plausible_elements(ds: Dataset) -> bool:
    # force=True parses anything; a real dataset has standard elements of groups 0008/0028.
    tags = [int(tag) for tag in ds.keys()]
    return any(tag >> 16 in (0x0008, 0x0028) for tag in tags) or any(tag == 0x7FE00010 for tag in tags)


# --------------------------------------------------------------------------- header checks


@dataclass(frozen=True)
class _Layout:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str

    @property
    def decoded_bytes(self) -> int:
        # 1-bit data is unpacked to one byte a pixel; YBR_FULL_422 is upsampled to 3 samples.
        per_sample = max(1, self.bits_allocated // 8)
        return self.rows * self.columns * self.frames * self.samples * per_sample

    @property
    def frame_work_bytes(self) -> int:
        # Rendering one frame works on float64 copies of it (rescale, window).
        return self.rows * self.columns * self.samples * 8


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    if keyword not in ds:
        if default is None:
            raise UnsupportedDicomError(f"the header has no {keyword}, which an image needs")
        return default
    with _failure_as(UnsupportedDicomError, f"the header's {keyword} is not a valid number"):
        value = ds[keyword].value
        if value is None or value == "":
            if default is None:
                raise UnsupportedDicomError(f"the header's {keyword} is empty")
            return default
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            raise UnsupportedDicomError(f"the header's {keyword} holds several values where one belongs")
        return int(value)


def _photometric(ds: Dataset) -> str:
    with _failure_as(UnsupportedDicomError, "the header's Photometric Interpretation is unreadable"):
        value = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if value in (*_MONOCHROME, *_COLOUR, _PALETTE):
        return value
    if not value:
        raise UnsupportedDicomError("the header has no Photometric Interpretation, which an image needs")
    named = f" ({value})" if value in _KNOWN_PHOTOMETRIC else ""
    supported = ", ".join((*_MONOCHROME, *_COLOUR, _PALETTE))
    raise UnsupportedDicomError(
        f"the photometric interpretation{named} is not one this reader renders; supported: {supported}"
    )


def _layout(ds: Dataset) -> _Layout:
    layout = _Layout(
        rows=_int_attr(ds, "Rows"),
        columns=_int_attr(ds, "Columns"),
        frames=_int_attr(ds, "NumberOfFrames", default=1),
        samples=_int_attr(ds, "SamplesPerPixel", default=1),
        bits_allocated=_int_attr(ds, "BitsAllocated"),
        bits_stored=_int_attr(ds, "BitsStored", default=-1),
        photometric=_photometric(ds),
    )
    if layout.bits_stored == -1:
        layout = _Layout(**{**layout.__dict__, "bits_stored": layout.bits_allocated})
    problems = []
    if layout.rows < 1 or layout.columns < 1:
        problems.append("Rows and Columns must be at least 1")
    if layout.frames < 1:
        problems.append("Number of Frames must be at least 1")
    if layout.bits_allocated not in (1, 8, 16, 32, 64):
        problems.append("Bits Allocated must be 1, 8, 16, 32 or 64")
    if not 1 <= layout.bits_stored <= max(layout.bits_allocated, 1):
        problems.append("Bits Stored must lie between 1 and Bits Allocated")
    expected_samples = 1 if layout.photometric in (*_MONOCHROME, _PALETTE) else 3
    if layout.samples != expected_samples:
        problems.append("Samples per Pixel does not match the photometric interpretation")
    if problems:
        raise UnsupportedDicomError("the header describes impossible pixel data: " + "; ".join(problems))
    return layout


def _check_size(layout: _Layout, limit: int) -> None:
    """Refuse, from the header alone, pixel data whose decoding could exhaust memory: a few bytes of
    RLE or JPEG can claim gigabytes."""
    if layout.decoded_bytes > limit:
        raise DicomTooLargeError(
            f"the header declares {_size(layout.decoded_bytes)} of pixel data, above the limit of {_size(limit)}; "
            + _raise_limit_hint()
        )
    if layout.frame_work_bytes > limit:
        raise DicomTooLargeError(
            f"one frame would need {_size(layout.frame_work_bytes)} to render, above the limit of {_size(limit)}; "
            + _raise_limit_hint()
        )


def _choose_frame(frames: int, frame: int | None) -> int:
    if frame is None:
        return frames // 2  # the middle of a series is the most representative single frame
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise DicomOptionError("the frame must be a whole number (0 for the first frame)")
    if not 0 <= frame < frames:
        raise DicomOptionError(f"frame {int(frame)} does not exist: this file has {frames} frame(s), numbered 0 to {frames - 1}")
    return int(frame)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        # Preamble-less files often lack file meta; their encoding tells the (native) syntax.
        implicit, little = ds.original_encoding
        tsyntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = tsyntax
    tsyntax = UID(str(tsyntax).strip().rstrip("\x00"))
    if not tsyntax.keyword or not tsyntax.is_transfer_syntax:
        raise UnsupportedDicomError("the file's transfer syntax is not one the DICOM standard defines; it cannot be decoded")
    return tsyntax


def _check_decoder(tsyntax: UID, layout: _Layout) -> None:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise MissingDecoderError(
            f"no pydicom plugin decodes {tsyntax.name} pixel data; convert the file to an uncompressed "
            "transfer syntax (for example with dcmtk's dcmdjpeg or gdcmconv --raw)"
        ) from None
    hint = _DECODER_HINTS.get(str(tsyntax), "a pydicom pixel-data plugin for it")
    if not decoder.is_available:
        raise MissingDecoderError(f"{tsyntax.name} pixel data needs a decoder that is not installed: {hint}")
    # Pillow and GDCM refuse 12-bit JPEG Extended in pydicom; only pylibjpeg-libjpeg decodes it.
    if tsyntax == JPEGExtended12Bit and layout.bits_stored > 8 and "pylibjpeg" not in decoder.available_plugins:
        raise MissingDecoderError(f"12-bit {tsyntax.name} pixel data needs {_INSTALL_LIBJPEG}")


# --------------------------------------------------------------------------- rendering


def _functional_group(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The item of a functional-group macro (e.g. PixelValueTransformationSequence) that applies to
    frame ``index`` of an enhanced multi-frame file: per-frame first, then shared."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > position and sequence in items[position] and items[position][sequence].value:
            return items[position][sequence].value[0]
    return None


def _modality_source(ds: Dataset, index: int) -> Dataset:
    """Where the rescale for this frame lives: the top level, or an enhanced file's functional groups."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
        return ds
    item = _functional_group(ds, index, "PixelValueTransformationSequence")
    return item if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item else ds


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)


def _full_range(values: np.ndarray) -> np.ndarray:
    """The frame's lowest..highest value stretched to 0..255 (what a viewer shows without a window)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float64)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values.astype(np.float64) - low) * (255.0 / (high - low))


def _linear_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM windowing (PS3.3 C.11.2.1.2) straight onto 0..255, through pydicom's implementation.

    The window is applied through a stand-in dataset that declares 8-bit unsigned output and no
    rescale, so that pydicom's output range is exactly 0..255.
    """
    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 8
    view.PixelRepresentation = 0
    view.WindowCenter = pydicom.valuerep.DSfloat(center, auto_format=True)
    view.WindowWidth = pydicom.valuerep.DSfloat(width, auto_format=True)
    view.VOILUTFunction = function
    return apply_windowing(values, view)


def _header_window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    """The first window the file gives for this frame (top level or frame VOI LUT macro), if usable."""
    source: Dataset | None = ds if "WindowCenter" in ds and "WindowWidth" in ds else None
    if source is None:
        source = _functional_group(ds, index, "FrameVOILUTSequence")
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    try:
        center, width = source.WindowCenter, source.WindowWidth
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    except Exception:  # noqa: BLE001 - an unreadable window is treated as no window
        return None
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1 or (function != "LINEAR" and width <= 0):
        return None
    return center, width, function


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The file's VOI LUT applied and scaled to 0..255 by the LUT's bit depth, or None if it has none."""
    items = ds.get("VOILUTSequence")
    if not items or "LUTDescriptor" not in items[0] or "LUTData" not in items[0]:
        return None
    depth = int(items[0].LUTDescriptor[2])
    integral = np.rint(values).astype(np.int64)  # the LUT is indexed by whole input values
    out = apply_voi(integral, ds, 0)
    return out.astype(np.float64) * (255.0 / (2**depth - 1))


def _fmt(center: float, width: float) -> str:
    return f"C {center:g}, W {width:g}"


def _is_ct(ds: Dataset) -> bool:
    modality = _code_string(ds, "Modality")
    rescale_type = _code_string(_modality_source(ds, 0), "RescaleType")
    return modality == "CT" or rescale_type == "HU"


def _render_grayscale(
    stored: np.ndarray, ds: Dataset, layout: _Layout, index: int, window: str | tuple[float, float] | None
) -> tuple[np.ndarray, str, tuple[float, float] | None, tuple[float, float] | None]:
    """Stored values -> modality LUT -> VOI -> 0..255 (MONOCHROME1 inverted). Returns pixels, the window
    label, the linear (center, width) applied (None for a VOI LUT) and the values' (lowest, highest)."""
    with _failure_as(CorruptDicomError, "the header's rescale (modality LUT) values could not be applied"):
        values = apply_modality_lut(stored, _modality_source(ds, index))
    lowest_highest = _value_range(values)
    linear: tuple[float, float] | None = None
    with _failure_as(CorruptDicomError, "the window could not be applied"):
        if isinstance(window, tuple):
            center, width = window
            gray, label = _linear_window(values, center, width), f"custom ({_fmt(center, width)})"
            linear = (center, width)
        elif window in WINDOW_PRESETS:
            if not _is_ct(ds):
                raise DicomOptionError(
                    f"the {window} preset is a CT window in Hounsfield units and this image is not CT; "
                    f"use '{HEADER_WINDOW}' or '{FULL_RANGE}'"
                )
            center, width = WINDOW_PRESETS[window]
            gray, label = _linear_window(values, center, width), f"{window} ({_fmt(center, width)})"
            linear = (center, width)
        elif window == FULL_RANGE:
            gray, label = _full_range(values), "full range"
            linear = _full_range_window(lowest_highest)
        else:
            gray, label, linear = _header_voi(values, ds, index, lowest_highest)
    pixels = _to_uint8(gray)
    if layout.photometric == "MONOCHROME1":  # minimum value is white: invert for display
        pixels = 255 - pixels
    return pixels, label, linear, lowest_highest


def _value_range(values: np.ndarray) -> tuple[float, float] | None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _full_range_window(lowest_highest: tuple[float, float] | None) -> tuple[float, float] | None:
    """The linear window that shows about what the full range shows (lowest black, highest white)."""
    if lowest_highest is None or lowest_highest[1] <= lowest_highest[0]:
        return None
    low, high = lowest_highest
    return (low + high) / 2, high - low


def _render_multi_window(
    stored: np.ndarray, ds: Dataset, index: int
) -> tuple[np.ndarray, str, tuple[float, float] | None]:
    """Stored values -> Hounsfield units -> the three MULTI_WINDOW_RANGES in R, G, B (CT only); also
    the values' (lowest, highest)."""
    if not _is_ct(ds):
        raise DicomOptionError(
            f"the '{MULTI_WINDOW}' window puts three CT windows in Hounsfield units into R, G, B and this image "
            f"is not CT; use '{HEADER_WINDOW}' or '{FULL_RANGE}'"
        )
    with _failure_as(CorruptDicomError, "the header's rescale (modality LUT) values could not be applied"):
        values = np.asarray(apply_modality_lut(stored, _modality_source(ds, index)), dtype=np.float64)
    channels = np.empty((*values.shape, 3), dtype=np.uint8)
    for channel, (_, low, high) in enumerate(MULTI_WINDOW_RANGES):
        channels[..., channel] = _to_uint8((np.clip(values, low, high) - low) * (255.0 / (high - low)))
    # No MONOCHROME1 inversion: this is a fixed encoding of Hounsfield units (what the model learned),
    # not a display of the stored values, so the same tissue gives the same colour in every file.
    label = f"{MULTI_WINDOW} (" + ", ".join(f"{name} {low:g}..{high:g} HU" for name, low, high in MULTI_WINDOW_RANGES) + ")"
    return channels, label, _value_range(values)


def _header_voi(
    values: np.ndarray, ds: Dataset, index: int, lowest_highest: tuple[float, float] | None
) -> tuple[np.ndarray, str, tuple[float, float] | None]:
    try:
        lut = _voi_lut(values, ds)
    except Exception:  # noqa: BLE001 - a broken VOI LUT falls back to the window or full range
        lut = None
    if lut is not None:
        return lut, "from the file (VOI LUT)", None
    found = _header_window(ds, index)
    if found is not None:
        center, width, function = found
        try:
            shown = _linear_window(values, center, width, function)
            return shown, f"from the file ({_fmt(center, width)})", (center, width)
        except Exception:  # noqa: BLE001
            pass
    return _full_range(values), "full range (the file gives no usable window)", _full_range_window(lowest_highest)


def _render_colour(stored: np.ndarray, ds: Dataset, layout: _Layout) -> np.ndarray:
    with _failure_as(CorruptDicomError, "the colour values could not be converted"):
        if layout.photometric == _PALETTE:
            rgb = apply_color_lut(stored, ds)[..., :3]  # drop an alpha channel if the palette has one
            top = 255 if rgb.dtype == np.uint8 else 65535
        else:
            rgb = stored  # pydicom has already turned YBR into RGB
            top = 2**layout.bits_stored - 1
        if top == 255:
            return np.clip(rgb, 0, 255).astype(np.uint8)
        return _to_uint8(rgb.astype(np.float64) * (255.0 / top))


def _code_string(ds: Dataset, keyword: str) -> str | None:
    """A code-string value if it is one (uppercase code, at most 16 characters), else None: a free
    text typed into a code field (a name, a comment) is not shown."""
    try:
        value = ds.get(keyword)
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0] if len(value) else None
        text = str(value).strip() if value is not None else ""
    except Exception:  # noqa: BLE001
        return None
    return text if _CODE_STRING.fullmatch(text) else None


def _attributes(ds: Dataset, layout: _Layout, index: int, window_label: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for label, keyword in (("Modality", "Modality"), ("Body part", "BodyPartExamined"), ("View position", "ViewPosition")):
        value = _code_string(ds, keyword)
        # Vendors write "WHOLE BODY" or "CHEST_ABDOMEN" for the defined WHOLEBODY and CHESTABDOMEN.
        if value and value.replace(" ", "").replace("_", "") in _SHOWN_TERMS[keyword]:
            attributes[label] = value
    attributes["Rows x columns"] = f"{layout.rows} x {layout.columns}"
    attributes["Frames"] = str(layout.frames)
    if layout.frames > 1:
        attributes["Frame shown"] = f"{index + 1} of {layout.frames}"
    attributes["Window"] = window_label
    return attributes


def _check_window_choice(window: str | tuple[float, float] | None) -> None:
    if window is None or window in WINDOW_CHOICES or window == MULTI_WINDOW:
        return
    if isinstance(window, tuple) and len(window) == 2:
        center, width = (float(v) for v in window)
        if np.isfinite(center) and np.isfinite(width) and width >= 1:
            return
        raise ValueError("a custom window is (center, width) with finite numbers and width >= 1")
    raise ValueError(
        f"unknown window {window!r}; choose one of {', '.join((*WINDOW_CHOICES, MULTI_WINDOW))} or give (center, width)"
    )


def read_dicom_image(
    source: str | os.PathLike[str] | bytes | bytearray | BinaryIO,
    window: str | tuple[float, float] | None = None,
    frame: int | None = None,
    *,
    max_bytes: int | None = None,
) -> DicomImage:
    """Render a DICOM file (path, bytes or binary file object) as the 8-bit RGB image the model gets.

    ``window``: None or ``"header"`` (the file's VOI LUT or window, else the full range), ``"full"``
    (the frame's full range), a CT preset from WINDOW_PRESETS, ``"multi"`` (MULTI_WINDOW: three
    CT windows in R, G, B), or a custom ``(center, width)``.
    ``frame``: 0-based; None takes the middle frame. ``max_bytes`` caps the file's size, the pixel
    data its header declares and the float copy of the rendered frame, all checked before decoding
    (default: the RADIOLOGY_DICOM_MAX_BYTES environment variable, else 512 MiB).

    Raises a DicomError subclass (an ImageDecodeError) naming the cause; ValueError for a window
    name that is not one of WINDOW_CHOICES.
    """
    _check_window_choice(window)
    if isinstance(window, tuple):
        window = (float(window[0]), float(window[1]))
    limit = _limit(max_bytes)
    data, dcm_name = _read_source(source, limit)
    ds, ended_early = _parse(data, dcm_name)
    with _quiet_pydicom():
        return _render(ds, ended_early, window, frame, limit)


def read_dicom_frames(
    source: str | os.PathLike[str] | bytes | bytearray | BinaryIO,
    frames: list[int],
    window: str | tuple[float, float] | None = None,
    *,
    max_bytes: int | None = None,
) -> list[DicomImage]:
    """Several frames (0-based) of one multi-frame file, read and parsed once; otherwise as
    ``read_dicom_image``. Each frame is decoded on its own, so memory holds the file and one frame."""
    _check_window_choice(window)
    if isinstance(window, tuple):
        window = (float(window[0]), float(window[1]))
    limit = _limit(max_bytes)
    data, dcm_name = _read_source(source, limit)
    ds, ended_early = _parse(data, dcm_name)
    with _quiet_pydicom():
        return [_render(ds, ended_early, window, frame, limit) for frame in frames]


def _render(ds: Dataset, ended_early: bool, window: str | tuple[float, float] | None, frame: int | None, limit: int) -> DicomImage:
    pixel_keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if pixel_keyword is None:
        if ended_early or "Rows" in ds or _is_image_object(ds):
            # An image without its pixels: the file was cut off, perhaps at an element boundary.
            raise TruncatedDicomError("the DICOM file ends before its pixel data (it was cut off); copy it again")
        raise NoPixelDataError(f"this DICOM file has no pixel data{_sop_class_note(ds)}: only image objects can be shown")
    layout = _layout(ds)
    _check_size(layout, limit)
    index = _choose_frame(layout.frames, frame)
    with _failure_as(UnsupportedDicomError, "the file's transfer syntax is unreadable"):
        tsyntax = _transfer_syntax(ds)
    if tsyntax.is_encapsulated:
        _check_decoder(tsyntax, layout)
    elif pixel_keyword == "PixelData":
        _check_native_length(ds, layout, ended_early)
    if ended_early:
        raise TruncatedDicomError("the DICOM file ends before the end of its pixel data (it was cut off); copy it again")
    stored = _decode_frame(ds, index, tsyntax, layout)
    linear, lowest_highest = None, None
    if layout.photometric in _MONOCHROME:
        if stored.ndim != 2:
            raise UnsupportedDicomError("the decoded frame does not have the single sample a grayscale image needs")
        if window == MULTI_WINDOW:
            rgb, label, lowest_highest = _render_multi_window(stored, ds, index)
            image = Image.fromarray(rgb, mode="RGB")
        else:
            gray, label, linear, lowest_highest = _render_grayscale(stored, ds, layout, index, window)
            image = Image.fromarray(gray, mode="L").convert("RGB")
    else:
        if window in WINDOW_PRESETS or window == MULTI_WINDOW or isinstance(window, tuple):
            raise DicomOptionError(f"window settings apply to grayscale images and this one is colour; use '{HEADER_WINDOW}'")
        rgb = _render_colour(stored, ds, layout)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise UnsupportedDicomError("the decoded frame does not have the three samples a colour image needs")
        image, label = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"), "not applicable (colour)"
    return DicomImage(
        image=image,
        attributes=_attributes(ds, layout, index, label),
        burned_in_annotation=_code_string(ds, "BurnedInAnnotation") == "YES",
        frame=index,
        frames=layout.frames,
        window=label,
        linear_window=linear,
        value_range=lowest_highest,
    )


def _plugins(tsyntax: UID) -> list[str]:
    """The installed plugins for ``tsyntax`` in the order to try them ("" lets pydicom choose)."""
    if not tsyntax.is_encapsulated:
        return [""]
    available = get_decoder(tsyntax).available_plugins
    order = [name for name in _SAFE_FIRST if name in available]
    if _GDCM in available and str(tsyntax) in _JPEG_FAMILY:
        order.append(_GDCM)
    return order


def _decode_frame(ds: Dataset, index: int, tsyntax: UID, layout: _Layout) -> np.ndarray:
    """One frame of stored values, trying the safe plugins first (see _SAFE_FIRST)."""
    failure: str | None = None
    plugins = _plugins(tsyntax)
    if not plugins:
        raise MissingDecoderError(
            f"{tsyntax.name} pixel data is only decodable here by GDCM, which is not used for it; install "
            + _DECODER_HINTS.get(str(tsyntax), "another pydicom pixel-data plugin")
        )
    for plugin in plugins:
        try:
            if plugin == _GDCM:
                frame = _check_jpeg_frame(ds, index, layout)
                return decode_with_gdcm(str(tsyntax), _pixel_module(ds, layout), frame)
            return pixel_array(ds, index=index, decoding_plugin=plugin)
        except GdcmWorkerError as err:
            failure = str(err)
        except DicomError:
            raise
        except MemoryError:
            raise DicomTooLargeError("the pixel data does not fit in memory; lower the number of files read at once") from None
        except Exception as err:  # noqa: BLE001 - decoders raise many types; messages may quote the header
            failure = type(err).__name__
    name = tsyntax.name if tsyntax.keyword else "the"
    raise CorruptDicomError(
        f"the {name} pixel data could not be decoded ({failure}); the file is damaged, or its header does not "
        "match its pixels"
    )


def _pixel_module(ds: Dataset, layout: _Layout) -> dict[str, Any]:
    """The Image Pixel values GDCM needs, from checked numbers only: nothing else crosses to its process."""
    representation = _int_attr(ds, "PixelRepresentation", default=0)
    planar = _int_attr(ds, "PlanarConfiguration", default=0) if layout.samples > 1 else 0
    if representation not in (0, 1) or planar not in (0, 1):
        raise UnsupportedDicomError("the header's Pixel Representation or Planar Configuration must be 0 or 1")
    pixel: dict[str, Any] = {
        "Rows": layout.rows, "Columns": layout.columns, "SamplesPerPixel": layout.samples,
        "PhotometricInterpretation": layout.photometric, "BitsAllocated": layout.bits_allocated,
        "BitsStored": layout.bits_stored, "HighBit": layout.bits_stored - 1, "PixelRepresentation": representation,
    }
    if layout.samples > 1:
        pixel["PlanarConfiguration"] = planar
    return pixel


def _jpeg_frame_header(stream: bytes) -> tuple[int, int, int, int] | None:
    """(precision, rows, columns, components) from the SOF segment of a JPEG or JPEG-LS stream."""
    if stream[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(stream):
        if stream[at] != 0xFF:
            return None
        marker = stream[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        if marker in _SOF_MARKERS:
            if at + 10 > len(stream):
                return None
            precision, rows, columns, components = struct.unpack(">BHHB", stream[at + 4 : at + 10])
            return precision, rows, columns, components
        at += 2 + int.from_bytes(stream[at + 2 : at + 4], "big")
    return None


def _check_jpeg_frame(ds: Dataset, index: int, layout: _Layout) -> bytes:
    """The compressed frame, refused if its own header disagrees with the DICOM header (GDCM trusts both)."""
    with _failure_as(CorruptDicomError, "the compressed frame could not be found in the pixel data"):
        stream = get_frame(ds.PixelData, index, number_of_frames=layout.frames)
    found = _jpeg_frame_header(stream)
    if found is None:
        raise CorruptDicomError("the compressed frame has no readable JPEG frame header; the file is damaged")
    precision, rows, columns, components = found
    consistent = (
        (rows, columns, components) == (layout.rows, layout.columns, layout.samples)
        and layout.bits_allocated == (8 if precision <= 8 else 16)
        and layout.bits_stored <= precision  # 12 bits stored in a 16-bit stream is common, the reverse is not
        and (components == 1 or layout.bits_stored == precision == 8)  # GDCM asserts on anything else in colour
    )
    if not consistent:
        raise CorruptDicomError(
            "the compressed frame's size, samples or bit depth disagree with the DICOM header; the file is damaged"
        )
    return stream


def _check_native_length(ds: Dataset, layout: _Layout, ended_early: bool) -> None:
    # Uncompressed pixel data shorter than the header describes: a cut file, or a wrong header.
    with _failure_as(CorruptDicomError, "the pixel data could not be read"):
        value = ds["PixelData"].value
        have = len(value) if value is not None else 0
    per_pixel_bits = layout.bits_allocated * layout.samples
    need = layout.rows * layout.columns * layout.frames * per_pixel_bits
    need = need // 8 + (need % 8 > 0)
    if layout.photometric == "YBR_FULL_422":
        need = need // 3 * 2
    if have < need:
        if ended_early:
            raise TruncatedDicomError("the DICOM file ends before the end of its pixel data (it was cut off); copy it again")
        raise TruncatedDicomError(
            "the pixel data is shorter than the header describes: the file was cut off, or its header is wrong"
        )


def _sop_class(ds: Dataset) -> UID | None:
    """The SOP class if it is a standard one (its name is then a fixed vocabulary word, safe to show)."""
    try:
        uid = UID(str(ds.get("SOPClassUID", "")).strip().rstrip("\x00"))
    except Exception:  # noqa: BLE001
        return None
    return uid if uid.keyword and not uid.is_transfer_syntax else None


def _is_image_object(ds: Dataset) -> bool:
    uid = _sop_class(ds)
    return uid is not None and "Image Storage" in uid.name


def _sop_class_note(ds: Dataset) -> str:
    uid = _sop_class(ds)
    return f" (it is an '{uid.name}' object)" if uid is not None else ""


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a DICOM file as the image the model sees.")
    parser.add_argument("file", help="a DICOM file")
    parser.add_argument("--window", default=None, help=f"one of {', '.join(WINDOW_CHOICES)} (default: header)")
    parser.add_argument("--frame", type=int, default=None, help="0-based frame of a multi-frame file (default: middle)")
    parser.add_argument("--out", default=None, help="write the rendered image here (PNG)")
    args = parser.parse_args(argv)
    try:
        rendered = read_dicom_image(args.file, window=args.window, frame=args.frame)
    except (DicomError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for label, value in rendered.attributes.items():
        print(f"{label}: {value}")
    if rendered.warning:
        print(f"warning: {rendered.warning}", file=sys.stderr)
    if args.out:
        rendered.image.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
