"""Versioned prompt templates (files under `prompts/<kind>/<version>/`) and their rendering.

A generation prompt is assembled from `system.txt`, `user.txt`, the category's
`category_<slug>.txt` and the question type's `format_<type>.txt`; a refinement prompt from
`refine/<version>/{system,user}.txt`. A window of a long video (`tasks.qa.windows`) adds
`window.txt` after its caption lines; a whole video's prompt does not use it. Templates use `$name` placeholders (string.Template), so JSON
examples in them need no escaping. A prompt's version id is `<version>-<hash of the files used>`:
editing a file without renaming its folder still yields a new id, so rows record exactly which text
produced them, and the stage fingerprint changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from string import Template
from typing import Any

from tasks.engine.store import stable_hash
from tasks.media.timecode import mmss
from tasks.qa.captions import VideoCaptions, Window, caption_lines

# Package data of tasks.qa: read through importlib.resources, so an installed wheel has them too.
PROMPTS_DIR = files("tasks.qa") / "prompts"

QUESTION_TYPE_LABELS = {"multiple_choice": "multiple-choice with four options A-D", "open_ended": "open-ended"}
LETTERS = ("A", "B", "C", "D")


class PromptError(ValueError):
    """A prompt version or template file that does not exist."""


def available_versions(kind: str) -> list[str]:
    root = PROMPTS_DIR / kind
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def category_slug(category: str) -> str:
    return category.lower().replace(" ", "_")


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]
    version: str


class PromptSet:
    """The template files of one version of one kind (`generate` or `refine`)."""

    def __init__(self, kind: str, version: str) -> None:
        directory = PROMPTS_DIR / kind / version
        if not directory.is_dir():
            raise PromptError(f"no {kind} prompt version {version!r}; available: {', '.join(available_versions(kind)) or 'none'}")
        self.kind = kind
        self.version = version
        self._texts = {p.name: p.read_text() for p in sorted(directory.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt")}

    def text(self, name: str) -> str:
        try:
            return self._texts[name]
        except KeyError:
            raise PromptError(f"{self.kind} prompt version {self.version!r} lacks {name}") from None

    def version_id(self, names: list[str]) -> str:
        return f"{self.version}-{stable_hash({n: self.text(n) for n in names}, 8)}"

    def fingerprint(self) -> str:
        return stable_hash(self._texts)


WINDOW_FILE = "window.txt"


def generation_prompt(prompts: PromptSet, window: Window, category: str, question_type: str, n_questions: int) -> Prompt:
    """The generation request for one window of a video: its caption lines, and for a part of a
    video (not the whole) the window note naming the part's time range."""
    span = None if window.whole else (window.start_s, window.end_s)
    return _generation(prompts, window.video, caption_lines(window.view), span, category, question_type, n_questions)


def prompt_frame(prompts: PromptSet, video: VideoCaptions, category: str, question_type: str, n_questions: int, windowed: bool) -> Prompt:
    """A generation prompt of `video` without caption lines: what a window costs besides its lines.
    A windowed frame's note gives the video's duration as both ends: no window's times are wider."""
    span = (video.duration_s, video.duration_s) if windowed else None
    return _generation(prompts, video, "", span, category, question_type, n_questions)


def _generation(
    prompts: PromptSet, video: VideoCaptions, lines: str, span: tuple[float, float] | None, category: str, question_type: str, n_questions: int
) -> Prompt:
    names = ["system.txt", "user.txt", f"category_{category_slug(category)}.txt", f"format_{question_type}.txt"]
    system, user, guidance, fmt = (prompts.text(n) for n in names)
    if span is not None:
        names.append(WINDOW_FILE)
        note = Template(prompts.text(WINDOW_FILE)).substitute(start=mmss(span[0]), end=mmss(span[1]), duration=mmss(video.duration_s))
        lines = f"{lines}\n\n{note.strip()}"
    user_text = Template(user).substitute(
        duration=mmss(video.duration_s),
        captions=lines,
        n_questions=n_questions,
        category=category,
        question_type=QUESTION_TYPE_LABELS[question_type],
        category_guidance=guidance.strip(),
        format=Template(fmt).substitute(n_questions=n_questions).strip(),
    )
    messages = [{"role": "system", "content": system.strip()}, {"role": "user", "content": user_text.strip()}]
    return Prompt(messages, prompts.version_id(names))


def refine_prompt(prompts: PromptSet, question: str, options: list[str] | None, answer: str, reasoning: str) -> Prompt:
    names = ["system.txt", "user.txt"]
    options_block = "Options:\n" + "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, options)) if options else ""
    user_text = Template(prompts.text("user.txt")).substitute(question=question, options=options_block, answer=answer, reasoning=reasoning)
    messages = [{"role": "system", "content": prompts.text("system.txt").strip()}, {"role": "user", "content": user_text.strip()}]
    return Prompt(messages, prompts.version_id(names))
