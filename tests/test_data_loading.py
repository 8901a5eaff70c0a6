"""Loading local datasets: image ids stay names, relative paths resolve, empty splits are named."""

from __future__ import annotations

import pytest

from radiology.data import DatasetError, load_caption_dataset
from tests.fixtures import write_empty_split, write_seed_parquet


def test_local_folder_keeps_image_ids(seed_data_dir):
    dataset = load_caption_dataset(str(seed_data_dir), "test")
    assert dataset["image_id"][:2] == ["ROCOv2_2023_train_000000", "ROCOv2_2023_train_000001"]


def test_relative_image_paths_still_resolve(tmp_path):
    from PIL import Image

    (tmp_path / "scans").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "scans" / "a.png")
    (tmp_path / "table.csv").write_text("image_path,image_id,caption\nscans/a.png,scan_a,A chest film.\n")
    row = load_caption_dataset(str(tmp_path / "table.csv"), "test", image_column="image_path")[0]
    assert row["image_path"] == str(tmp_path / "scans" / "a.png")
    assert row["image_id"] == "scan_a"


def test_empty_split_is_named_and_does_not_block_the_others(tmp_path):
    data = write_seed_parquet(tmp_path / "data", splits={"train": 3})
    write_empty_split(data, "test")
    with pytest.raises(DatasetError, match=r"split 'test' of .* is empty \(0 rows\)"):
        load_caption_dataset(str(data), "test")
    assert len(load_caption_dataset(str(data), "train")) == 5  # 3 rows + the 2 planted bad ones
