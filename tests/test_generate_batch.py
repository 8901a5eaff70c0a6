"""Batched generation (left padding) and side-by-side streaming, on the tiny model."""

from __future__ import annotations

import argparse
import threading

import pytest

from radiology.generate import (
    GenerationSettings,
    add_generation_arguments,
    build_batch_inputs,
    generate_batch,
    generate_text,
    load_for_generation,
    settings_from_args,
    stream_side_by_side,
)
from tests.fixtures import real_images

SETTINGS = GenerationSettings(max_new_tokens=16)
# Contexts of different lengths make the prompts differ in length, so the batch really pads.
CONTEXTS = [None, "fever", "a much longer clinical context: cough for three weeks, smoker", None, "trauma", "pain"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_for_generation(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    from radiology.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)
    return load_for_generation(str(folder), device="cpu")


@pytest.fixture(scope="module")
def images():
    return list(real_images().values())


def test_batch_pads_on_the_left(tiny, images):
    inputs = build_batch_inputs(tiny.processor, images, contexts=CONTEXTS)
    mask = inputs["attention_mask"]
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1, "the prompts should differ in length"
    assert mask[:, -1].all(), "every prompt must end in the last column"
    shortest = int(lengths.argmin())
    assert not mask[shortest, 0], "the shortest prompt is padded at the start"


def test_batched_greedy_equals_one_at_a_time(tiny, images):
    batched = generate_batch(tiny, images, settings=SETTINGS, contexts=CONTEXTS)
    single = [generate_text(tiny, image, settings=SETTINGS, context=c) for image, c in zip(images, CONTEXTS)]
    assert batched == single
    assert all(batched), "the tiny model should say something for every image"


def test_batch_input_errors(tiny, images):
    assert generate_batch(tiny, []) == []
    with pytest.raises(ValueError, match="2 contexts for 3 prompts"):
        generate_batch(tiny, images[:3], contexts=["a", "b"])


def test_side_by_side_streams_each_model_in_turn(tiny, other_tiny, images):
    image = images[1]
    items = list(stream_side_by_side([tiny, other_tiny], image, settings=SETTINGS))
    expected = [generate_text(tiny, image, settings=SETTINGS), generate_text(other_tiny, image, settings=SETTINGS)]
    assert items[-1] == expected
    assert expected[0] != expected[1], "two differently seeded models should answer differently"
    # The first model streams while the second is still empty; the first stays complete afterwards.
    first_done = items.index(next(i for i in items if i[1]))
    assert all(item[1] == "" for item in items[:first_done])
    assert all(item[0] == expected[0] for item in items[first_done:])
    assert len(items) > 2, "answers arrive in pieces, not whole"


def test_side_by_side_stop_skips_the_rest(tiny, other_tiny, images):
    stop = threading.Event()
    stream = stream_side_by_side([tiny, other_tiny], images[0], settings=SETTINGS, stop=stop)
    first = next(stream)
    stop.set()
    rest = list(stream)
    assert all(item[1] == "" for item in [first, *rest]), "the second model must not start after stop"
    full = generate_text(tiny, images[0], settings=SETTINGS)
    last = (rest or [first])[-1][0]
    assert len(last) < len(full), "the first model's answer is cut short"


def test_generation_flags_build_settings():
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser, max_new_tokens=128, seed=0)
    greedy = settings_from_args(parser.parse_args([]))
    assert (greedy.max_new_tokens, greedy.do_sample, greedy.seed) == (128, False, 0)
    sampled = settings_from_args(parser.parse_args(["--temperature", "0.7", "--seed", "3"]))
    assert (sampled.do_sample, sampled.temperature, sampled.seed) == (True, 0.7, 3)


# --------------------------------------------------------------------------- several images and a prior


@pytest.fixture(scope="module")
def plain_tiny(tiny_model_dir):
    return load_for_generation(str(tiny_model_dir), device="cpu", fast=False)


def test_a_study_of_several_images_and_a_prior_answers_as_plain_generate_does(tiny, plain_tiny):
    pictures = list(real_images().values())
    study, prior = pictures[:4], pictures[4]
    inputs = build_batch_inputs(tiny.processor, [study], priors=[prior])
    image_token = tiny.processor.tokenizer.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == 5 * tiny.processor.image_seq_length
    assert inputs["pixel_values"].shape[0] == 5
    settings = GenerationSettings(max_new_tokens=24)
    engine = generate_text(tiny, study, settings=settings, context="fever", prior=prior)
    plain = generate_text(plain_tiny, study, settings=settings, context="fever", prior=prior)
    assert engine == plain
    # The prior is part of the prompt: leaving it out, or putting it among the study, changes the prompt.
    without = build_batch_inputs(tiny.processor, [study])["input_ids"]
    assert without.shape[1] < inputs["input_ids"].shape[1]


def test_a_batch_mixes_single_images_and_studies_in_order(tiny):
    pictures = list(real_images().values())
    rows = [pictures[0], pictures[1:3], pictures[3]]
    batched = generate_batch(tiny, rows, settings=SETTINGS)
    one_by_one = [generate_text(tiny, row, settings=SETTINGS) for row in rows]
    assert batched == one_by_one
    with pytest.raises(ValueError, match="at least one"):
        generate_batch(tiny, [[]], settings=SETTINGS)


def test_paced_keeps_state_changes_and_the_last_item():
    from radiology.generate import SideBySideTexts, paced

    def items():
        yield SideBySideTexts([""], ["generating"], [0.0])
        for n in range(1, 200):
            yield SideBySideTexts(["x" * n], ["generating"], [0.0])
        yield SideBySideTexts(["x" * 200], ["done"], [0.1])

    passed = list(paced(items(), interval_s=60))
    assert [item.states for item in passed] == [["generating"], ["done"]]
    assert passed[-1] == ["x" * 200]
    everything = list(paced(items(), interval_s=0))
    assert len(everything) == 201
