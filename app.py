# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2 app`: chat with ViCA2 about a video or an image in the browser (a Gradio web demo).

    vica2 app --model DIR_OR_REPO            # serves http://127.0.0.1:7860
    vica2 app                                # offline: the built-in tiny random model (its answers are random)
    VICA2_MODEL=owner/name python app.py     # what a Hugging Face Space runs (app.py as is)

Each upload is decoded and encoded once (vision towers + prefill of the prompt up to the question); every turn of
the chat continues from that cached prefix, through the shared prefix API of `vica2.tools.inference`. Each browser tab
has its own conversation; one model call runs at a time (a queue, whose position the page shows). Needs the `app`
extra: `pip install 'vica2-hf[app]'`.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
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
RANDOM_MODEL_NOTE = (
    "**Offline demo: the built-in tiny model has random weights, so its answers are random.** "
    "Start the app with `--model DIR_OR_REPO` (or set `VICA2_MODEL`) to chat with a real ViCA2."
)
THUMBNAIL_HEIGHT = 96
# Errors a user can cause (bad file, bad setting, too long a video): shown in the page, the app goes on. The app
# decodes videos itself (its thumbnails come from the frames the model sees), so the reader's error is one of them.
USER_ERRORS = (UsageError, VideoLoadError)


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



# ---------------------------------------------------------------------------------------------------- the app
class Vica2App:
    """The demo's handlers (plain functions of the page's values and a tab's `TabState`, testable without a
    browser) and `build()`, which lays them out as a Gradio page.

    Model calls (encoding an upload, answering a turn) share one queue slot, so one runs at a time; every tab keeps
    its own conversation, and at most `max_conversations` keep their caches (the oldest is released first).
    """

    def __init__(self, model, processor, *, model_name: str, random_weights: bool = False, example_video=None,
                 frames: int | None = None, max_new_tokens: int = 128, cache_budget_gb: float = 4.0,
                 max_conversations: int = 4):
        self.model, self.processor = model, processor
        self.model_name, self.random_weights = model_name, random_weights
        self.example_video = str(example_video) if example_video else None
        self.max_new_tokens, self.cache_budget_gb = max_new_tokens, cache_budget_gb
        self.max_conversations = max_conversations
        config = model.config
        frames = frames or config.video_frames_budget
        # The checkpoint's Hiera share of the frame budget, carried over to `frames` (7B: 32 of 64).
        hiera = max(1, frames * config.hiera_frames // config.video_frames_budget)
        self.default_settings = TokenSettings(frames, hiera, config.siglip_pool_stride, config.hiera_pool_stride)
        self._live: OrderedDict[int, TabState] = OrderedDict()  # tabs holding a cache, least recently used first
        self._live_lock = threading.Lock()  # Gradio drops a closed tab's state from its own thread

    # ------------------------------------------------------------------ handlers
    def preview(self, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None) -> str:
        """The visual tokens (and cache size) the settings imply, shown before anything runs."""
        try:
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            if tab is not None and tab.kind == "image" and tab.session is not None:
                counts = tab.session.implied_token_counts()
                what = "This image (its tokens follow its size; the controls apply to videos)"
            else:
                counts = implied_token_counts(self.model.config, num_frames=settings.frames, **settings.overrides())
                what = f"A video at {settings.frames} frames"
        except USER_ERRORS as error:
            return f"⚠️ {one_line(error)}"
        cache_mb = counts["total"] * cache_bytes_per_token(self.model) / 2**20
        return (f"{what}: **{counts['total']:,} visual tokens** (SigLIP {counts['siglip']:,} + Hiera "
                f"{counts['hiera']:,}), a cache of about {cache_mb:,.1f} MB.")

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
        except USER_ERRORS as error:  # name the file as the user knows it, not by the server's upload path
            message = one_line(error).replace(str(path), Path(path).name)
            return tab, tab.messages, tab.thumbnails, self.stats(tab), f"⚠️ {message}"
        self._forget(tab)
        self._keep(new_tab)
        return new_tab, new_tab.messages, new_tab.thumbnails, self.stats(new_tab), self._ready(new_tab)

    def upload_example(self, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None):
        """The generated example clip, as if uploaded."""
        return self.upload(self.example_video, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                           time_instruction, tab)

    def ask(self, question, frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, time_instruction, tab=None):
        """Answer one turn, streamed: yields (tab, chat messages, stats, status, question box) as text arrives.

        The turn continues from the conversation's cache. Changed settings (or a released cache) restart the
        conversation on the same media first, and the status says so."""
        tab = tab if tab is not None else TabState()
        question = (question or "").strip()
        try:
            if not question:
                raise UsageError("Type a question first.")
            if tab.media_path is None:
                raise UsageError("Upload a video or an image first (or try the example clip).")
            settings = TokenSettings.parse(frames, hiera_frames, siglip_pool_stride, hiera_pool_stride,
                                           time_instruction)
            if tab.session is None or self._settings_changed(tab, settings):
                why = ("the settings changed" if tab.session is not None else
                       "its cache had been released to make room for other conversations")
                tab = self._restart(tab, settings, f"New conversation: {why}, so the media was encoded again.")
        except USER_ERRORS as error:
            yield tab, tab.messages, self.stats(tab), f"⚠️ {one_line(error)}", question
            return
        self._keep(tab)
        tab.messages = [*tab.messages, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        status = tab.note or "Answering…"
        for piece in tab.session.iter_ask(question, max_new_tokens=self.max_new_tokens):
            answer += piece
            tab.messages[-1] = {"role": "assistant", "content": answer}
            yield tab, tab.messages, self.stats(tab), status, ""
        tab.messages[-1] = {"role": "assistant", "content": tab.session.last_answer.text}
        status = self._ready(tab)  # still says why the conversation restarted, once
        tab.note = ""
        yield tab, tab.messages, self.stats(tab), status, ""

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
                tab.messages = []
        except USER_ERRORS as error:
            return tab, tab.messages, tab.thumbnails, self.stats(tab), f"⚠️ {one_line(error)}"
        self._keep(tab)
        return tab, tab.messages, tab.thumbnails, self.stats(tab), "New conversation. " + self._ready(tab)

    def stats(self, tab: TabState | None) -> str:
        """The panel under the frames: tokens per stream, cache reuse, tower runs and timings."""
        if tab is None or tab.session is None:
            return ""
        session, media = tab.session, tab.session.media
        lines = [
            f"**Visual tokens**: SigLIP {media.visual_tokens['siglip']:,} · Hiera {media.visual_tokens['hiera']:,}",
            f"**This upload**: decoded in {tab.decode_s:.2f} s, encoded in {session.encode_s:.2f} s · "
            f"vision towers ran {session.stats.tower_runs}× · {session.stats.turns} turn(s)",
        ]
        answer = session.last_answer
        if answer is not None:
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
    def _open(self, path: str, settings: TokenSettings) -> TabState:
        """Decode `path` once, check it fits the memory budget, and encode it into a new `ChatSession`."""
        if not Path(path).is_file():
            raise UsageError(f"{Path(path).name}: no such file.")
        kind = media_kind(path)
        session = ChatSession(self.model, self.processor, num_frames=settings.frames,
                              add_time_instruction=settings.time_instruction, max_new_tokens=self.max_new_tokens,
                              **settings.overrides())
        start = time.perf_counter()
        if kind == "video":
            self._check_budget(implied_token_counts(self.model.config, num_frames=settings.frames,
                                                    **settings.overrides())["total"], f"{settings.frames} frames",
                               "Sample fewer frames or use larger pool strides.")
            decoded = self.processor.load_video(path, num_frames=settings.frames, keep_frames=True, **settings.overrides())
            thumbnails = video_thumbnails(decoded)
            decode_s = time.perf_counter() - start
            session.set_video(decoded)
        else:
            image = open_image(path)
            self._check_budget(implied_token_counts(self.model.config, image_size=(image.height, image.width))["total"],
                               f"{image.width}x{image.height} pixels", "Use a smaller image.")
            thumbnails = [(thumbnail(image), f"image {image.width}x{image.height}")]
            decode_s = time.perf_counter() - start
            session.set_image(image)
        return TabState(session=session, media_path=path, kind=kind, settings=settings, thumbnails=thumbnails,
                        decode_s=decode_s)

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
            raise UsageError(
                f"Too long for this app's memory budget: {what} are {visual_tokens:,} visual tokens, whose cache needs "
                f"{needed / 2**30:.2f} GB, but each conversation may use {self.cache_budget_gb:g} GB "
                f"(--cache-budget-gb). {fix}"
            )
        limit = self.model.config.text_config.max_position_embeddings
        if visual_tokens >= limit:
            raise UsageError(f"{what} are {visual_tokens:,} visual tokens, more than the model's {limit:,} positions. "
                             f"{fix}")

    def _keep(self, tab: TabState) -> None:
        """Mark `tab` as the most recent holder of a cache; release the oldest beyond `max_conversations`."""
        with self._live_lock:
            self._live[id(tab)] = tab
            self._live.move_to_end(id(tab))
            while len(self._live) > self.max_conversations:
                _, oldest = self._live.popitem(last=False)
                oldest.session = None  # its next turn re-encodes the media (the tab is told why)

    def _forget(self, tab: TabState | None) -> None:
        if tab is not None:
            with self._live_lock:
                self._live.pop(id(tab), None)

    def _ready(self, tab: TabState) -> str:
        name = Path(tab.media_path).name if tab.media_path else ""
        return f"{tab.note + ' ' if tab.note else ''}Ready: ask about {name}."

    # ------------------------------------------------------------------ the page
    def build(self):
        """The Gradio page: media and settings on the left, the chat, frames and figures on the right."""
        gr = import_gradio()
        defaults = self.default_settings
        with gr.Blocks(title="ViCA2", analytics_enabled=False) as page:
            tab = gr.State(None, delete_callback=self._forget)
            gr.Markdown(f"# ViCA2: ask about a video\nModel: `{self.model_name}`. Upload a video or an image, then "
                        "chat about it: it is encoded once and every turn continues from its cached prefix.")
            if self.random_weights:
                gr.Markdown(RANDOM_MODEL_NOTE, elem_id="random-note")
            with gr.Row():
                with gr.Column(scale=1):
                    media = gr.File(label="Video or image", file_types=["video", "image"], type="filepath",
                                    elem_id="media")
                    example = gr.Button("Use the generated example clip", elem_id="example",
                                        visible=self.example_video is not None)
                    with gr.Accordion("Token ratio", open=True):
                        frames = gr.Number(defaults.frames, label="Frames sampled", precision=0, elem_id="frames")
                        hiera_frames = gr.Number(defaults.hiera_frames, label="Hiera frames (of those; must divide "
                                                 "them)", precision=0, elem_id="hiera-frames")
                        siglip_stride = gr.Number(defaults.siglip_pool_stride, label="SigLIP pool stride",
                                                  precision=0, elem_id="siglip-stride")
                        hiera_stride = gr.Number(defaults.hiera_pool_stride, label="Hiera pool stride", precision=0,
                                                 elem_id="hiera-stride")
                        time_instruction = gr.Checkbox(True, label="Time instruction (frame timestamps in the "
                                                       "prompt)", elem_id="time-instruction")
                        preview = gr.Markdown(self.preview(*_values(defaults)), elem_id="preview")
                    reset = gr.Button("Reset conversation", elem_id="reset")
                with gr.Column(scale=2):
                    status = gr.Markdown("Upload a video or an image to start.", elem_id="status")
                    chat = gr.Chatbot(label="Conversation", elem_id="chat", height=360)
                    with gr.Row():
                        question = gr.Textbox(placeholder="How far is the table from the ball?", show_label=False,
                                              scale=4, elem_id="question")
                        ask = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                    frame_strip = gr.Gallery(label="Sampled frames (time in the video)", columns=8, fit_columns=False,
                                             height=140, object_fit="contain", allow_preview=False,
                                             elem_id="frames-strip")
                    stats = gr.Markdown(elem_id="stats")

            settings = [frames, hiera_frames, siglip_stride, hiera_stride, time_instruction]
            on_model = {"concurrency_id": "model", "concurrency_limit": 1}  # one model call at a time, queued
            for control in settings:
                control.change(self.preview, [*settings, tab], preview, queue=False)
            # The file box empties after each upload, ready for the next (the status names what is loaded).
            media.upload(self.upload, [media, *settings, tab], [tab, chat, frame_strip, stats, status],
                         **on_model).then(lambda: None, None, media, queue=False)
            example.click(self.upload_example, [*settings, tab], [tab, chat, frame_strip, stats, status], **on_model)
            for trigger in (ask.click, question.submit):
                trigger(self.ask, [question, *settings, tab], [tab, chat, stats, status, question], **on_model)
            reset.click(self.reset, [*settings, tab], [tab, chat, frame_strip, stats, status], **on_model)
        page.queue(default_concurrency_limit=1)
        return page


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
    """The image at `path` as RGB, or a `UsageError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"{Path(path).name} is not a readable image ({type(error).__name__}).") from None


def _values(settings: TokenSettings) -> tuple:
    return (settings.frames, settings.hiera_frames, settings.siglip_pool_stride, settings.hiera_pool_stride,
            settings.time_instruction)


# ---------------------------------------------------------------------------------------------------- main
def create_app(model_path: str | None = None, *, workdir: str | Path | None = None, dtype: str = "auto",
               device: str = "auto", attn_implementation: str | None = None, trust_remote_code: bool = False,
               frames: int | None = None, max_new_tokens: int = 128, cache_budget_gb: float = 4.0,
               max_conversations: int = 4) -> Vica2App:
    """Load the model (or build `vica2 demo`'s tiny offline one when `model_path` is None) and the example clip."""
    from vica2.tools.demo import build_demo_checkpoint, write_demo_video

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="vica2-app-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # ours: made just above
    workdir = Path(workdir)
    random_weights = model_path is None
    if random_weights:
        demo = build_demo_checkpoint(workdir, verify=False)
        model_path, example = str(demo.hub), demo.video
        dtype, frames = "float32", frames or 8  # the tiny towers run at the real input sizes: keep CPU turns short
    else:
        example = write_demo_video(workdir / "room.mp4")
    model, processor = load_model_and_processor(model_path, dtype, device, attn_implementation=attn_implementation,
                                                trust_remote_code=trust_remote_code)
    # Visitors upload files: nothing they send makes this server fetch from the network (an uploaded HLS playlist
    # naming http segments included).
    processor.allow_remote_media = False
    return Vica2App(model, processor, model_name="built-in tiny random ViCA2" if random_weights else model_path,
                    random_weights=random_weights, example_video=example, frames=frames,
                    max_new_tokens=max_new_tokens, cache_budget_gb=cache_budget_gb,
                    max_conversations=max_conversations)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vica2 app", description=__doc__.split("\n\n")[0],
                                     epilog="--model defaults to $VICA2_MODEL, else the built-in tiny random model.")
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
                      max_conversations=args.max_conversations)


def _serve(app: Vica2App, args) -> int:
    # A stop by SIGTERM (a Space restarting, `kill`) exits like Ctrl-C, so the temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"vica2 app: serving {app.model_name} on http://{args.host}:{args.port}", file=sys.stderr)
    app.build().launch(server_name=args.host, server_port=args.port, ssr_mode=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
