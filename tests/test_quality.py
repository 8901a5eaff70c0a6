"""Quality measures and the training filters: each filter removes exactly its planted problem, and
train.py applies them (with clinical context) from the command line."""

from __future__ import annotations

import itertools
from collections import Counter
from unittest.mock import patch

import pytest
from datasets import Dataset
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageFilter

from radiology import quality
from radiology.config import parse_args
from radiology.data import (
    DatasetError,
    canonical_columns,
    load_caption_dataset,
    load_caption_splits,
    prepare_caption_dataset,
)
from radiology.quality import (
    MeasuredImages,
    QualityThresholds,
    duplicate_groups,
    filter_training_rows,
    measure_image,
    measure_images,
    perceptual_hash,
    sharpness,
)
from tests.conftest import run_cli
from tests.fixtures import distinct_images, encode

CLEAN_TRAIN = ["ct", "mr", "us", "mr_overlay", "us_palette", "ct_flipped", "mr_rotated"]


def distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


# --------------------------------------------------------------------------- measures


def test_blur_lowers_sharpness_and_barely_moves_the_hash():
    for name, picture in distinct_images().items():
        rgb = picture.convert("RGB")
        blurred = rgb.filter(ImageFilter.GaussianBlur(3))
        assert sharpness(blurred) < sharpness(rgb) / 5, name
        assert distance(perceptual_hash(blurred), perceptual_hash(rgb)) <= quality.DEFAULT_NEAR_DUPLICATE_DISTANCE, name


def test_distinct_pictures_are_far_apart_in_hash():
    hashes = {name: perceptual_hash(p.convert("RGB")) for name, p in distinct_images().items()}
    closest = min(distance(hashes[a], hashes[b]) for a, b in itertools.combinations(hashes, 2))
    assert closest > 2 * quality.DEFAULT_NEAR_DUPLICATE_DISTANCE


def test_measure_reports_the_stored_mode_and_the_upright_size():
    pictures = distinct_images()
    ct = measure_image({"bytes": encode(pictures["ct"]), "path": None})
    assert (ct.width, ct.height, ct.mode) == (128, 128, "I;16")
    us = measure_image(pictures["us_palette"])
    assert (us.width, us.height, us.mode) == (800, 350, "P")


def test_sharpness_does_not_fall_as_a_large_scan_gets_larger():
    # Large scans are measured at 512 px a side: a 2x and a 3x enlargement of one picture score alike,
    # where the plain Laplacian variance would fall with every enlargement.
    for name in ("us_palette", "mr_overlay", "us"):
        picture = distinct_images()[name].convert("RGB")
        twice, thrice = (picture.resize((picture.width * f, picture.height * f), Image.LANCZOS) for f in (2, 3))
        assert sharpness(thrice) == pytest.approx(sharpness(twice), rel=0.1), name


@settings(max_examples=40, deadline=None)
@given(
    hashes=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40),
    seeds=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 63)), max_size=30),
    max_distance=st.integers(0, 8),
)
def test_pair_search_matches_a_brute_force_count(hashes, seeds, max_distance):
    # Near copies (one bit flipped) make close pairs likely; tiny blocks make the search cross block edges.
    hashes = hashes + [hashes[i % len(hashes)] ^ (1 << bit) for i, bit in seeds]
    measured = MeasuredImages(error=[None] * len(hashes), width=[1] * len(hashes), height=[1] * len(hashes),
                              mode=["L"] * len(hashes), sharpness=[1.0] * len(hashes), phash=hashes)
    with patch.object(quality, "_BLOCK_COMPARISONS", 7):
        found = {(i, j) for i, j, _ in quality.shared_images(measured, measured, max_distance)}
    expected = {(i, j) for i in range(len(hashes)) for j in range(len(hashes))
                if distance(hashes[i], hashes[j]) <= max_distance}
    assert found == expected


def test_duplicate_groups_keep_the_first_row_and_join_chains():
    # 0 ~ 1 (3 bits) and 1 ~ 3 (3 bits), though 0 and 3 are 6 bits apart: one picture.
    # 2 and 4 stand alone; 5 did not decode.
    hashes = [0b0, 0b111, 2**64 - 1, 0b111111, 0x5555_5555_5555_5555, None]
    measured = MeasuredImages(error=[None] * 5 + ["broken"], width=[9] * 6, height=[9] * 6, mode=["L"] * 6,
                              sharpness=[1.0, 99.0, 1.0, 1.0, 1.0, None], phash=hashes)
    assert duplicate_groups(measured, range(6), max_distance=3) == [[0, 1, 3]]
    assert duplicate_groups(measured, [1, 3, 4], max_distance=3) == [[1, 3]]
    assert duplicate_groups(measured, range(6), max_distance=1) == []


def test_thresholds_refuse_impossible_limits():
    with pytest.raises(ValueError, match="--min_image_side must be at least 1"):
        QualityThresholds(min_image_side=0)
    with pytest.raises(ValueError, match="--min_sharpness must be 0 or more"):
        QualityThresholds(min_sharpness=-1)
    with pytest.raises(ValueError, match="--near_duplicate_distance must be 0-16"):
        QualityThresholds(near_duplicate_distance=20)


# --------------------------------------------------------------------------- filters


@pytest.fixture(scope="module")
def planted(audit_data):
    folder, _ = audit_data
    prepared = prepare_caption_dataset(load_caption_dataset(str(folder), "train"))
    held_out = {"test": measure_images(load_caption_dataset(str(folder), "test"))}
    return prepared, held_out


def test_validation_drops_the_broken_image_and_the_empty_caption(planted):
    prepared, _ = planted
    assert prepared.dropped == {"unreadable image": 1, "empty caption": 1}
    assert "broken" not in prepared.dataset["image_id"] and "no_caption" not in prepared.dataset["image_id"]


@pytest.mark.parametrize(
    ("options", "removed"),
    [
        ({"thresholds": QualityThresholds(min_sharpness=20)}, {"blurry image": ["blurred"]}),
        # The blurred copy is also a near-duplicate of mr_overlay, which comes first and stays.
        ({"drop_duplicates": True}, {"duplicate image": ["blurred", "duplicate"]}),
        ({"held_out": "test"}, {"image also in test split": ["leaked"]}),
        ({"thresholds": QualityThresholds(min_image_side=100)}, {"small image": ["mr", "mr_rotated", "duplicate"]}),
        (
            {"thresholds": QualityThresholds(min_sharpness=20), "drop_duplicates": True, "held_out": "test"},
            {"blurry image": ["blurred"], "duplicate image": ["duplicate"], "image also in test split": ["leaked"]},
        ),
    ],
)
def test_each_filter_removes_exactly_its_rows(planted, options, removed):
    prepared, held_out = planted
    result = filter_training_rows(
        prepared,
        options.get("thresholds", QualityThresholds()),
        drop_duplicates=options.get("drop_duplicates", False),
        held_out=held_out if options.get("held_out") else None,
    )
    gone = [i for i in prepared.dataset["image_id"] if i not in result.dataset["image_id"]]
    assert sorted(gone) == sorted(i for ids in removed.values() for i in ids)
    assert result.dropped == Counter({"unreadable image": 1, "empty caption": 1,
                                      **{reason: len(ids) for reason, ids in removed.items()}})


def test_all_filters_together_leave_only_the_clean_rows(planted):
    prepared, held_out = planted
    result = filter_training_rows(prepared, QualityThresholds(min_sharpness=20), drop_duplicates=True,
                                  held_out=held_out)
    assert result.dataset["image_id"] == CLEAN_TRAIN


def test_short_captions_go_by_word_count(planted):
    prepared, _ = planted
    words = dict(zip(prepared.dataset["image_id"], (len(c.split()) for c in prepared.dataset["caption"])))
    limit = sorted(words.values())[len(words) // 2]  # drops some rows, keeps others
    result = filter_training_rows(prepared, QualityThresholds(min_caption_words=limit))
    assert set(result.dataset["image_id"]) == {i for i, n in words.items() if n >= limit}
    assert 0 < len(result.dataset) < len(prepared.dataset)


def test_filters_that_leave_nothing_say_what_to_relax(planted):
    prepared, _ = planted
    with pytest.raises(DatasetError, match="no rows left after the quality filters.*--min_sharpness"):
        filter_training_rows(prepared, QualityThresholds(min_sharpness=1e9))


def test_config_refuses_to_hold_out_the_training_split_itself():
    with pytest.raises(ValueError, match="names the training split 'train' itself"):
        parse_args(["--config", "recipes/tiny-cpu.yaml", "--drop_images_in_split", "train"])


def test_held_out_split_needs_a_dataset_with_splits(tmp_path, audit_data, tiny_model_dir):
    from radiology.training import load_training_data

    single = tmp_path / "train.parquet"
    load_caption_splits(str(audit_data[0]), splits=["train"])["train"].to_parquet(str(single))
    script_args, training_args, _ = parse_args([
        "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(single), "--output_dir", str(tmp_path / "out"), "--drop_images_in_split", "test",
    ])
    with pytest.raises(DatasetError, match="needs a dataset with several splits.*single file"):
        load_training_data(script_args, training_args)


def test_train_cli_applies_the_filters_and_trains_with_context(audit_data, tiny_model_dir, tmp_path):
    result = run_cli(
        "train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(audit_data[0]), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "1", "--save_strategy", "no", "--merge", "false",
        "--min_sharpness", "20", "--drop_duplicates", "--drop_images_in_split", "test",
        "--context_column", "history",
    )
    log = result.stderr
    assert "Quality filters dropped 3 rows: 1 blurry image, 1 duplicate image, 1 image also in test split" in log
    assert ("7 rows kept; dropped 5: 1 blurry image, 1 duplicate image, 1 empty caption, "
            "1 image also in test split, 1 unreadable image") in log
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- several images per row


def test_a_missing_file_is_counted_as_file_not_found(tmp_path):
    pictures = distinct_images()
    rows = []
    for name in ("ct", "mr", "us"):
        (tmp_path / f"{name}.png").write_bytes(encode(pictures[name]))
        rows.append({"image": str(tmp_path / f"{name}.png"), "caption": f"A {name} image of the chest."})
    prepared = prepare_caption_dataset(Dataset.from_list(rows))
    (tmp_path / "mr.png").unlink()  # gone between validation and the filters
    result = filter_training_rows(prepared, QualityThresholds(min_sharpness=0))
    assert result.dropped == {"file not found": 1}
    assert result.dataset["image_id"] == ["0", "2"]


def study_rows(pictures, studies):
    return [{"image": [encode(pictures[name]) if isinstance(name, str) else name for name in names],
             "caption": f"Study {i} shows a finding.", "image_id": f"s{i}"} for i, names in enumerate(studies)]


def test_every_image_of_a_row_is_checked():
    pictures = distinct_images()
    blurred = encode(pictures["mr_overlay"].filter(ImageFilter.GaussianBlur(3)))
    copy = encode(pictures["mr"].convert("RGB"), "JPEG")
    studies = [
        ["ct", "mr"],
        ["us", blurred],  # its second image is blurry
        ["us_palette", copy],  # its second image is the first study's second one, re-encoded
        ["ct_rotated", "ct_rotated"],  # two copies within one row are not a duplicate row
        ["mr_overlay_rotated", b"\x89PNG\r\n\x1a\n broken"],  # one unreadable image makes the row unreadable
    ]
    dataset = Dataset.from_list(study_rows(pictures, studies))
    prepared = prepare_caption_dataset(dataset, images_column="image")
    assert prepared.dropped == {"unreadable image": 1}
    measured = measure_images(prepared.dataset)
    assert measured.row == [0, 0, 1, 1, 2, 2, 3, 3] and len(measured) == 4
    assert duplicate_groups(measured, range(4), quality.DEFAULT_NEAR_DUPLICATE_DISTANCE) == [[0, 2]]
    result = filter_training_rows(prepared, QualityThresholds(min_sharpness=20), drop_duplicates=True)
    gone = [i for i in prepared.dataset["image_id"] if i not in result.dataset["image_id"]]
    assert gone == ["s1", "s2"]
    assert result.dropped == Counter({"unreadable image": 1, "blurry image": 1, "duplicate image": 1})


def test_a_study_sharing_one_image_with_a_held_out_study_is_dropped():
    pictures = distinct_images()
    train = prepare_caption_dataset(Dataset.from_list(study_rows(pictures, [["ct", "mr"], ["us", "us_palette"]])),
                                    images_column="image")
    test = Dataset.from_list(study_rows(pictures, [["mr_rotated", encode(pictures["us_palette"], "PNG")]]))
    held_out = {"test": measure_images(canonical_columns(test, images_column="image"))}
    result = filter_training_rows(train, QualityThresholds(), held_out=held_out)
    assert result.dataset["image_id"] == ["s0"] and result.dropped == {"image also in test split": 1}
