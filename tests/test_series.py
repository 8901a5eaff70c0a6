"""radiology.series on real series from pydicom's test data (dicomdirtests: MR700 radial MR, CT2 and
CT5N axial CT, MR1/MR2 several series, CT2N two planes, TINY_ALPHA without pixels; eCT_Supplemental
and emri_small multi-frame), copied under shuffled names that carry planted patient data."""

from __future__ import annotations

import io
import logging
import os
import random
import stat
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import radiology.series
from radiology.dicom import MULTI_WINDOW, MULTI_WINDOW_RANGES, DicomOptionError, TruncatedDicomError, read_dicom_image
from radiology.images import ImageDecodeError
from radiology.series import (
    MixedSeriesError,
    MultipleSeriesError,
    NoSlicesError,
    SeriesError,
    SeriesLimits,
    SeriesOptionError,
    SeriesTooLargeError,
    UnsafeArchiveError,
    describe_indices,
    list_series,
    load_series,
    render_series,
    sample_indices,
)
from tests.conftest import run_cli
from tests.fixtures import SENTINEL, sentinel_hits, set_raw_value, write_sentinel_dicom

DIRTESTS = "dicomdirtests"
MR700 = f"{DIRTESTS}/98892003/MR700"
CT2 = f"{DIRTESTS}/77654033/CT2"
CT5N = f"{DIRTESTS}/98892001/CT5N"

# Known order of each real series, from its headers (checked independently in test_known_geometry).
EXPECTED_ORDER = {
    # z = -99.48, 103.02, 104.27, 105.52 along the normal +z (instance numbers 18, 180, 181, 182)
    CT2: ["17106", "17136", "17166", "17196"],
    # z = -1.24 ... 8.76: position wins over the instance numbers, which run the other way (10 ... 6)
    CT5N: ["3353", "3023", "2693", "2392", "2062"],
    # planes rotated about the z axis by 16.4 degrees each; instance numbers 1 ... 7
    MR700: ["4558", "4528", "4588", "4467", "4618", "4678", "4648"],
}


def data_file(relative: str) -> Path:
    path = get_testdata_file(relative, download=False)
    if path is None:
        pytest.fail(f"{relative} not found: install the test requirements (pip install -r requirements-dev.txt)")
    return Path(path)


def series_files(relative: str) -> list[str]:
    return sorted(p.name for p in data_file(relative).iterdir())


def copy_series(relative: str, folder: Path, seed: int = 0, **overrides: object) -> dict[str, str]:
    """The series' files copied into ``folder`` under shuffled names holding the sentinel, with
    patient data planted. Returns {new name: original name}."""
    originals = series_files(relative)
    numbers = list(range(len(originals)))
    random.Random(seed).shuffle(numbers)
    names = {}
    for original, number in zip(originals, numbers):
        name = f"{SENTINEL}_{seed}_{number:03d}.dcm"
        write_sentinel_dicom(folder, name, source=f"{relative}/{original}", **overrides)
        names[name] = original
    return names


def input_order(folder: Path) -> list[str]:
    """The file names of a folder in the order the series stage numbers them."""
    return [p.name for p in sorted(folder.iterdir(), key=lambda p: p.name)]


def ordered_originals(series, folder: Path, names: dict[str, str]) -> list[str]:
    files = input_order(folder)
    return [names[files[s.file - 1]] for s in series.slices]


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def folder_members(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def quiet_check(caplog, recwarn):
    """After the test: no planted patient data in any log record or warning."""
    caplog.set_level(logging.DEBUG)
    yield
    assert not sentinel_hits(caplog.text, *(str(w.message) for w in recwarn))


# --------------------------------------------------------------------------- ordering of real series


@pytest.mark.parametrize("relative", [CT2, CT5N, MR700])
def test_real_series_are_ordered_by_their_geometry(tmp_path, relative, quiet_check):
    names = copy_series(relative, tmp_path / "in", seed=len(relative))
    series = load_series(tmp_path / "in")
    assert ordered_originals(series, tmp_path / "in", names) == EXPECTED_ORDER[relative]
    assert series.modality == ("MR" if relative == MR700 else "CT") and (series.rows, series.columns) == (16, 16)
    positions = [s.position for s in series.slices]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # Each rendered slice is its own file's image: the order reaches the pixels.
    images = render_series(series, range(len(series)), window="header")
    by_name = {original: read_dicom_image(data_file(f"{relative}/{original}")).image for original in names.values()}
    for image, original in zip(images, EXPECTED_ORDER[relative]):
        assert np.array_equal(as_array(image), as_array(by_name[original]))
    assert not sentinel_hits(series.description, repr(series.slices))


def test_known_geometry():
    # The expected orders above, recomputed from the raw headers: position along the normal for the
    # CT stacks, the in-plane row direction's angle for the radial MR.
    for relative in (CT2, CT5N):
        z = {}
        for name in series_files(relative):
            ds = pydicom.dcmread(data_file(f"{relative}/{name}"), stop_before_pixels=True)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            z[name] = float(ds.ImagePositionPatient[2])
        assert sorted(z, key=z.get) == EXPECTED_ORDER[relative]
    angles = {}
    for name in series_files(MR700):
        ds = pydicom.dcmread(data_file(f"{MR700}/{name}"), stop_before_pixels=True)
        row = [float(v) for v in ds.ImageOrientationPatient[:3]]
        angles[name] = np.degrees(np.arctan2(row[1], row[0]))
    assert sorted(angles, key=angles.get) == EXPECTED_ORDER[MR700]
    steps = np.diff(sorted(angles.values()))
    assert np.allclose(steps, steps[0], atol=0.2)


def test_without_positions_instance_numbers_order_then_file_order(tmp_path):
    names = copy_series(CT5N, tmp_path / "a", ImagePositionPatient=None)
    by_instance = load_series(tmp_path / "a")
    assert by_instance.ordered_by == "instance number"
    assert ordered_originals(by_instance, tmp_path / "a", names) == EXPECTED_ORDER[CT5N][::-1]  # instances 6 ... 10
    names = copy_series(CT5N, tmp_path / "b", ImagePositionPatient=None, InstanceNumber=None)
    by_file = load_series(tmp_path / "b")
    assert by_file.ordered_by == "file order"
    assert [s.file for s in by_file.slices] == [1, 2, 3, 4, 5]


def test_list_of_uploads_and_paths_order_like_the_folder(tmp_path):
    names = copy_series(CT5N, tmp_path / "in", seed=3)
    files = sorted((tmp_path / "in").iterdir())
    random.Random(1).shuffle(files)
    from_bytes = load_series([p.read_bytes() for p in files])
    from_paths = load_series([str(p) for p in files])
    expected = [files.index(tmp_path / "in" / next(n for n, o in names.items() if o == original)) + 1
                for original in EXPECTED_ORDER[CT5N]]
    assert [s.file for s in from_bytes.slices] == [s.file for s in from_paths.slices] == expected


def test_multi_frame_files_are_series_of_their_frames():
    emri = load_series(data_file("emri_small.dcm"))
    assert len(emri) == 10 and emri.ordered_by == "frame order" and [s.frame for s in emri.slices] == list(range(10))
    images = render_series(emri, [0, 9])
    assert np.array_equal(as_array(images[1]), as_array(read_dicom_image(data_file("emri_small.dcm"), frame=9).image))
    # Enhanced CT: frame 0 at z -159, frame 1 at z -149, orientation (-1,0,0 / 0,1,0) so the normal is -z:
    # along the normal frame 1 (149) comes before frame 0 (159).
    enhanced = load_series(data_file("eCT_Supplemental.dcm"))
    assert [s.frame for s in enhanced.slices] == [1, 0] and enhanced.orientation == "axial"
    assert [s.position for s in enhanced.slices] == [149.0, 159.0]
    header = render_series(enhanced, [0, 1], window="header")
    for image, frame in zip(header, (1, 0)):
        expected = read_dicom_image(data_file("eCT_Supplemental.dcm"), frame=frame).image
        assert np.array_equal(as_array(image), as_array(expected))


# --------------------------------------------------------------------------- the multi window


def notebook_multi_window(hu: np.ndarray) -> np.ndarray:
    """Google's MedGemma CT notebook: clip HU to each range, scale to 0..255, round."""
    channels = [np.round((np.clip(hu, low, high) - low) / (high - low) * 255.0) for _, low, high in MULTI_WINDOW_RANGES]
    return np.stack(channels, axis=-1).astype(np.int64)


def raw_hu(path: Path, frame: int = 0, slope: float | None = None, intercept: float | None = None) -> np.ndarray:
    """Hounsfield units from the raw Pixel Data bytes of an uncompressed little-endian file."""
    ds = pydicom.dcmread(path)
    dtype = np.dtype(f"<{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
    frames = int(ds.get("NumberOfFrames") or 1)
    values = np.frombuffer(ds.PixelData, dtype=dtype, count=frames * ds.Rows * ds.Columns).reshape(frames, ds.Rows, ds.Columns)
    slope = float(ds.RescaleSlope) if slope is None else slope
    intercept = float(ds.RescaleIntercept) if intercept is None else intercept
    return values[frame].astype(np.float64) * slope + intercept


def assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(ours - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_multi_window_is_the_notebooks_three_ct_windows():
    assert [(low, high) for _, low, high in MULTI_WINDOW_RANGES] == [(-1024, 1024), (-135, 215), (0, 80)]
    path = data_file("CT_small.dcm")
    shown = read_dicom_image(path, window=MULTI_WINDOW)
    ours = as_array(shown.image)
    assert_close(ours, notebook_multi_window(raw_hu(path)))
    assert not (ours[..., 0] == ours[..., 1]).all(), "the channels carry different windows"
    assert shown.window.startswith("multi") and "-135..215 HU" in shown.window
    # An enhanced CT keeps its rescale in the shared functional groups (intercept -1024).
    enhanced = data_file("eCT_Supplemental.dcm")
    series = load_series(enhanced)
    assert series.default_window == MULTI_WINDOW
    (image,) = render_series(series, [1])  # slice 2 is frame 0
    assert_close(as_array(image), notebook_multi_window(raw_hu(enhanced, 0, slope=1.0, intercept=-1024.0)))


def test_multi_window_refuses_images_that_are_not_grayscale_ct(tmp_path, monkeypatch):
    with pytest.raises(DicomOptionError, match="not CT"):
        read_dicom_image(data_file("MR_small.dcm"), window=MULTI_WINDOW)
    with pytest.raises(DicomOptionError, match="colour"):
        read_dicom_image(data_file("SC_rgb.dcm"), window=MULTI_WINDOW)
    copy_series(MR700, tmp_path)
    series = load_series(tmp_path)
    assert series.default_window == "header"

    def decoding(*args, **kwargs):
        raise AssertionError("nothing may be decoded for a window the series cannot take")

    monkeypatch.setattr(radiology.series, "read_dicom_frames", decoding)
    with pytest.raises(SeriesOptionError, match="not grayscale CT; use 'header'"):
        render_series(series, [0], window=MULTI_WINDOW)
    with pytest.raises(ValueError, match="unknown window 'liver'"):
        render_series(series, [0], window="liver")


# --------------------------------------------------------------------------- several series, mixed series


def test_zip_with_two_series_is_refused_with_the_list_then_chosen(tmp_path, quiet_check):
    copy_series(CT5N, tmp_path / "five")
    copy_series(CT2, tmp_path / "four")
    data = zip_bytes({**folder_members(tmp_path / "five", "a/"), **folder_members(tmp_path / "four", "b/")})
    archive = tmp_path / "study.zip"
    archive.write_bytes(data)
    with pytest.raises(MultipleSeriesError) as refused:
        load_series(archive)
    assert [c.line() for c in refused.value.choices] == [
        "1: CT, axial, 5 slice(s), 16 x 16",
        "2: CT, axial, 4 slice(s), 16 x 16",
    ]
    assert "series=N" in str(refused.value) and "2: CT, axial, 4 slice(s), 16 x 16" in str(refused.value)
    assert [s.line() for s in list_series(data)] == [c.line() for c in refused.value.choices]
    chosen = load_series(data, series=2)  # an upload's bytes
    assert len(chosen) == 4 and chosen.description.startswith("series 2 of 2: CT, axial, 4 slice(s)")
    assert [s.position for s in chosen.slices] == sorted(s.position for s in chosen.slices)
    assert len(render_series(chosen, sample_indices(len(chosen), 3))) == 3
    with pytest.raises(SeriesOptionError, match="numbered 1 to 2"):
        load_series(archive, series=3)
    assert not sentinel_hits(str(refused.value), chosen.description)


def test_burned_in_annotation_is_read_from_every_header(tmp_path, monkeypatch):
    copy_series(MR700, tmp_path / "clean")
    assert load_series(tmp_path / "clean").burned_in_annotation is False
    names = copy_series(MR700, tmp_path / "one")
    flagged = sorted(names)[3]
    write_sentinel_dicom(tmp_path / "one", flagged, source=f"{MR700}/{names[flagged]}", burned_in_annotation="YES")

    def decoding(*args, **kwargs):
        raise AssertionError("the flag must come from the headers, without decoding a slice")

    monkeypatch.setattr(radiology.series, "read_dicom_frames", decoding)
    assert load_series(tmp_path / "one").burned_in_annotation is True  # one file of seven declares it


def test_read_series_slices_gives_the_rendered_slices_with_their_labels(tmp_path):
    copy_series(CT5N, tmp_path, burned_in_annotation="YES")
    series = load_series(tmp_path)
    shown = radiology.series.read_series_slices(series, [4, 0])
    assert [np.array_equal(as_array(s.image), as_array(i)) for s, i in zip(shown, render_series(series, [4, 0]))] == [
        True, True]
    assert all(s.window.startswith("multi") and s.burned_in_annotation for s in shown)
    assert all(s.attributes["Modality"] == "CT" and not sentinel_hits(repr(s.attributes)) for s in shown)


def test_mixed_orientations_are_refused(tmp_path):
    # CT2N: one series of two slices, one sagittal and one coronal.
    copy_series(f"{DIRTESTS}/98892001/CT2N", tmp_path / "ct2n")
    with pytest.raises(MixedSeriesError, match="different orientations"):
        load_series(tmp_path / "ct2n")
    # MR2: two three-plane localizers and a single sagittal slice.
    copy_series(f"{DIRTESTS}/98892003/MR2", tmp_path / "mr2")
    with pytest.raises(MultipleSeriesError) as refused:
        load_series(tmp_path / "mr2")
    orientations = sorted(c.orientation for c in refused.value.choices)
    assert orientations == ["mixed orientations", "mixed orientations", "sagittal"]
    localizer = next(c.number for c in refused.value.choices if c.orientation == "mixed orientations")
    with pytest.raises(MixedSeriesError, match="localizer"):
        load_series(tmp_path / "mr2", series=localizer)


def test_mixed_sizes_are_refused(tmp_path):
    copy_series(CT5N, tmp_path)
    uid = pydicom.dcmread(next(tmp_path.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    write_sentinel_dicom(tmp_path, f"{SENTINEL}_big.dcm", source="CT_small.dcm", SeriesInstanceUID=uid)  # 128 x 128
    assert list_series(tmp_path)[0].size == "mixed sizes"
    with pytest.raises(MixedSeriesError, match="rows x columns"):
        load_series(tmp_path)


def test_several_single_slice_series_are_listed(tmp_path):
    copy_series(f"{DIRTESTS}/98892003/MR1", tmp_path)
    with pytest.raises(MultipleSeriesError) as refused:
        load_series(tmp_path)
    assert [c.line() for c in refused.value.choices] == [f"{n}: MR, sagittal, 1 slice(s), 16 x 16" for n in (1, 2, 3)]


# --------------------------------------------------------------------------- what is skipped


def test_non_dicom_files_are_skipped_and_counted(tmp_path):
    copy_series(MR700, tmp_path)
    (tmp_path / f"{SENTINEL}_notes.txt").write_text("report draft")
    Image.new("RGB", (8, 8)).save(tmp_path / "preview.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    pydicom.dcmread(data_file(f"{DIRTESTS}/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000")).save_as(tmp_path / "nopix.dcm")
    series = load_series(tmp_path)
    assert len(series) == 7
    assert series.skipped == {"not DICOM": 3, "DICOM without an image": 1}
    assert series.description.endswith("skipped 4 of 11 file(s): 1 DICOM without an image, 3 not DICOM")


def test_nothing_left_is_refused_with_the_counts(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(NoSlicesError, match=r"all 2 file\(s\) were skipped \(2 not DICOM\)"):
        load_series(tmp_path)
    with pytest.raises(NoSlicesError, match="DICOM without an image"):
        load_series(data_file(f"{DIRTESTS}/TINY_ALPHA"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoSlicesError, match="holds no file"):
        load_series(tmp_path / "empty")


def test_copies_of_a_file_count_once(tmp_path):
    names = copy_series(CT2, tmp_path)
    first = sorted(names)[0]
    (tmp_path / f"{SENTINEL}_copy.dcm").write_bytes((tmp_path / first).read_bytes())
    series = load_series(tmp_path)
    assert len(series) == 4 and series.skipped == {"copy of another file (same SOP Instance UID)": 1}


def test_symlinks_in_a_folder_are_not_followed(tmp_path):
    copy_series(CT5N, tmp_path / "series")
    copy_series(CT2, tmp_path / "elsewhere")
    outside = sorted((tmp_path / "elsewhere").iterdir())[0]
    os.symlink(outside, tmp_path / "series" / "link.dcm")
    os.symlink(tmp_path / "elsewhere", tmp_path / "series" / "linked_folder")
    series = load_series(tmp_path / "series")  # without the links it is one series
    assert len(series) == 5 and series.skipped == {"symbolic link (not followed)": 2}


# --------------------------------------------------------------------------- hostile or oversized input


def test_zip_with_names_outside_the_archive_is_refused(tmp_path):
    copy_series(CT2, tmp_path)
    members = folder_members(tmp_path)
    for bad in ("../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "..\\evil.dcm"):
        data = zip_bytes({**members, bad: b"DICM"})
        assert bad in zipfile.ZipFile(io.BytesIO(data)).namelist()
        with pytest.raises(UnsafeArchiveError, match="outside the archive") as refused:
            load_series(data)
        assert "evil" not in str(refused.value)


def test_zip_bomb_is_refused_before_reading(tmp_path, monkeypatch):
    copy_series(CT2, tmp_path)
    bomb = zip_bytes({**folder_members(tmp_path), "bomb.dcm": bytes(20 * 2**20)})
    assert len(bomb) < 200_000

    def reading(*args, **kwargs):
        raise AssertionError("no member may be read")

    monkeypatch.setattr(radiology.series, "_read_headers", reading)
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        load_series(bomb)
    with pytest.raises(SeriesTooLargeError, match="above the limit of 10.0 MiB"):
        load_series(bomb, limits=SeriesLimits(max_total_bytes=10 * 2**20, max_zip_ratio=10_000))
    with pytest.raises(SeriesTooLargeError, match="declares 5 members"):
        load_series(bomb, limits=SeriesLimits(max_files=4))


def test_zip_symlink_entries_are_skipped(tmp_path):
    copy_series(CT2, tmp_path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in folder_members(tmp_path).items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("link.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    series = load_series(buffer.getvalue())
    assert len(series) == 4 and series.skipped == {"symbolic link (not followed)": 1}


def test_limits_are_checked_before_decoding(tmp_path, monkeypatch):
    copy_series(MR700, tmp_path)

    def decoding(*args, **kwargs):
        raise AssertionError("nothing may be decoded")

    monkeypatch.setattr(radiology.series, "read_dicom_frames", decoding)
    cases = [
        (SeriesLimits(max_files=6), "more than 6 files"),
        (SeriesLimits(max_total_bytes=10_000), "above the limit of 10 KiB"),
        (SeriesLimits(max_file_bytes=1_000), r"file \d of 7 is .* above the limit of 1 KiB for one file"),
        (SeriesLimits(max_slices=6), "7 slices, above the limit of 6"),
    ]
    for limits, message in cases:
        with pytest.raises(SeriesTooLargeError, match=message) as refused:
            load_series(tmp_path, limits=limits)
        assert isinstance(refused.value, ImageDecodeError) and not sentinel_hits(str(refused.value))
    with pytest.raises(SeriesTooLargeError, match="declares 10 frames"):
        load_series(data_file("emri_small.dcm"), limits=SeriesLimits(max_slices=9))


def test_bad_headers_are_silenced_and_never_quoted(tmp_path, quiet_check):
    names = copy_series(CT5N, tmp_path)
    for name in sorted(names)[:2]:
        path = tmp_path / name
        path.write_bytes(set_raw_value(path.read_bytes(), "InstanceNumber", SENTINEL.encode()))
    series = load_series(tmp_path)
    assert len(series) == 5 and ordered_originals(series, tmp_path, names) == EXPECTED_ORDER[CT5N]
    render_series(series, [0, 4])


# --------------------------------------------------------------------------- sampling


def test_sampling_spreads_slices_evenly_with_both_ends():
    chosen = sample_indices(300, 8)
    assert len(chosen) == 8 and chosen[0] == 0 and chosen[-1] == 299
    assert max(np.diff(chosen)) - min(np.diff(chosen)) <= 1
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_indices(7, 4) == [0, 2, 4, 6]
    assert sample_indices(9, 1) == [4]
    assert sample_indices(300, 3, slice_range=(10, 20)) == [9, 14, 19]
    assert sample_indices(300, 8, slice_range=(5, 5)) == [4]
    assert all(len(set(sample_indices(n, k))) == min(n, k) for n in range(1, 40) for k in range(1, 12))
    assert describe_indices([0, 2, 4, 6], 7) == "slices 1, 3, 5, 7 of 7"
    # Runs of three or more neighbours read as ranges; two stay listed.
    assert describe_indices(range(7), 7) == "slices 1-7 of 7"
    assert describe_indices([2, 4, 5, 6, 7, 8, 11, 12], 20) == "slices 3, 5-9, 12, 13 of 20"
    assert describe_indices([4], 9) == "slices 5 of 9"
    for bad in (dict(max_images=0), dict(slice_range=(0, 3)), dict(slice_range=(5, 4)), dict(slice_range=(1, 301))):
        with pytest.raises(SeriesOptionError):
            sample_indices(300, **{"max_images": 8, **bad})


# --------------------------------------------------------------------------- a long series


def synthetic_series(folder: Path, count: int, broken: set[int] = frozenset()) -> None:
    """``count`` slices made from CT_small.dcm (a real CT slice, 128 x 128): one series, positions 1.25 mm
    apart, files named in shuffled order. Files in ``broken`` lose the end of their pixel data."""
    template = pydicom.dcmread(data_file("CT_small.dcm"))
    template.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    template.PatientName = f"{SENTINEL}^SYNTHETIC"
    # Fixed-width placeholders, replaced in the written bytes: one save for all the slices.
    template.ImagePositionPatient = ["0", "0", "111111.11"]
    template.InstanceNumber = "222222"
    template.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2.333333"
    buffer = io.BytesIO()
    template.save_as(buffer)
    data = buffer.getvalue()
    order = list(range(count))
    random.Random(count).shuffle(order)
    folder.mkdir(parents=True)
    for position, number in enumerate(order):
        slice_data = (
            data.replace(b"111111.11", f"{1.25 * position:09.2f}".encode())
            .replace(b"222222", f"{position + 1:06d}".encode())
            .replace(b".333333", f".{position:06d}".encode())
        )
        (folder / f"{SENTINEL}_{number:04d}.dcm").write_bytes(slice_data[:-4000] if position in broken else slice_data)


def test_only_the_chosen_slices_are_decoded(tmp_path):
    chosen = sample_indices(300, 8)
    synthetic_series(tmp_path / "s", 300, broken=set(range(300)) - set(chosen))
    series = load_series(tmp_path / "s")
    assert [s.position for s in series.slices] == [1.25 * i for i in range(300)]
    images = render_series(series, chosen)  # the other 292 files are cut short: never decoded
    assert len(images) == 8 and all(image.size == (128, 128) for image in images)
    with pytest.raises(TruncatedDicomError, match=r"^slice 2 of 300 \(file \d+ of 300\): ") as refused:
        render_series(series, [1])
    assert not sentinel_hits(str(refused.value))


def peak_bytes(folder: Path) -> int:
    tracemalloc.start()
    try:
        series = load_series(folder)
        render_series(series, sample_indices(len(series), 8))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_slices(tmp_path):
    synthetic_series(tmp_path / "short", 30)
    synthetic_series(tmp_path / "long", 300)
    short, long = peak_bytes(tmp_path / "short"), peak_bytes(tmp_path / "long")
    # Each slice's pixel data is 32 KiB; holding it (or its header's dataset) would add megabytes.
    assert long - short < 270 * 2048, (short, long)


# --------------------------------------------------------------------------- command line


def test_command_line_writes_the_images_the_model_gets(tmp_path):
    copy_series(MR700, tmp_path / "in")
    copy_series(CT2, tmp_path / "in", seed=9)  # named after the MR files: series 2
    refused = run_cli("-m", "radiology.series", str(tmp_path / "in"), check=False)
    assert refused.returncode == 1 and "choose one with series=N (--series N)" in refused.stderr
    assert "2: CT, axial, 4 slice(s), 16 x 16" in refused.stderr and "Traceback" not in refused.stderr
    result = run_cli("-m", "radiology.series", str(tmp_path / "in"), "--series", "1", "--max_images", "4",
                     "--out", str(tmp_path / "out"))
    lines = result.stdout.splitlines()
    assert lines[0] == "series 1 of 2: MR, radial, 7 slice(s) of 16 x 16, ordered by rotation angle"
    assert "window: header" in lines and "images: 4 (slices 1, 3, 5, 7 of 7)" in lines
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["slice_1_of_7.png", "slice_3_of_7.png", "slice_5_of_7.png", "slice_7_of_7.png"]
    series = load_series(tmp_path / "in", series=1)
    expected = render_series(series, [0, 2, 4, 6])
    for name, image in zip(written, expected):
        assert np.array_equal(as_array(Image.open(tmp_path / "out" / name).convert("RGB")), as_array(image))
    assert not sentinel_hits(result.stdout, result.stderr, refused.stdout, refused.stderr, *written)


def test_errors_are_image_decode_errors_without_file_names(tmp_path):
    with pytest.raises(SeriesError, match="not found") as missing:
        load_series(tmp_path / f"{SENTINEL}_missing")
    assert not sentinel_hits(str(missing.value))
    (tmp_path / f"{SENTINEL}.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SeriesError, match="damaged") as damaged:
        load_series(tmp_path / f"{SENTINEL}.zip")
    assert isinstance(damaged.value, ImageDecodeError) and not sentinel_hits(str(damaged.value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SeriesError, match="neither a path nor bytes"):
            load_series([b"x", 3])
