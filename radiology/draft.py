"""The draft beside the image: the model's answer(s) to one study as a clinician reads, questions, keeps and
exports them.

A Draft holds what one Generate gave (the images as the model saw them, the instruction and clinical context,
each model's answer and settings line) and the follow-up questions asked about it since. The app keeps drafts in
the browser session only (gr.State); nothing here writes to disk except ``write_export``, into a folder its caller
gives and deletes once the file is served. No DICOM header value and no upload's file name is ever part of a draft.
"""

from __future__ import annotations

import html
import io
import re
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from radiology.data import Dialogue, control_token_in
from radiology.generate import LoadedModel, build_inputs
from radiology.serve import ControlError

__all__ = [
    "DRAFT_HEADER",
    "Answer",
    "Draft",
    "FollowUpError",
    "Turn",
    "clean_question",
    "conversation_messages",
    "find_draft",
    "fitting_dialogue",
    "history_choices",
    "marked",
    "prompt_fits",
    "remember",
    "report_markdown",
    "report_text",
    "sections_markdown",
    "write_export",
]

DRAFT_HEADER = "AI-generated draft, not reviewed"
DISCLAIMER_LINE = ("Research demo output, not a diagnosis: a qualified clinician reads the images and makes every "
                   "clinical decision.")
# The last line of an answer that did not end on its own (the settings line says it too, but a copied or exported
# answer travels without it).
STOPPED_MARK = "[stopped by user]"
NOT_RUN_MARK = "[not run: stopped by user]"
CUT_MARK = "[cut at {limit} new tokens: raise Max new tokens]"
MAX_QUESTION_CHARS = 1000
# Follow-up questions kept per draft, and drafts kept per browser session.
MAX_FOLLOW_UPS = 20
HISTORY_SIZE = 20


class FollowUpError(ValueError):
    """A follow-up question that cannot be asked now; the message says what to do."""


def marked(text: str, state: str, max_new_tokens: int) -> str:
    """The answer as the page shows it: with a last line saying it was stopped, not run, or cut at the limit
    (stream_side_by_side's states "stopped", "not run", "cut"); as it is otherwise."""
    if state == "not run":
        return NOT_RUN_MARK
    mark = {"stopped": STOPPED_MARK, "cut": CUT_MARK.format(limit=max_new_tokens)}.get(state)
    if mark is None:
        return text
    return f"{text}\n\n{mark}" if text else mark


@dataclass(frozen=True)
class Answer:
    """One model's answer: ``text`` as generated (what a later prompt carries), ``shown`` with its mark (what
    the page and the export show), and the settings line under it."""

    model: str
    text: str
    shown: str
    about: str


@dataclass(frozen=True)
class Turn:
    """A follow-up question and the served model's answer to it."""

    question: str
    answer: Answer


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Draft:
    """What one Generate gave, and the follow-up questions asked about it since."""

    images: tuple[Image.Image, ...]
    prior: Image.Image | None
    study: str  # UploadedStudy.describe(): "images: 3 (slices 1, 4, 7 of 7) + prior"
    instruction: str
    context: str | None
    answers: tuple[Answer, ...]
    report_format: str = "free"
    follow_ups: tuple[Turn, ...] = ()
    created: datetime = field(default_factory=_now)
    id: str = field(default_factory=_new_id)

    def dialogue(self, question: str, earlier: Sequence[Turn] | None = None) -> Dialogue:
        """The served model's conversation up to ``question``: its first answer, then ``earlier`` turns (default:
        every follow-up so far) with its own answers, as generated."""
        turns = self.follow_ups if earlier is None else earlier
        return Dialogue(None, self.answers[0].text,
                        (*((turn.question, turn.answer.text) for turn in turns), (question, None)))

    def with_turn(self, turn: Turn) -> Draft:
        return replace(self, follow_ups=(*self.follow_ups, turn))


def clean_question(text: object, limit: int = MAX_QUESTION_CHARS) -> str:
    """A follow-up question as the prompt will carry it. ControlError when it is not text or too long,
    FollowUpError when it is empty or holds a chat control token (it would change the prompt's turns)."""
    if text is not None and (not isinstance(text, str) or len(text.strip()) > limit):
        raise ControlError(f"The question must be text of at most {limit} characters; shorten it.", "question")
    text = (text or "").strip()
    if not text:
        raise FollowUpError("Type a question about the draft first, then press Ask.")
    token = control_token_in(text)
    if token is not None:
        raise FollowUpError(f"The question contains the chat control token {token}, which would change the "
                            "prompt's structure; remove it from the question.")
    return text


def fitting_dialogue(draft: Draft | None, question: str, fits: Callable[[Dialogue], bool]) -> tuple[Dialogue, int]:
    """The conversation to ask ``question`` in, and how many of the earliest follow-ups were left out so that the
    prompt ``fits`` (the first answer always stays). FollowUpError when there is no finished draft, when the
    draft holds MAX_FOLLOW_UPS questions, or when even the first answer alone does not fit."""
    if draft is None:
        raise FollowUpError("There is no draft to ask about: press Generate first (or restore a draft from the "
                            "history), then ask.")
    if len(draft.follow_ups) >= MAX_FOLLOW_UPS:
        raise FollowUpError(f"This draft holds {MAX_FOLLOW_UPS} follow-up questions, the most one draft takes: "
                            "press Generate for a new draft to go on.")
    for dropped in range(len(draft.follow_ups) + 1):
        dialogue = draft.dialogue(question, draft.follow_ups[dropped:])
        if fits(dialogue):
            return dialogue, dropped
    raise FollowUpError("The draft and this question do not fit the model's context with the Max new tokens "
                        "asked: lower Max new tokens, shorten the question, or generate a shorter draft.")


def conversation_messages(draft: Draft | None, pending: tuple[str, str] | None = None) -> list[dict[str, str]]:
    """The follow-up questions and answers as chat messages (user, assistant), and a question being answered."""
    messages: list[dict[str, str]] = []
    turns = [(turn.question, turn.answer.shown) for turn in (draft.follow_ups if draft is not None else ())]
    for question, answer in [*turns, *([pending] if pending else [])]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


# --------------------------------------------------------------------------- report layout

_SECTION = re.compile(r"\b(findings|impression)\s*:", re.IGNORECASE)


def _markdown_escaped(text: str) -> str:
    """``text`` with Markdown's markup characters escaped, line breaks kept."""
    escaped = "".join(f"\\{c}" if c in "\\`*_[]|~#<>" else c for c in html.escape(text, quote=False))
    return re.sub(r"(?<!\n)\n(?!\n)", "  \n", escaped)  # a single line break stays one; blank lines part paragraphs


def _sections(text: str) -> list[tuple[str | None, str]]:
    """(heading, body) pieces of an answer: the text before any heading (heading None), then each "Findings:"
    or "Impression:" and what follows it."""
    pieces: list[tuple[str | None, str]] = []
    matches = list(_SECTION.finditer(text))
    if not matches or matches[0].start() > 0:
        pieces.append((None, text[: matches[0].start() if matches else len(text)].strip()))
    for match, following in zip(matches, [*matches[1:], None]):
        body = text[match.end(): following.start() if following else len(text)].strip()
        pieces.append((match.group(1).capitalize(), body))
    return [(heading, body) for heading, body in pieces if heading is not None or body]


def sections_markdown(text: str) -> str:
    """An answer asked for in "Findings:" and "Impression:" sections, as Markdown with one heading per
    section; an answer without them is shown as it is, with a note saying so."""
    if not text.strip():
        return ""
    pieces = _sections(text)
    if all(heading is None for heading, _ in pieces):
        return f"{_markdown_escaped(text.strip())}\n\n*(no Findings: / Impression: sections in this answer)*"
    return "\n\n".join(f"#### {heading}\n\n{_markdown_escaped(body)}" if heading else _markdown_escaped(body)
                       for heading, body in pieces)


def _image_names(draft: Draft) -> list[tuple[str, str, Image.Image]]:
    """(file name, caption, image) of the images the model saw, in prompt order (the prior first)."""
    named = [("prior.png", "prior study", draft.prior)] if draft.prior is not None else []
    width = len(str(len(draft.images)))
    named += [(f"image-{n:0{width}d}.png", f"image {n}", image) for n, image in enumerate(draft.images, start=1)]
    return named


def _facts(draft: Draft) -> list[tuple[str, str]]:
    facts = [("Created", f"{draft.created:%Y-%m-%d %H:%M:%S} UTC"), ("Sent to the model", draft.study)]
    for number, answer in enumerate(draft.answers):
        facts.append(("Model" if number == 0 else "Baseline", answer.model))
        facts.append(("Settings" if number == 0 else "Baseline settings", answer.about))
    facts += [("Report format", draft.report_format), ("Instruction", draft.instruction),
              ("Clinical context", draft.context or "none given")]
    return facts


def report_markdown(draft: Draft) -> str:
    """The draft as Markdown: the header line first, then when and how it was made, each answer, the follow-up
    questions, and the images (PNG files beside it in the export)."""
    lines = [f"# {DRAFT_HEADER}", "", f"*{DISCLAIMER_LINE}*", ""]
    lines += [f"- **{name}:** {_markdown_escaped(value)}" for name, value in _facts(draft)]
    for number, answer in enumerate(draft.answers):
        title = "Draft" if number == 0 else "Baseline draft, for comparison"
        body = (sections_markdown(answer.shown) if draft.report_format == "findings_impression"
                else _markdown_escaped(answer.shown))
        lines += ["", f"## {title} ({_markdown_escaped(answer.model)})", "", body]
    if draft.follow_ups:
        lines += ["", "## Follow-up questions"]
        for number, turn in enumerate(draft.follow_ups, start=1):
            lines += ["", f"**Question {number}:** {_markdown_escaped(turn.question)}", "",
                      f"**Answer {number}:** {_markdown_escaped(turn.answer.shown)}"]
    lines += ["", "## Images, as the model saw them", ""]
    lines += [f"![{caption}]({name})" for name, caption, _ in _image_names(draft)]
    return "\n".join(lines) + "\n"


def report_text(draft: Draft) -> str:
    """The draft as plain text, laid out as report_markdown."""
    lines = [DRAFT_HEADER, DISCLAIMER_LINE, ""]
    lines += [f"{name}: {value}" for name, value in _facts(draft)]
    for number, answer in enumerate(draft.answers):
        title = "DRAFT" if number == 0 else "BASELINE DRAFT, FOR COMPARISON"
        lines += ["", f"{title} ({answer.model})", answer.shown]
    if draft.follow_ups:
        lines += ["", "FOLLOW-UP QUESTIONS"]
        for number, turn in enumerate(draft.follow_ups, start=1):
            lines += ["", f"Question {number}: {turn.question}", f"Answer {number}: {turn.answer.shown}"]
    lines += ["", "IMAGES, AS THE MODEL SAW THEM: " + ", ".join(name for name, _, _ in _image_names(draft))]
    return "\n".join(lines) + "\n"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # a fresh PNG: no metadata of the upload travels with it
    return buffer.getvalue()


def write_export(draft: Draft, folder: Path) -> Path:
    """The draft as a .zip in ``folder``: report.md, report.txt and the images as the model saw them (PNG).
    Its name says when the draft was made, nothing else."""
    path = Path(folder) / f"draft-{draft.created:%Y%m%d-%H%M%S}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("report.md", report_markdown(draft))
        archive.writestr("report.txt", report_text(draft))
        for name, _, image in _image_names(draft):
            archive.writestr(name, _png(image))
    return path


# --------------------------------------------------------------------------- history (browser session only)


def remember(history: Sequence[Draft] | None, draft: Draft | None, limit: int = HISTORY_SIZE) -> list[Draft]:
    """The session's drafts with ``draft`` in: it replaces its earlier version (same id: a follow-up was
    added), or comes last; only the ``limit`` latest are kept."""
    drafts = list(history or [])
    if draft is None:
        return drafts
    at = next((i for i, kept in enumerate(drafts) if kept.id == draft.id), None)
    if at is None:
        drafts.append(draft)
    else:
        drafts[at] = draft
    return drafts[-limit:]


def history_choices(history: Sequence[Draft] | None) -> list[tuple[str, str]]:
    """(label, id) per draft, the latest first: its time, its images and the start of its answer."""
    choices = []
    for draft in reversed(list(history or [])):
        start = " ".join(draft.answers[0].text.split())[:60] if draft.answers else ""
        questions = f" · {len(draft.follow_ups)} follow-up(s)" if draft.follow_ups else ""
        choices.append((f"{draft.created:%H:%M:%S} UTC · {draft.study}{questions} · {start or '(empty)'}", draft.id))
    return choices


def find_draft(history: Sequence[Draft] | None, draft_id: Any) -> Draft | None:
    """The draft of the session's history with ``draft_id`` (None: none such)."""
    return next((draft for draft in history or () if draft.id == draft_id), None)


def prompt_fits(loaded: LoadedModel, draft: Draft, dialogue: Dialogue, max_new_tokens: int) -> bool:
    """Whether the prompt of ``dialogue`` about the draft's images and an answer of ``max_new_tokens`` fit the
    decode engine's cache (engine.fits), or the model's positions where it has no engine. A served model's own
    server checks the length of what it is sent, and its refusal reaches the page."""
    if not isinstance(loaded, LoadedModel):
        return True
    inputs = build_inputs(loaded.processor, list(draft.images), draft.instruction, draft.context, draft.prior,
                          dialogue=dialogue)
    length = inputs["input_ids"].shape[1]
    if loaded.engine is not None:
        return loaded.engine.fits(length, max_new_tokens)
    return length + max_new_tokens <= loaded.model.config.get_text_config().max_position_embeddings
