"""Gemma 3's special token ids, read from a processor: what collation, generation, the decode engine
and the merged model's generation config all need to agree on; and the streamed text with its token count.

Ids are never written as literals: the tiny test model and the real checkpoints number them
differently (``<end_of_turn>`` is 106 in Gemma 3 and 6 in the tiny model).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import ProcessorMixin

__all__ = ["SpecialIds", "StreamedText", "never_generated", "special_ids", "stop_ids"]


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the collator and generation need, read from the processor (never literals)."""

    pad: int
    image: int
    boi: int
    eoi: int
    end_of_turn: int
    eos: int


def special_ids(processor: ProcessorMixin) -> SpecialIds:
    tok = processor.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is None or end_of_turn == tok.unk_token_id:
        raise ValueError("the tokenizer has no <end_of_turn> token: is this a Gemma 3 processor?")
    return SpecialIds(
        pad=tok.pad_token_id,
        image=tok.convert_tokens_to_ids(tok.image_token),
        boi=tok.convert_tokens_to_ids(tok.boi_token),
        eoi=tok.convert_tokens_to_ids(tok.eoi_token),
        end_of_turn=end_of_turn,
        eos=tok.eos_token_id,
    )


def stop_ids(processor: ProcessorMixin) -> list[int]:
    """The tokens that end an answer: ``<eos>`` and ``<end_of_turn>`` (the chat turn's end, which
    is what a fine-tuned Gemma 3 emits; stopping on ``<eos>`` alone lets it run on)."""
    ids = special_ids(processor)
    return [ids.eos, ids.end_of_turn]


def never_generated(processor: ProcessorMixin) -> list[int]:
    """The image placeholders (soft token and ``<start_of_image>``): a generated one would need pixels."""
    ids = special_ids(processor)
    return [ids.image, ids.boi]


class StreamedText(str):
    """One item of ``stream_text``: the answer so far, and how many new tokens it holds (stop tokens not
    counted). An answer whose ``new_tokens`` reached max_new_tokens was cut at that limit."""

    new_tokens: int

    def __new__(cls, text: str, new_tokens: int) -> StreamedText:
        item = super().__new__(cls, text)
        item.new_tokens = new_tokens
        return item
