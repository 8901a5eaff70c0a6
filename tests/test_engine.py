"""The decode engine (static cache, batched requests): same answers as plain generate, faster paths
only where they are exact. CUDA graphs themselves need a GPU (bench/generate_speed.py checks them
there); on the CPU the engine runs the same steps eagerly."""

from __future__ import annotations

import threading

import pytest
import torch

from radiology.engine import DecodeEngine
from radiology.generate import GenerationSettings, build_inputs, generate_batch, generate_text, load_for_generation
from tests.fixtures import real_images

IMAGES = list(real_images().values())[:4]
CONTEXTS = [None, "58-year-old smoker, cough for 3 weeks.", None, "Follow-up after lobectomy."]


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return load_for_generation(str(tiny_model_dir), fast=False)


@pytest.fixture()
def fast(tiny_model_dir):
    loaded = load_for_generation(str(tiny_model_dir))
    assert loaded.engine is not None
    return loaded


def test_greedy_answers_equal_plain_generate(plain, fast):
    settings = GenerationSettings(max_new_tokens=24)
    for image, context in zip(IMAGES, CONTEXTS):
        assert generate_text(fast, image, settings=settings, context=context) == \
            generate_text(plain, image, settings=settings, context=context)


def test_concurrent_requests_are_decoded_together_with_unchanged_answers(plain, fast):
    settings = GenerationSettings(max_new_tokens=24)
    expected = [generate_text(plain, image, settings=settings, context=c) for image, c in zip(IMAGES, CONTEXTS)]
    prompts = [build_inputs(fast.processor, image, context=c) for image, c in zip(IMAGES, CONTEXTS)]
    widths = {p["input_ids"].shape[1] for p in prompts}
    assert len(widths) > 1, "prompts of different lengths: the batch must pad"
    ids = fast.engine.generate_many(prompts, settings)
    assert [fast.processor.decode(row, skip_special_tokens=True).strip() for row in ids] == expected
    assert fast.engine.batch_sizes[4] == 1, f"one batch of four, got {dict(fast.engine.batch_sizes)}"
    assert generate_batch(fast, IMAGES, settings=settings, contexts=CONTEXTS) == expected


def test_threads_streaming_at_once_each_get_their_own_answer(plain, fast):
    settings = GenerationSettings(max_new_tokens=16)
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        text = ""
        for text in fast.engine.stream(build_inputs(fast.processor, IMAGES[i]), settings):
            pass
        results[i] = text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == [generate_text(plain, image, settings=settings) for image in IMAGES]


def test_stop_ends_generation_at_the_next_token(fast, monkeypatch):
    monkeypatch.setattr(fast, "stop_token_ids", [])  # the random model must not end on its own
    stop = threading.Event()
    settings = GenerationSettings(max_new_tokens=400, do_sample=True, seed=1)
    stream = fast.engine.stream(build_inputs(fast.processor, IMAGES[0]), settings, stop)
    next(stream)
    stop.set()
    rest = list(stream)
    produced = len(fast.processor.tokenizer((rest or [""])[-1], add_special_tokens=False)["input_ids"])
    assert produced < 100


def test_seeded_sampling_repeats_and_seeds_differ(fast):
    inputs = build_inputs(fast.processor, IMAGES[0])
    first = fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=20, do_sample=True, seed=5))
    again = fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=20, do_sample=True, seed=5))
    other = fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=20, do_sample=True, seed=6))
    assert first == again and first != other


def test_image_placeholders_are_never_generated(fast, monkeypatch):
    ids = fast.engine.generate_ids(build_inputs(fast.processor, IMAGES[1]),
                                   GenerationSettings(max_new_tokens=60, do_sample=True, temperature=3.0, seed=0))
    tok = fast.processor.tokenizer
    assert tok.image_token_id not in ids and tok.convert_tokens_to_ids(tok.boi_token) not in ids


def test_prompts_longer_than_the_cache_fall_back_to_plain_generate(plain, tiny_model_dir):
    loaded = load_for_generation(str(tiny_model_dir))
    loaded.engine = DecodeEngine(loaded, max_len=32)  # shorter than any prompt with an image
    settings = GenerationSettings(max_new_tokens=12)
    assert not loaded.engine.fits(build_inputs(loaded.processor, IMAGES[0])["input_ids"].shape[1])
    assert generate_text(loaded, IMAGES[0], settings=settings) == generate_text(plain, IMAGES[0], settings=settings)
    assert not loaded.engine.batch_sizes


def test_a_failing_request_reaches_its_caller_and_the_engine_keeps_serving(fast, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    inputs = build_inputs(fast.processor, IMAGES[0])
    with monkeypatch.context() as patch:
        patch.setattr(fast.model, "forward", broken)
        with pytest.raises(RuntimeError, match="simulated failure"):
            fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=4))
    assert fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=4))


def test_warm_up_serves_every_batch_size(fast):
    seconds = fast.engine.warm_up(build_inputs(fast.processor, IMAGES[0]), GenerationSettings(max_new_tokens=2))
    assert seconds > 0 and {1, 2, 4} <= set(fast.engine.batch_sizes)
    assert torch.is_inference_mode_enabled() is False


def test_close_ends_the_worker_and_a_new_request_restarts_it(fast):
    inputs = build_inputs(fast.processor, IMAGES[0])
    fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=2))
    worker = fast.engine._worker
    fast.engine.close()
    assert not worker.is_alive()
    assert fast.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=2))
