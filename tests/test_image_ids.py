"""Image identifiers survive loading from a local folder (they are names, not relative paths)."""

from __future__ import annotations

from radiology.data import load_caption_dataset


def test_local_folder_keeps_image_ids(seed_data_dir):
    dataset = load_caption_dataset(str(seed_data_dir), "test")
    assert dataset["image_id"][:2] == ["ROCOv2_2023_train_000000", "ROCOv2_2023_train_000001"]


def test_relative_image_paths_still_resolve(tmp_path):
    from PIL import Image

    (tmp_path / "scans").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "scans" / "a.png")
    (tmp_path / "table.csv").write_text("image_path,image_id,caption\nscans/a.png,scan_a,A chest film.\n")
    row = load_caption_dataset(str(tmp_path / "table.csv"), "test")[0]
    assert row["image_path"] == str(tmp_path / "scans" / "a.png")
    assert row["image_id"] == "scan_a"
