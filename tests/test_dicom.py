"""radiology.dicom on real files from pydicom's test data (bundled with pydicom, and the pydicom-data
package): each rendering is checked against an independent reading of the stored pixel values,
done here with numpy from the raw Pixel Data bytes and the DICOM formulas."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames, get_frame

import radiology.dicom
from radiology import gdcm_worker
from radiology.data import decode_image
from radiology.dicom import (
    BURNED_IN_WARNING,
    FULL_RANGE,
    WINDOW_CHOICES,
    WINDOW_PRESETS,
    CorruptDicomError,
    DicomError,
    DicomImage,
    DicomOptionError,
    DicomTooLargeError,
    MissingDecoderError,
    NoPixelDataError,
    NotDicomError,
    TruncatedDicomError,
    UnsupportedDicomError,
    has_dicom_preamble,
    read_dicom_image,
)
from radiology.gdcm_worker import GdcmWorkerError, decode_with_gdcm
from radiology.images import ImageDecodeError
from tests.conftest import ROOT
from tests.fixtures import SENTINEL, sentinel_hits, set_raw_value, write_sentinel_dicom

ALLOWED_ATTRIBUTES = {"Modality", "Body part", "View position", "Rows x columns", "Frames", "Frame shown", "Window"}


# --------------------------------------------------------------------------- independent reading


def dicom_file(name: str) -> str:
    """A test file, from pydicom's own data or the pydicom-data package; never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} not found: install the test requirements (pip install -r requirements-dev.txt)")
    return str(path)


def stored_values(path: str) -> np.ndarray:
    """Stored values straight from uncompressed Pixel Data bytes: (frames, rows, cols[, samples])."""
    ds = pydicom.dcmread(path)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed, "the reference must be uncompressed"
    allocated, stored, signed = ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation == 1
    endian = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
    frames, rows, cols, samples = int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns, ds.SamplesPerPixel
    dtype = np.dtype(f"{endian}{'i' if signed else 'u'}{allocated // 8}")
    values = np.frombuffer(ds.PixelData, dtype=dtype, count=frames * rows * cols * samples).astype(np.int64)
    if stored < allocated:  # bits above High Bit are not part of the value
        values = values & ((1 << stored) - 1)
        if signed:
            values = np.where(values >= 1 << (stored - 1), values - (1 << stored), values)
    if samples == 1:
        return values.reshape(frames, rows, cols)
    if ds.get("PlanarConfiguration", 0) == 1:
        return values.reshape(frames, samples, rows, cols).transpose(0, 2, 3, 1)
    return values.reshape(frames, rows, cols, samples)


def dicom_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI function onto an output range of 0..255."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    inside = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, inside))


def full_range(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) * 255.0 / (x.max() - x.min())


def to_8bit(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y), 0, 255).astype(np.int64)


def gray_of(result: DicomImage) -> np.ndarray:
    pixels = np.asarray(result.image)
    assert result.image.mode == "RGB" and pixels.shape[2] == 3
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), "gray renders as R=G=B"
    return pixels[..., 0].astype(np.int64)


def assert_matches(ours: np.ndarray, expected: np.ndarray, tolerance: int = 1) -> None:
    """Equal up to a rounding step: float evaluation order may move a value sitting on .5."""
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= tolerance, f"max difference {diff.max()}"
    assert (diff == 0).mean() > 0.99, f"only {(diff == 0).mean():.2%} of pixels identical"


# --------------------------------------------------------------------------- grayscale pipeline


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
def test_ct_presets_apply_the_dicom_window_to_hounsfield_units(preset):
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = stored_values(path)[0] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = WINDOW_PRESETS[preset]
    result = read_dicom_image(path, window=preset)
    assert_matches(gray_of(result), to_8bit(dicom_window(hu, center, width)))
    assert result.window.startswith(preset) and result.attributes["Window"] == result.window


def test_ct_window_on_known_pixels():
    # The CT header's own window (C 40, W 100) on HU = stored - 1024: below C-0.5-(W-1)/2 = -10 is
    # black, above 89 is white, and in between y = ((HU - 39.5) / 99 + 0.5) * 255.
    path = dicom_file("693_UNCI.dcm")
    hu = stored_values(path)[0] - 1024
    ours = gray_of(read_dicom_image(path))
    black, white = hu <= -10, hu > 89
    between = ~black & ~white
    assert black.any() and white.any() and between.any()
    assert (ours[black] == 0).all() and (ours[white] == 255).all()
    row, col = np.argwhere(between)[len(np.argwhere(between)) // 2]
    expected = round(((hu[row, col] - 39.5) / 99 + 0.5) * 255)
    assert abs(int(ours[row, col]) - expected) <= 1


def test_mr_uses_the_header_window():
    path = dicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    result = read_dicom_image(path)
    expected = dicom_window(stored_values(path)[0], float(ds.WindowCenter), float(ds.WindowWidth))
    assert_matches(gray_of(result), to_8bit(expected))
    assert "C 600, W 1600" in result.window


def test_full_range_and_no_header_window_stretch_min_to_max():
    path = dicom_file("CT_small.dcm")  # no window in this header
    ds = pydicom.dcmread(path)
    hu = stored_values(path)[0] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    default = read_dicom_image(path)
    assert default.window.startswith("full range")
    assert_matches(gray_of(default), to_8bit(full_range(hu)))
    mr = dicom_file("MR_small.dcm")  # has a window, ignored on request
    assert_matches(gray_of(read_dicom_image(mr, window=FULL_RANGE)), to_8bit(full_range(stored_values(mr)[0])))


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG3_J2KR.dcm"])
def test_monochrome1_cr_is_inverted_after_windowing(name):
    reference = dicom_file("RG3_UNCR.dcm")  # CR, MONOCHROME1, 10 bits stored, window C 550 W 1024
    ds = pydicom.dcmread(reference)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    expected = 255 - to_8bit(dicom_window(stored_values(reference)[0], 550, 1024))
    result = read_dicom_image(dicom_file(name))
    assert_matches(gray_of(result), expected)
    assert result.attributes["Body part"] == "EXTREMITY" and result.attributes["View position"] == "AP"


def test_modality_lut_sequence_then_full_range():
    path = dicom_file("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.int64)
    stored = stored_values(path)[0]
    modality = lut[np.clip(stored - first, 0, entries - 1)]
    assert_matches(gray_of(read_dicom_image(path)), to_8bit(full_range(modality)))


def test_voi_lut_sequence_scaled_by_its_bit_depth():
    path = dicom_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    entries, first, depth = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.int64)
    stored = stored_values(path)[0]
    expected = lut[np.clip(stored - first, 0, entries - 1)] * 255.0 / (2**depth - 1)
    result = read_dicom_image(path)
    assert_matches(gray_of(result), to_8bit(expected))
    assert result.window == "from the file (VOI LUT)"


def test_enhanced_ct_takes_rescale_and_window_from_functional_groups():
    path = dicom_file("eCT_Supplemental.dcm")  # 2 frames; rescale and window only in the shared groups
    shared = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0]
    transform, voi = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    stored = stored_values(path)
    for frame in (0, 1):
        hu = stored[frame] * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
        result = read_dicom_image(path, frame=frame)
        assert_matches(gray_of(result), to_8bit(dicom_window(hu, float(voi.WindowCenter), float(voi.WindowWidth))))
    assert read_dicom_image(path).frame == 1  # the middle of 2 frames


# --------------------------------------------------------------------------- compressed transfer syntaxes


def _render_reference(path: str, frame: int) -> np.ndarray:
    """What a grayscale file should look like by its header window or, without one, full range."""
    ds = pydicom.dcmread(path)
    values = stored_values(path)[frame].astype(np.float64)
    if "RescaleSlope" in ds:
        values = values * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "WindowCenter" in ds:
        center = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        return to_8bit(dicom_window(values, float(center), float(width)))
    return to_8bit(full_range(values))


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE Lossless (pydicom's own decoder)
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # CT, JPEG 2000 lossless, signed 16-bit
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),  # NM, JPEG 2000
        ("emri_small_RLE.dcm", "emri_small.dcm"),  # multi-frame RLE
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # multi-frame JPEG 2000
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # multi-frame JPEG-LS
    ],
)
def test_lossless_grayscale_matches_its_uncompressed_twin(compressed, uncompressed):
    reference = dicom_file(uncompressed)
    frames = int(pydicom.dcmread(reference).get("NumberOfFrames") or 1)
    result = read_dicom_image(dicom_file(compressed))
    assert result.frame == frames // 2 and result.frames == frames
    assert_matches(gray_of(result), _render_reference(reference, frames // 2))


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG Lossless, process 14 (decoded by GDCM)
        ("SC_rgb_gdcm_KY.dcm", "SC_rgb.dcm"),  # JPEG 2000 colour
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # JPEG 2000 YBR_RCT
        ("SC_rgb_rle_2frame.dcm", "SC_rgb_2frame.dcm"),
    ],
)
def test_lossless_colour_matches_its_uncompressed_twin(compressed, uncompressed):
    reference = stored_values(dicom_file(uncompressed))
    result = read_dicom_image(dicom_file(compressed))
    assert np.array_equal(np.asarray(result.image), reference[len(reference) // 2].astype(np.uint8))


def test_jpeg_lossless_grayscale_renders_with_its_window():
    path = dicom_file("JPGLosslessP14SV1_1s_1f_8b.dcm")  # US, 8-bit, JPEG Lossless SV1, window C 127 W 254
    result = read_dicom_image(path)
    # No other permissively licensed decoder exists to compare with; the window maps 0..254 nearly 1:1.
    assert result.image.size == (1024, 768) and "C 127, W 254" in result.window
    assert 100 < len(np.unique(gray_of(result))) <= 256


def _pillow_frame(path: str, index: int) -> np.ndarray:
    """An independent decode of one JPEG baseline frame: Pillow on the raw JPEG stream."""
    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    with Image.open(io.BytesIO(frames[index])) as jpeg:
        return np.asarray(jpeg.convert("RGB"))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm"])
def test_jpeg_baseline_ybr_matches_pillow_and_the_original(name):
    path = dicom_file(name)
    ours = np.asarray(read_dicom_image(path).image).astype(np.int64)
    assert np.abs(ours - _pillow_frame(path, 0)).max() <= 2
    original = stored_values(dicom_file("SC_rgb.dcm"))[0]  # the image before lossy compression
    assert np.abs(ours - original).mean() < 4


def test_multiframe_ybr_jpeg_takes_the_chosen_frame():
    path = dicom_file("examples_ybr_color.dcm")  # US, 30 frames, YBR_FULL_422 JPEG baseline
    middle = read_dicom_image(path)
    first = read_dicom_image(path, frame=0)
    assert (middle.frame, middle.frames, first.frame) == (15, 30, 0)
    assert middle.attributes["Frames"] == "30" and middle.attributes["Frame shown"] == "16 of 30"
    for result, index in ((middle, 15), (first, 0)):
        assert np.abs(np.asarray(result.image).astype(np.int64) - _pillow_frame(path, index)).max() <= 2
    assert not np.array_equal(np.asarray(middle.image), np.asarray(first.image))


def test_lossy_jpeg2000_stays_close_to_the_original():
    ours = gray_of(read_dicom_image(dicom_file("693_J2KI.dcm")))
    assert np.abs(ours - _render_reference(dicom_file("693_UNCI.dcm"), 0)).mean() < 2


def test_12bit_jpeg_extended_without_a_permissive_decoder_names_the_gpl_package():
    if importlib.util.find_spec("libjpeg") is not None:
        pytest.skip("pylibjpeg-libjpeg was installed here on purpose, so 12-bit JPEG decodes")
    with pytest.raises(MissingDecoderError, match="pylibjpeg-libjpeg.*GPL-3.0"):
        read_dicom_image(dicom_file("JPEG-lossy.dcm"))


# --------------------------------------------------------------------------- colour


def test_rgb_is_passed_through():
    path = dicom_file("examples_rgb_color.dcm")
    assert np.array_equal(np.asarray(read_dicom_image(path).image), stored_values(path)[0].astype(np.uint8))


def test_16bit_rgb_is_scaled_by_bits_stored():
    path = dicom_file("SC_rgb_16bit.dcm")
    expected = to_8bit(stored_values(path)[0] * 255.0 / 65535)
    assert np.array_equal(np.asarray(read_dicom_image(path).image).astype(np.int64), expected)


def _ybr_full_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """YBR_FULL to RGB (PS3.3 C.7.6.3.1.2, ITU-R BT.601 full range)."""
    y, cb, cr = (c.astype(np.float64) for c in (y, cb, cr))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1)
    return to_8bit(rgb)


def test_uncompressed_ybr_full_is_converted_to_rgb():
    path = dicom_file("SC_ybr_full_uncompressed.dcm")
    ybr = stored_values(path)[0]
    ours = np.asarray(read_dicom_image(path).image).astype(np.int64)
    assert np.abs(ours - _ybr_full_to_rgb(ybr[..., 0], ybr[..., 1], ybr[..., 2])).max() <= 1
    # ... and close to the RGB image it was made from (8-bit YCbCr cannot hold every RGB value).
    assert np.abs(ours - stored_values(dicom_file("SC_rgb.dcm"))[0]).mean() < 1


def test_uncompressed_ybr_full_422_is_upsampled_and_converted():
    path = dicom_file("SC_ybr_full_422_uncompressed.dcm")
    ds = pydicom.dcmread(path)
    # Two pixels share one chroma pair, stored as Y0 Y1 Cb Cr.
    raw = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns // 2, 4)
    y = raw[..., :2].reshape(ds.Rows, ds.Columns)
    cb, cr = np.repeat(raw[..., 2], 2, axis=1), np.repeat(raw[..., 3], 2, axis=1)
    ours = np.asarray(read_dicom_image(path).image).astype(np.int64)
    assert np.abs(ours - _ybr_full_to_rgb(y, cb, cr)).max() <= 1


def test_palette_colour_is_looked_up_and_scaled():
    path = dicom_file("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    channels = []
    for colour in ("Red", "Green", "Blue"):
        entries, first, depth = ds[f"{colour}PaletteColorLookupTableDescriptor"].value
        lut = np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2").astype(np.int64)
        channels.append(lut[np.clip(stored_values(path)[0] - first, 0, (entries or 65536) - 1)])
    expected = to_8bit(np.stack(channels, -1) * 255.0 / (2**depth - 1))
    assert np.array_equal(np.asarray(read_dicom_image(path).image).astype(np.int64), expected)


# --------------------------------------------------------------------------- options and attributes


def test_technical_attributes_only():
    result = read_dicom_image(dicom_file("RG1_UNCI.dcm"))
    assert result.attributes == {
        "Modality": "CR", "Body part": "CHEST", "View position": "PA", "Rows x columns": "1955 x 1841",
        "Frames": "1", "Window": "from the file (C 15000, W 30000)",
    }
    assert result.image.size == (1841, 1955)


def test_attributes_show_defined_terms_only(tmp_path):
    # Text typed into a code field (here the planted name) is left out, not shown.
    typed = write_sentinel_dicom(tmp_path, "typed.dcm", Modality=SENTINEL, BodyPartExamined=SENTINEL, ViewPosition="X1")
    assert set(read_dicom_image(typed).attributes) == {"Rows x columns", "Frames", "Window"}
    vendor = write_sentinel_dicom(tmp_path, "vendor.dcm", BodyPartExamined="WHOLE BODY", ViewPosition="LL")
    assert read_dicom_image(vendor).attributes == {
        "Modality": "CT", "Body part": "WHOLE BODY", "View position": "LL", "Rows x columns": "128 x 128",
        "Frames": "1", "Window": "full range (the file gives no usable window)",
    }


def test_burned_in_annotation_is_flagged(tmp_path):
    yes = read_dicom_image(write_sentinel_dicom(tmp_path, "yes.dcm", burned_in_annotation="YES"))
    no = read_dicom_image(write_sentinel_dicom(tmp_path, "no.dcm", burned_in_annotation="NO"))
    unset = read_dicom_image(write_sentinel_dicom(tmp_path, "unset.dcm"))
    assert yes.burned_in_annotation and yes.warning == BURNED_IN_WARNING
    assert not no.burned_in_annotation and no.warning is None and unset.warning is None


def test_frame_out_of_range_is_refused():
    path = dicom_file("emri_small.dcm")
    assert read_dicom_image(path, frame=9).frame == 9
    for frame in (10, -1):
        with pytest.raises(DicomOptionError, match="10 frame"):
            read_dicom_image(path, frame=frame)


def test_window_choices():
    assert WINDOW_CHOICES[:2] == ("header", "full") and set(WINDOW_PRESETS) <= set(WINDOW_CHOICES)
    with pytest.raises(ValueError, match="unknown window 'liver'"):
        read_dicom_image(dicom_file("CT_small.dcm"), window="liver")
    with pytest.raises(DicomOptionError, match="not CT"):
        read_dicom_image(dicom_file("MR_small.dcm"), window="lung")
    with pytest.raises(DicomOptionError, match="colour"):
        read_dicom_image(dicom_file("SC_rgb.dcm"), window="bone")
    custom = read_dicom_image(dicom_file("MR_small.dcm"), window=(300.0, 500.0))
    assert_matches(gray_of(custom), to_8bit(dicom_window(stored_values(dicom_file("MR_small.dcm"))[0], 300, 500)))


def test_sources_path_bytes_and_file_object_agree(tmp_path):
    path = dicom_file("MR_small_RLE.dcm")
    data = Path(path).read_bytes()
    images = [read_dicom_image(path).image, read_dicom_image(data).image, read_dicom_image(io.BytesIO(data)).image]
    assert all(np.array_equal(np.asarray(images[0]), np.asarray(i)) for i in images[1:])
    assert has_dicom_preamble(data) and not has_dicom_preamble(data[:131])


def test_command_line_prints_technical_attributes_and_writes_png(tmp_path):
    source = write_sentinel_dicom(tmp_path / "in", burned_in_annotation="YES")
    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "radiology.dicom", str(source), "--window", "lung", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert "Modality: CT" in result.stdout and "lung (C -600, W 1500)" in result.stdout
    assert "burned-in" in result.stderr
    assert not sentinel_hits(result.stdout, result.stderr, out.read_bytes())
    with Image.open(out) as written:
        assert written.size == (128, 128)


# --------------------------------------------------------------------------- bad input


def test_not_dicom_with_and_without_the_dcm_name(tmp_path):
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    renamed = tmp_path / "scan.dcm"
    renamed.write_bytes(png.getvalue())
    with pytest.raises(NotDicomError, match=r"named \.dcm.*looks like a PNG image"):
        read_dicom_image(renamed)
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        read_dicom_image(b"plain text, no image here" * 20)
    with pytest.raises(NotDicomError, match=r"named \.dcm"):
        decode_image(str(renamed))  # the loader trusts the name and says what is wrong
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="not a readable image") as caught:
        decode_image(str(text))
    assert not isinstance(caught.value, DicomError)


def test_preamble_less_dicom_without_dcm_name_still_loads(tmp_path):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    bare = tmp_path / "IM000001"  # as found in DICOMDIR exports
    ds.preamble = None
    pydicom.dcmwrite(bare, ds, enforce_file_format=False)
    data = bare.read_bytes()
    assert not has_dicom_preamble(data)
    assert np.array_equal(np.asarray(decode_image(str(bare))), np.asarray(read_dicom_image(dicom_file("CT_small.dcm")).image))


def test_truncated_files(tmp_path):
    with pytest.raises(TruncatedDicomError, match="cut off"):
        read_dicom_image(dicom_file("MR_truncated.dcm"))  # pydicom's own truncated file
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"):
        data = Path(dicom_file(name)).read_bytes()
        header_end = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
        # In the header, just after the Pixel Data tag, mid-pixels, and in the last 20 bytes (the last
        # fragment of compressed data; a cut inside only the final 8-byte delimiter loses no pixel).
        for cut in (header_end // 2, header_end + 20, (header_end + len(data)) // 2, len(data) - 19):
            with pytest.raises(TruncatedDicomError, match="cut off"):
                read_dicom_image(data[:cut])


@pytest.mark.parametrize(("name", "kind"), [("rtplan.dcm", "RT Plan Storage"), ("test-SR.dcm", "Comprehensive SR")])
def test_no_pixel_data(name, kind):
    with pytest.raises(NoPixelDataError, match=f"no pixel data.*{kind}"):
        read_dicom_image(dicom_file(name))


def test_missing_decoder_names_the_package_to_install():
    # A fresh interpreter in which python-gdcm cannot be imported, as on a machine without it.
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('gdcm', '_gdcm', 'jpeg_ls', 'libjpeg'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from radiology.dicom import read_dicom_image, MissingDecoderError\n"
        f"for name in {[dicom_file('JPEG-LL.dcm'), dicom_file('MR_small_jpeg_ls_lossless.dcm')]!r}:\n"
        "    try:\n"
        "        read_dicom_image(name)\n"
        "    except MissingDecoderError as err:\n"
        "        print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert "JPEG Lossless" in lines[0] and "pip install python-gdcm" in lines[0]
    assert "JPEG-LS" in lines[1] and "python-gdcm" in lines[1] and "pyjpegls" in lines[1]


def test_size_guard_runs_before_decoding(tmp_path, monkeypatch):
    # A header that claims 65535 x 65535 x 100 frames over 32 KiB of data: refused from the header
    # alone (decoding would have failed differently, on the short data).
    hostile = write_sentinel_dicom(tmp_path, "big.dcm", Rows=65535, Columns=65535, NumberOfFrames=100)
    with pytest.raises(DicomTooLargeError, match="above the limit of 512.0 MiB") as caught:
        read_dicom_image(hostile)
    assert not sentinel_hits(str(caught.value))
    # One 8-bit 10000 x 10000 frame: 95 MiB declared, but 763 MiB of float64 to render it.
    wide = write_sentinel_dicom(tmp_path, "wide.dcm", Rows=10000, Columns=10000, BitsAllocated=8, BitsStored=8)
    with pytest.raises(DicomTooLargeError, match="one frame would need 762.9 MiB to render"):
        read_dicom_image(wide)
    small = dicom_file("CT_small.dcm")  # 128 x 128 x 2 bytes = 32 KiB declared, 128 KiB to render
    with pytest.raises(DicomTooLargeError, match="need 128 KiB to render"):
        read_dicom_image(Path(small).read_bytes(), max_bytes=128 * 128 * 8 - 1)
    assert read_dicom_image(Path(small).read_bytes(), max_bytes=128 * 128 * 8).image.size == (128, 128)
    with pytest.raises(DicomTooLargeError, match="the file is 38 KiB"):
        read_dicom_image(small, max_bytes=38 * 1024)  # a path: its size is checked before reading it
    monkeypatch.setenv("RADIOLOGY_DICOM_MAX_BYTES", "1000")
    with pytest.raises(DicomTooLargeError):
        decode_image(small)


def test_errors_are_image_decode_errors_and_never_quote_the_header(tmp_path):
    # Header values that end up in the error's path: each must be named, never quoted.
    cases = [
        (UnsupportedDicomError, write_sentinel_dicom(tmp_path, "pi.dcm", PhotometricInterpretation=SENTINEL)),
        (UnsupportedDicomError, write_sentinel_dicom(tmp_path, "rows.dcm", Rows=0)),
        (NoPixelDataError, write_sentinel_dicom(tmp_path, "plan.dcm", source="rtplan.dcm", SOPClassUID=SENTINEL)),
    ]
    multiframe = write_sentinel_dicom(tmp_path, "frames.dcm", source="emri_small.dcm").read_bytes()
    cases.append((UnsupportedDicomError, set_raw_value(multiframe, "NumberOfFrames", SENTINEL.encode())))
    cases.append((UnsupportedDicomError, set_raw_value(multiframe, "TransferSyntaxUID", b"1.2." + SENTINEL.encode())))
    for error, source in cases:
        with pytest.raises(error) as caught:
            read_dicom_image(source)
        assert isinstance(caught.value, ImageDecodeError)
        assert not sentinel_hits(*traceback.format_exception(caught.value)), caught.value


def test_damaged_compressed_data_is_a_clear_error():
    data = bytearray(Path(dicom_file("MR_small_jp2klossless.dcm")).read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # the JPEG 2000 codestream
    data[start : start + 64] = bytes(64)
    with pytest.raises(CorruptDicomError, match="could not be decoded"):
        read_dicom_image(bytes(data))


# --------------------------------------------------------------------------- GDCM in its own process


def test_a_stream_that_aborts_gdcm_is_a_clear_error_and_the_next_file_still_decodes():
    # One byte breaks the marker after the frame header of this JPEG Lossless file; GDCM then
    # aborts its process (checked below). The reader must survive it and decode the next file.
    good = Path(dicom_file("SC_rgb_jpeg_gdcm.dcm")).read_bytes()
    damaged = bytearray(good)
    damaged[good.index(b"\xff\xd8\xff") + 37] = 0x40
    frame = get_frame(pydicom.dcmread(io.BytesIO(bytes(damaged))).PixelData, 0, number_of_frames=1)
    pixel = {"Rows": 100, "Columns": 100, "SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "BitsAllocated": 8,
             "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0, "PlanarConfiguration": 0}
    with pytest.raises(GdcmWorkerError, match="stopped"):
        decode_with_gdcm(str(pydicom.uid.JPEGLosslessSV1), pixel, frame)
    with pytest.raises(CorruptDicomError, match="GDCM stopped"):
        read_dicom_image(bytes(damaged))
    assert np.array_equal(np.asarray(read_dicom_image(good).image), stored_values(dicom_file("SC_rgb.dcm"))[0])


def test_gdcm_gets_pixel_numbers_only(tmp_path, monkeypatch):
    seen = []

    def spy(transfer_syntax, pixel, frame, **kwargs):
        seen.append(repr((transfer_syntax, pixel)))
        return decode_with_gdcm(transfer_syntax, pixel, frame, **kwargs)

    monkeypatch.setattr(radiology.dicom, "decode_with_gdcm", spy)
    path = write_sentinel_dicom(tmp_path, source="SC_rgb_jpeg_gdcm.dcm")
    assert np.array_equal(np.asarray(read_dicom_image(path).image), stored_values(dicom_file("SC_rgb.dcm"))[0])
    assert len(seen) == 1 and not sentinel_hits(*seen)


def test_a_hung_gdcm_child_is_stopped():
    # A child that never answers stands in for GDCM looping on a hostile stream.
    worker = gdcm_worker._Worker()
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    worker._process = hung
    with pytest.raises(GdcmWorkerError, match="in time"):
        worker.decode("1.2.840.10008.1.2.4.70", {}, b"", timeout=0.5)
    assert hung.poll() is not None and worker._process is None
