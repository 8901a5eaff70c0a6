"""Special token ids live in radiology.tokens: generation reads them there, not from the merge stage."""

from __future__ import annotations

from radiology.tiny import build_tiny_processor
from radiology.tokens import never_generated, special_ids, stop_ids
from tests.conftest import run_cli


def test_stop_and_suppressed_ids_are_read_from_the_processor():
    tok = build_tiny_processor().tokenizer
    assert tok.convert_ids_to_tokens(stop_ids(build_tiny_processor())) == ["<eos>", "<end_of_turn>"]
    assert tok.convert_ids_to_tokens(never_generated(build_tiny_processor())) == [
        "<image_soft_token>", "<start_of_image>"]
    published = build_tiny_processor(vocab_size=262208)  # Gemma 3's real ids
    assert stop_ids(published) == [1, 106] and special_ids(published).image == 262144


def test_generation_does_not_import_the_merge_stage():
    # Merging pulls in PEFT; generating from a merged folder needs neither.
    script = "import sys, radiology.generate, radiology.engine, radiology.collate; print(sorted(m for m in sys.modules if m.startswith('radiology.')))"
    loaded = run_cli("-c", script).stdout
    assert "radiology.merge" not in loaded and "radiology.tokens" in loaded
