"""Series stage: a CT or MR series (a folder, a .zip, or a list of DICOM files) -> its slices in
anatomical order -> evenly sampled slices, each rendered as one image the model gets.

    python -m radiology.series study.zip --max_images 8 --window multi --out slices/
    python -m radiology.series scans/ --series 2 --slices 20-60 --out slices/

Radiologists read series, not single images; Gemma 3 takes several images in one prompt (256
tokens each), so a series goes in as a few evenly spaced slices, first and last included.

Reading: every file's header is read without its pixel data (pydicom ``stop_before_pixels`` and
``specific_tags``) and only a few numbers are kept from it; only the slices chosen for the model
are decoded, one file at a time, through ``radiology.dicom``. Files are grouped by Series Instance
UID; a multi-frame file is a series of its own (its frames are the slices). Slices are ordered by
their position along the slice normal (Image Position (Patient) . (row x column of Image
Orientation (Patient))), else by Instance Number, else by file order. A radial series (planes
rotated about one axis at even steps) is ordered by its rotation angle.

Limits (``SeriesLimits``) are checked before any pixel is decoded: files in the input, bytes in
all, bytes in one file, slices in the chosen series, and for a zip its declared member count and
sizes, each member's compression ratio, names that point outside the archive and symbolic links.

Patient data: no header value, file name or member name is ever logged, printed or put in a
message (files are "file 3 of 7"); pydicom's warnings are silenced while headers are read. A
series is described by its modality (a DICOM defined term only), orientation, slice count and
size, computed here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import stat
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from radiology.dicom import (
    FULL_RANGE,
    HEADER_WINDOW,
    MAX_BYTES_ENV,
    MULTI_WINDOW,
    WINDOW_CHOICES,
    DicomError,
    DicomImage,
    DicomOptionError,
    DicomTooLargeError,
    _check_window_choice,
    _code_string,
    _limit,
    _MODALITIES,
    _quiet_pydicom,
    _size,
    _starts_like_bare_dataset,
    has_dicom_preamble,
    read_dicom_frames,
)

__all__ = [
    "ALL_WINDOWS",
    "DEFAULT_MAX_IMAGES",
    "MixedSeriesError",
    "MultipleSeriesError",
    "NoSlicesError",
    "Series",
    "SeriesError",
    "SeriesLimits",
    "SeriesOptionError",
    "SeriesSlice",
    "SeriesSummary",
    "SeriesTooLargeError",
    "UnsafeArchiveError",
    "describe_indices",
    "list_series",
    "load_series",
    "parse_slice_range",
    "read_series_slices",
    "render_series",
    "sample_indices",
]

DEFAULT_MAX_IMAGES = 8  # 8 x 256 image tokens: a series fits one prompt next to the instruction
# Every named window: radiology.dicom's single-channel ones, then multi (three CT windows in R, G, B).
ALL_WINDOWS: tuple[str, ...] = (*WINDOW_CHOICES, MULTI_WINDOW)

# A member/file source: a path, or the bytes of an upload.
SourceItem = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclass(frozen=True)
class SeriesLimits:
    """Bounds checked before any pixel is decoded. The defaults fit a 1000-slice CT (a 300-slice
    CT of 512 x 512 is about 160 MiB) with room to spare; raise them for larger studies."""

    max_files: int = 2000  # files in a folder, a list or a zip, DICOM or not
    max_slices: int = 1000  # slices of the chosen series (frames of a multi-frame file)
    max_total_bytes: int = 2 * 2**30  # all files together (a zip: its members' declared sizes)
    max_file_bytes: int | None = None  # one file; None: radiology.dicom's limit (512 MiB or its env variable)
    max_zip_ratio: float = 100.0  # uncompressed / compressed size of a zip member above 1 MiB


# Clinical DICOM compresses 2-10x with deflate; a run of zeros compresses ~1000x. Small members
# are left out of the ratio check (tiny files compress oddly) and are bounded by the totals.
_RATIO_CHECK_FROM = 2**20
_CHUNK = 2**20  # zip members are read 1 MiB at a time
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

# The header elements the series stage reads; nothing else is parsed.
_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "Rows", "Columns",
    "RescaleType", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "BurnedInAnnotation",
]

# Skip reasons, counted and reported (never with a file name).
_NOT_DICOM = "not DICOM"
_NO_IMAGE = "DICOM without an image"
_UNREADABLE = "unreadable DICOM header"
_SYMLINK = "symbolic link (not followed)"
_SPECIAL = "not a regular file"
_DUPLICATE = "copy of another file (same SOP Instance UID)"

_PARALLEL_COS = math.cos(math.radians(1.0))  # slice normals within 1 degree count as parallel
_PLANE_COS = math.cos(math.radians(30.0))  # within 30 degrees of an axis: named after that plane
_RADIAL_MIN_STEP = math.radians(0.5)


# --------------------------------------------------------------------------- errors


class SeriesError(DicomError):
    """A set of DICOM files that cannot be used as one series. Messages name files by their
    number in the input ("file 3 of 7"), never by name, and quote no header value."""

    reason = "unusable DICOM series"


class SeriesTooLargeError(SeriesError, DicomTooLargeError):
    """The input exceeds one of the SeriesLimits."""

    reason = "DICOM series above a limit"


class UnsafeArchiveError(SeriesError):
    """A zip that is refused unread: a zip bomb, or names pointing outside the archive."""

    reason = "unsafe zip archive"


class MultipleSeriesError(SeriesError):
    """The input holds several series and none was chosen. ``choices`` lists them."""

    reason = "several DICOM series, none chosen"

    def __init__(self, message: str, choices: Sequence[SeriesSummary] = ()) -> None:
        super().__init__(message)
        self.choices = list(choices)


class MixedSeriesError(SeriesError):
    """The slices of one series differ in orientation or size and cannot be stacked."""

    reason = "DICOM series with mixed orientations or sizes"


class NoSlicesError(SeriesError):
    """Nothing in the input is a DICOM image."""

    reason = "no DICOM image in the input"


class SeriesOptionError(SeriesError, DicomOptionError):
    """A series number, slice range, image count or window that does not fit this input."""

    reason = "DICOM series option not available"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SeriesSlice:
    """One slice in anatomical order. ``file``: 1-based number of its file in the input (a
    folder's files sorted by path, a zip's members in archive order, a list in its order);
    ``frame``: 0-based frame of a multi-frame file, else None; ``position``: where it lies along
    the slice normal in mm (degrees for a radial series), None when unknown."""

    file: int
    frame: int | None
    position: float | None
    instance: int | None


@dataclass(frozen=True)
class SeriesSummary:
    """What may be shown about one series of an input: computed values and defined terms only."""

    number: int  # 1-based, as series= and --series take it
    modality: str | None  # a DICOM defined term (CT, MR, ...), None when absent or not a defined term
    orientation: str  # axial, sagittal, coronal, oblique, radial, mixed, unknown
    slices: int
    size: str  # "rows x columns", or "mixed sizes"

    def line(self) -> str:
        return f"{self.number}: {self.modality or 'unknown modality'}, {self.orientation}, {self.slices} slice(s), {self.size}"


@dataclass(frozen=True)
class Series:
    """One series, its slices in order. Pass it to ``render_series``."""

    number: int  # 1-based among the input's series
    series_count: int
    modality: str | None
    orientation: str
    rows: int
    columns: int
    ct: bool
    colour: bool
    ordered_by: str
    slices: tuple[SeriesSlice, ...]
    skipped: dict[str, int]
    files: int  # files in the input
    _input: _Input = field(repr=False, compare=False)
    # Any file of the series declares text burned into its pixels (BurnedInAnnotation YES), read
    # from every header, rendered or not: what a page showing the slices must warn about.
    burned_in_annotation: bool = False

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def default_window(self) -> str:
        """``multi`` (three CT windows in R, G, B) for grayscale CT, the file's own window otherwise."""
        return MULTI_WINDOW if self.ct and not self.colour else HEADER_WINDOW

    @property
    def description(self) -> str:
        """One line for people: no header value beyond the modality's defined term."""
        which = f"series {self.number} of {self.series_count}: " if self.series_count > 1 else ""
        text = (
            f"{which}{self.modality or 'unknown modality'}, {self.orientation}, {len(self.slices)} slice(s) of "
            f"{self.rows} x {self.columns}, ordered by {self.ordered_by}"
        )
        if self.skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} of {self.files} file(s): {counts}"
        return text


# --------------------------------------------------------------------------- the input


@dataclass(frozen=True)
class _Entry:
    size: int
    path: Path | None = None
    data: bytes | None = None
    member: zipfile.ZipInfo | None = None
    in_folder: bool = False  # opened without following a symbolic link


@dataclass
class _Input:
    entries: list[_Entry]
    archive: Path | bytes | None  # the zip the members come from
    skipped: Counter
    files: int  # everything counted in the input, skipped ones included

    @contextlib.contextmanager
    def opener(self) -> Iterator[Callable[[_Entry], BinaryIO]]:
        """A function opening an entry as a binary file; the zip stays open meanwhile."""
        if self.archive is None:
            yield _open_plain
            return
        container = io.BytesIO(self.archive) if isinstance(self.archive, bytes) else open(self.archive, "rb")
        with container, zipfile.ZipFile(container) as archive:
            yield lambda entry: archive.open(entry.member)  # type: ignore[arg-type]


def _open_plain(entry: _Entry) -> BinaryIO:
    if entry.data is not None:
        return io.BytesIO(entry.data)
    assert entry.path is not None
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
    if entry.in_folder:
        flags |= getattr(os, "O_NOFOLLOW", 0)  # a file swapped for a link since the listing is not followed
    return os.fdopen(os.open(entry.path, flags), "rb")


def _file_limit(limits: SeriesLimits) -> int:
    return _limit(limits.max_file_bytes)


def _too_large(what: str, hint: str) -> SeriesTooLargeError:
    return SeriesTooLargeError(f"{what}; {hint}")


def _check_counts(files: int, total: int, limits: SeriesLimits) -> None:
    if files > limits.max_files:
        raise _too_large(
            f"the input holds more than {limits.max_files} files",
            "give one series' folder, or raise max_files (--max_files)",
        )
    if total > limits.max_total_bytes:
        raise _too_large(
            f"the input holds {_size(total)}, above the limit of {_size(limits.max_total_bytes)}",
            "give one series, or raise max_total_bytes (--max_total_bytes)",
        )


def _check_file_size(number: int, files: int, size: int, limits: SeriesLimits) -> None:
    limit = _file_limit(limits)
    if size > limit:
        raise _too_large(
            f"file {number} of {files} is {_size(size)}, above the limit of {_size(limit)} for one file",
            f"remove it, or raise max_file_bytes (--max_file_bytes) or {MAX_BYTES_ENV}",
        )


def _is_zip_bytes(head: bytes) -> bool:
    return head[:4] in _ZIP_MAGIC


def _collect(source: SourceItem | Sequence[SourceItem], limits: SeriesLimits) -> _Input:
    """The input's files, with every limit that needs no reading already checked."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _collect_zip(data, len(data), limits) if _is_zip_bytes(data) else _collect_list([data], limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _collect_folder(path, limits)
        if not path.is_file():
            raise SeriesError("the folder or file was not found (check the path)")
        with open(path, "rb") as fp:
            head = fp.read(4)
        if _is_zip_bytes(head):
            return _collect_zip(path, path.stat().st_size, limits)
        return _collect_list([path], limits)
    if isinstance(source, Sequence):
        items = list(source)
        if len(items) == 1:  # one upload: a zip, a folder or a single (multi-frame) file
            return _collect(items[0], limits)
        return _collect_list(items, limits)
    raise SeriesError("give a folder, a .zip, or a list of DICOM files (paths or bytes)")


def _collect_list(items: list[SourceItem], limits: SeriesLimits) -> _Input:
    if not items:
        raise NoSlicesError("no file was given; give a folder, a .zip, or a list of DICOM files")
    entries = []
    _check_counts(len(items), 0, limits)
    for number, item in enumerate(items, start=1):
        if isinstance(item, (bytes, bytearray, memoryview)):
            entries.append(_Entry(size=len(item), data=bytes(item)))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise SeriesError(f"file {number} of {len(items)} was not found or is not a file (check the path)")
            entries.append(_Entry(size=path.stat().st_size, path=path))
        else:
            raise SeriesError(f"file {number} of {len(items)} is neither a path nor bytes")
        _check_file_size(number, len(items), entries[-1].size, limits)
    _check_counts(len(items), sum(e.size for e in entries), limits)
    return _Input(entries=entries, archive=None, skipped=Counter(), files=len(items))


def _collect_folder(root: Path, limits: SeriesLimits) -> _Input:
    found: list[tuple[tuple[str, ...], _Entry]] = []
    skipped: Counter = Counter()
    root = root.resolve()  # the folder the user chose; links inside it are not followed
    total = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        linked = sum(1 for d in dirs if os.path.islink(os.path.join(folder, d)))
        if linked:
            skipped[_SYMLINK] += linked
        for name in names:
            path = Path(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                skipped[_SYMLINK] += 1
            elif not stat.S_ISREG(info.st_mode):
                skipped[_SPECIAL] += 1
            else:
                found.append((path.relative_to(root).parts, _Entry(size=info.st_size, path=path, in_folder=True)))
                total += info.st_size
            _check_counts(len(found) + sum(skipped.values()), total, limits)
    found.sort(key=lambda item: item[0])
    entries = [entry for _, entry in found]
    files = len(entries) + sum(skipped.values())
    for number, entry in enumerate(entries, start=1):
        _check_file_size(number, len(entries), entry.size, limits)
    return _Input(entries=entries, archive=None, skipped=skipped, files=files)


def _declared_zip_entries(fp: BinaryIO) -> int:
    """The member count the zip's end record declares, read before zipfile parses the central
    directory (which holds every member's record in memory)."""
    find_end = getattr(zipfile, "_EndRecData", None)  # private but unchanged for decades; handles zip64
    if find_end is None:
        return 0  # then only the parsed member list is counted
    try:
        end = find_end(fp)
    except Exception:  # noqa: BLE001
        end = None
    if not end:
        raise SeriesError("the .zip is damaged (no end of central directory); create it again")
    return int(end[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])


def _unsafe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in parts


def _collect_zip(archive: Path | bytes, archive_size: int, limits: SeriesLimits) -> _Input:
    if archive_size > limits.max_total_bytes:
        raise _too_large(
            f"the .zip is {_size(archive_size)}, above the limit of {_size(limits.max_total_bytes)}",
            "give one series, or raise max_total_bytes (--max_total_bytes)",
        )
    container = io.BytesIO(archive) if isinstance(archive, bytes) else open(archive, "rb")
    with container:
        declared = _declared_zip_entries(container)
        if declared > limits.max_files:
            raise _too_large(
                f"the .zip declares {declared} members, above the limit of {limits.max_files} files",
                "give one series' files, or raise max_files (--max_files)",
            )
        container.seek(0)
        try:
            with zipfile.ZipFile(container) as opened:
                members = opened.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise SeriesError("the .zip is damaged and cannot be opened; create it again") from None
    if len(members) > limits.max_files:
        raise _too_large(f"the .zip holds more than {limits.max_files} members", "raise max_files (--max_files)")
    if any(_unsafe_name(member.filename) for member in members):
        raise UnsafeArchiveError(
            "the .zip holds a member whose name points outside the archive ('..' or an absolute path); "
            "such archives are refused: zip the series folder again from inside it"
        )
    entries: list[_Entry] = []
    skipped: Counter = Counter()
    files = [m for m in members if not m.is_dir()]
    total = 0
    for number, member in enumerate(files, start=1):
        if stat.S_ISLNK(member.external_attr >> 16):
            skipped[_SYMLINK] += 1
            continue
        if member.flag_bits & 0x1:
            raise SeriesError("the .zip is encrypted; extract it with its password and give the folder")
        _check_file_size(number, len(files), member.file_size, limits)
        if member.file_size > _RATIO_CHECK_FROM and member.file_size > limits.max_zip_ratio * max(member.compress_size, 1):
            raise UnsafeArchiveError(
                f"member {number} of {len(files)} would expand {member.file_size / max(member.compress_size, 1):,.0f} "
                f"times (to {_size(member.file_size)}), above the limit of {limits.max_zip_ratio:g}: a zip bomb, or "
                "data no scanner writes; if you trust the file, raise max_zip_ratio (--max_zip_ratio)"
            )
        total += member.file_size
        _check_counts(len(files), total, limits)
        entries.append(_Entry(size=member.file_size, member=member))
    return _Input(entries=entries, archive=archive, skipped=skipped, files=len(files))


def _read_entry(fp: BinaryIO, entry: _Entry, limit: int) -> bytes:
    """All of an entry, read in bounded chunks and stopped at its declared (or listed) size."""
    if entry.size > limit:
        raise _too_large(
            f"a file of the series is {_size(entry.size)}, above the limit of {_size(limit)} for one file",
            f"raise max_bytes or {MAX_BYTES_ENV}",
        )
    cap = entry.size
    chunks, have = [], 0
    while True:
        chunk = fp.read(min(_CHUNK, cap + 1 - have))
        if not chunk:
            break
        have += len(chunk)
        if have > cap:
            raise SeriesError("a file changed while the series was being read; read the series again")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class _Header:
    """The few numbers kept from one file's header (its UIDs are used for grouping only)."""

    entry: int
    series_uid: str
    instance_uid: str
    modality: str | None
    ct: bool
    colour: bool
    rows: int
    columns: int
    instance: int | None
    burned_in: bool
    positions: tuple[tuple[float, ...] | None, ...]  # one per frame
    orientations: tuple[tuple[float, ...] | None, ...]  # one per frame


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - absent, malformed: no geometry
        return None
    return numbers if len(numbers) == count and all(math.isfinite(n) for n in numbers) else None


def _whole(value: object) -> int | None:
    try:
        if value is None or value == "" or isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            return None
        return int(value)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001
        return None


def _item(ds: Dataset | None, sequence: str) -> Dataset | None:
    try:
        items = ds.get(sequence) if ds is not None else None
        return items[0] if items else None
    except Exception:  # noqa: BLE001
        return None


def _geometry(ds: Dataset, frames: int) -> tuple[tuple[tuple[float, ...] | None, ...], tuple[tuple[float, ...] | None, ...]]:
    """Position and orientation of every frame: an enhanced file's functional groups, else the top level."""
    top_position = _floats(ds.get("ImagePositionPatient"), 3)
    top_orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    shared_orientation = _floats(getattr(_item(shared, "PlaneOrientationSequence"), "ImageOrientationPatient", None), 6)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        per_frame = [None] * frames
    positions, orientations = [], []
    for item in per_frame:
        position = _floats(getattr(_item(item, "PlanePositionSequence"), "ImagePositionPatient", None), 3)
        orientation = _floats(getattr(_item(item, "PlaneOrientationSequence"), "ImageOrientationPatient", None), 6)
        # A classic multi-frame file's top-level position is its first frame's only.
        positions.append(position or (top_position if frames == 1 else None))
        orientations.append(orientation or shared_orientation or top_orientation)
    return tuple(positions), tuple(orientations)


def _header(ds: Dataset, entry: int, number: int, files: int, limits: SeriesLimits) -> _Header | str:
    rows, columns = _whole(ds.get("Rows")), _whole(ds.get("Columns"))
    if not rows or not columns or rows < 1 or columns < 1:
        return _NO_IMAGE
    declared = ds.get("NumberOfFrames")
    frames = 1 if declared is None or declared == "" else _whole(declared)
    if frames is None or frames < 1:
        return _UNREADABLE
    if frames > limits.max_slices:
        raise _too_large(
            f"file {number} of {files} declares {frames} frames, above the limit of {limits.max_slices} slices",
            "raise max_slices (--max_slices)",
        )
    modality = _code_string(ds, "Modality")
    photometric = _code_string(ds, "PhotometricInterpretation") or "MONOCHROME2"
    positions, orientations = _geometry(ds, frames)
    return _Header(
        entry=entry,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
        instance_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
        modality=modality if modality in _MODALITIES else None,
        ct=modality == "CT" or _code_string(ds, "RescaleType") == "HU",
        colour=photometric not in ("MONOCHROME1", "MONOCHROME2"),
        rows=rows,
        columns=columns,
        instance=_whole(ds.get("InstanceNumber")),
        burned_in=_code_string(ds, "BurnedInAnnotation") == "YES",
        positions=positions,
        orientations=orientations,
    )


def _read_headers(source: _Input, limits: SeriesLimits) -> tuple[list[_Header], Counter]:
    headers: list[_Header] = []
    skipped: Counter = Counter(source.skipped)
    with source.opener() as open_entry, _quiet_pydicom():
        for index, entry in enumerate(source.entries):
            try:
                with open_entry(entry) as fp:
                    result = _read_header(fp, index, len(source.entries), limits)
            except SeriesError:
                raise
            except Exception:  # noqa: BLE001 - a file that cannot even be opened is counted, not shown
                result = _UNREADABLE
            if isinstance(result, str):
                skipped[result] += 1
            else:
                headers.append(result)
    return headers, skipped


def _read_header(fp: BinaryIO, index: int, files: int, limits: SeriesLimits) -> _Header | str:
    head = fp.read(132)
    if not (has_dicom_preamble(head) or _starts_like_bare_dataset(head)):
        return _NOT_DICOM
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # noqa: BLE001 - pydicom's messages may quote header values
        return _UNREADABLE
    try:
        return _header(ds, index, index + 1, files, limits)
    except SeriesError:
        raise
    except Exception:  # noqa: BLE001
        return _UNREADABLE


# --------------------------------------------------------------------------- geometry


def _normal(orientation: tuple[float, ...]) -> np.ndarray | None:
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 else None


def _plane(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(float(normal[axis])) < _PLANE_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]  # patient x: left, y: posterior, z: head


def _radial_angles(normals: list[np.ndarray]) -> list[float] | None:
    """Each plane's rotation (radians, increasing) when all planes share one axis and are evenly
    rotated about it (a radial acquisition), else None."""
    if len(normals) < 3:
        return None
    crosses = [np.cross(normals[0], n) for n in normals]
    lengths = [float(np.linalg.norm(c)) for c in crosses]
    widest = int(np.argmax(lengths))
    if lengths[widest] < math.sin(math.radians(1.0)):
        return None
    axis = crosses[widest] / lengths[widest]
    if any(abs(float(n @ axis)) > math.sin(math.radians(1.0)) for n in normals):
        return None  # the planes do not all contain one axis (e.g. a three-plane localizer)
    # A plane's normal and its negation are the same plane: angles are taken modulo 180 degrees.
    angles = [math.atan2(float(np.cross(normals[0], n) @ axis), float(normals[0] @ n)) % math.pi for n in normals]
    order = sorted(range(len(angles)), key=angles.__getitem__)
    ring = [angles[i] for i in order]
    gaps = [(ring[(k + 1) % len(ring)] - ring[k]) % math.pi for k in range(len(ring))]
    cut = int(np.argmax(gaps))  # the widest gap is where the fan of planes opens
    start = (cut + 1) % len(ring)
    unwrapped = {}
    for step in range(len(ring)):
        k = (start + step) % len(ring)
        unwrapped[order[k]] = (ring[k] - ring[start]) % math.pi
    steps = [gaps[(start + step) % len(ring)] for step in range(len(ring) - 1)]
    if min(steps) < _RADIAL_MIN_STEP or max(steps) > 1.5 * min(steps):
        return None  # two slices in one plane, or uneven steps: not one radial series
    return [unwrapped[i] for i in range(len(normals))]


@dataclass(frozen=True)
class _Candidate:
    """One group of slices (a series, or a multi-frame file) before it is chosen."""

    headers: tuple[_Header, ...]
    multi_frame: bool

    def raw_slices(self) -> list[tuple[_Header, int | None]]:
        if self.multi_frame:
            header = self.headers[0]
            return [(header, frame) for frame in range(len(header.positions))]
        return [(header, None) for header in self.headers]

    @property
    def sizes(self) -> set[tuple[int, int]]:
        return {(h.rows, h.columns) for h in self.headers}

    @property
    def modality(self) -> str | None:
        found = {h.modality for h in self.headers}
        return found.pop() if len(found) == 1 else None


def _ordering(slices: list[tuple[_Header, int | None]]) -> tuple[str, list[float] | None, str | None]:
    """(orientation label, sort keys or None, what the keys are)."""
    positions = [h.positions[f or 0] for h, f in slices]
    orientations = [h.orientations[f or 0] for h, f in slices]
    normals = [_normal(o) if o is not None else None for o in orientations]
    if any(n is None for n in normals):
        return "unknown orientation", None, None
    first = normals[0]
    assert first is not None
    if all(abs(float(first @ n)) >= _PARALLEL_COS for n in normals):  # type: ignore[operator]
        if any(p is None for p in positions):
            return _plane(first), None, None
        return _plane(first), [round(float(np.array(p) @ first), 4) for p in positions], "position along the slice normal"
    angles = _radial_angles(normals)  # type: ignore[arg-type]
    if angles is not None:
        return "radial", [round(math.degrees(a), 4) for a in angles], "rotation angle"
    return "mixed orientations", None, None


def _ordered(
    slices: list[tuple[_Header, int | None]], keys: list[float] | None, radial: bool
) -> tuple[list[int], list[float] | None]:
    """The slices' order, and their keys (a reversed radial series counts its angles from its new start)."""
    def instance_key(i: int) -> tuple[int, int, int]:
        header, frame = slices[i]
        number = header.instance
        return (0, number, i) if number is not None and frame is None else (1, 0, i)

    order = sorted(range(len(slices)), key=lambda i: ((keys[i] if keys is not None else 0.0), *instance_key(i)))
    if radial and keys is not None:
        # The rotation's sense is arbitrary (the sign of the axis): follow the scanner's numbering.
        first, last = slices[order[0]][0].instance, slices[order[-1]][0].instance
        if first is not None and last is not None and first > last:
            order.reverse()
            span = max(keys)
            keys = [round(span - key, 4) for key in keys]
    return order, keys


def _summary(number: int, candidate: _Candidate) -> SeriesSummary:
    sizes = candidate.sizes
    rows, columns = next(iter(sizes))
    orientation, _, _ = _ordering(candidate.raw_slices())
    return SeriesSummary(
        number=number,
        modality=candidate.modality,
        orientation=orientation,
        slices=len(candidate.raw_slices()),
        size=f"{rows} x {columns}" if len(sizes) == 1 else "mixed sizes",
    )


def _candidates(headers: list[_Header], skipped: Counter) -> list[_Candidate]:
    groups: dict[tuple[str, str | int], list[_Header]] = {}
    for header in headers:
        key: tuple[str, str | int] = ("file", header.entry) if len(header.positions) > 1 else ("series", header.series_uid)
        groups.setdefault(key, []).append(header)
    candidates = []
    for (kind, _), members in groups.items():
        unique, seen = [], set()
        for header in members:
            if header.instance_uid and header.instance_uid in seen:
                skipped[_DUPLICATE] += 1
                continue
            seen.add(header.instance_uid)
            unique.append(header)
        candidates.append(_Candidate(headers=tuple(unique), multi_frame=kind == "file"))
    return candidates


# --------------------------------------------------------------------------- loading


def list_series(source: SourceItem | Sequence[SourceItem], *, limits: SeriesLimits | None = None) -> list[SeriesSummary]:
    """The series in an input, without choosing one (for a selector). Reads headers only."""
    limits = limits or SeriesLimits()
    collected = _collect(source, limits)
    headers, skipped = _read_headers(collected, limits)
    return [_summary(n, c) for n, c in enumerate(_candidates(headers, skipped), start=1)]


def load_series(
    source: SourceItem | Sequence[SourceItem],
    series: int | None = None,
    *,
    limits: SeriesLimits | None = None,
) -> Series:
    """A folder, a .zip (path or bytes) or a list of DICOM files (paths or bytes) -> one series, its
    slices in order. ``series``: 1-based number of the series to take when the input holds several
    (the MultipleSeriesError raised without it lists them). Reads headers only; no pixel is decoded.

    Raises a SeriesError subclass (a DicomError, so an ImageDecodeError) naming the cause and the fix.
    """
    limits = limits or SeriesLimits()
    collected = _collect(source, limits)
    headers, skipped = _read_headers(collected, limits)
    candidates = _candidates(headers, skipped)
    if not candidates:
        raise NoSlicesError(_nothing_left(skipped, collected.files))
    summaries = [_summary(n, c) for n, c in enumerate(candidates, start=1)]
    if series is None and len(candidates) > 1:
        listing = "\n".join("  " + s.line() for s in summaries)
        raise MultipleSeriesError(
            f"the input holds {len(candidates)} series; choose one with series=N (--series N):\n{listing}", summaries
        )
    number = 1 if series is None else series
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= len(candidates):
        raise SeriesOptionError(f"there is no series {series!r}: this input holds {len(candidates)} series, numbered 1 to {len(candidates)}")
    return _build(number, len(candidates), candidates[number - 1], summaries[number - 1], collected, skipped, limits)


def _nothing_left(skipped: Counter, files: int) -> str:
    if not files:
        return "the input holds no file; give the folder or .zip of one series' DICOM files"
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    return (
        f"no DICOM image is left: all {files} file(s) were skipped ({counts}); give the folder or .zip of one "
        "series' DICOM image files"
    )


def _build(
    number: int, count: int, candidate: _Candidate, summary: SeriesSummary, collected: _Input, skipped: Counter,
    limits: SeriesLimits,
) -> Series:
    slices = candidate.raw_slices()
    if len(slices) > limits.max_slices:
        raise _too_large(
            f"the series has {len(slices)} slices, above the limit of {limits.max_slices}",
            "choose a smaller series, or raise max_slices (--max_slices)",
        )
    if len(candidate.sizes) > 1:
        raise MixedSeriesError(
            "the slices of this series differ in rows x columns and cannot be stacked; give the files of one "
            "acquisition only"
        )
    orientation, keys, ordered_by = _ordering(slices)
    if orientation == "mixed orientations":
        raise MixedSeriesError(
            "the slices of this series lie in different orientations (e.g. a localizer's axial, sagittal and "
            "coronal planes) and cannot be stacked; choose a series of parallel slices"
        )
    order, keys = _ordered(slices, keys, radial=orientation == "radial")
    if ordered_by is None:
        if candidate.multi_frame:
            ordered_by = "frame order"
        elif any(header.instance is not None for header, _ in slices):
            ordered_by = "instance number"
        else:
            ordered_by = "file order"
    header = candidate.headers[0]
    return Series(
        number=number,
        series_count=count,
        modality=summary.modality,
        orientation=orientation,
        rows=header.rows,
        columns=header.columns,
        ct=all(h.ct for h in candidate.headers),
        colour=any(h.colour for h in candidate.headers),
        ordered_by=ordered_by,
        slices=tuple(
            SeriesSlice(
                file=slices[i][0].entry + 1,
                frame=slices[i][1],
                position=keys[i] if keys is not None else None,
                instance=slices[i][0].instance,
            )
            for i in order
        ),
        skipped=dict(skipped),
        files=collected.files,
        _input=collected,
        burned_in_annotation=any(h.burned_in for h in candidate.headers),
    )


# --------------------------------------------------------------------------- sampling


def sample_indices(total: int, max_images: int = DEFAULT_MAX_IMAGES, slice_range: tuple[int, int] | None = None) -> list[int]:
    """0-based indices of at most ``max_images`` evenly spaced slices, the first and last included
    (one image: the middle slice). ``slice_range``: (first, last), 1-based and inclusive, to
    sample a part of the series."""
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise SeriesOptionError("max_images must be a whole number from 1 (--max_images)")
    if total < 1:
        raise NoSlicesError("the series has no slice")
    first, last = slice_range if slice_range is not None else (1, total)
    if not (isinstance(first, int) and isinstance(last, int)) or not 1 <= first <= last <= total:
        raise SeriesOptionError(
            f"the slice range must lie within 1 to {total} with the first not after the last (--slices A-B)"
        )
    count = last - first + 1
    chosen = min(max_images, count)
    if chosen == 1:
        return [first - 1 + (count - 1) // 2]
    # i * (count - 1) / (chosen - 1), rounded half up in whole numbers: steps of at least one slice.
    return [first - 1 + (2 * i * (count - 1) + chosen - 1) // (2 * (chosen - 1)) for i in range(chosen)]


def describe_indices(indices: Sequence[int], total: int) -> str:
    """``slices 1, 44, 87 of 300`` for 0-based indices, as people count slices; a run of three or
    more neighbours is written as a range (``slices 1-7 of 7``, ``slices 3, 5-9 of 20``)."""
    parts: list[str] = []
    run: list[int] = []
    for number in [int(i) + 1 for i in indices] + [None]:  # None closes the last run
        if run and number == run[-1] + 1:
            run.append(number)
            continue
        if len(run) >= 3:
            parts.append(f"{run[0]}-{run[-1]}")
        else:
            parts.extend(str(n) for n in run)
        run = [number] if number is not None else []
    return f"slices {', '.join(parts)} of {total}"


# --------------------------------------------------------------------------- rendering


def _resolve_window(series: Series, window: str | tuple[float, float] | None) -> str | tuple[float, float]:
    _check_window_choice(window)  # ValueError naming the choices, before any file is read
    chosen = series.default_window if window is None else window
    if chosen == MULTI_WINDOW and (not series.ct or series.colour):
        raise SeriesOptionError(
            f"the '{MULTI_WINDOW}' window puts three CT windows in Hounsfield units into R, G, B and this series is "
            f"not grayscale CT; use '{HEADER_WINDOW}' or '{FULL_RANGE}' (or leave the window out)"
        )
    return chosen


def render_series(
    series: Series,
    indices: Sequence[int],
    window: str | tuple[float, float] | None = None,
    *,
    max_bytes: int | None = None,
) -> list[Image.Image]:
    """The chosen slices (0-based, e.g. from ``sample_indices``) as 8-bit RGB images, in the order
    given: what training, generation and the demo give the model.

    ``window``: None takes ``series.default_window`` (``multi`` for grayscale CT, the file's own
    window otherwise); else any window of ``radiology.dicom.read_dicom_image``. Only these slices'
    files are read and decoded, one file at a time. ``max_bytes`` caps one file as in radiology.dicom.
    """
    return [shown.image for shown in read_series_slices(series, indices, window, max_bytes=max_bytes)]


def read_series_slices(
    series: Series,
    indices: Sequence[int],
    window: str | tuple[float, float] | None = None,
    *,
    max_bytes: int | None = None,
) -> list[DicomImage]:
    """As ``render_series``, each slice with what a page may show about it (``DicomImage``: the
    window's label, the technical attributes, the burned-in annotation flag)."""
    chosen_window = _resolve_window(series, window)
    total = len(series.slices)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < total:
            raise SeriesOptionError(f"slice indices are 0-based and below {total}; check the chosen slices")
    by_file: dict[int, list[int]] = {}
    for k, i in enumerate(indices):
        by_file.setdefault(series.slices[i].file, []).append(k)
    images: list[DicomImage | None] = [None] * len(indices)
    limit = _limit(max_bytes)
    entries = series._input.entries
    with series._input.opener() as open_entry:
        for file, positions in by_file.items():
            entry = entries[file - 1]
            first = int(indices[positions[0]])
            try:
                with open_entry(entry) as fp:
                    data = _read_entry(fp, entry, limit)
                frames = [series.slices[int(indices[k])].frame or 0 for k in positions]
                rendered = read_dicom_frames(data, frames, chosen_window, max_bytes=limit)
            except DicomError as err:
                where = f"slice {first + 1} of {total} (file {file} of {len(entries)})"
                raise type(err)(f"{where}: {err}") from None
            except OSError as err:
                raise SeriesError(
                    f"file {file} of {len(entries)} could not be read again ({type(err).__name__}); "
                    "was it moved or changed?"
                ) from None
            for k, shown in zip(positions, rendered):
                images[k] = shown
    return [image for image in images if image is not None]


# --------------------------------------------------------------------------- command line


def parse_slice_range(text: str) -> tuple[int, int]:
    """``"10-60"`` -> (10, 60): a 1-based, inclusive slice range as the command lines take it
    (``--slices``); argparse.ArgumentTypeError, which argparse reports under the flag, names the form."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError("give the 1-based slice range as A-B, e.g. 10-60")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show the slices of a DICOM series the model gets, and write them as PNGs.")
    parser.add_argument("source", nargs="+", help="a folder, a .zip, or DICOM files of one series")
    parser.add_argument("--series", type=int, default=None, help="1-based series number when the input holds several")
    parser.add_argument("--max_images", type=int, default=DEFAULT_MAX_IMAGES, help="slices to send (default: %(default)s)")
    parser.add_argument("--slices", type=parse_slice_range, default=None, help="1-based slice range A-B to sample from")
    windows = ", ".join(ALL_WINDOWS)
    parser.add_argument("--window", default=None, help=f"one of {windows} (default: multi for CT, else header)")
    parser.add_argument("--out", default=None, help="folder to write the PNGs to")
    defaults = SeriesLimits()
    parser.add_argument("--max_files", type=int, default=defaults.max_files)
    parser.add_argument("--max_slices", type=int, default=defaults.max_slices)
    parser.add_argument("--max_total_bytes", type=int, default=defaults.max_total_bytes)
    parser.add_argument("--max_file_bytes", type=int, default=None)
    parser.add_argument("--max_zip_ratio", type=float, default=defaults.max_zip_ratio)
    args = parser.parse_args(argv)
    limits = SeriesLimits(
        max_files=args.max_files, max_slices=args.max_slices, max_total_bytes=args.max_total_bytes,
        max_file_bytes=args.max_file_bytes, max_zip_ratio=args.max_zip_ratio,
    )
    source = args.source[0] if len(args.source) == 1 else args.source
    try:
        series = load_series(source, args.series, limits=limits)
        indices = sample_indices(len(series), args.max_images, args.slices)
        images = render_series(series, indices, args.window, max_bytes=args.max_file_bytes)
    except (DicomError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(series.description)
    print(f"window: {args.window or series.default_window}")
    print(f"images: {len(images)} ({describe_indices(indices, len(series))})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        width = len(str(len(series)))
        for index, image in zip(indices, images):
            image.save(out / f"slice_{index + 1:0{width}d}_of_{len(series)}.png")
        print(f"wrote {len(images)} PNG(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
