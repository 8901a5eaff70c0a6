"""The decode engine past Gemma 3's sliding window: several images per prompt, answers that cross
the window, batches of prompts of different lengths, both attention implementations. The tiny model
gets a 64-token window here (its prompts are ~100 tokens with one image), so that every prompt
already passes it and each answer crosses it again and again; greedy answers must equal plain
`model.generate`'s, which keeps its own sliding cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from transformers import Gemma3TextConfig

from radiology.data import DEFAULT_INSTRUCTION, decode_image
from radiology.engine import DecodeEngine, static_cache_bytes
from radiology.generate import GenerationSettings, load_for_generation
from radiology.tokens import never_generated, special_ids
from tests.fixtures import real_images

WINDOW = 64
IMAGES = [decode_image(image) for image in real_images().values()]


@pytest.fixture(scope="module")
def window_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("window64") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["sliding_window"] = WINDOW
    config["text_config"]["max_position_embeddings"] = 2048  # below the engine's default cap of 8192
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _load(window_dir, attn_implementation: str, dtype: torch.dtype = torch.bfloat16):
    loaded = load_for_generation(str(window_dir), attn_implementation=attn_implementation, fast=False)
    assert loaded.model.config.get_text_config()._attn_implementation == attn_implementation
    loaded.model.to(dtype)
    loaded.stop_token_ids = []  # every answer runs to max_new_tokens, far past the window
    return loaded


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def loaded(request, window_dir):
    """The tiny model in bf16, as served."""
    model = _load(window_dir, request.param)
    yield model
    model.close()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def loaded32(request, window_dir):
    """The same weights in float32: see the batch test for why."""
    model = _load(window_dir, request.param, torch.float32)
    yield model
    model.close()


@pytest.fixture(scope="module")
def window_model(window_dir):
    model = _load(window_dir, "sdpa")
    yield model
    model.close()


def several_images(processor, count: int, context: str | None = None) -> dict[str, torch.Tensor]:
    """One prompt with ``count`` images: the chat template renders one image block per image item."""
    text = DEFAULT_INSTRUCTION if context is None else f"{DEFAULT_INSTRUCTION}\n\nClinical context: {context}"
    content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    return processor(text=[prompt], images=[[IMAGES[i % len(IMAGES)] for i in range(count)]], return_tensors="pt",
                     add_special_tokens=False)


def plain_generate(loaded, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy new ids and their logits (steps, vocab) from plain generate, which keeps a dynamic cache
    with its own sliding layers; pixels in bf16 as radiology.generate and the engine pass them."""
    moved = {k: v.to(loaded.model.device) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        out = loaded.model.generate(**moved, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[],
                                    pad_token_id=special_ids(loaded.processor).pad,
                                    suppress_tokens=never_generated(loaded.processor),
                                    output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.cat(out.logits).float()


def engine_for(loaded, **options) -> DecodeEngine:
    engine = DecodeEngine(loaded, **options)
    assert not engine.use_graphs, "on the CPU the step runs eagerly (the GPU test below replays graphs)"
    return engine


def record_logits(engine: DecodeEngine, monkeypatch) -> list[torch.Tensor]:
    """The logits (batch, vocab) from which the engine picks each step's tokens."""
    steps: list[torch.Tensor] = []
    choose = engine._choose

    def recording(logits, requests, generators):
        steps.append(logits.clone())
        return choose(logits, requests, generators)

    monkeypatch.setattr(engine, "_choose", recording)
    return steps


def test_a_prompt_of_several_images_past_the_window_and_its_long_answer_equal_plain_generate(loaded):
    inputs = several_images(loaded.processor, 4)
    assert inputs["input_ids"].shape[1] > WINDOW and inputs["pixel_values"].shape[0] == 4
    settings = GenerationSettings(max_new_tokens=3 * WINDOW)
    engine = engine_for(loaded)
    try:
        assert engine.generate_ids(inputs, settings) == plain_generate(loaded, inputs, settings.max_new_tokens)[0]
    finally:
        engine.close()


def test_a_batch_of_prompts_of_different_lengths_equals_plain_generate_row_by_row(loaded32, monkeypatch):
    """In float32, so that greedy equality means what it says. In bf16 the engine's attention over its
    512-slot cache sums in another order than plain generate's over its trimmed window: the logits
    differ by up to one bf16 step (2**-9 near 0.4), and the second prompt here meets a near-tie at its
    17th token (0.4355 against 0.4336 in plain generate, an exact tie in the engine), where argmax
    flips. In float32 the engine's logits stay within 1e-3 of plain generate's at every step; without
    the sliding layers' window they differ by 0.14 or more and the tokens part by the 17th."""
    prompts = [several_images(loaded32.processor, 1),
               several_images(loaded32.processor, 3, "Follow-up after lobectomy."),
               several_images(loaded32.processor, 2), several_images(loaded32.processor, 5)]
    widths = [p["input_ids"].shape[1] for p in prompts]
    assert len(set(widths)) == 4 and min(widths) > WINDOW, "left padding, every prompt past the window"
    settings = GenerationSettings(max_new_tokens=2 * WINDOW + 7)
    # Small caches so that the batch takes a longer one than the first: 128, 256, 512.
    engine = engine_for(loaded32, min_len=128, max_len=512, batch_wait_s=2.0)
    steps = record_logits(engine, monkeypatch)
    try:
        answers = engine.generate_many(prompts, settings)
        assert dict(engine.batch_sizes) == {4: 1}, "one batch of four"
        assert list(engine._slots) == [(4, 512)], "widest prompt + answer > 256: the 512 cache"
    finally:
        engine.close()
    for row, prompt in enumerate(prompts):
        ids, logits = plain_generate(loaded32, prompt, settings.max_new_tokens)
        assert answers[row] == ids
        ours = torch.stack([step[row] for step in steps])
        assert (ours - logits).abs().max() < 1e-3


def test_long_caches_are_made_when_needed_and_dropped_to_stay_within_the_budget(window_model):
    engine = engine_for(window_model, min_len=128, max_len=512, max_batch=2)
    assert engine.cache_lengths == [128, 256, 512]
    assert [engine._length_bucket(n) for n in (1, 128, 129, 256, 300, 512)] == [128, 128, 256, 256, 512, 512]
    assert engine.long_cache_budget == engine.cache_bytes(2, 512) == 2 * engine.cache_bytes(1, 512)
    for key in [(1, 128), (2, 128), (1, 256), (1, 512), (1, 256)]:
        engine._slot(*key)
    assert list(engine._slots) == [(1, 128), (2, 128), (1, 512), (1, 256)], "least recently used first"
    engine._slot(2, 512)  # takes the whole budget: the other long caches go, the first-length ones stay
    assert list(engine._slots) == [(1, 128), (2, 128), (2, 512)]
    engine._slot(1, 256)
    assert list(engine._slots) == [(1, 128), (2, 128), (1, 256)]
    # A request past the first length runs in such a cache, whole.
    inputs = several_images(window_model.processor, 1)
    answer = 256 - inputs["input_ids"].shape[1]
    assert len(engine.generate_ids(inputs, GenerationSettings(max_new_tokens=answer))) == answer
    assert list(engine._slots)[-1] == (1, 256)
    engine.close()


def test_the_cache_size_of_gemma3_4b_at_8192_positions_and_batch_4():
    config = Gemma3TextConfig(num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                              hidden_size=2560)
    assert static_cache_bytes(config, 4, 8192) == 34 * 2 * 4 * 4 * 8192 * 256 * 2 == int(4.25 * 2**30)
    assert static_cache_bytes(config, 1, 1) == 136 * 2**10


def test_the_cache_is_capped_at_max_position_embeddings_and_max_len(window_model):
    positions = window_model.model.config.get_text_config().max_position_embeddings
    default = engine_for(window_model)
    assert default.max_len == min(8192, positions) and default.cache_lengths == [1024, 2048][:len(default.cache_lengths)]
    engine = engine_for(window_model, max_len=300)
    assert engine.cache_lengths == [300] and engine.fits(200, 100) and not engine.fits(200, 101)
    with pytest.raises(ValueError, match="raise the engine's max_len"):
        engine.generate_ids(several_images(window_model.processor, 1), GenerationSettings(max_new_tokens=300))
    with pytest.raises(ValueError, match="min_len=0"):
        engine_for(window_model, min_len=0)


@pytest.mark.gpu
def test_graph_replay_equals_the_eager_step_past_the_window_on_a_gpu(window_dir):
    """The captured decode step (its sliding mask rebuilt from buffers on every replay) gives the
    same tokens as the same step run eagerly, for a long prompt and an answer across the window."""
    loaded = load_for_generation(str(window_dir), device="cuda", fast=False)
    loaded.stop_token_ids = []
    graphs, eager = DecodeEngine(loaded, min_len=128, use_graphs=True), DecodeEngine(loaded, min_len=128,
                                                                                   use_graphs=False)
    try:
        prompts = [several_images(loaded.processor, 6), several_images(loaded.processor, 2)]
        settings = GenerationSettings(max_new_tokens=3 * WINDOW)
        assert graphs.generate_many(prompts, settings) == eager.generate_many(prompts, settings)
        assert graphs.generate_ids(prompts[0], settings) == eager.generate_ids(prompts[0], settings)
        assert all(slot.graph is not None for slot in graphs._slots.values())
        assert set(graphs._slots) == {(2, 512), (1, 512)}, "prompt + answer past the first two caches"
    finally:
        graphs.close()
        eager.close()
        loaded.close()
