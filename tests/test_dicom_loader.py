"""DICOM through the data loader and training: a table of .dcm paths with captions trains like PNGs,
and the patient data planted in the files (tests.fixtures.SENTINEL) shows up in no output, log
line or written file."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from radiology.collate import CaptionCollator
from radiology.data import DEFAULT_INSTRUCTION, load_caption_dataset, prepare_caption_dataset
from radiology.dicom import read_dicom_image
from radiology.modeling import load_processor
from tests.conftest import run_cli
from tests.fixtures import CAPTIONS, files_with_sentinel, sentinel_hits, write_sentinel_dicom

# Real files covering the decoders the loader meets: native CT, RLE MR, JPEG baseline YBR,
# multi-frame JPEG, JPEG Lossless, JPEG 2000 MONOCHROME1 CR.
SOURCES = {
    "ct.dcm": "CT_small.dcm",
    "mr_rle.dcm": "MR_small_RLE.dcm",
    "us_ybr_jpeg.dcm": "SC_rgb_jpeg_dcmtk.dcm",
    "us_cine.dcm": "examples_ybr_color.dcm",
    "rgb_jpeg_lossless.dcm": "SC_rgb_jpeg_gdcm.dcm",
    "mr_j2k.dcm": "MR_small_jp2klossless.dcm",
}


def write_dicom_table(folder: Path, fmt: str, repeat: int = 1) -> tuple[Path, Path]:
    """Sentinel-tagged DICOM files under folder/images, one cut-off file among them, and a table
    (CSV or JSONL) of relative paths and captions. Returns (table, images folder)."""
    images = folder / "images"
    rows = []
    for i, (name, source) in enumerate(SOURCES.items()):
        write_sentinel_dicom(images, name, source=source)
        rows.append({"image": f"images/{name}", "caption": CAPTIONS[i % len(CAPTIONS)]})
    whole = write_sentinel_dicom(images, "cut.dcm", source="CT_small.dcm").read_bytes()
    (images / "cut.dcm").write_bytes(whole[: len(whole) // 2])  # a transfer that was cut off
    rows = [{"image": "images/cut.dcm", "caption": "A file that was cut off."}] + rows * repeat
    table = folder / f"train.{fmt}"
    if fmt == "csv":
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return table, images


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_dicom_table_loads_collates_and_leaks_nothing(fmt, tmp_path, tiny_model_dir, caplog, capfd, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # scanned below
    caplog.set_level(logging.DEBUG)
    table, images = write_dicom_table(tmp_path / "data", fmt)

    prepared = prepare_caption_dataset(load_caption_dataset(str(table), "train"))
    assert len(prepared.dataset) == len(SOURCES)
    assert dict(prepared.dropped) == {"truncated DICOM file": 1}

    processor = load_processor(str(tiny_model_dir))
    rows = [prepared.dataset[i] for i in range(len(prepared.dataset))]
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)(rows)
    # The 30-frame cine is a series: 8 evenly spaced frames (--max_images); every other file is one image.
    counts = {Path(row["image"]).name: row["image_count"] for row in rows}
    assert counts == {name: 8 if name == "us_cine.dcm" else 1 for name in SOURCES}
    assert batch["pixel_values"].shape[0] == len(SOURCES) - 1 + 8
    assert (batch["labels"] != -100).any(dim=1).all()
    # The collator fed the model exactly the rendered DICOM (header window), not something else.
    ct_row = next(i for i, row in enumerate(rows) if row["image"].endswith("ct.dcm"))
    ct_position = sum(row["image_count"] for row in rows[:ct_row])
    ct_image = read_dicom_image(images / "ct.dcm").image
    expected = processor.image_processor([ct_image], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"][ct_position], expected[0])

    out = tmp_path / "out"
    prepared.dataset.save_to_disk(str(out / "prepared"))
    (out / "summary.txt").write_text(prepared.summary())
    stdout, stderr = capfd.readouterr()
    assert not sentinel_hits(caplog.text, stdout, stderr, repr(rows), prepared.summary())
    assert not files_with_sentinel(tmp_path, skip=(images,))
    assert files_with_sentinel(images), "the inputs do hold the planted data, so the scan can find it"


def test_rendered_upload_returns_nothing_from_the_header_but_technical_attributes(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    for name, source in SOURCES.items():
        path = write_sentinel_dicom(tmp_path, name, source=source, burned_in_annotation="YES")
        result = read_dicom_image(path, window="full")
        assert set(result.attributes) <= {"Modality", "Body part", "View position", "Rows x columns", "Frames",
                                          "Frame shown", "Window"}
        assert not sentinel_hits(repr(result), str(result.image.info), str(result.warning), result.window)
        assert np.asarray(result.image).shape[2] == 3
    stdout, stderr = capfd.readouterr()
    assert not sentinel_hits(caplog.text, stdout, stderr)


def test_training_on_dicom_files_writes_no_patient_data(tmp_path, tiny_model_dir):
    table, images = write_dicom_table(tmp_path / "data", "csv", repeat=3)  # the recipe keeps the first 16 rows
    out, cache = tmp_path / "run", tmp_path / "hf-cache"
    result = run_cli(
        "train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(table), "--output_dir", str(out), env={"HF_DATASETS_CACHE": str(cache)},
    )
    assert (out / "merged").is_dir() and "15 rows kept; dropped 1: 1 truncated DICOM file" in result.stderr
    assert not sentinel_hits(result.stdout, result.stderr)
    assert not files_with_sentinel(tmp_path, skip=(images,))
