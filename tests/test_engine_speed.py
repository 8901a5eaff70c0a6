"""The decode engine's speed options (radiology.engine: compile_step, decode_attention="filled",
choose_in_graph, compile_vision): each keeps greedy answers those of plain generate, past the sliding
window and in batches of prompts of different lengths; sampling inside the graph is reproducible from
its seed and draws from the distribution temperature, top-k and top-p leave.

Greedy equality is checked in float32, as in test_engine_long.py: in bf16 the tiny random model meets
exact ties between its top logits (one bf16 step apart or equal), where any change in the order of a
sum (a fused kernel, an attention over fewer slots) may flip argmax. In float32 the options' logits
stay within 1e-3 of plain generate's. torch.compile runs inductor on the CPU here (gcc); CUDA graphs
are checked by the GPU tests at the end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from radiology.engine import DecodeEngine, _choose_on_device, uniform_noise
from radiology.generate import GenerationSettings, load_for_generation
from tests.test_engine_long import plain_generate, several_images

WINDOW = 64


@pytest.fixture(scope="module")
def window_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 64-token window: every prompt passes it (see test_engine_long.py)."""
    folder = tmp_path_factory.mktemp("window64-speed") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["sliding_window"] = WINDOW
    config["text_config"]["max_position_embeddings"] = 2048
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def loaded32(window_dir):
    loaded = load_for_generation(str(window_dir), fast=False)
    loaded.model.to(torch.float32)
    loaded.stop_token_ids = []  # every answer runs to max_new_tokens, far past the window
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def prompts(loaded32):
    """Four prompts of different widths (1, 3, 2 and 5 images), all past the window."""
    made = [several_images(loaded32.processor, 1), several_images(loaded32.processor, 3, "Follow-up after lobectomy."),
            several_images(loaded32.processor, 2), several_images(loaded32.processor, 5)]
    assert len({p["input_ids"].shape[1] for p in made}) == 4 and min(p["input_ids"].shape[1] for p in made) > WINDOW
    return made


@pytest.fixture(scope="module")
def expected(loaded32, prompts):
    return [plain_generate(loaded32, prompt, ANSWER)[0] for prompt in prompts]


ANSWER = WINDOW + 7  # every answer crosses the window again


def _engine(loaded, **options) -> DecodeEngine:
    # Small caches (128, 256, 512) so that the batch needs a longer one than the first; a long wait so
    # that prompts submitted together are one batch.
    return DecodeEngine(loaded, min_len=128, max_len=512, batch_wait_s=0.5, **options)


def _check_greedy(loaded, prompts, expected, alone: bool = True, **options) -> None:
    engine = _engine(loaded, **options)
    try:
        settings = GenerationSettings(max_new_tokens=ANSWER)
        assert engine.generate_many(prompts, settings) == expected, "batched"
        assert dict(engine.batch_sizes) == {4: 1}
        if alone:
            assert engine.generate_ids(prompts[3], settings) == expected[3], "alone"
    finally:
        engine.close()


@pytest.mark.parametrize("options", [
    {"decode_attention": "filled", "attention_chunk": 32},
    {"choose_in_graph": True},
    {"decode_attention": "filled", "attention_chunk": 48, "choose_in_graph": True},
], ids=["filled", "choose_in_graph", "filled+choose_in_graph"])
def test_each_option_gives_plain_generates_greedy_answers_past_the_window_and_batched(loaded32, prompts, expected,
                                                                                    options):
    _check_greedy(loaded32, prompts, expected, **options)


# The compiled ones decode the batch only: each compile takes ~40 s on two CPU cores (batch 1 compiles
# apart, as it does on the GPU, where the benchmark runs it).


def test_the_compiled_step_gives_plain_generates_greedy_answers(loaded32, prompts, expected):
    _check_greedy(loaded32, prompts, expected, alone=False, compile_step=True)


def test_every_option_at_once_gives_plain_generates_greedy_answers(loaded32, prompts, expected):
    _check_greedy(loaded32, prompts, expected, alone=False, compile_step=True, decode_attention="filled",
                  attention_chunk=32, choose_in_graph=True, compile_vision=True)


def test_the_filled_attention_reads_only_the_slots_filled_so_far(loaded32):
    engine = _engine(loaded32, decode_attention="filled", attention_chunk=32)
    slot = engine._slot(1, 512)
    assert [slot.attention_length(p) for p in (0, 31, 32, 100, 479, 480, 511)] == [32, 32, 64, 128, 480, 512, 512]
    assert _engine(loaded32)._slot(1, 512).attention_length(100) == 512, "the model's attention reads them all"


# ---------------------------------------------------------------------- sampling on the device


@pytest.fixture(scope="module")
def fast_tiny(tiny_model_dir):
    loaded = load_for_generation(str(tiny_model_dir), fast=False)
    loaded.stop_token_ids = []
    loaded.engine = DecodeEngine(loaded, choose_in_graph=True, batch_wait_s=0.5)
    yield loaded
    loaded.close()


def test_seeded_sampling_in_the_graph_repeats_whatever_shares_the_batch(fast_tiny):
    inputs = several_images(fast_tiny.processor, 1)
    other = several_images(fast_tiny.processor, 2)
    seeded = GenerationSettings(max_new_tokens=30, do_sample=True, seed=5)
    first = fast_tiny.engine.generate_ids(inputs, seeded)
    assert fast_tiny.engine.generate_ids(inputs, seeded) == first
    assert fast_tiny.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=30, do_sample=True, seed=6)) != first
    together = fast_tiny.engine.generate_many([other, inputs], seeded)
    assert together[1] == first, "a row's draws depend on its seed only"


def test_with_the_choice_in_the_graph_answers_end_at_a_stop_token_and_the_next_request_is_whole(fast_tiny,
                                                                                              monkeypatch):
    """The step after the one that chose the stop token already runs when the host reads it: its token
    must not reach the answer, nor its cache writes the next request."""
    prompts = [several_images(fast_tiny.processor, 1), several_images(fast_tiny.processor, 2)]
    settings = GenerationSettings(max_new_tokens=20)
    full = fast_tiny.engine.generate_many(prompts, settings)
    stop = full[0][6]
    with monkeypatch.context() as patch:
        patch.setattr(fast_tiny, "stop_token_ids", [stop])
        ended = fast_tiny.engine.generate_many(prompts, settings)
    assert ended == [row[:row.index(stop)] if stop in row else row for row in full]
    assert len(ended[0]) == full[0].index(stop) <= 6
    assert fast_tiny.engine.generate_many(prompts, settings) == full


def test_sampling_with_top_k_1_is_greedy_and_never_yields_an_image_token(fast_tiny):
    inputs = several_images(fast_tiny.processor, 1)
    greedy = fast_tiny.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=20))
    assert fast_tiny.engine.generate_ids(
        inputs, GenerationSettings(max_new_tokens=20, do_sample=True, top_k=1, seed=3)) == greedy
    hot = fast_tiny.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=60, do_sample=True, temperature=3.0,
                                                                   top_k=0, top_p=1.0, seed=0))
    tok = fast_tiny.processor.tokenizer
    assert tok.image_token_id not in hot and tok.convert_tokens_to_ids(tok.boi_token) not in hot


def _splitmix_reference(seed: int, draw: int, token: int) -> float:
    """uniform_noise for one entry, in Python integers modulo 2**64."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x &= mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    golden = 0x9E3779B97F4A7C15
    row = mix(seed * golden + draw)
    bits = mix(row + (token + 1) * golden)
    return ((bits >> 41) + 0.5) * 2.0**-23


def test_the_noise_is_splitmix64_of_seed_draw_and_token_and_lies_in_the_open_unit_interval():
    seeds = torch.tensor([0, 5, 2**61 + 12345])
    noise = uniform_noise(seeds, torch.tensor(7), 1000)
    for row, seed in enumerate(seeds.tolist()):
        for token in (0, 1, 517, 999):
            assert noise[row, token].item() == _splitmix_reference(seed, 7, token)
    assert 0 < noise.min() and noise.max() < 1 and abs(noise.mean().item() - 0.5) < 0.02
    assert not torch.equal(noise, uniform_noise(seeds, torch.tensor(8), 1000))


def test_sampling_on_the_device_draws_from_what_temperature_top_k_and_top_p_leave():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5]])
    suppress = torch.zeros(8, dtype=torch.bool)
    suppress[0] = True  # an image placeholder: never drawn

    def frequencies(temperature: float, top_k: int, top_p: float, draws: int = 6000) -> torch.Tensor:
        counts = torch.zeros(8)
        for draw in range(draws):
            token = _choose_on_device(logits, suppress, torch.tensor([True]), torch.tensor([temperature]),
                                      torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([11]),
                                      torch.tensor(draw), True)
            counts[token] += 1
        return counts / draws

    def expected(temperature: float, kept: list[int]) -> torch.Tensor:
        probs = torch.zeros(8)
        probs[kept] = torch.softmax(logits[0, kept] / temperature, -1)
        return probs

    # Top-k 3 of the unsuppressed: tokens 5, 7, 1 (3.0, 1.5, 1.0).
    assert (frequencies(1.0, 3, 1.0) - expected(1.0, [5, 7, 1])).abs().max() < 0.03
    # Top-p 0.8 at temperature 2 over all: probabilities 0.30 0.19 0.16 0.15 ... keep until 0.8 is crossed.
    scaled = torch.softmax((logits[0] / 2).masked_fill(suppress, float("-inf")), -1)
    order = scaled.argsort(descending=True).tolist()
    cumulative, kept = 0.0, []
    for token in order:
        kept.append(token)
        cumulative += scaled[token].item()
        if cumulative > 0.8:
            break
    assert 3 <= len(kept) < 7
    assert (frequencies(2.0, 0, 0.8) - expected(2.0, kept)).abs().max() < 0.03
    greedy = _choose_on_device(logits, suppress, torch.tensor([False]), torch.tensor([1.0]), torch.tensor([0]),
                               torch.tensor([1.0]), torch.tensor([0]), torch.tensor(0), True)
    assert greedy.tolist() == [5]


# ---------------------------------------------------------------------- options, timings, warm-up


@pytest.mark.parametrize("options, message", [
    ({"decode_attention": "flash"}, "decode_attention='flash' is not one of model, filled"),
    ({"compile_mode": "reduce-overhead"}, "must add none of its own"),
    ({"attention_chunk": 0}, "attention_chunk must be at least 1"),
])
def test_bad_options_are_refused_with_what_to_use(loaded32, options, message):
    with pytest.raises(ValueError, match=message):
        DecodeEngine(loaded32, **options)


def test_the_first_tokens_time_is_broken_down_and_steps_can_be_timed(fast_tiny):
    engine = fast_tiny.engine
    inputs = several_images(fast_tiny.processor, 1)
    text = ""
    for text in engine.stream(inputs, GenerationSettings(max_new_tokens=3)):
        pass
    timings = engine.last_timings
    parts = ["queue_s", "collate_s", "vision_s", "prefill_s", "first_choice_s", "prefill_and_first_token_s",
             "handover_s"]
    assert set(parts) <= set(timings) and all(timings[p] >= 0 for p in parts)
    assert timings["vision_s"] + timings["prefill_s"] <= timings["prefill_and_first_token_s"]
    assert engine.time_steps(inputs, steps=4) > 0


def test_warm_up_takes_the_batch_sizes_to_prepare(tiny_model_dir):
    loaded = load_for_generation(str(tiny_model_dir))
    try:
        loaded.engine.warm_up(several_images(loaded.processor, 1), GenerationSettings(max_new_tokens=2),
                              batch_sizes=(1, 4))
        assert set(loaded.engine._slots) == {(1, 1024), (4, 1024)}
    finally:
        loaded.close()


# ---------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("options", [
    {},
    {"decode_attention": "filled", "attention_chunk": 32},
    {"choose_in_graph": True},
    {"compile_step": True},
    {"compile_step": True, "decode_attention": "filled", "attention_chunk": 32, "choose_in_graph": True,
     "compile_vision": True},
], ids=["today", "filled", "choose_in_graph", "compile", "all"])
def test_captured_graphs_give_the_eager_steps_tokens_on_a_gpu(window_dir, options):
    """Each option's captured graphs (several per cache with the filled attention, the choice inside
    them, compiled kernels) give the tokens of the same steps run eagerly, greedy and seeded, past the
    window and in a batch."""
    loaded = load_for_generation(str(window_dir), device="cuda", fast=False)
    loaded.model.to(torch.float32)
    loaded.stop_token_ids = []
    graphs = DecodeEngine(loaded, min_len=128, use_graphs=True, batch_wait_s=2.0, **options)
    eager = DecodeEngine(loaded, min_len=128, use_graphs=False, batch_wait_s=2.0,
                         **{k: v for k, v in options.items() if k not in ("compile_step", "compile_vision")})
    try:
        prompts = [several_images(loaded.processor, 6), several_images(loaded.processor, 2)]
        for settings in (GenerationSettings(max_new_tokens=3 * WINDOW),
                         GenerationSettings(max_new_tokens=3 * WINDOW, do_sample=True, seed=4)):
            if settings.do_sample and not options.get("choose_in_graph"):
                continue  # the host's sampling draws from torch generators: same code either way
            assert graphs.generate_many(prompts, settings) == eager.generate_many(prompts, settings)
            assert graphs.generate_ids(prompts[0], settings) == eager.generate_ids(prompts[0], settings)
        assert all(slot.graphs for slot in graphs._slots.values())
    finally:
        graphs.close()
        eager.close()
        loaded.close()


@pytest.mark.gpu
def test_the_noise_is_the_same_on_the_gpu_and_the_cpu():
    seeds = torch.tensor([1, 2**40 + 3])
    on_gpu = uniform_noise(seeds.cuda(), torch.tensor(9).cuda(), 262_208).cpu()
    assert torch.equal(on_gpu, uniform_noise(seeds, torch.tensor(9), 262_208))
