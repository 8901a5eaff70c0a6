"""The demo with studies, driven through gradio_client: several files (a series' slices, two views), a
zipped series (one, two to choose from, an unsafe one), a multi-frame file, a prior study; real series
from pydicom's test data under names and headers that carry planted patient data."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import radiology.generate
from radiology.dicom import read_dicom_image
from radiology.series import load_series, render_series
from radiology.series import SeriesLimits
from radiology.serve import (
    MAX_STUDY_IMAGES,
    STUDY_PIXELS,
    SeriesChoiceError,
    UploadError,
    load_study,
    read_upload,
)
from tests.fixtures import SENTINEL, encode, real_images, sentinel_hits, write_sentinel_dicom
from tests.test_app import EXAMPLE, generate_args, raw_call, uploaded, value, visible
from tests.test_series import CT2, MR700, copy_series

def study_args(files, max_new_tokens: int = 4, window: str = "auto", prior: Path | None = None,
               series: int | None = None, max_images: int = 8, first: int | None = None,
               last: int | None = None, context: str | None = None) -> list:
    """/generate's inputs for a study: ``files`` (a path, or a list of paths: one upload of several files)."""
    upload = [handle_file(str(f)) for f in files] if isinstance(files, list) else handle_file(str(files))
    return [upload, "Describe this study.", "greedy", 1.0, 0.95, 64, max_new_tokens, None, context, window, None,
            handle_file(str(prior)) if prior is not None else None, series, max_images, first, last]


def zipped(target: Path, *folders: tuple[Path, str]) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder, prefix in folders:
            for path in sorted(folder.iterdir()):
                archive.write(path, prefix + path.name)
    return target


@pytest.fixture(scope="module")
def mr(tmp_path_factory) -> Path:
    """MR700's 7 slices under shuffled names that hold the sentinel, with planted patient data."""
    folder = tmp_path_factory.mktemp("mr700") / "slices"
    copy_series(MR700, folder)
    return folder


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct2") / "slices"
    copy_series(CT2, folder, seed=5)
    return folder


@pytest.fixture
def prompts(monkeypatch) -> list[dict]:
    """What each generation's prompt was built from: the images in order, and the prior."""
    seen: list[dict] = []
    build_inputs = radiology.generate.build_inputs

    def spy(processor, image, instruction=None, context=None, prior=None, dialogue=None):
        seen.append({"images": radiology.generate.study_images(image), "prior": prior})
        return build_inputs(processor, image, instruction, context, prior, dialogue=dialogue)

    monkeypatch.setattr(radiology.generate, "build_inputs", spy)
    return seen


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_several_files_of_a_series_are_one_study_in_anatomical_order(app_server, mr, prompts):
    files = sorted(mr.iterdir(), key=lambda p: p.name[::-1])  # an upload order unlike the slices' order
    text, about = app_server.client().predict(*study_args(files), api_name="/generate")
    assert text.strip() and "images: 7 (slices 1-7 of 7) · DICOM window: from the file" in about
    (prompt,) = prompts
    expected = render_series(load_series(mr), range(7), "header")
    assert prompt["prior"] is None and [same(a, b) for a, b in zip(prompt["images"], expected)] == [True] * 7
    assert not sentinel_hits(text, about)


def test_a_zipped_series_is_sampled_within_the_slice_range_with_a_prior_first(app_server, mr, tmp_path, prompts):
    archive = zipped(tmp_path / f"{SENTINEL}_study.zip", (mr, "MR700/"))
    prior = write_sentinel_dicom(tmp_path, f"{SENTINEL}_prior.dcm")  # a CT slice: the study's header window fits it
    client = app_server.client()
    _, about = client.predict(*study_args(archive, prior=prior, max_images=3, first=2, last=6), api_name="/generate")
    assert "images: 3 (slices 2, 4, 6 of 7) + prior" in about
    (prompt,) = prompts
    expected = render_series(load_series(mr), [1, 3, 5], "header")
    assert [same(a, b) for a, b in zip(prompt["images"], expected)] == [True] * 3
    assert same(prompt["prior"], read_dicom_image(prior).image)
    # The preview: the middle slice as the model gets it, and the series' technical attributes only.
    image, warning, window, frame, attributes = client.predict(handle_file(str(archive)), "auto", api_name="/preview")
    assert same(Image.open(image), render_series(load_series(mr), [3])[0])
    assert value(attributes).startswith("**DICOM series** (technical attributes only) · Modality: MR · "
                                        "Orientation: radial · Slices: 7, ordered by rotation angle · "
                                        "Rows x columns: 16 x 16 · Window: from the file")
    assert visible(window) and not visible(frame) and not visible(warning)
    assert not sentinel_hits(json.dumps([about, warning, window, frame, attributes]))


def test_a_zip_with_two_series_is_refused_with_the_list_then_one_is_chosen(app_server, mr, ct, tmp_path, prompts):
    archive = zipped(tmp_path / "two.zip", (mr, "mr/"), (ct, "ct/"))
    client = app_server.client()
    with pytest.raises(AppError) as refused:
        client.predict(*study_args(archive), api_name="/generate")
    message = str(refused.value)
    assert message.startswith("This upload holds 2 DICOM series; choose one under Series")
    assert "1: MR, radial, 7 slice(s), 16 x 16; 2: CT, axial, 4 slice(s), 16 x 16." in message
    assert not prompts  # nothing reached the model
    _, about = client.predict(*study_args(archive, series=2), api_name="/generate")
    # A CT series takes the multi window by default.
    assert "images: 4 (slices 1-4 of 4) · DICOM window: multi (wide -1024..1024 HU" in about
    expected = render_series(load_series(ct), range(4), "multi")
    assert [same(a, b) for a, b in zip(prompts[0]["images"], expected)] == [True] * 4
    _, lung = client.predict(*study_args(archive, series=2, window="lung", max_images=2), api_name="/generate")
    assert "images: 2 (slices 1, 4 of 4) · DICOM window: lung (C -600, W 1500)" in lung
    with pytest.raises(AppError, match="There is no series 3: this input holds 2 series, numbered 1 to 2"):
        client.predict(*study_args(archive, series=3), api_name="/generate")
    # The preview lists the series where the attributes go.
    _, _, _, _, attributes = client.predict(handle_file(str(archive)), "auto", api_name="/preview")
    assert "2: CT, axial, 4 slice(s), 16 x 16" in value(attributes)
    assert not sentinel_hits(message, about, lung, json.dumps(attributes))


def test_a_zip_pointing_outside_itself_is_refused_and_the_app_goes_on(app_server, tmp_path):
    archive = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(archive, "w") as evil:
        evil.writestr("../../outside/slice.dcm", write_sentinel_dicom(tmp_path, "slice.dcm").read_bytes())
    client = app_server.client()
    with pytest.raises(AppError, match=r"points outside the archive \('\.\.' or an absolute path\); such archives "
                                       "are refused"):
        client.predict(*study_args(archive), api_name="/generate")
    assert not (tmp_path.parent / "outside").exists()
    text, _ = client.predict(*generate_args(EXAMPLE, max_new_tokens=4), api_name="/generate")
    assert text.strip()


def test_two_views_stay_in_upload_order_and_a_prior_comes_first(app_server, tmp_path, prompts):
    pictures = real_images()
    views = []
    for name in ("rgb", "mr_gray"):
        views.append(tmp_path / f"{name}.png")
        views[-1].write_bytes(encode(pictures[name]))
    prior = tmp_path / "last_year.png"
    prior.write_bytes(encode(pictures["ct_16bit"]))
    _, about = app_server.client().predict(*study_args(views, prior=prior), api_name="/generate")
    assert "images: 2 + prior" in about and "DICOM" not in about
    (prompt,) = prompts
    assert [same(a, pictures[n]) for a, n in zip(prompt["images"], ("rgb", "mr_gray"))] == [True, True]
    assert same(prompt["prior"], read_upload(prior))


@pytest.mark.parametrize("case, message", [
    ("zip and a file", "Upload a .zip alone"),
    ("series and an image", "This upload mixes a DICOM series with other images"),
    ("too many views", "images uploaded; the model gets at most 2 at once (Max images)"),
    ("slice range", "The slice range 5 to 9 does not fit this series: its slices are numbered 1 to 7"),
    ("max images", f"Max images must be a whole number from 1 to {MAX_STUDY_IMAGES}, or empty for 8."),
    ("prior zip", "Prior study: unsupported file type .zip"),
    ("text file", "File 2 of 2: unsupported file type .txt"),
])
def test_studies_that_cannot_be_used_get_a_message(app_server, mr, tmp_path, case, message):
    archive = zipped(tmp_path / "mr.zip", (mr, ""))
    slices = sorted(mr.iterdir())
    notes = tmp_path / f"{SENTINEL}_notes.txt"
    notes.write_text("not an image")
    args = {
        "zip and a file": study_args([archive, EXAMPLE]),
        "series and an image": study_args([*slices, EXAMPLE]),
        "too many views": study_args([EXAMPLE] * 3, max_images=2),
        "slice range": study_args(archive, first=5, last=9),
        "max images": study_args(archive, max_images=MAX_STUDY_IMAGES + 1),
        "prior zip": study_args(EXAMPLE, prior=archive),
        "text file": study_args([EXAMPLE, notes]),
    }[case]
    with pytest.raises(AppError) as refused:
        app_server.client().predict(*args, api_name="/generate")
    assert message in str(refused.value) and not sentinel_hits(str(refused.value))


def test_one_file_still_works_through_the_old_positional_api(app_server, tmp_path):
    # A script written before studies: one file, eleven values (gradio_client fills in the rest).
    dicom = write_sentinel_dicom(tmp_path, "scan.dcm")
    text, about = app_server.client().predict(handle_file(str(dicom)), "Describe.", "greedy", 1.0, 0.95, 64, 4,
                                               None, "58-year-old smoker", "lung", None, api_name="/generate")
    assert text.strip() and "images: 1 · DICOM window: lung (C -600, W 1500) · with clinical history" in about
    event, payload = raw_call(app_server, "generate", [uploaded(app_server, dicom), "Describe.", "greedy", 1.0, 0.95,
                                                       64, 4, None, None, "header", None])
    assert event == "complete" and "images: 1 · DICOM window: full range" in payload[1]


def test_request_limits_are_checked_before_reading(tmp_path, mr):
    files = [str(p) for p in sorted(mr.iterdir())]
    with pytest.raises(UploadError, match="This request holds 7 files; this app takes at most 5: upload the series "
                                          "as a .zip"):
        load_study(files, limits=SeriesLimits(max_files=5))
    size = sum(Path(f).stat().st_size for f in files)
    with pytest.raises(UploadError, match="MiB of files; this app takes at most 0 MiB at once"):
        load_study(files, limits=SeriesLimits(max_total_bytes=size - 1))
    assert len(load_study(files, limits=SeriesLimits(max_total_bytes=size)).images) == 7
    copy_series(CT2, tmp_path / "ct")
    with pytest.raises(SeriesChoiceError) as several:
        load_study([*files, *map(str, sorted((tmp_path / "ct").iterdir()))])
    assert several.value.choices == [(1, "MR, radial, 7 slice(s), 16 x 16"), (2, "CT, axial, 4 slice(s), 16 x 16")]


def test_the_pixels_sent_are_bounded_from_the_headers(tmp_path, monkeypatch):
    import radiology.serve

    copy_series(CT2, tmp_path / "ct")
    files = [str(p) for p in sorted((tmp_path / "ct").iterdir())]
    monkeypatch.setattr(radiology.serve, "STUDY_PIXELS", 3 * 16 * 16)  # three 16 x 16 slices

    def decoding(*args, **kwargs):
        raise AssertionError("nothing may be decoded for a request above the pixel budget")

    monkeypatch.setattr(radiology.serve, "read_series_slices", decoding)
    with pytest.raises(UploadError, match="4 slices of 16 x 16 are 0 megapixels, above this app's 0 per request: set "
                                          "Max images to 3 or fewer"):
        load_study(files)
    assert STUDY_PIXELS >= 16 * 2000 * 2000  # sixteen large slices fit the real budget


def test_burned_in_annotation_in_any_file_of_a_series_shows_the_warning(app_server, tmp_path):
    from radiology.dicom import BURNED_IN_WARNING

    names = copy_series(MR700, tmp_path / "mr")
    flagged = sorted(names)[0]
    write_sentinel_dicom(tmp_path / "mr", flagged, source=f"{MR700}/{names[flagged]}", burned_in_annotation="YES")
    archive = zipped(tmp_path / "mr.zip", (tmp_path / "mr", ""))
    _, warning, *_ = app_server.client().predict(handle_file(str(archive)), "auto", api_name="/preview")
    assert visible(warning) and BURNED_IN_WARNING in value(warning)


def test_single_dicom_images_of_different_series_are_views_in_upload_order(tmp_path):
    ct = write_sentinel_dicom(tmp_path, "ct.dcm")
    mr = write_sentinel_dicom(tmp_path, "mr.dcm", source="MR_small.dcm")
    study = load_study([str(mr), str(ct)])  # e.g. a PA and a lateral film, each its own series
    assert study.kind == "views" and study.describe() == "images: 2" and study.sent == (0, 1)
    assert same(study.images[0], read_dicom_image(mr).image) and same(study.images[1], read_dicom_image(ct).image)
    fake = tmp_path / "notes.dcm"
    fake.write_text("Findings: none. This is a text file.\n" * 10)
    with pytest.raises(UploadError, match=r"^File 2 of 2: the file is named \.dcm but is not DICOM") as refused:
        load_study([str(ct), str(fake)])
    assert not sentinel_hits(str(refused.value))


def test_dicom_views_of_one_series_that_do_not_stack_stay_views(tmp_path):
    import pydicom

    pa = write_sentinel_dicom(tmp_path, "pa.dcm")  # 128 x 128
    uid = pydicom.dcmread(pa, stop_before_pixels=True).SeriesInstanceUID
    lateral = write_sentinel_dicom(tmp_path, "lateral.dcm", source="MR_small.dcm", SeriesInstanceUID=uid)  # 64 x 64
    study = load_study([str(lateral), str(pa)])
    assert study.kind == "views" and [image.size for image in study.images] == [(64, 64), (128, 128)]
    with pytest.raises(UploadError, match="differ in rows x columns and cannot be stacked"):
        load_study([str(lateral), str(pa)], max_images=1)  # more files than a study of views may send
