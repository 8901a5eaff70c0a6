"""Property tests: random bytes, mutated headers and damaged files never make the DICOM reader
fail with anything but its own clear error (a DicomError), and never make it quote the planted
patient data (tests.fixtures.SENTINEL) in a result, an error or a log record."""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radiology.dicom import DicomError, read_dicom_image
from tests.fixtures import SENTINEL, sentinel_hits, set_raw_value, write_sentinel_dicom

LIMIT = 4 * 2**20  # a small size guard keeps hostile sizes cheap; the guard logic is the same
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Explicit VR little endian files, one per decoder path, with the sentinel in every identifying field.
BASES = {
    "native": "CT_small.dcm",  # signed 16-bit with rescale
    "rle": "MR_small_RLE.dcm",
    "jpeg2000": "MR_small_jp2klossless.dcm",
    "jpeg_ls_multiframe": "emri_small_jpeg_ls_lossless.dcm",
    "jpeg_baseline_ybr": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg_lossless": "SC_rgb_jpeg_gdcm.dcm",
}


@functools.cache
def base_file(kind: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_sentinel_dicom(Path(folder), source=BASES[kind], burned_in_annotation="NO").read_bytes()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log record of the process, at every level (pytest's caplog is per test, not per example)."""
    handler, root = _Records(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def check_reader(data: bytes) -> None:
    """The property: a rendered RGB image or a DicomError; nothing quotes the planted data."""
    with captured_logs() as logs:
        try:
            result = read_dicom_image(data, max_bytes=LIMIT)
        except DicomError as err:
            message = "".join(traceback.format_exception(err))
            assert str(err).strip(), "an error says what is wrong"
            assert not sentinel_hits(message), message
        else:
            assert result.image.mode == "RGB" and min(result.image.size) >= 1
            assert not sentinel_hits(repr(result))
    assert not sentinel_hits(*logs)


@SETTINGS
@given(st.binary(max_size=4096), st.booleans())
def test_random_bytes(data, with_preamble):
    check_reader(bytes(128) + b"DICM" + data if with_preamble else data)


@SETTINGS
@given(st.sampled_from(sorted(BASES)), st.integers(min_value=0), st.binary(min_size=1, max_size=64))
def test_random_meta_and_dataset_bytes_after_a_valid_start(kind, at, junk):
    # Keep the preamble and part of the header, then garbage: parsers meet odd tags, VRs and lengths.
    base = base_file(kind)
    cut = 132 + at % (len(base) - 132)
    check_reader(base[:cut] + junk + base[cut + len(junk) :])


US_FIELDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
             "PlanarConfiguration"]
TEXT_FIELDS = ["PhotometricInterpretation", "NumberOfFrames", "WindowCenter", "WindowWidth", "RescaleSlope",
               "RescaleIntercept", "TransferSyntaxUID", "BurnedInAnnotation", "Modality", "BodyPartExamined",
               "VOILUTFunction"]
TEXT_VALUES = st.one_of(
    st.sampled_from([
        "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "CMYK", "YES", "CT",
        "0", "1", "-1", "2", "30", "65536", "1e308", "-1e308", "nan", "inf", "1\\2", "", " ", "SIGMOID",
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.110", SENTINEL, f"{SENTINEL}^NAME", f"1.2.{SENTINEL}",
    ]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=24),
)


@st.composite
def mutated_header(draw) -> bytes:
    data = base_file(draw(st.sampled_from(sorted(BASES))))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if draw(st.booleans()):
            keyword = draw(st.sampled_from(US_FIELDS))
            value = struct.pack("<H", draw(st.integers(min_value=0, max_value=65535)))
        else:
            keyword = draw(st.sampled_from(TEXT_FIELDS))
            value = draw(TEXT_VALUES).encode("ascii")
        with contextlib.suppress(ValueError):  # the element is not in this file: mutate another
            data = set_raw_value(data, keyword, value)
    return data


@SETTINGS
@given(mutated_header())
def test_mutated_headers(data):
    check_reader(data)


@SETTINGS
@given(
    st.sampled_from(sorted(BASES)),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=12),
    st.one_of(st.none(), st.integers(min_value=0)),
)
def test_damaged_files(kind, edits, cut):
    # Flipped bytes anywhere (header, fragment table, compressed stream) and an optional cut.
    data = bytearray(base_file(kind))
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    check_reader(bytes(data))
