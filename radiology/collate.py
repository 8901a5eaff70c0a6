"""Collate stage: rows (image, caption, optional context) -> padded training batches with labels.

Labels carry the loss only on the answer: the caption's tokens and its ``<end_of_turn>``. The
instruction, the image block (``<start_of_image>``, the soft tokens, ``<end_of_image>``), the turn
headers and padding are all -100. The prompt is tokenized exactly as generation tokenizes it
(through the processor), so the model trains on the tokens it will see at inference.

Padding is on the right for training: positions stay 0..n-1 for every row, and nothing is lost
to left-shifted sequences. Generation pads on the left (see ``radiology.generate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import ProcessorMixin

from radiology.data import CAPTION, CONTEXT, IMAGE, build_messages, decode_image
from radiology.tokens import special_ids

__all__ = ["IGNORE_INDEX", "CaptionCollator"]

IGNORE_INDEX = -100


class CaptionCollator:
    """Turns dataset rows into a batch for Gemma 3: input_ids, attention_mask, token_type_ids,
    pixel_values and labels. Runs inside DataLoader workers, so image decoding and resizing happen
    off the training step.
    """

    def __init__(self, processor: ProcessorMixin, instruction: str, max_length: int | None = None):
        if processor.chat_template is None:
            raise ValueError(
                "the processor has no chat template; load it from the instruction-tuned model "
                "(e.g. google/gemma-3-4b-it) with --processor_name_or_path"
            )
        self.processor = processor
        self.instruction = instruction
        self.max_length = max_length
        self.ids = special_ids(processor)
        self._end_of_turn_text = "<end_of_turn>"

    # One row: prompt ids (as generation builds them) + answer ids, labels on the answer only.
    def encode_row(self, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        messages = build_messages(self.instruction, caption=str(row[CAPTION]), context=row.get(CONTEXT))
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
        # The processor expands <start_of_image> into boi + soft tokens + eoi; doing the same
        # through it (text only) keeps training and generation token-for-token identical.
        expanded = prompt_text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        return self.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode_row(row) for row in rows]
        images = [decode_image(row[IMAGE]) for row in rows]
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
