# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2 app`: chat with ViCA2 about a video or an image in the browser (a Gradio web demo).

    vica2 app --model DIR_OR_REPO            # serves http://127.0.0.1:7860
    vica2 app                                # offline: the built-in tiny model (a toy trained on synthetic clips)
    VICA2_MODEL=owner/name python app.py     # what a Hugging Face Space runs (app.py as is)

Each upload is decoded and encoded once (vision towers + prefill of the prompt up to the question); every turn of
the chat continues from that cached prefix, through the shared prefix API of `vica2.tools.inference`. Each browser tab
has its own conversation; one model call runs at a time (a queue, whose position the page shows). Needs the `app`
extra: `pip install 'vica2-hf[app]'`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path


if __package__ in (None, ""):
    # Run as a script (`python app.py`, as a Space does): the repository root is the `vica2` package (setup.cfg maps
    # it so when installed); register it under that name so the imports below work in both cases.
    import types

    _package = types.ModuleType("vica2")
    _package.__path__ = [str(Path(__file__).resolve().parent)]
    sys.modules.setdefault("vica2", _package)

from vica2.tools.inference import (  # noqa: E402
    ChatSession,
    UsageError,
    cache_bytes_per_token,
    implied_token_counts,
    load_model_and_processor,
)
from vica2.tools.shell import add_model_options, guarded, one_line  # noqa: E402
from vica2.video_loading_vica2 import VideoLoadError  # noqa: E402


GRADIO_INSTALL_HINT = "The web demo needs Gradio: pip install 'vica2-hf[app]' (or pip install gradio)."
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
TOY_MODEL_NOTE = (
    "**Offline demo: {notice}** Try the example clip and its example questions. Start the app with "
    "`--model DIR_OR_REPO` (or set `VICA2_MODEL`) to chat with a real ViCA2."
)
THUMBNAIL_HEIGHT = 96
MAX_QUESTION_CHARS = 2000  # a 40,000-character question costs GBs of attention mask and minutes of prefill
MAX_FILE_SIZE_MB = 200
EXAMPLE_QUESTIONS = [  # VSI-Bench style: counting, distance, relative position, route
    "How many chairs are in this room?",
    "What is the distance between the table and the ball, in meters?",
    "Which is closer to the camera, the table or the ball?",
    "In which direction does the ball roll?",
]
# Errors a user can cause (bad file, bad setting, too long a video): shown in the page, the app goes on. The app
# decodes videos itself (its thumbnails come from the frames the model sees), so the reader's error is one of them.
USER_ERRORS = (UsageError, VideoLoadError)


class UserError(UsageError):
    """A problem told to a web visitor: a short sentence, and the technical `detail` shown on demand."""

    def __init__(self, sentence: str, detail: str = ""):
        super().__init__(sentence)
        self.detail = detail


# Full thumbnails in the strip (8 to a row, more rows as needed), captions whole; on a phone the chat column is not
# pushed below by the settings; the first message starts clear of the chat's top edge.
CSS = """
#frames-strip, #frames-strip .grid-wrap {
  height: auto !important; min-height: 0 !important; max-height: none !important;
}
#frames-strip .grid-wrap { overflow: visible !important; }
#frames-strip .grid-container { grid-template-columns: repeat(8, minmax(0, 1fr)) !important; }
#frames-strip .caption-label { white-space: normal !important; max-width: 100% !important; }
#chat .bubble-wrap { padding-top: 40px; }
@media (max-width: 640px) {
  #frames-strip .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
}
"""


def import_gradio():
    """Gradio, imported only when the app is built (an optional dependency), with analytics off: the app must work
    with no network at all, and a version check or telemetry call would try to reach the internet."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError as error:
        raise ImportError(GRADIO_INSTALL_HINT) from error
    return gradio


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TokenSettings:
    """The page's token-ratio controls. `frames` are sampled from the video; Hiera encodes `hiera_frames` of them
    (every k-th, k = frames / hiera_frames), so the model's frame budget is set to `frames` for the call."""

    frames: int
    hiera_frames: int
    siglip_pool_stride: int
    hiera_pool_stride: int
    time_instruction: bool = True

    @classmethod
    def parse(cls, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction=True):
        """Settings from the page's fields, or a `UsageError` naming the field and the fix."""
        values = {}
        for label, name, value in (("Frames", "frames", frames), ("Hiera frames", "hiera_frames", hiera_frames),
                                   ("SigLIP pool stride", "siglip_pool_stride", siglip_pool_stride),
                                   ("Hiera pool stride", "hiera_pool_stride", hiera_pool_stride)):
            number = _whole_number(value)
            if number is None or number < 1:
                raise UsageError(f"{label} must be a whole number of at least 1 (got {value!r}).")
            values[name] = number
        if values["frames"] % values["hiera_frames"]:
            raise UsageError(
                f"Hiera frames ({values['hiera_frames']}) must divide Frames ({values['frames']}): Hiera encodes every "
                "k-th sampled frame (ViCA2-7B: 32 of 64, every 2nd)."
            )
        return cls(**values, time_instruction=bool(time_instruction))

    def overrides(self) -> dict:
        return {"video_frames_budget": self.frames, "hiera_frames": self.hiera_frames,
                "siglip_pool_stride": self.siglip_pool_stride, "hiera_pool_stride": self.hiera_pool_stride}


def _whole_number(value) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def media_kind(path: str | Path) -> str:
    """"image" for the usual image suffixes, else "video" (PyAV reads nearly any container)."""
    return "image" if Path(path).suffix.lower() in IMAGE_SUFFIXES else "video"


# ---------------------------------------------------------------------------------------------------- one tab
@dataclass
class TabState:
    """One browser tab's conversation (held in `gr.State`, so each tab has its own)."""

    session: object = None  # vica2.tools.inference.ChatSession; None before the first upload or once released
    media_path: str | None = None
    kind: str | None = None
    settings: TokenSettings | None = None
    messages: list = field(default_factory=list)  # what the chatbot shows: {"role", "content"} dicts
    thumbnails: list = field(default_factory=list)  # (PIL image, caption) per sampled frame
    decode_s: float = 0.0
    note: str = ""  # why the conversation was restarted, if it was
    turns_before: int = 0  # the session's turns before the last Reset (the stats count this conversation's)
    image_size: tuple | None = None  # (width, height) of an image


# ---------------------------------------------------------------------------------------------------- the app
class Vica2App:
    """The demo's handlers (plain functions of the page's values and a tab's `TabState`, testable without a
    browser) and `build()`, which lays them out as a Gradio page.

    Model calls (encoding an upload, answering a turn) share one queue slot, so one runs at a time; every tab keeps
    its own conversation, and at most `max_conversations` keep their caches (the oldest is released first).
    """

    def __init__(self, model, processor, *, model_name: str, toy_notice: str | None = None, example_video=None,
                 example_questions: list[str] | None = None, frames: int | None = None, max_new_tokens: int = 128,
                 cache_budget_gb: float = 4.0,
                 max_conversations: int = 4, max_question_chars: int = MAX_QUESTION_CHARS,
                 max_file_size_mb: float = MAX_FILE_SIZE_MB):
        self.model, self.processor = model, processor
        self.model_name, self.toy_notice = model_name, toy_notice
        self.example_questions = list(example_questions or EXAMPLE_QUESTIONS)
        self.example_video = str(example_video) if example_video else None
        self.max_new_tokens, self.cache_budget_gb = max_new_tokens, cache_budget_gb
        self.max_conversations, self.max_question_chars = max_conversations, max_question_chars
        self.max_file_size_mb = max_file_size_mb
        config = model.config
        frames = frames or config.video_frames_budget
        # The checkpoint's Hiera share of the frame budget, carried over to `frames` (7B: 32 of 64).
        hiera = max(1, frames * config.hiera_frames // config.video_frames_budget)
        self.default_settings = TokenSettings(frames, hiera, config.siglip_pool_stride, config.hiera_pool_stride,
                                              processor.add_time_instruction)  # as the model was trained
        self._live: OrderedDict[int, TabState] = OrderedDict()  # tabs holding a cache, least recently used first
        self._live_lock = threading.Lock()  # Gradio drops a closed tab's state from its own thread
        self._media_users: Counter = Counter()  # media path -> tabs about it (an upload is deleted at zero)

    # ------------------------------------------------------------------ handlers
    def preview(self, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None) -> str:
        """The visual tokens (and cache size) the settings imply, shown before anything runs."""
        try:
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            if tab is not None and tab.kind == "image":
                width, height = tab.image_size
                counts = implied_token_counts(self.model.config, image_size=(height, width))
                what = f"An image ({width}x{height}; its tokens follow its size, the frame settings apply to videos)"
            else:
                counts = implied_token_counts(self.model.config, num_frames=settings.frames, **settings.overrides())
                what = f"A video at {settings.frames} frames"
        except USER_ERRORS as error:
            return f"⚠️ {one_line(error)}"
        cache_mb = counts["total"] * cache_bytes_per_token(self.model) / 2**20
        return (f"{what}: **{counts['total']:,} visual tokens** (SigLIP {counts['siglip']:,} + Hiera "
                f"{counts['hiera']:,}), a cache of about {cache_mb:,.1f} MB.")

    def settings_changed(self, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction,
                         tab=None) -> tuple[str, str]:
        """(settings summary, status): says before the next question that new settings start a new conversation."""
        summary = self.preview(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab)
        if tab is None or tab.media_path is None:
            return summary, "Upload a video or an image to start."
        try:
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
        except USER_ERRORS as error:
            return summary, error_text(error)
        if self._settings_changed(tab, settings):
            return summary, ("New settings: your next question starts a new conversation (the video is encoded "
                             "again with them).")
        return summary, self._ready(tab)

    def upload(self, path, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None):
        """A new video or image: decode and encode it once, start a new conversation about it.

        Returns (tab, chat messages, thumbnails, stats, status). On a user error the tab keeps its previous
        conversation and the status says what went wrong."""
        tab = tab if tab is not None else TabState()
        if not path:
            return tab, tab.messages, tab.thumbnails, self.stats(tab), "Upload a video or an image to start."
        try:
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            new_tab = self._open(str(path), settings)
        except USER_ERRORS as error:
            self._release_upload(str(path))  # a file that could not be used is not kept
            return tab, tab.messages, tab.thumbnails, self.stats(tab), error_text(error, path)
        self._forget(tab)
        self._keep(new_tab)
        return new_tab, new_tab.messages, new_tab.thumbnails, self.stats(new_tab), self._ready(new_tab)

    def upload_example(self, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None):
        """The generated example clip, as if uploaded."""
        return self.upload(self.example_video, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                           time_instruction, tab)

    def show_question(self, question, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction,
                      tab=None):
        """The typed question in the chat at once, before the model call (which may wait in the queue).

        Returns (question for `ask`, chat messages, question box, status); a question `ask` would refuse stays in
        the box and the chat is unchanged (`ask` says why)."""
        messages = tab.messages if tab is not None else []
        text = (question or "").strip()
        try:
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            if self._question_problem(text, tab):
                raise UsageError("refused")
        except USER_ERRORS:
            return question, messages, question, "Checking…"
        restart = tab.session is None or self._settings_changed(tab, settings)
        shown = [] if restart and tab.session is not None else messages
        status = "Encoding again with the new settings…" if restart else "Waiting for the model…"
        return text, [*shown, {"role": "user", "content": text}], "", status

    def ask(self, question, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None):
        """Answer one turn, streamed: yields (tab, chat messages, thumbnails, stats, status, question box), first
        with the question and an empty answer, then as each token's text arrives.

        The turn continues from the conversation's cache. Changed settings (or a released cache) restart the
        conversation on the same media first (new thumbnails), and the status says so."""
        tab = tab if tab is not None else TabState()
        question = (question or "").strip()
        try:
            problem = self._question_problem(question, tab)
            if problem:
                raise UsageError(problem)
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            if tab.session is None or self._settings_changed(tab, settings):
                why = ("the settings changed" if tab.session is not None else
                       "its cache had been released to make room for other conversations")
                tab = self._restart(tab, settings, f"New conversation: {why}, so the media was encoded again.")
        except USER_ERRORS as error:
            yield tab, tab.messages, tab.thumbnails, self.stats(tab), error_text(error, tab.media_path), question
            return
        self._keep(tab)
        before = tab.messages
        tab.messages = [*before, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        status = tab.note or "Answering…"
        yield tab, tab.messages, tab.thumbnails, self.stats(tab), status, ""
        answer = ""
        try:
            for piece in tab.session.iter_ask(question, max_new_tokens=self.max_new_tokens):
                answer += piece
                tab.messages[-1] = {"role": "assistant", "content": answer}
                yield tab, tab.messages, tab.thumbnails, self.stats(tab), status, ""
        except USER_ERRORS as error:  # e.g. a prompt longer than the model's positions: the chat stays as it was
            tab.messages = before
            yield tab, tab.messages, tab.thumbnails, self.stats(tab), error_text(error, tab.media_path), question
            return
        tab.messages[-1] = {"role": "assistant", "content": tab.session.last_answer.text}
        status = self._ready(tab)  # still says why the conversation restarted, once
        tab.note = ""
        yield tab, tab.messages, tab.thumbnails, self.stats(tab), status, ""

    def reset(self, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None):
        """Forget the chat and start again about the same media (re-encoded only if the settings changed).

        Returns (tab, chat messages, thumbnails, stats, status)."""
        tab = tab if tab is not None else TabState()
        if tab.media_path is None:
            return tab, [], [], self.stats(tab), "Upload a video or an image to start."
        try:
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            if tab.session is None or self._settings_changed(tab, settings):
                tab = self._restart(tab, settings, "")
            else:
                tab.session.reset()
                tab.messages, tab.turns_before = [], tab.session.stats.turns
        except USER_ERRORS as error:
            return tab, tab.messages, tab.thumbnails, self.stats(tab), error_text(error, tab.media_path)
        self._keep(tab)
        return tab, tab.messages, tab.thumbnails, self.stats(tab), "New conversation. " + self._ready(tab)

    def stats(self, tab: TabState | None) -> str:
        """The panel under the frames: tokens per stream, cache reuse, tower runs and timings of this conversation."""
        if tab is None or tab.session is None:
            return ""
        session, media = tab.session, tab.session.media
        turns = session.stats.turns - tab.turns_before
        lines = [
            f"**Visual tokens**: SigLIP {media.visual_tokens['siglip']:,} · Hiera {media.visual_tokens['hiera']:,}",
            f"**This upload**: decoded in {tab.decode_s:.2f} s, encoded in {session.encode_s:.2f} s · "
            f"vision towers ran {session.stats.tower_runs}× · {turns} turn(s)",
        ]
        answer = session.last_answer
        if answer is not None and turns:
            timing = answer.timings
            speed = timing.get("decode_tokens_per_s", float("nan"))
            lines.append(
                f"**Last turn**: prompt {answer.prompt_tokens:,} tokens ({answer.cached_tokens:,} from the cache, "
                f"{answer.prompt_tokens - answer.cached_tokens:,} prefilled) · generated {answer.new_tokens} · "
                f"first token after {timing.get('time_to_first_token_s', 0.0):.2f} s"
                + (f" · {speed:.1f} tokens/s" if speed == speed else "")
            )
        return "\n\n".join(lines)

    # ------------------------------------------------------------------ conversations
    def _question_problem(self, question: str, tab: TabState | None) -> str | None:
        if not question:
            return "Type a question first."
        if len(question) > self.max_question_chars:
            return (f"Your question is {len(question):,} characters long; this app takes questions of up to "
                    f"{self.max_question_chars:,} characters. Please shorten it.")
        if tab is None or tab.media_path is None:
            return "Upload a video or an image first (or try the example clip)."
        return None

    def _open(self, path: str, settings: TokenSettings) -> TabState:
        """Decode `path` once, check it fits the memory budget, and encode it into a new `ChatSession`."""
        if not Path(path).is_file():
            raise UserError("This file is no longer on the server: please upload it again.", f"{Path(path).name}: "
                            "no such file.")
        kind = media_kind(path)
        session = ChatSession(self.model, self.processor, num_frames=settings.frames,
                              add_time_instruction=settings.time_instruction, max_new_tokens=self.max_new_tokens,
                              max_question_chars=self.max_question_chars, **settings.overrides())
        start = time.perf_counter()
        if kind == "video":
            self._check_budget(implied_token_counts(self.model.config, num_frames=settings.frames,
                                                    **settings.overrides())["total"], f"{settings.frames} frames",
                               "Sample fewer frames or use larger pool strides.")
            try:
                decoded = self.processor.load_video(path, num_frames=settings.frames, keep_frames=True,
                                                    **settings.overrides())  # full frames for the thumbnails
            except VideoLoadError as error:
                raise UserError("This file could not be read as a video.", one_line(error)) from None
            thumbnails, size = video_thumbnails(decoded), None
            decode_s = time.perf_counter() - start
            session.set_video(decoded)
        else:
            image = open_image(path)
            self._check_budget(implied_token_counts(self.model.config, image_size=(image.height, image.width))["total"],
                               f"{image.width}x{image.height} pixels", "Use a smaller image.")
            thumbnails, size = [(thumbnail(image), f"image {image.width}x{image.height}")], image.size
            decode_s = time.perf_counter() - start
            session.set_image(image)
        with self._live_lock:
            self._media_users[path] += 1
        return TabState(session=session, media_path=path, kind=kind, settings=settings, thumbnails=thumbnails,
                        decode_s=decode_s, image_size=size)

    @staticmethod
    def _settings_changed(tab: TabState, settings: TokenSettings) -> bool:
        return tab.kind == "video" and settings != tab.settings  # an image's tokens follow its size alone

    def _restart(self, tab: TabState, settings: TokenSettings, note: str) -> TabState:
        new_tab = self._open(tab.media_path, settings)
        new_tab.note = note
        self._forget(tab)
        return new_tab

    def _check_budget(self, visual_tokens: int, what: str, fix: str) -> None:
        needed = visual_tokens * cache_bytes_per_token(self.model)
        if needed > self.cache_budget_gb * 2**30:
            raise UserError(
                f"Too long for this app's memory: {what} are {visual_tokens:,} visual tokens. {fix}",
                f"Their cache needs {needed / 2**30:.2f} GB, but each conversation may use "
                f"{self.cache_budget_gb:g} GB (the server's --cache-budget-gb).",
            )
        limit = self.model.config.text_config.max_position_embeddings
        if visual_tokens >= limit:
            raise UserError(f"Too long for this model: {what} are {visual_tokens:,} visual tokens. {fix}",
                            f"The model has {limit:,} positions.")

    def _keep(self, tab: TabState) -> None:
        """Mark `tab` as the most recent holder of a cache; release the oldest beyond `max_conversations`."""
        with self._live_lock:
            self._live[id(tab)] = tab
            self._live.move_to_end(id(tab))
            while len(self._live) > self.max_conversations:
                _, oldest = self._live.popitem(last=False)
                oldest.session = None  # its next turn re-encodes the media (the tab is told why)

    def _forget(self, tab: TabState | None) -> None:
        """`tab` is done (replaced, or its browser tab closed): drop its cache, and its upload once no tab uses it."""
        if tab is None:
            return
        with self._live_lock:
            self._live.pop(id(tab), None)
            path, tab.media_path = tab.media_path, None
            if path is None:
                return
            self._media_users[path] -= 1
            if self._media_users[path] > 0:
                return
            del self._media_users[path]
        self._release_upload(path)

    def _release_upload(self, path: str) -> None:
        """Delete `path` if it is a visitor's upload in Gradio's upload folder that no tab uses (never our files)."""
        if self._media_users.get(path) or path == self.example_video:
            return
        upload_folder = Path(import_gradio().utils.get_upload_folder()).resolve()
        file = Path(path).resolve()
        if upload_folder in file.parents:
            file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                file.parent.rmdir()  # Gradio's folder for this one upload, if now empty

    def _ready(self, tab: TabState) -> str:
        name = Path(tab.media_path).name if tab.media_path else ""
        return f"{tab.note + ' ' if tab.note else ''}Ready: ask about {name}."

    # ------------------------------------------------------------------ the page
    def build(self):
        """The Gradio page: media and settings on the left, the chat, frames and figures on the right (on a phone:
        one column, the chat right after the media)."""
        gr = import_gradio()
        defaults = self.default_settings
        # Thumbnails are removed an hour after they were made, uploads when no tab uses them (and all at exit).
        with gr.Blocks(title="ViCA2", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
            tab, pending = gr.State(None, delete_callback=self._forget), gr.State("")
            gr.Markdown(f"# ViCA2: ask about a video\nModel: `{self.model_name}`. Upload a video or an image, then "
                        "chat about it: it is encoded once and every turn continues from its cached prefix.")
            if self.toy_notice:
                gr.Markdown(TOY_MODEL_NOTE.format(notice=self.toy_notice), elem_id="toy-note")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=300):
                    media = gr.File(label=f"Video or image (up to {self.max_file_size_mb:g} MB)",
                                    file_types=["video", "image"], type="filepath", elem_id="media", height=110)
                    example = gr.Button("Try the example clip", variant="primary", elem_id="example",
                                        visible=self.example_video is not None)
                    video_view = gr.Video(label="The video", interactive=False, visible=False, elem_id="media-video",
                                          height=180)
                    image_view = gr.Image(label="The image", interactive=False, visible=False, elem_id="media-image",
                                          height=180)
                    controls, summary = self._settings_panel(gr, defaults, self.preview(*_values(defaults)))
                with gr.Column(scale=2, elem_id="chat-column"):
                    status = gr.Markdown("Upload a video or an image to start.", elem_id="status")
                    chat = gr.Chatbot(show_label=False, elem_id="chat", height=380, buttons=[],
                                      placeholder="Your questions and ViCA2's answers appear here.")
                    with gr.Row():
                        question = gr.Textbox(placeholder="Ask about the video or image", show_label=False,
                                              scale=4, lines=1, elem_id="question")
                        ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                        reset = gr.Button("New chat", scale=1, min_width=80, elem_id="reset")
                    gr.Markdown(f"Questions of up to {self.max_question_chars:,} characters.", elem_id="limit")
                    gr.Examples([[text] for text in self.example_questions], [question], label="Example questions",
                                elem_id="example-questions")
                    frame_strip = gr.Gallery(label="Sampled frames (time in the video)", columns=8, height="auto",
                                             object_fit="contain", allow_preview=False, elem_id="frames-strip")
                    stats = gr.Markdown(elem_id="stats")
            self._wire(gr, tab, pending, media, example, controls, summary, status, chat, question, ask, reset,
                       frame_strip, stats, video_view, image_view)
        page.queue(default_concurrency_limit=1)
        return page

    def launch(self, host: str = "127.0.0.1", port: int = 7860, **launch_kwargs):
        """Build the page and serve it (`launch_kwargs` go to Gradio's `launch`, e.g. prevent_thread_lock)."""
        allowed = [str(Path(self.example_video).parent)] if self.example_video else []  # the example's preview
        page = self.build()
        page.launch(server_name=host, server_port=port, ssr_mode=False, show_error=True, css=CSS,
                    max_file_size=f"{self.max_file_size_mb:g}mb", allowed_paths=allowed, **launch_kwargs)
        return page

    @staticmethod
    def _settings_panel(gr, defaults: TokenSettings, summary: str) -> tuple[list, object]:
        """The token-ratio controls, collapsed, and the summary of what they imply: each field says what it does."""
        with gr.Accordion("Token ratio (advanced)", open=False, elem_id="token-ratio"):
            return [
                gr.Number(defaults.frames, label="Frames sampled", precision=0, elem_id="frames",
                          info="How many frames of the video the model sees, evenly spaced."),
                gr.Number(defaults.hiera_frames, label="Hiera frames", precision=0, elem_id="hiera-frames",
                          info="How many of those the spatial encoder (Hiera) also sees; must divide the frames."),
                gr.Number(defaults.siglip_pool_stride, label="SigLIP pool stride", precision=0, elem_id="siglip-stride",
                          info="Shrinks each frame's semantic tokens by this factor per side (larger: fewer tokens)."),
                gr.Number(defaults.hiera_pool_stride, label="Hiera pool stride", precision=0, elem_id="hiera-stride",
                          info="The same for the spatial tokens."),
                gr.Checkbox(True, label="Time instruction", elem_id="time-instruction",
                            info="Tell the model the video's length and each frame's time."),
            ], gr.Markdown(summary, elem_id="preview")

    def _wire(self, gr, tab, pending, media, example, settings, summary, status, chat, question, ask, reset,
              frame_strip, stats, video_view, image_view) -> None:
        on_model = {"concurrency_id": "model", "concurrency_limit": 1}  # one model call at a time, queued

        def show_media(state):  # the upload box and the preview name what the chat is about, after errors too
            path, kind = (state.media_path, state.kind) if state is not None else (None, None)
            return (path, gr.update(value=path if kind == "video" else None, visible=kind == "video"),
                    gr.update(value=path if kind == "image" else None, visible=kind == "image"))

        loaded = [tab, chat, frame_strip, stats, status]
        shown = {"fn": show_media, "inputs": [tab], "outputs": [media, video_view, image_view], "queue": False}
        for control in settings:
            control.change(self.settings_changed, [*settings, tab], [summary, status], queue=False)
        media.upload(self.upload, [media, *settings, tab], loaded, **on_model).then(**shown).then(
            self.preview, [*settings, tab], summary, queue=False)
        example.click(self.upload_example, [*settings, tab], loaded, **on_model).then(**shown).then(
            self.preview, [*settings, tab], summary, queue=False)
        for trigger in (ask.click, question.submit):
            trigger(self.show_question, [question, *settings, tab], [pending, chat, question, status], queue=False
                    ).then(self.ask, [pending, *settings, tab], [*loaded, question], **on_model)
        reset.click(self.reset, [*settings, tab], loaded, **on_model)


# ---------------------------------------------------------------------------------------------------- errors
def error_text(error: BaseException, path=None) -> str:
    """A user error for the page: its short sentence, and any technical detail in a collapsed "Details" (the
    server's upload path shortened to the file's name)."""
    detail = getattr(error, "detail", "")
    sentence = str(error) if detail else one_line(error)
    if path:
        sentence, detail = (text.replace(str(path), Path(path).name) for text in (sentence, detail))
    if not detail:
        return f"⚠️ {sentence}"
    return f"⚠️ {sentence}\n\n<details><summary>Details</summary>\n\n{detail}\n\n</details>"


# ---------------------------------------------------------------------------------------------------- media helpers
def video_thumbnails(decoded) -> list:
    """(thumbnail, "1.25 s") for every sampled frame of a `DecodedVideo` (decoded exactly: full frames)."""
    from PIL import Image

    metadata = decoded.metadata
    times = list(metadata.timestamps) if metadata is not None and metadata.fps else [None] * decoded.num_frames
    return [(thumbnail(Image.fromarray(frame)), f"{t:.2f} s" if t is not None else f"frame {i + 1}")
            for i, (frame, t) in enumerate(zip(decoded.frames, times))]


def thumbnail(image):
    width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
    return image.convert("RGB").resize((width, THUMBNAIL_HEIGHT))


def open_image(path: str):
    """The image at `path` as RGB, or a `UserError` (unreadable, or a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise UserError("This file could not be read as an image.",
                        f"{Path(path).name}: {type(error).__name__}: {one_line(error)}") from None


def _values(settings: TokenSettings) -> tuple:
    return (settings.frames, settings.hiera_frames, settings.siglip_pool_stride, settings.hiera_pool_stride,
            settings.time_instruction)


# ---------------------------------------------------------------------------------------------------- main
def create_app(model_path: str | None = None, *, workdir: str | Path | None = None, dtype: str = "auto",
               device: str = "auto", attn_implementation: str | None = None, trust_remote_code: bool = False,
               frames: int | None = None, max_new_tokens: int = 128, cache_budget_gb: float = 4.0,
               max_conversations: int = 4, **limits) -> Vica2App:
    """Load the model (the built-in tiny one when `model_path` is None) and the example clip."""
    from vica2.tools import tiny_model
    from vica2.tools.demo import write_demo_video

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="vica2-app-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # ours: made just above
    workdir = Path(workdir)
    toy = model_path is None
    if toy:  # its held-out clip, and the questions it was trained to answer, asked in its words
        samples = tiny_model.demo_samples()
        model_path, example, dtype = str(tiny_model.SHIPPED), samples[0]["video"], "float32"
    else:
        example = write_demo_video(workdir / "room.mp4")
    model, processor = load_model_and_processor(model_path, dtype, device, attn_implementation=attn_implementation,
                                                trust_remote_code=trust_remote_code)
    # Visitors upload files: nothing they send makes this server fetch from the network (an uploaded HLS playlist
    # naming http segments included).
    processor.allow_remote_media = False
    return Vica2App(model, processor, model_name="built-in tiny ViCA2 (a toy)" if toy else model_path,
                    toy_notice=tiny_model.TOY_NOTICE if toy else None, example_video=example,
                    example_questions=[sample["prompt"] for sample in samples] if toy else None, frames=frames,
                    max_new_tokens=max_new_tokens, cache_budget_gb=cache_budget_gb,
                    max_conversations=max_conversations, **limits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vica2 app", description=__doc__.split("\n\n")[0],
                                     epilog="--model defaults to $VICA2_MODEL, else the built-in tiny model (a toy).")
    add_model_options(parser, model_default=os.environ.get("VICA2_MODEL"))
    # Spaces tell Gradio where to listen through GRADIO_SERVER_NAME / _PORT (0.0.0.0:7860); locally: this machine only.
    parser.add_argument("--host", default=os.environ.get("VICA2_HOST") or os.environ.get("GRADIO_SERVER_NAME")
                        or "127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--frames", type=int, help="default frames to sample (the model's budget, 8 for the tiny one)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cache-budget-gb", type=float, default=float(os.environ.get("VICA2_CACHE_BUDGET_GB", 4.0)),
                        help="largest KV cache one conversation may hold (ViCA2-7B, 64 frames: 1.2 GB in bf16)")
    parser.add_argument("--max-conversations", type=int, default=4,
                        help="conversations that keep their cache at once (the oldest is released first)")
    parser.add_argument("--max-question-chars", type=int, default=MAX_QUESTION_CHARS,
                        help=f"longest question accepted, in characters (default {MAX_QUESTION_CHARS:,})")
    parser.add_argument("--max-file-size-mb", type=float, default=MAX_FILE_SIZE_MB,
                        help=f"largest upload accepted, in MB (default {MAX_FILE_SIZE_MB})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    app = guarded("vica2 app", lambda: _start(args), debug=args.debug)
    return app if isinstance(app, int) else _serve(app, args)


def _start(args) -> Vica2App:
    import_gradio()  # before the slow load: a missing extra is said at once
    return create_app(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation,
                      trust_remote_code=args.trust_remote_code, frames=args.frames,
                      max_new_tokens=args.max_new_tokens, cache_budget_gb=args.cache_budget_gb,
                      max_conversations=args.max_conversations, max_question_chars=args.max_question_chars,
                      max_file_size_mb=args.max_file_size_mb)


def _serve(app: Vica2App, args) -> int:
    # A stop by SIGTERM (a Space restarting, `kill`) is handled like Ctrl-C: Gradio closes its server, deleting the
    # uploads and previews it stored, and the temporary folder is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"vica2 app: serving {app.model_name} on http://{args.host}:{args.port}", file=sys.stderr)
    app.launch(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
