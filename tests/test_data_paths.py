"""Local tables: relative image paths resolve against the table's folder; identifiers stay as given."""

from __future__ import annotations

from datasets import Dataset

from radiology.data import decode_image, load_caption_dataset
from tests.fixtures import real_images


def test_relative_image_paths_resolve_but_image_ids_do_not(tmp_path):
    (tmp_path / "scans").mkdir()
    real_images()["mr_gray"].save(tmp_path / "scans" / "a.png")
    Dataset.from_list([{"image": "scans/a.png", "image_id": "ROCOv2_2023_train_000001", "caption": "An MRI."}]) \
        .to_parquet(str(tmp_path / "train.parquet"))
    dataset = load_caption_dataset(str(tmp_path), "train")
    assert dataset[0]["image"] == str(tmp_path / "scans" / "a.png")
    assert dataset[0]["image_id"] == "ROCOv2_2023_train_000001"
    assert decode_image(dataset[0]["image"]).size == (64, 64)
