"""Several images per row: several image columns, a list column, a DICOM series in a column, a prior
study. One function (row_images) reads a prepared row for every stage; validation counts bad rows by
cause; no planted patient data reaches a log line or an error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Image as ImageFeature, List
from pydicom.data import get_testdata_file

from radiology.config import parse_args
from radiology.data import (
    IMAGE_COUNT,
    SERIES_SLICES,
    DatasetArguments,
    DatasetError,
    ImageOptions,
    TooManyImagesError,
    canonical_columns,
    decode_image,
    prepare_caption_dataset,
    row_images,
)
from radiology.dicom import read_dicom_image
from radiology.series import load_series, render_series, sample_indices
from tests.fixtures import (
    CT2,
    MR700,
    SENTINEL,
    distinct_images,
    encode,
    sentinel_hits,
    write_sentinel_dicom,
    write_sentinel_series,
    write_study_dataset,
)


def pixels(image) -> np.ndarray:
    return np.asarray(decode_image(image))


def same(a, b) -> bool:
    return np.array_equal(pixels(a), pixels(b))


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    return write_study_dataset(tmp_path_factory.mktemp("studies") / "set")


def study_args(folder: Path, **options) -> DatasetArguments:
    return DatasetArguments(dataset_name=str(folder), images_column="images", prior_image_column="prior",
                            id_column="study", **options)


# --------------------------------------------------------------------------- where a row's images come from


def test_several_image_columns_give_each_row_its_images_in_order():
    pictures = distinct_images()
    rows = [
        {"front": encode(pictures["ct"]), "lateral": encode(pictures["mr"]), "caption": "Two views."},
        {"front": encode(pictures["us"]), "lateral": None, "caption": "The frontal view only."},
    ]
    dataset = Dataset.from_list(rows).cast_column("front", ImageFeature()).cast_column("lateral", ImageFeature())
    prepared = prepare_caption_dataset(dataset, image_column=["front", "lateral"])
    assert prepared.dataset[IMAGE_COUNT] == [2, 1] and prepared.dropped == {}
    two, one = (row_images(row) for row in prepared.dataset)
    assert same(two.images[0], pictures["ct"]) and same(two.images[1], pictures["mr"]) and two.prior is None
    assert len(one.images) == 1 and same(one.images[0], pictures["us"])
    # The other order gives the other order.
    swapped = prepare_caption_dataset(dataset, image_column=["lateral", "front"]).dataset[0]
    assert same(row_images(swapped).images[0], pictures["mr"])


def test_image_columns_of_relative_paths_in_a_csv_are_read_from_its_folder(tmp_path):
    pictures = distinct_images()
    for name in ("ct", "mr"):
        (tmp_path / f"{name}.png").write_bytes(encode(pictures[name]))
    (tmp_path / "train.csv").write_text("pa,lat,text\nct.png,mr.png,Two views of the chest.\n")
    script_args, _, _ = parse_args(["--config", "recipes/tiny-cpu.yaml", "--dataset_name", str(tmp_path / "train.csv"),
                                    "--image_column", "pa", "lat", "--caption_column", "text"])
    assert script_args.image_column == ["pa", "lat"]
    prepared = script_args.prepare(script_args.load("train"))
    images = row_images(prepared.dataset[0], prepared.options).images
    assert len(images) == 2 and same(images[0], pictures["ct"]) and same(images[1], pictures["mr"])


def test_a_list_column_with_a_series_folder_and_a_prior(study_dir):
    args = study_args(study_dir)
    prepared = args.prepare(args.load("train"))
    rows = list(prepared.dataset)
    assert [row["image_id"] for row in rows] == [f"study_{i}" for i in range(6)] and prepared.dropped == {}
    assert prepared.dataset[IMAGE_COUNT] == [2, 7, 4, 2, 3, 4]  # study_1 is MR700: all 7 slices (below 8)
    assert prepared.dataset[SERIES_SLICES] == [[], [7], [], [], [], []]
    raw = json.loads((study_dir / "train.jsonl").read_text().splitlines()[0])
    first = row_images(rows[0], prepared.options)
    assert [same(image, study_dir / path) for image, path in zip(first.images, raw["images"])] == [True, True]
    assert same(first.prior, study_dir / raw["prior"])
    assert first.in_prompt_order[0] is first.prior
    series = row_images(rows[1], prepared.options)
    expected = render_series(load_series(study_dir / "series" / "mr700"), range(7))
    assert series.prior is None and all(same(a, b) for a, b in zip(series.images, expected))


def test_max_images_samples_series_evenly_and_drops_larger_studies(study_dir):
    args = study_args(study_dir, max_images=3)
    prepared = args.prepare(args.load("train"))
    assert prepared.dropped == {"more images than --max_images": 2}  # the two rows of 4 images
    assert prepared.dataset[IMAGE_COUNT] == [2, 3, 2, 3]
    sampled = row_images(prepared.dataset[1], prepared.options).images
    series = load_series(study_dir / "series" / "mr700")
    assert sample_indices(7, 3) == [0, 3, 6]
    assert all(same(a, b) for a, b in zip(sampled, render_series(series, [0, 3, 6])))
    with pytest.raises(TooManyImagesError, match="4 images, more than --max_images 3"):
        row_images({"image": [str(study_dir / "images" / f"{n}.png") for n in ("ct", "mr", "us", "mr_overlay")]},
                   ImageOptions(max_images=3))


def test_a_list_column_of_embedded_images():
    pictures = distinct_images()
    rows = [{"images": [encode(pictures["ct"]), encode(pictures["us"])], "caption": "Two images."}]
    dataset = Dataset.from_list(rows).cast_column("images", List(ImageFeature()))
    prepared = prepare_caption_dataset(dataset, images_column="images")
    images = row_images(prepared.dataset[0]).images
    assert [same(images[0], pictures["ct"]), same(images[1], pictures["us"])] == [True, True]


def test_a_multi_frame_dicom_file_is_a_series_and_a_single_frame_one_an_image(tmp_path):
    multi = Path(get_testdata_file("emri_small.dcm"))  # MR, 10 frames
    single = write_sentinel_dicom(tmp_path, f"{SENTINEL}_ct.dcm")  # CT_small, one frame
    study = row_images({"image": str(multi)})
    frames = render_series(load_series(multi), sample_indices(10, 8))
    assert len(study.images) == 8 and study.series_slices == [10]
    assert all(same(a, b) for a, b in zip(study.images, frames))
    one = row_images({"image": str(single)})
    assert len(one.images) == 1 and one.series_slices == []
    assert same(one.images[0], read_dicom_image(single).image)  # its own window, as before
    bytes_row = row_images({"image": {"bytes": multi.read_bytes(), "path": None}})  # embedded in a parquet
    assert len(bytes_row.images) == 8 and all(same(a, b) for a, b in zip(bytes_row.images, frames))


def test_a_ct_series_is_read_with_the_multi_window_by_default(tmp_path):
    folder = write_sentinel_series(tmp_path / "ct", CT2)
    series = load_series(folder)
    default = row_images({"image": str(folder)}).images
    assert all(same(a, b) for a, b in zip(default, render_series(series, range(4), "multi")))
    lung = row_images({"image": str(folder)}, ImageOptions(series_window="lung")).images
    assert all(same(a, b) for a, b in zip(lung, render_series(series, range(4), "lung")))
    assert not all(same(a, b) for a, b in zip(default, lung))


def test_a_prior_series_gives_its_middle_slice(tmp_path):
    folder = write_sentinel_series(tmp_path / "prior", MR700)
    study = row_images({"image": encode(distinct_images()["ct"]), "prior": str(folder)})
    assert same(study.prior, render_series(load_series(folder), [3])[0]) and len(study.images) == 1


# --------------------------------------------------------------------------- validation and errors


def test_validation_drops_and_counts_rows_by_cause_without_patient_data(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    pictures = distinct_images()
    good = tmp_path / "ct.png"
    good.write_bytes(encode(pictures["ct"]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / f"{SENTINEL}_report.txt").write_text("draft")
    mixed = tmp_path / "two_series"
    write_sentinel_series(mixed / "a", MR700)
    write_sentinel_series(mixed / "b", CT2)
    rows = [
        {"image": [str(good), str(tmp_path / "gone.png")], "caption": "A missing view."},
        {"image": [str(good), str(broken)], "caption": "A broken view."},
        {"image": [str(notes)], "caption": "A folder without DICOM."},
        {"image": [str(mixed)], "caption": "Two series in one folder."},
        {"image": [str(good)] * 3, "caption": "Too many views."},
        {"image": [str(good), str(write_sentinel_series(tmp_path / "mr", MR700))], "caption": "A usable study."},
    ]
    prepared = prepare_caption_dataset(Dataset.from_list(rows), images_column="image",
                                       options=ImageOptions(max_images=8))
    assert prepared.dropped == {"file not found": 1, "unreadable image": 1, "no DICOM image in the input": 1,
                                "several DICOM series, none chosen": 1}
    assert prepared.dataset[IMAGE_COUNT] == [3, 8]
    few = prepare_caption_dataset(Dataset.from_list([*rows[4:], {"image": [str(good)], "caption": "One view."}]),
                                  images_column="image", options=ImageOptions(max_images=2))
    assert few.dropped == {"more images than --max_images": 2}  # 3 files; 1 + the series' 2 sampled slices
    errors = []
    for row in rows[2:4]:
        with pytest.raises(Exception) as refused:
            row_images(row)
        errors.append(str(refused.value))
    assert not sentinel_hits(caplog.text, *errors)


def test_the_log_counts_images_per_row_priors_and_series(study_dir, caplog):
    caplog.set_level(logging.INFO, logger="radiology.data")
    args = study_args(study_dir)
    args.prepare(args.load("train"))
    assert ("Images: images per row: 2 (2 rows), 3 (1 row), 4 (2 rows), 7 (1 row); 3 row(s) with a prior study; "
            "1 DICOM series of 7 slices, each sampled to at most 8 images (--max_images)") in caplog.text
    assert not sentinel_hits(caplog.text)


def test_image_options_are_checked_before_anything_loads():
    with pytest.raises(ValueError, match="not both"):
        DatasetArguments(dataset_name="d", image_column=["front"], images_column="images")
    with pytest.raises(ValueError, match="--max_images must be a whole number from 1"):
        DatasetArguments(dataset_name="d", max_images=0)
    with pytest.raises(ValueError, match="--series_window: unknown window 'soft'"):
        DatasetArguments(dataset_name="d", series_window="soft")
    assert DatasetArguments(dataset_name="d", image_column="scan").image_column == ["scan"]  # YAML / Python: one name


def test_list_and_single_image_columns_are_named_with_their_own_flag():
    dataset = Dataset.from_list([{"images": ["a.png", "b.png"], "front": "a.png", "caption": "x"}])
    with pytest.raises(DatasetError, match="holds a list of images per row; name it with --images_column images"):
        canonical_columns(dataset, image_column="images")
    with pytest.raises(DatasetError, match="holds one image per row.*--image_column front"):
        canonical_columns(dataset, images_column="front")
    with pytest.raises(DatasetError, match="column 'lateral' not found.*--image_column"):
        canonical_columns(dataset, image_column=["front", "lateral"])
    with pytest.raises(DatasetError, match="column 'before' not found.*--prior_image_column"):
        canonical_columns(dataset, image_column="front", prior_image_column="before")


def test_flags_give_back_the_description():
    data = DatasetArguments(dataset_name="d", image_column=["front", "lateral"], prior_image_column="old",
                            max_images=4, series_window="multi")
    assert data.flags() == ["--dataset_name", "d", "--image_column", "front", "lateral", "--prior_image_column", "old",
                            "--max_images", "4", "--series_window", "multi"]
    script_args, _, _ = parse_args(["--config", "recipes/tiny-cpu.yaml", *data.flags()])
    assert DatasetArguments.of(script_args) == data


def test_a_zip_of_a_series_reads_like_its_folder(tmp_path):
    import zipfile

    folder = write_sentinel_series(tmp_path / "mr", MR700)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        for path in sorted(folder.iterdir()):
            packed.write(path, path.name)
    from_zip = row_images({"image": str(archive)}, ImageOptions(max_images=4))
    from_folder = row_images({"image": str(folder)}, ImageOptions(max_images=4))
    assert from_zip.series_slices == [7] and len(from_zip.images) == 4
    assert all(same(a, b) for a, b in zip(from_zip.images, from_folder.images))
    embedded = row_images({"image": {"bytes": archive.read_bytes(), "path": None}}, ImageOptions(max_images=4))
    assert all(same(a, b) for a, b in zip(embedded.images, from_folder.images))


def test_a_yaml_config_names_one_or_several_image_columns(tmp_path):
    from radiology.evaluate import parse_config

    for value, expected in (("front", ["front"]), ("[front, lateral]", ["front", "lateral"])):
        recipe = tmp_path / "eval.yaml"
        recipe.write_text(f"model: m\ndataset_name: d\nimage_column: {value}\nmax_images: 4\n")
        config = parse_config(["--config", str(recipe), "--output_dir", "o"])
        assert config.data.image_column == expected and config.data.image_options() == ImageOptions(max_images=4)
