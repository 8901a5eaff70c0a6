"""Collate stage: exactly which positions carry labels, on a real processed example."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor

from radiology.collate import IGNORE_INDEX, CaptionCollator, special_ids
from radiology.data import DEFAULT_INSTRUCTION
from radiology.generate import build_inputs
from tests.fixtures import encode, real_images

CAPTION = "Axial CT shows a nodule."


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def row(caption=CAPTION, image="ct_16bit"):
    return {"image": {"bytes": encode(real_images()[image]), "path": None}, "caption": caption, "image_id": "x"}


def test_labels_sit_exactly_on_the_caption_and_its_end_of_turn(processor):
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row()])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = processor.tokenizer
    caption_ids = tok(CAPTION, add_special_tokens=False)["input_ids"]
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    # Locate the answer independently: it follows the last "<start_of_turn>model\n".
    header = tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    start = max(i for i in range(len(ids)) if ids[i:i + len(header)] == header) + len(header)
    answer = caption_ids + [end_of_turn]
    assert ids[start:start + len(answer)] == answer
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labelled == list(range(start, start + len(answer)))
    assert [labels[i] for i in labelled] == answer
    # Everything else (bos, turn headers, instruction, image block, trailing newline) carries none.
    image_block = [i for i, t in enumerate(ids) if t in (tok.image_token_id, special_ids(processor).boi,
                                                         special_ids(processor).eoi)]
    assert len(image_block) == processor.image_seq_length + 2
    assert not set(image_block) & set(labelled)


def test_prompt_tokens_match_what_generation_feeds_the_model(processor):
    image = real_images()["mr_gray"]
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row(image="mr_gray")])
    prompt = build_inputs(processor, image, DEFAULT_INSTRUCTION)
    n = prompt["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == prompt["input_ids"][0].tolist()
    assert torch.allclose(batch["pixel_values"][0], prompt["pixel_values"][0])
    assert batch["token_type_ids"][0, :n].tolist() == prompt["token_type_ids"][0].tolist()


def test_batches_pad_on_the_right_without_labels(processor):
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row("Short."), row("A much longer caption " * 3)])
    short_len = int(batch["attention_mask"][0].sum())
    assert batch["attention_mask"][0, :short_len].all() and not batch["attention_mask"][0, short_len:].any()
    assert (batch["input_ids"][0, short_len:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short_len:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 2
    assert (batch["token_type_ids"] == (batch["input_ids"] == processor.tokenizer.image_token_id)).all()


def test_truncation_cuts_only_the_answer(processor):
    full = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row("word " * 40)])
    n_prompt = build_inputs(processor, real_images()["ct_16bit"], DEFAULT_INSTRUCTION)["input_ids"].shape[1]
    cut = CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=n_prompt + 5)([row("word " * 40)])
    assert cut["input_ids"].shape[1] == n_prompt + 5
    assert (cut["input_ids"][0] == processor.tokenizer.image_token_id).sum() == processor.image_seq_length
    assert (cut["labels"][0] != IGNORE_INDEX).sum() == 5
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : n_prompt + 5].tolist()


def test_max_length_inside_the_prompt_is_refused(processor):
    with pytest.raises(ValueError, match=r"max_length=8 is shorter than the prompt.*raise --max_length"):
        CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=8)([row()])


def test_special_token_text_in_a_caption_stays_text(processor):
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row("See <start_of_image> here.")])
    ids = batch["input_ids"][0]
    assert (ids == special_ids(processor).boi).sum() == 1  # only the real image block's


def test_special_ids_come_from_the_processor(processor):
    ids = special_ids(processor)
    tok = processor.tokenizer
    assert ids.image == tok.image_token_id and ids.pad == tok.pad_token_id
    assert tok.convert_ids_to_tokens([ids.boi, ids.eoi, ids.end_of_turn]) == [
        "<start_of_image>", "<end_of_image>", "<end_of_turn>"]


# --------------------------------------------------------------------------- several images and a prior


def study_row(caption=CAPTION, context="Follow-up of a nodule."):
    images = real_images()
    return {"image": [{"bytes": encode(images[name]), "path": None} for name in ("ct_16bit", "mr_gray", "rgb")],
            "prior": {"bytes": encode(images["palette"]), "path": None}, "caption": caption, "context": context,
            "image_id": "s"}


def test_a_study_with_a_prior_tokenizes_exactly_as_generation_feeds_the_model(processor):
    """Three images and a prior in one user turn: the collator's prompt ids, image token types and pixels
    equal what radiology.generate.build_inputs gives the model for the same study."""
    images = real_images()
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([study_row(), row()])
    prompt = build_inputs(processor, [images["ct_16bit"], images["mr_gray"], images["rgb"]], DEFAULT_INSTRUCTION,
                          "Follow-up of a nodule.", prior=images["palette"])
    n = prompt["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == prompt["input_ids"][0].tolist()
    assert batch["token_type_ids"][0, :n].tolist() == prompt["token_type_ids"][0].tolist()
    assert batch["pixel_values"].shape[0] == 4 + 1  # the study's prior and three images, then the second row's one
    assert torch.allclose(batch["pixel_values"][:4], prompt["pixel_values"])  # the prior first
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids.count(processor.tokenizer.image_token_id) == 4 * processor.image_seq_length
    assert ids.count(special_ids(processor).boi) == 4
    caption_ids = processor.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
    assert [label for label in labels if label != IGNORE_INDEX] == caption_ids + [special_ids(processor).end_of_turn]
    # The second row keeps its own one-image prompt in the mixed batch.
    alone = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row()])
    width = int(alone["attention_mask"][0].sum())
    assert batch["input_ids"][1, :width].tolist() == alone["input_ids"][0, :width].tolist()


def test_a_series_row_gives_one_image_block_per_sampled_slice(processor, tmp_path):
    from radiology.data import ImageOptions
    from radiology.series import load_series, render_series
    from tests.fixtures import write_sentinel_series

    folder = write_sentinel_series(tmp_path / "mr")
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION, images=ImageOptions(max_images=4))
    batch = collator([{"image": str(folder), "caption": CAPTION, "image_id": "x"}])
    slices = render_series(load_series(folder), [0, 2, 4, 6])  # 4 of 7, evenly, first and last
    prompt = build_inputs(processor, slices, DEFAULT_INSTRUCTION)
    n = prompt["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == prompt["input_ids"][0].tolist()
    assert torch.allclose(batch["pixel_values"], prompt["pixel_values"])


def test_max_length_is_checked_against_the_largest_study_before_training(processor):
    from datasets import Dataset

    from radiology.collate import PromptTooLongError
    from radiology.data import ImageOptions

    rows = Dataset.from_dict({"caption": ["Short.", "A longer caption of the largest study."],
                              "image_count": [1, 8], "prior": [None, None]})
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=64, images=ImageOptions(max_images=8))
    needed = collator.prompt_length(images=8)
    assert needed == build_inputs(processor, [real_images()["rgb"]] * 8, DEFAULT_INSTRUCTION)["input_ids"].shape[1]
    longest = len(processor.tokenizer("A longer caption of the largest study.", add_special_tokens=False)["input_ids"])
    with pytest.raises(PromptTooLongError) as refused:
        collator.check_max_length(rows)
    assert str(refused.value).startswith(f"8 images need {needed}+ tokens")
    assert (f"--max_length 64 is too short: raise it to at least {needed + longest + 1} (that prompt and the longest "
            "caption) or lower --max_images (now 8)") in str(refused.value)
    with_prior = Dataset.from_dict({"caption": ["x"], "image_count": [7], "prior": [b"an image"]})
    with pytest.raises(PromptTooLongError, match=r"^8 images \(a prior study's and the current study's\)"):
        collator.check_max_length(with_prior)
    CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=needed + 1).check_max_length(rows)  # fits: no error
    CaptionCollator(processor, DEFAULT_INSTRUCTION).check_max_length(rows)  # no --max_length: nothing to check
