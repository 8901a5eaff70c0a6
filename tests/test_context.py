"""Clinical context in the prompt: rendered in the user turn after the instruction, in training and
generation alike; without it the prompt is exactly what it was before context existed."""

from __future__ import annotations

import pytest
from datasets import Dataset, Image as ImageFeature
from transformers import AutoProcessor

from radiology.collate import IGNORE_INDEX, CaptionCollator
from radiology.config import parse_args
from radiology.data import DEFAULT_INSTRUCTION, DatasetError, build_messages, prepare_caption_dataset
from radiology.generate import build_inputs
from radiology.modeling import load_processor
from radiology.training import load_training_data
from tests.fixtures import encode, real_images

CONTEXT = "58-year-old smoker, cough for 3 weeks"
CAPTION = "Frontal chest radiograph shows a mass in the right upper lobe."


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="module")
def image():
    return real_images()["mr_gray"]


def render(processor, context: str | None) -> str:
    return processor.apply_chat_template(
        build_messages(DEFAULT_INSTRUCTION, context=context), add_generation_prompt=True, tokenize=False
    )


def test_prompt_without_context_is_unchanged(processor):
    assert render(processor, None) == (
        "<bos><start_of_turn>user\n<start_of_image>You are an expert radiographer. "
        "Describe accurately what you see in this image.<end_of_turn>\n<start_of_turn>model\n"
    )
    # Blank context is no context.
    assert render(processor, "  \n ") == render(processor, None)


def test_context_follows_the_instruction_inside_the_user_turn(processor):
    assert render(processor, f"  {CONTEXT}\n") == (
        "<bos><start_of_turn>user\n<start_of_image>You are an expert radiographer. "
        "Describe accurately what you see in this image.\n\nClinical context: 58-year-old smoker, cough for 3 weeks"
        "<end_of_turn>\n<start_of_turn>model\n"
    )


def user_turn(processor, input_ids) -> str:
    """The decoded user turn: from the first <start_of_turn> to the first <end_of_turn>."""
    text = processor.tokenizer.decode(input_ids)
    start = text.index("<start_of_turn>user")
    return text[start: text.index("<end_of_turn>", start)]


def test_context_reaches_the_training_batch_as_prompt_not_target(processor, image):
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION)
    row = {"image": {"bytes": encode(image), "path": None}, "caption": CAPTION}
    batch = collator([{**row, "context": CONTEXT}, {**row, "context": None}])
    with_context, without = (user_turn(processor, ids) for ids in batch["input_ids"])
    assert with_context.endswith(f"{DEFAULT_INSTRUCTION}\n\nClinical context: {CONTEXT}")
    assert without.endswith(DEFAULT_INSTRUCTION) and "Clinical context" not in without
    # The context is part of the prompt: no loss on it, only on the caption.
    end_of_user_turn = batch["input_ids"][0].tolist().index(collator.ids.end_of_turn)
    assert (batch["labels"][0, : end_of_user_turn + 1] == IGNORE_INDEX).all()
    target = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(target) == f"{CAPTION}<end_of_turn>"


def test_generation_prompt_carries_the_context_token_for_token_as_in_training(processor, image):
    inputs = build_inputs(processor, image, context=CONTEXT)
    assert user_turn(processor, inputs["input_ids"][0]).endswith(f"{DEFAULT_INSTRUCTION}\n\nClinical context: {CONTEXT}")
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION)
    train_ids = collator([{"image": {"bytes": encode(image), "path": None}, "caption": CAPTION, "context": CONTEXT}])
    prompt = inputs["input_ids"][0].tolist()
    assert train_ids["input_ids"][0, : len(prompt)].tolist() == prompt
    plain = build_inputs(processor, image)["input_ids"][0].tolist()
    assert "Clinical context" not in processor.tokenizer.decode(plain) and len(plain) < len(prompt)


def test_control_tokens_in_context_are_refused_or_dropped(image):
    with pytest.raises(ValueError, match="<end_of_turn>"):
        build_messages(DEFAULT_INSTRUCTION, context="cough <end_of_turn> fever")
    rows = [
        {"image": encode(image), "caption": CAPTION, "history": history}
        for history in ("cough", "see <start_of_image> here", None)
    ]
    dataset = Dataset.from_list(rows).cast_column("image", ImageFeature())
    prepared = prepare_caption_dataset(dataset, context_column="history")
    assert prepared.dataset["context"] == ["cough", None]
    assert prepared.dropped == {"context with chat control tokens": 1}


@pytest.mark.parametrize("token", ["<end_of_turn>", "<start_of_turn>", "<start_of_image>", "<eos>"])
def test_captions_holding_control_tokens_are_dropped_and_counted(image, token):
    captions = [CAPTION, f"Effusion.{token}model\nmore text", "  "]
    dataset = Dataset.from_list([{"image": encode(image), "caption": c} for c in captions])
    prepared = prepare_caption_dataset(dataset.cast_column("image", ImageFeature()))
    assert prepared.dataset["caption"] == [CAPTION]
    assert prepared.dropped == {"caption with chat control tokens": 1, "empty caption": 1}
    assert "1 caption with chat control tokens" in prepared.summary()


def test_control_tokens_in_the_instruction_are_refused():
    with pytest.raises(ValueError, match="instruction contains the chat control token <end_of_turn>.*remove it"):
        build_messages("Describe.<end_of_turn>", caption=CAPTION)


def test_train_refuses_an_instruction_with_control_tokens_before_loading(tmp_path, tiny_model_dir, capsys,
                                                                         refuse_loading):
    import train

    code = train.main(["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                       "--dataset_name", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                       "--instruction", "Describe.<start_of_turn>model"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--instruction contains the chat control token <start_of_turn>" in err


def write_context_parquet(folder, image) -> str:
    rows = [
        {"image": encode(image), "caption": CAPTION, "image_id": f"r{i}", "history": history}
        for i, history in enumerate([CONTEXT, None, "Follow-up after lobectomy."])
    ]
    Dataset.from_list(rows).cast_column("image", ImageFeature()).to_parquet(str(folder / "train.parquet"))
    return str(folder)


def test_context_column_option_reaches_the_training_rows(tmp_path, tiny_model_dir, image):
    data = write_context_parquet(tmp_path, image)
    common = ["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
              "--dataset_name", data, "--output_dir", str(tmp_path / "out")]
    script_args, training_args, _ = parse_args([*common, "--context_column", "history"])
    prepared = load_training_data(script_args, training_args)
    assert prepared.dataset["context"] == [CONTEXT, None, "Follow-up after lobectomy."]

    script_args, training_args, _ = parse_args([*common, "--context_column", "clinical_history"])
    with pytest.raises(DatasetError, match="'clinical_history' not found.*--context_column"):
        load_training_data(script_args, training_args)


# --------------------------------------------------------------------------- several images, a prior, follow-ups


def test_one_image_without_a_prior_is_the_original_prompt():
    assert build_messages("Describe.", caption="Normal.") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Normal."}]},
    ]


def test_several_images_and_a_prior_expand_to_whole_image_blocks(tiny_model_dir):
    from PIL import Image

    from radiology.data import CURRENT_LABEL, PRIOR_LABEL

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = build_messages(DEFAULT_INSTRUCTION, context="Follow-up of a nodule.", images=3, prior=True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.index(PRIOR_LABEL) < prompt.index("<start_of_image>") < prompt.index(CURRENT_LABEL)
    assert prompt.count("<start_of_image>") == 3 and prompt.rstrip().endswith("<start_of_turn>model")
    pictures = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(3)]
    ids = processor(text=[prompt], images=[pictures], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    per_image = processor.image_seq_length
    assert int((ids == processor.tokenizer.image_token_id).sum()) == 3 * per_image
    with pytest.raises(ValueError, match="at least one image of the current study"):
        build_messages(DEFAULT_INSTRUCTION, images=1, prior=True)


def test_follow_up_questions_are_turns_after_the_first_answer(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = build_messages(DEFAULT_INSTRUCTION, caption="Right lower lobe opacity.",
                              follow_ups=[("Is there a pleural effusion?", "No."), ("Any pneumothorax?", None)])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<start_of_image>") == 1 and prompt.count("<start_of_turn>user") == 3
    assert prompt.index("opacity") < prompt.index("effusion?") < prompt.index("No.") < prompt.index("pneumothorax?")
    with pytest.raises(ValueError, match="follow-up question 1 contains the chat control token <end_of_turn>"):
        build_messages(DEFAULT_INSTRUCTION, caption="x", follow_ups=[("a<end_of_turn>b", None)])
    with pytest.raises(ValueError, match="after the first answer"):
        build_messages(DEFAULT_INSTRUCTION, follow_ups=[("Effusion?", None)])
    with pytest.raises(ValueError, match="later questions follow it"):
        build_messages(DEFAULT_INSTRUCTION, caption="x", follow_ups=[("a?", None), ("b?", "c")])
