"""Collate stage: rows (image(s), caption or questions and answers, optional context and prior) -> padded
training batches with labels.

A row's images (one, a study's several, a DICOM series' sampled slices, and a prior study's image first)
come from ``radiology.data.row_images`` and go into the first user turn, one image block each. A row is a
conversation (``radiology.data.row_dialogue``): a caption row is one turn (the instruction, then the
caption); a question row one turn (the question, then its answer); a conversation row its turns. Labels carry
the loss only on the answers: every assistant turn's tokens and its ``<end_of_turn>``. The instruction or
questions, the image blocks (``<start_of_image>``, the soft tokens, ``<end_of_image>``), the prior/current
labels, the turn headers, the newline after each ``<end_of_turn>`` and padding are all -100. Each prompt is
tokenized exactly as generation tokenizes it (through the processor), so the model trains on the tokens it
will see at inference.

Padding is on the right for training: positions stay 0..n-1 for every row, and nothing is lost
to left-shifted sequences. Generation pads on the left (see ``radiology.generate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import ProcessorMixin

from radiology.data import (
    CAPTION,
    CONTEXT,
    FOLLOW_UPS,
    QUESTION,
    Dialogue,
    ImageOptions,
    has_prior,
    image_counts,
    row_dialogue,
    row_images,
)
from radiology.tokens import special_ids

__all__ = ["IGNORE_INDEX", "CaptionCollator", "PromptTooLongError"]

IGNORE_INDEX = -100


class PromptTooLongError(ValueError):
    """--max_length leaves no room for the caption after the largest row's image blocks."""


def _answer_texts(dataset: Dataset) -> list[str]:
    """Each row's words after its first prompt: the caption or answer, and a conversation's later turns."""
    if FOLLOW_UPS not in dataset.column_names:
        return [str(c) for c in dataset[CAPTION]]
    return [
        " ".join([str(caption), *(f"{turn['question']} {turn['answer']}" for turn in turns or [])])
        for caption, turns in zip(dataset[CAPTION], dataset[FOLLOW_UPS])
    ]


class CaptionCollator:
    """Turns dataset rows (captions, questions, conversations: see radiology.data.row_dialogue) into a batch for
    Gemma 3: input_ids, attention_mask, token_type_ids, pixel_values and labels. Runs inside DataLoader workers,
    so image decoding and resizing happen off the training step. ``instruction``: the first user turn's text on
    rows without a question. ``images``: how rows' images are read (--max_images, --series_window).
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        instruction: str,
        max_length: int | None = None,
        images: ImageOptions | None = None,
    ):
        if processor.chat_template is None:
            raise ValueError(
                "the processor has no chat template; load it from the instruction-tuned model "
                "(e.g. google/gemma-3-4b-it) with --processor_name_or_path"
            )
        self.processor = processor
        self.instruction = instruction
        self.max_length = max_length
        self.images = images or ImageOptions()
        self.ids = special_ids(processor)
        self._end_of_turn_text = "<end_of_turn>"

    def _render(self, messages: list[dict[str, Any]], prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)

    # One row: each prompt's ids (as generation builds them) + each answer's ids, labels on the answers only.
    # ``images`` counts every image in the prompt, the prior's included; ``prior``: the first of them is the prior's.
    def encode_row(self, row: Mapping[str, Any], images: int = 1, prior: bool = False) -> tuple[list[int], list[int]]:
        messages = row_dialogue(row).messages(self.instruction, row.get(CONTEXT), images, prior)
        tok = self.processor.tokenizer
        input_ids: list[int] = []
        labels: list[int] = []
        done = ""  # the text encoded so far: every turn up to the last answer's <end_of_turn>
        first_prompt = 0
        for answer_at in range(1, len(messages), 2):
            # The prompt of this answer is what generation gives the model for it: the turns before, and the header.
            prompt_text = self._render(messages[:answer_at], prompt=True)
            full_text = self._render(messages[: answer_at + 1])
            if not prompt_text.startswith(done) or not full_text.startswith(prompt_text):
                raise ValueError("the chat template renders a conversation's turns differently as it grows")
            answer_text, sep, _ = full_text[len(prompt_text):].partition(self._end_of_turn_text)
            if not sep:
                raise ValueError("the chat template does not end the answer with <end_of_turn>")
            asked_ids = self._prompt_ids(prompt_text[len(done):])
            first_prompt = first_prompt or len(asked_ids)
            # split_special_tokens: an answer that contains "<start_of_image>" stays plain text.
            answer_ids = tok(answer_text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            answer_ids = answer_ids + [self.ids.end_of_turn]
            input_ids += asked_ids + answer_ids
            labels += [IGNORE_INDEX] * len(asked_ids) + answer_ids
            done = prompt_text + answer_text + sep
        tail = self._render(messages)[len(done):]
        tail_ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
        input_ids += tail_ids
        labels += [IGNORE_INDEX] * len(tail_ids)
        if self.max_length is not None and len(input_ids) > self.max_length:
            if first_prompt >= self.max_length:
                raise ValueError(
                    f"max_length={self.max_length} is shorter than the prompt with its image block "
                    f"({first_prompt} tokens); raise --max_length (the image block is never truncated)"
                )
            # Only turns after the first prompt are cut: every image block lies wholly inside it.
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels

    def _prompt_ids(self, prompt_text: str) -> list[int]:
        # The processor expands each <start_of_image> into boi + soft tokens + eoi; doing the same
        # through it (text only) keeps training and generation token-for-token identical.
        expanded = prompt_text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        return self.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def prompt_length(self, images: int = 1, prior: bool = False, context: str | None = None,
                      question: str | None = None) -> int:
        """Tokens of a prompt with ``images`` image blocks (the prior's included) and ``question`` (None: the
        instruction), before the answer."""
        messages = Dialogue(question).messages(self.instruction, context, images, prior)
        return len(self._prompt_ids(self._render(messages, prompt=True)))

    def check_max_length(self, *datasets: Dataset) -> None:
        """Refuse, before training starts, a --max_length that the largest row's prompt (all its image blocks,
        the prior's included, which are never truncated) would fill: the error names both numbers and the fix."""
        if self.max_length is None:
            return
        rows = [(n + p, p) for dataset in datasets for n, p in zip(image_counts(dataset), has_prior(dataset))]
        if not rows:
            return
        images, prior = max(rows)
        questions = [q for dataset in datasets if QUESTION in dataset.column_names for q in dataset[QUESTION] if q]
        # With questions, the longest one stands for the largest row's (an upper bound on its prompt).
        needed = self.prompt_length(images, prior, question=max(questions, key=len) if questions else None)
        if needed < self.max_length:
            return
        answers = [text for dataset in datasets for text in _answer_texts(dataset)]
        tokenized = self.processor.tokenizer(answers, add_special_tokens=False, split_special_tokens=True)
        longest = max((len(ids) for ids in tokenized["input_ids"]), default=0)
        what = f"{images} images" + (" (a prior study's and the current study's)" if prior else "")
        answer = "answer" if questions else "caption"
        raise PromptTooLongError(
            f"{what} need {needed}+ tokens (each image block is {self.processor.image_seq_length} image tokens "
            f"and is never truncated); --max_length {self.max_length} is too short: raise it to at least "
            f"{needed + longest + 1} (that prompt and the longest {answer}) or lower --max_images "
            f"(now {self.images.max_images})"
        )

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        studies = [row_images(row, self.images) for row in rows]
        encoded = [
            self.encode_row(row, len(study.in_prompt_order), study.prior is not None)
            for row, study in zip(rows, studies)
        ]
        # Flat, in prompt order (each row's prior first): the model fills the image blocks in this order.
        images = [image for study in studies for image in study.in_prompt_order]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        width = max(len(ids) for ids, _ in encoded)
        batch_ids = torch.full((len(rows), width), self.ids.pad, dtype=torch.long)
        batch_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(encoded):  # right padding
            batch_ids[i, : len(ids)] = torch.tensor(ids)
            batch_labels[i, : len(labels)] = torch.tensor(labels)
            attention[i, : len(ids)] = 1
        image_positions = batch_ids == self.ids.image
        # Defensive: no label ever sits on an image, image-delimiter or pad position.
        for token in (self.ids.image, self.ids.boi, self.ids.eoi):
            batch_labels[batch_ids == token] = IGNORE_INDEX
        batch_labels[attention == 0] = IGNORE_INDEX
        return {
            "input_ids": batch_ids,
            "attention_mask": attention,
            # Gemma 3 needs token_type_ids (1 on image soft tokens) to attend bidirectionally within images.
            "token_type_ids": image_positions.long(),
            "pixel_values": pixel_values,
            "labels": batch_labels,
        }
