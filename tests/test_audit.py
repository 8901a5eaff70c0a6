"""The audit command on data with planted problems: it finds each one and nothing else, and writes a
self-contained, escaped report and a JSON file without image content or captions."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset, Image as ImageFeature

from radiology.audit import audit_splits, main, render_report
from radiology.data import load_caption_splits
from tests.conftest import run_cli
from tests.fixtures import AUDIT_CAPTIONS, distinct_images, encode

# Clean fixture images measure 47 or more, the blurred copy about 2 (see test_quality.py).
MIN_SHARPNESS = "20"


@pytest.fixture(scope="module")
def audit_run(audit_data, tmp_path_factory):
    """One audit CLI run over both splits, with a blur threshold; returns (output folder, stdout)."""
    folder, _ = audit_data
    out = tmp_path_factory.mktemp("audit_out")
    result = run_cli("-m", "radiology.audit", "--dataset_name", str(folder), "--output_dir", str(out),
                     "--min_sharpness", MIN_SHARPNESS)
    return out, result.stdout


def flagged(report: dict) -> dict[tuple[str, str], set[str]]:
    return {(row["split"], row["image_id"]): set(row["reasons"]) for row in report["rows"] if row["reasons"]}


def test_audit_finds_each_planted_problem_and_nothing_else(audit_run, audit_data):
    out, _ = audit_run
    report = json.loads((out / "audit.json").read_text())
    assert flagged(report) == audit_data[1]
    assert report["summary"]["train"]["rows"] == 12 and report["summary"]["test"]["rows"] == 3


def test_audit_json_names_the_groups_and_the_training_flags(audit_run):
    out, stdout = audit_run
    report = json.loads((out / "audit.json").read_text())
    assert report["duplicate_images"]["train"] == [["mr", "duplicate"], ["mr_overlay", "blurred"]]
    assert report["duplicate_captions"]["train"] == [["mr", "duplicate"]]
    assert [(leak["a"]["image_id"], leak["b"]["image_id"]) for leak in report["leakage"]] == [("leaked", "test_leaked")]
    assert report["train_flags"] == ["--min_sharpness", MIN_SHARPNESS, "--drop_duplicates", "--drop_images_in_split",
                                     "test"]
    assert "--drop_duplicates --drop_images_in_split test" in stdout
    assert report["summary"]["train"]["modes"] == {"L": 6, "I;16": 2, "RGB": 2, "P": 1}
    widths = {row["image_id"]: (row["width"], row["height"]) for row in report["rows"]}
    assert widths["mr"] == (64, 64) and widths["us"] == (320, 240) and widths["broken"] == (None, None)


def test_audit_json_holds_no_caption_text(audit_run):
    text = (audit_run[0] / "audit.json").read_text()
    assert not any(caption[:30] in text for caption in AUDIT_CAPTIONS)


def test_report_is_one_self_contained_page(audit_run):
    page = (audit_run[0] / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/jpeg;base64,") for src in sources)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    assert "<link" not in page and "<script" not in page
    assert page.count("<svg") == 8  # four histograms for each of the two splits
    for expected in ("Images in more than one split", "near-duplicate images", "duplicate captions",
                     "unreadable images", "empty captions", "blurry images", "Blurriest images"):
        assert expected in page


def test_without_a_threshold_the_blurred_copy_is_shown_first_but_not_flagged(audit_data):
    folder, _ = audit_data
    result = audit_splits(load_caption_splits(str(folder)))
    train = result.splits["train"]
    assert train.rows[train.blurriest[0]].image_id == "blurred"
    assert len(train.blurriest) == 11  # every readable image, up to 12; the broken one is not among them
    assert not any("blurry image" in row.reasons for row in result.flagged())


def test_report_escapes_dataset_text():
    image = encode(distinct_images()["mr"])
    hostile = '<script>alert("x")</script> Shows a <b>mass</b>.'
    rows = [{"image": image, "image_id": f'<img src=x onerror="y">{i}', "caption": hostile} for i in range(2)]
    dataset = Dataset.from_list(rows).cast_column("image", ImageFeature())
    page = render_report(audit_splits({"train": dataset}, dataset_name="<i>name</i>"))
    assert "<script>" not in page and "<b>mass" not in page and "<i>name" not in page
    assert "onerror=" not in page.replace("onerror=&quot;", "")  # only ever inside escaped text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;i&gt;name&lt;/i&gt;" in page


def test_one_split_audit_says_leakage_is_not_checked(audit_data, tmp_path, capsys):
    assert main(["--dataset_name", str(audit_data[0]), "--split", "test", "--output_dir", str(tmp_path)]) == 0
    assert "leakage not checked" in capsys.readouterr().out
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["splits"] == ["test"] and flagged(report) == {}


@pytest.mark.parametrize(
    ("options", "messages"),
    [
        (["--split", "validation"], ["split 'validation' not found", "splits found: test, train"]),
        (["--caption_column", "text"], ["column 'text' not found", "--caption_column"]),
        (["--near_duplicate_distance", "40"], ["--near_duplicate_distance must be 0-16"]),
        (["--max_samples", "0"], ["--max_samples must be at least 1"]),
    ],
)
def test_audit_errors_name_the_problem_and_the_fix(audit_data, tmp_path, capsys, options, messages):
    assert main(["--dataset_name", str(audit_data[0]), "--output_dir", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(message in err for message in messages)
    assert not (tmp_path / "report.html").exists()


def test_an_empty_split_gives_an_empty_report_not_a_crash():
    empty = Dataset.from_dict({"image": [], "caption": []}).cast_column("image", ImageFeature())
    result = audit_splits({"train": empty})
    assert result.to_json()["summary"]["train"]["rows"] == 0 and result.flagged() == []
    assert "no readable images" in render_report(result)


# --------------------------------------------------------------------------- several images per row


def test_audit_of_studies_counts_images_per_row_and_checks_every_image(tmp_path):
    """Rows of 2-4 images, priors and a real DICOM series with planted patient data: the audit reads each row
    as training does, counts images per row and series sizes, flags a row for any one bad image, and writes
    nothing of the patient data."""
    from tests.fixtures import files_with_sentinel, sentinel_hits, write_study_dataset

    data = write_study_dataset(tmp_path / "studies")
    extra = [
        {"study": "missing_view", "images": ["images/ct.png", "images/gone.png"], "prior": None,
         "caption": "Two views, one of them lost."},
        {"study": "broken_view", "images": ["images/mr.png", "broken.png"], "prior": None,
         "caption": "Two views, one of them damaged."},
    ]
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    with (data / "train.jsonl").open("a") as handle:
        handle.write("\n".join(json.dumps(row) for row in extra) + "\n")
    out = tmp_path / "audit"
    result = run_cli("-m", "radiology.audit", "--dataset_name", str(data), "--images_column", "images",
                     "--prior_image_column", "prior", "--id_column", "study", "--output_dir", str(out))
    report = json.loads((out / "audit.json").read_text())
    train = report["summary"]["train"]
    assert train["images_per_row"] == {"2": 2, "3": 1, "4": 2, "7": 1}  # readable rows only
    assert train["rows_with_prior"] == 3 and train["series"]["count"] == 1 and train["series"]["slices"]["max"] == 7
    assert train["images"] == 2 + 7 + 4 + 2 + 3 + 4 + 3  # every image of every readable row, priors included
    reasons = {(row["split"], row["image_id"]): row["reasons"] for row in report["rows"]}
    assert reasons[("train", "missing_view")][0] == "file not found"
    assert reasons[("train", "broken_view")][0] == "unreadable image"
    series_row = next(row for row in report["rows"] if row["image_id"] == "study_1" and row["split"] == "train")
    assert (series_row["images"], series_row["prior"], series_row["series_slices"]) == (7, False, [7])
    assert (series_row["width"], series_row["height"]) == (16, 16)
    assert "train: images per row: 2 (2 rows), 3 (1 rows), 4 (2 rows), 7 (1 rows); 3 rows with a prior study; " \
           "1 DICOM series" in result.stdout
    page = (out / "report.html").read_text()
    assert "images per row (current study)" in page and "DICOM series size (slices)" in page
    assert "files not found" in page and "(image 1 of 2)" in page
    assert not sentinel_hits(result.stdout, result.stderr)
    assert not files_with_sentinel(out)
