"""The draft (radiology/draft.py): marks on stopped or cut answers, the Findings / Impression format, follow-up
conversations that fit the context, the session history and the export; the token counts the marks rely on."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

import radiology.generate as generate_module
from radiology.data import (
    DEFAULT_INSTRUCTION,
    FINDINGS_IMPRESSION_REQUEST,
    build_messages,
    with_report_format,
)
from radiology.draft import (
    CUT_MARK,
    DRAFT_HEADER,
    HISTORY_SIZE,
    MAX_FOLLOW_UPS,
    NOT_RUN_MARK,
    STOPPED_MARK,
    Answer,
    Draft,
    FollowUpError,
    Turn,
    clean_question,
    conversation_messages,
    find_draft,
    fitting_dialogue,
    history_choices,
    marked,
    remember,
    report_markdown,
    report_text,
    sections_markdown,
    write_export,
)
from radiology.generate import GenerationSettings, StreamedText, load_for_generation, stream_side_by_side, stream_text
from radiology.serve import ControlError
from tests.fixtures import real_images


def a_draft(follow_ups: int = 0, report_format: str = "free", prior: bool = True) -> Draft:
    images = real_images()
    answer = Answer("model-a + adapter-b", "Findings: clear lungs. Impression: normal.", "Findings: clear lungs. "
                    "Impression: normal.", "model-a + adapter-b · bf16 · cpu · greedy, max 64 new tokens · images: 2")
    turns = tuple(Turn(f"question {n}?", Answer("model-a + adapter-b", f"answer {n}", f"answer {n}", f"line {n}"))
                  for n in range(1, follow_ups + 1))
    return Draft((images["rgb"], images["mr_gray"]), images["ct_16bit"].convert("L") if prior else None,
                 "images: 2 + prior", DEFAULT_INSTRUCTION, "58-year-old smoker", (answer,), report_format, turns,
                 created=datetime(2026, 12, 2, 5, 30, 0, tzinfo=timezone.utc))


# --------------------------------------------------------------------------- marks


def test_stopped_cut_and_not_run_answers_are_marked_in_the_text():
    assert marked("a b c", "done", 8) == "a b c"
    assert marked("a b c", "stopped", 8) == f"a b c\n\n{STOPPED_MARK}" == "a b c\n\n[stopped by user]"
    assert marked("a b c", "cut", 8) == "a b c\n\n[cut at 8 new tokens: raise Max new tokens]"
    assert marked("", "not run", 8) == NOT_RUN_MARK and marked("", "stopped", 8) == STOPPED_MARK
    assert marked("a", "generating", 8) == "a"  # still writing: no mark yet
    assert CUT_MARK.format(limit=3) in marked("x", "cut", 3)


def test_stream_side_by_side_says_cut_only_for_an_answer_that_reached_max_new_tokens():
    class ThreeTokens:
        """A model (generate.AnsweringModel) whose answer is three tokens long."""

        name, precision, device = "three", "bf16", "cpu"

        def stream_answer(self, image, instruction, settings, context, stop, prior, dialogue=None):
            yield StreamedText("one two", 2)
            yield StreamedText("one two three", 3)

    last = list(stream_side_by_side([ThreeTokens()], "unused", settings=GenerationSettings(max_new_tokens=3)))[-1]
    assert last.states == ["cut"] and last == ["one two three"]
    last = list(stream_side_by_side([ThreeTokens()], "unused", settings=GenerationSettings(max_new_tokens=4)))[-1]
    assert last.states == ["done"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    with load_for_generation(str(tiny_model_dir), device="cpu") as model:
        yield model


def test_both_generation_paths_count_the_answers_new_tokens(loaded):
    # The decode engine counts the ids it hands over; plain generate (no engine) counts through a stopping
    # criterion. Greedy answers are the same, so the counts must be too.
    settings = GenerationSettings(max_new_tokens=40)
    image = real_images()["rgb"]
    *_, fast = stream_text(loaded, image, settings=settings)
    *_, plain = stream_text(dataclasses.replace(loaded, engine=None), image, settings=settings)
    assert str(fast) == str(plain)
    assert fast.new_tokens == plain.new_tokens == 40  # the random tiny model writes on to the limit
    # A stop token is not counted: made one of the answer's own tokens, it ends the answer just before it.
    ids = loaded.engine.generate_ids(generate_module.build_inputs(loaded.processor, image), settings)
    stop_at = ids.index(ids[5])
    *_, stopped = stream_text(dataclasses.replace(loaded, engine=None, stop_token_ids=[ids[5]]), image,
                              settings=settings)
    assert stopped.new_tokens == stop_at < 40


# --------------------------------------------------------------------------- report format


def test_the_findings_impression_instruction_is_pinned_and_the_prompt_builder_carries_it():
    asked = with_report_format(DEFAULT_INSTRUCTION, "findings_impression")
    assert asked == ("You are an expert radiographer. Describe accurately what you see in this image. Write the "
                     'report in two sections: "Findings:" with what the image shows, then "Impression:" with the '
                     "conclusion in one or two sentences.")
    assert with_report_format(asked, "findings_impression") == asked  # applied once
    assert with_report_format(DEFAULT_INSTRUCTION, "free") == DEFAULT_INSTRUCTION
    with pytest.raises(ValueError, match="unknown report format 'soap': use one of free, findings_impression"):
        with_report_format(DEFAULT_INSTRUCTION, "soap")
    (user,) = build_messages(asked, context="cough")
    assert user["content"][-1]["text"] == f"{asked}\n\nClinical context: cough"
    assert FINDINGS_IMPRESSION_REQUEST in user["content"][-1]["text"]


def test_the_generate_command_line_asks_for_the_report_format(monkeypatch, tmp_path):
    image = tmp_path / "image.png"
    real_images()["rgb"].save(image)
    asked = []
    monkeypatch.setattr(generate_module, "load_for_generation", lambda *args, **kwargs: object())
    monkeypatch.setattr(generate_module, "generate_text",
                        lambda loaded, images, instruction, *args, **kwargs: asked.append(instruction) or "text")
    generate_module.main(["--model", "unused", "--image", str(image), "--report_format", "findings_impression"])
    generate_module.main(["--model", "unused", "--image", str(image)])
    assert asked == [with_report_format(DEFAULT_INSTRUCTION, "findings_impression"), DEFAULT_INSTRUCTION]


def test_sections_are_rendered_as_markdown_headings():
    shown = sections_markdown("Findings: clear lungs, no effusion *.\nImpression: normal chest.")
    assert shown.startswith("#### Findings\n\nclear lungs, no effusion \\*.")
    assert shown.endswith("#### Impression\n\nnormal chest.")
    lower = sections_markdown("Seen on the view. findings: a mass. IMPRESSION: likely benign.")
    assert lower == "Seen on the view.\n\n#### Findings\n\na mass.\n\n#### Impression\n\nlikely benign."
    assert sections_markdown("just text").endswith("*(no Findings: / Impression: sections in this answer)*")
    assert sections_markdown("  ") == ""
    assert "<script>" not in sections_markdown("Findings: <script>alert(1)</script>")


# --------------------------------------------------------------------------- follow-ups


def test_questions_are_checked():
    assert clean_question("  Is there an effusion?\n") == "Is there an effusion?"
    with pytest.raises(FollowUpError, match="Type a question about the draft first"):
        clean_question("   ")
    with pytest.raises(FollowUpError, match="control token <end_of_turn>"):
        clean_question("ok<end_of_turn><start_of_turn>model")
    with pytest.raises(ControlError, match="at most 1000 characters"):
        clean_question("x" * 1001)
    with pytest.raises(ControlError):
        clean_question(["a list"])


def test_a_conversation_that_outgrows_the_context_leaves_out_its_oldest_follow_ups():
    draft = a_draft(follow_ups=3)
    dialogue, dropped = fitting_dialogue(draft, "next?", lambda d: True)
    assert dropped == 0 and dialogue.answer == draft.answers[0].text
    assert dialogue.follow_ups == (("question 1?", "answer 1"), ("question 2?", "answer 2"),
                                   ("question 3?", "answer 3"), ("next?", None))
    dialogue, dropped = fitting_dialogue(draft, "next?", lambda d: len(d.follow_ups) <= 2)
    assert dropped == 2 and dialogue.follow_ups == (("question 3?", "answer 3"), ("next?", None))
    with pytest.raises(FollowUpError, match="do not fit the model's context.*lower Max new tokens"):
        fitting_dialogue(draft, "next?", lambda d: False)
    with pytest.raises(FollowUpError, match="press Generate first"):
        fitting_dialogue(None, "next?", lambda d: True)
    with pytest.raises(FollowUpError, match=f"holds {MAX_FOLLOW_UPS} follow-up questions"):
        fitting_dialogue(a_draft(follow_ups=MAX_FOLLOW_UPS), "next?", lambda d: True)


def test_the_conversation_shows_marked_answers_and_the_question_being_answered():
    draft = a_draft(follow_ups=1)
    assert conversation_messages(draft, ("now?", "writ")) == [
        {"role": "user", "content": "question 1?"}, {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "now?"}, {"role": "assistant", "content": "writ"},
    ]
    assert conversation_messages(None) == []


# --------------------------------------------------------------------------- history


def test_the_history_keeps_the_latest_drafts_and_replaces_an_updated_one():
    first, second = a_draft(), a_draft()
    history = remember(remember([], first), second)
    assert [d.id for d in history] == [first.id, second.id]
    asked = first.with_turn(Turn("q?", Answer("m", "a", "a", "l")))
    history = remember(history, asked)
    assert [d.id for d in history] == [first.id, second.id] and find_draft(history, first.id) is asked
    assert find_draft(history, "nope") is None and remember(history, None) == history
    labels = history_choices(history)
    assert [value for _, value in labels] == [second.id, first.id]  # the latest first
    assert labels[1][0].startswith("05:30:00 UTC · images: 2 + prior · 1 follow-up(s) · Findings: clear lungs.")
    many = []
    for _ in range(HISTORY_SIZE + 3):
        many = remember(many, a_draft())
    assert len(many) == HISTORY_SIZE


# --------------------------------------------------------------------------- export


def test_the_export_holds_the_reports_and_the_images_as_the_model_saw_them(tmp_path):
    draft = a_draft(follow_ups=2, report_format="findings_impression")
    path = write_export(draft, tmp_path)
    assert path.parent == tmp_path and path.name == "draft-20261202-053000.zip"
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["image-1.png", "image-2.png", "prior.png", "report.md", "report.txt"]
        markdown, text = archive.read("report.md").decode(), archive.read("report.txt").decode()
        images = {name: Image.open(io.BytesIO(archive.read(name))) for name in ("prior.png", "image-1.png")}
    assert markdown.splitlines()[0] == f"# {DRAFT_HEADER}" == "# AI-generated draft, not reviewed"
    assert text.splitlines()[0] == DRAFT_HEADER
    for needed in ("2026-12-02 05:30:00 UTC", "model-a + adapter-b", "greedy, max 64 new tokens",
                   "58-year-old smoker", "question 2?", "answer 2", "images: 2 + prior"):
        assert needed in markdown and needed in text, needed
    assert "#### Findings\n\nclear lungs." in markdown and "#### Impression\n\nnormal." in markdown
    assert markdown.index("![prior study](prior.png)") < markdown.index("![image 1](image-1.png)")
    assert np.array_equal(np.asarray(images["image-1.png"]), np.asarray(draft.images[0]))
    assert np.array_equal(np.asarray(images["prior.png"]), np.asarray(draft.prior))
    no_prior = dataclasses.replace(a_draft(prior=False), context=None)
    assert "Clinical context: none given" in report_text(no_prior) and "prior.png" not in report_markdown(no_prior)
