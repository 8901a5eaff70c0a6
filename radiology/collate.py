"""Collate stage: rows (image(s), caption, optional context and prior) -> padded training batches with labels.

A row's images (one, a study's several, a DICOM series' sampled slices, and a prior study's image first)
come from ``radiology.data.row_images`` and go into one user turn, one image block each. Labels carry
the loss only on the answer: the caption's tokens and its ``<end_of_turn>``. The instruction, the
image blocks (``<start_of_image>``, the soft tokens, ``<end_of_image>``), the prior/current labels,
the turn headers and padding are all -100. The prompt is tokenized exactly as generation tokenizes it
(through the processor), so the model trains on the tokens it will see at inference.

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
    ImageOptions,
    build_messages,
    has_prior,
    image_counts,
    row_images,
)
from radiology.tokens import special_ids

__all__ = ["IGNORE_INDEX", "CaptionCollator", "PromptTooLongError"]

IGNORE_INDEX = -100


class PromptTooLongError(ValueError):
    """--max_length leaves no room for the caption after the largest row's image blocks."""


class CaptionCollator:
    """Turns dataset rows into a batch for Gemma 3: input_ids, attention_mask, token_type_ids,
    pixel_values and labels. Runs inside DataLoader workers, so image decoding and resizing happen
    off the training step. ``images``: how rows' images are read (--max_images, --series_window).
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

    # One row: prompt ids (as generation builds them) + answer ids, labels on the answer only. ``images``
    # counts every image in the prompt, the prior's included; ``prior``: the first of them is the prior's.
    def encode_row(self, row: Mapping[str, Any], images: int = 1, prior: bool = False) -> tuple[list[int], list[int]]:
        messages = build_messages(
            self.instruction, caption=str(row[CAPTION]), context=row.get(CONTEXT), images=images, prior=prior
        )
        prompt_text = self.processor.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        full_text = self.processor.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently with and without the answer")
        answer_text = full_text[len(prompt_text):]
        caption_text, sep, tail = answer_text.partition(self._end_of_turn_text)
        if not sep:
            raise ValueError("the chat template does not end the answer with <end_of_turn>")
        tok = self.processor.tokenizer
        prompt_ids = self._prompt_ids(prompt_text)
        # split_special_tokens: a caption that contains "<start_of_image>" stays plain text.
        caption_ids = tok(caption_text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        tail_ids = tok(tail, add_special_tokens=False)["input_ids"] if tail else []
        answer_ids = caption_ids + [self.ids.end_of_turn]
        input_ids = prompt_ids + answer_ids + tail_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)
        if self.max_length is not None and len(input_ids) > self.max_length:
            if len(prompt_ids) >= self.max_length:
                raise ValueError(
                    f"max_length={self.max_length} is shorter than the prompt with its image block "
                    f"({len(prompt_ids)} tokens); raise --max_length (the image block is never truncated)"
                )
            # Only the answer is cut: the image block lies wholly inside the prompt.
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels

    def _prompt_ids(self, prompt_text: str) -> list[int]:
        # The processor expands each <start_of_image> into boi + soft tokens + eoi; doing the same
        # through it (text only) keeps training and generation token-for-token identical.
        expanded = prompt_text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        return self.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def prompt_length(self, images: int = 1, prior: bool = False, context: str | None = None) -> int:
        """Tokens of a prompt with ``images`` image blocks (the prior's included), before the caption."""
        messages = build_messages(self.instruction, context=context, images=images, prior=prior)
        prompt_text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self._prompt_ids(prompt_text))

    def check_max_length(self, *datasets: Dataset) -> None:
        """Refuse, before training starts, a --max_length that the largest row's prompt (all its image blocks,
        the prior's included, which are never truncated) would fill: the error names both numbers and the fix."""
        if self.max_length is None:
            return
        rows = [(n + p, p) for dataset in datasets for n, p in zip(image_counts(dataset), has_prior(dataset))]
        if not rows:
            return
        images, prior = max(rows)
        needed = self.prompt_length(images, prior)
        if needed < self.max_length:
            return
        captions = [str(c) for dataset in datasets for c in dataset[CAPTION]]
        tokenized = self.processor.tokenizer(captions, add_special_tokens=False, split_special_tokens=True)
        longest = max((len(ids) for ids in tokenized["input_ids"]), default=0)
        what = f"{images} images" + (" (a prior study's and the current study's)" if prior else "")
        raise PromptTooLongError(
            f"{what} need {needed}+ tokens (each image block is {self.processor.image_seq_length} image tokens "
            f"and is never truncated); --max_length {self.max_length} is too short: raise it to at least "
            f"{needed + longest + 1} (that prompt and the longest caption) or lower --max_images "
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
