"""Data stage: loading from every supported source, RGB conversion, validation, clear errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from radiology.data import (
    DatasetError,
    build_messages,
    decode_image,
    load_caption_dataset,
    prepare_caption_dataset,
)
from radiology.images import ImageDecodeError, to_rgb
from tests.fixtures import encode, real_images, write_seed_parquet


@pytest.mark.parametrize("name", list(real_images()))
def test_every_real_image_mode_becomes_8bit_rgb(name):
    image = real_images()[name]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.asarray(rgb).std() > 0, "conversion flattened the image"


def test_16bit_grayscale_is_stretched_not_clipped():
    ct = real_images()["ct_16bit"]  # values up to a few thousand: a plain convert("L") saturates
    pixels = np.asarray(ct, dtype=np.float64)
    rgb = np.asarray(to_rgb(ct))[..., 0].astype(np.float64)
    expected = (pixels - pixels.min()) * 255.0 / (pixels.max() - pixels.min())
    assert np.abs(rgb - expected).max() <= 1.0
    assert rgb.min() == 0 and rgb.max() == 255


def test_alpha_is_composited_on_black():
    transparent = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert np.asarray(to_rgb(transparent)).max() == 0


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "CMYK", "F", "I", "YCbCr"])
def test_other_modes(mode):
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert(mode)
    assert to_rgb(image).mode == "RGB"


def test_decode_image_accepts_bytes_paths_and_dataset_dicts(tmp_path):
    png = encode(real_images()["mr_gray"])
    path = tmp_path / "mr.png"
    path.write_bytes(png)
    for value in (png, str(path), {"bytes": png, "path": None}, {"bytes": None, "path": str(path)}):
        assert decode_image(value).mode == "RGB"


@pytest.mark.parametrize(
    "value, cause",
    [
        (b"plain text, not pixels", "not a readable image"),
        (encode(real_images()["rgb"])[:200], "not a readable image"),  # truncated PNG
        ("/nonexistent/scan.png", "not found"),
        ({"bytes": None, "path": None}, "no image"),
    ],
)
def test_decode_image_errors_name_the_cause(value, cause):
    with pytest.raises(ImageDecodeError, match=cause):
        decode_image(value)


def test_decompression_bomb_guard_stays_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(encode(Image.new("L", (64, 64))))


def test_messages_put_image_then_instruction_in_the_user_turn():
    messages = build_messages("Describe.", caption="Normal.")
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Normal."}]}


# ----------------------------------------------------------------------------- loading


def test_parquet_folder_in_the_seed_schema(seed_data_dir):
    train = load_caption_dataset(str(seed_data_dir), "train")
    assert {"image", "image_id", "caption", "cui"} <= set(train.column_names)
    prepared = prepare_caption_dataset(train)
    assert prepared.dropped == {"unreadable image": 1, "empty caption": 1}
    assert len(prepared.dataset) == len(train) - 2
    assert "broken" not in prepared.dataset["image_id"]


def test_single_parquet_file(seed_data_dir):
    assert len(load_caption_dataset(str(seed_data_dir / "test.parquet"), "test")) == 6


def _write_image_table(folder, suffix):
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for i, (name, image) in enumerate(list(real_images().items())[:3]):
        (images / f"{name}.png").write_bytes(encode(image.convert("RGB")))
        rows.append({"file": f"images/{name}.png", "text": f"caption {i}"})
    if suffix == ".jsonl":
        (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        (folder / "train.csv").write_text("file,text\n" + "\n".join(f"{r['file']},{r['text']}" for r in rows))
    return folder / f"train{suffix}"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_tables_of_relative_image_paths(tmp_path, suffix):
    table = _write_image_table(tmp_path / "set", suffix)
    for source in (table, table.parent):  # the file itself, or its folder
        dataset = load_caption_dataset(str(source), "train", image_column="file")
        prepared = prepare_caption_dataset(dataset, image_column="file", caption_column="text")
        assert len(prepared.dataset) == 3 and not prepared.dropped
        assert decode_image(prepared.dataset[0]["image"]).mode == "RGB"


def test_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    lines = []
    for name, image in list(real_images().items())[:3]:
        image.convert("RGB").save(folder / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "caption": f"An image of {name}."}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    dataset = load_caption_dataset(str(tmp_path / "imagefolder"), "train")
    prepared = prepare_caption_dataset(dataset)
    assert len(prepared.dataset) == 3


def test_missing_column_lists_the_columns_found(seed_data_dir):
    train = load_caption_dataset(str(seed_data_dir), "train")
    with pytest.raises(DatasetError, match=r"'findings' not found; columns found: image, image_id, caption, cui.*--caption_column"):
        prepare_caption_dataset(train, caption_column="findings")


def test_unknown_split_lists_the_splits_found(seed_data_dir):
    with pytest.raises(DatasetError, match="split 'validation' not found.*splits found: test, train"):
        load_caption_dataset(str(seed_data_dir), "validation")


def test_wrong_path_says_so(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_caption_dataset(str(tmp_path / "nowhere"), "train")


def test_max_samples_takes_the_first_rows(seed_data_dir):
    prepared = prepare_caption_dataset(load_caption_dataset(str(seed_data_dir), "train"), max_samples=3)
    assert prepared.dataset["image_id"] == [f"ROCOv2_2023_train_{i:06d}" for i in range(3)]


def test_all_bad_rows_is_an_error(tmp_path):
    folder = write_seed_parquet(tmp_path / "d", {"train": 0})
    with pytest.raises(DatasetError, match="no usable rows"):
        prepare_caption_dataset(load_caption_dataset(str(folder), "train"))


def test_dropped_rows_are_counted_in_the_log(seed_data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="radiology.data"):
        prepare_caption_dataset(load_caption_dataset(str(seed_data_dir), "train"))
    assert "dropped 2: 1 empty caption, 1 unreadable image" in caplog.text


# ----------------------------------------------------------------------------- hardening


def test_images_are_the_ground_floor_of_data_and_dicom():
    """radiology.images imports neither radiology.data nor radiology.dicom; dicom does not import data."""
    import subprocess
    import sys

    probe = ("import sys, radiology.images; a = sorted(m for m in sys.modules if m.startswith('radiology.')); "
             "import radiology.dicom; b = sorted(m for m in sys.modules if m.startswith('radiology.')); print(a, b)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    before, after = out.strip().split("] [")
    assert "radiology.data" not in before and "radiology.dicom" not in before
    assert "radiology.data" not in after, "radiology.dicom must not import radiology.data"


def _write_path_table(folder, rows: list[tuple[str, str]]):
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "cases.csv"
    table.write_text("image,caption\n" + "\n".join(f"{image},{caption}" for image, caption in rows) + "\n")
    return table


def test_a_missing_image_file_is_counted_as_file_not_found(tmp_path):
    real_images()["mr_gray"].save(tmp_path / "here.png")
    table = _write_path_table(tmp_path, [("here.png", "An MRI."), ("gone.png", "A CT."), ("/no/such/scan.png", "X.")])
    prepared = prepare_caption_dataset(load_caption_dataset(str(table), "train"))
    assert prepared.dropped == {"file not found": 2}
    assert len(prepared.dataset) == 1


@pytest.mark.parametrize("rows, cause, fix", [
    ([("gone1.png", "An MRI."), ("gone2.png", "A CT.")], "dropped 2: 2 file not found", "--image_column"),
    ([("a.png", ""), ("b.png", " ")], "dropped 2: 2 empty caption", "--caption_column"),
])
def test_a_dataset_without_a_usable_row_says_why_and_what_to_do(tmp_path, rows, cause, fix):
    real_images()["mr_gray"].save(tmp_path / "a.png")
    real_images()["mr_gray"].save(tmp_path / "b.png")
    table = _write_path_table(tmp_path, rows)
    with pytest.raises(DatasetError) as caught:
        prepare_caption_dataset(load_caption_dataset(str(table), "train"))
    message = str(caught.value)
    assert "no usable rows" in message and cause in message and fix in message
    assert "concatenate" not in message


def test_an_unknown_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError) as caught:
        load_caption_dataset("someone/not-a-dataset", "train")
    message = str(caught.value)
    assert "someone/not-a-dataset" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" in message  # what to do instead


def test_a_single_file_without_a_split_is_the_whole_file(tmp_path):
    from radiology.data import WHOLE_FILE, load_caption_splits

    real_images()["mr_gray"].save(tmp_path / "a.png")
    table = _write_path_table(tmp_path, [("a.png", "An MRI.")])
    assert list(load_caption_splits(str(table))) == [WHOLE_FILE] == ["whole file"]
    assert list(load_caption_splits(str(table), splits=["test"])) == ["test"]  # named as asked
