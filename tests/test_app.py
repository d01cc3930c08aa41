"""`vica2 app`: the web demo's handlers called directly, then the real page driven in headless Chromium.

The app runs a tiny random ViCA2 converted from the release's layout (its towers at the real input sizes, 2 frames:
SigLIP 2 x 14 x 15 = 420 tokens, Hiera every 2nd frame, 1 x 16 x 17 = 272); one test starts it without a model, on
the built-in trained tiny model. Vision-tower runs are counted by forward hooks on the model, not
by the app's own counters, so "encoded once" is checked independently of the code under test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


pytest.importorskip("gradio")
pytest.importorskip("av")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio builds anything: no version check, no telemetry

from vica2 import app as app_module  # noqa: E402
from vica2.convert_checkpoint import convert_checkpoint  # noqa: E402
from vica2.tools import tiny_model  # noqa: E402
from vica2.tools.demo import build_demo_release, write_demo_video  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS = (2, 1, 2, 2, True)  # frames, Hiera frames, SigLIP and Hiera pool strides, time instruction
TOKENS_TEXT = "SigLIP 420 · Hiera 272"


class TowerRuns:
    """Counts forward calls of both vision towers (hooks on the model's own modules)."""

    def __init__(self, model):
        self.calls = {"siglip": 0, "hiera": 0}
        for name, module in (("siglip", model.model.vision_tower), ("hiera", model.model.hiera_tower)):
            module.register_forward_hook(lambda *_, name=name: self.calls.__setitem__(name, self.calls[name] + 1))

    def snapshot(self) -> dict:
        return dict(self.calls)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The app on a tiny random model at the real input sizes, plus a generated video, an image and an unreadable
    file."""
    root = tmp_path_factory.mktemp("app")
    model = convert_checkpoint(build_demo_release(root / "release"), root / "hub", progress=False).output_dir
    app = app_module.create_app(str(model), workdir=root / "work", dtype="float32", frames=2, max_new_tokens=4,
                                cache_budget_gb=0.01)
    media = root / "media"
    media.mkdir()
    video = write_demo_video(media / "room.mp4", num_frames=24, fps=12)
    image = media / "room.png"
    Image.fromarray((np.random.default_rng(0).random((120, 200, 3)) * 255).astype("uint8")).save(image)
    broken = media / "broken.mp4"
    broken.write_bytes(video.read_bytes()[:1500])  # a truncated mp4: PyAV cannot open it
    return {"app": app, "towers": TowerRuns(app.model), "video": video, "image": image, "broken": broken,
            "root": root}


@pytest.fixture(scope="module")
def ready_tab(demo):
    """A tab with the video encoded and no turn yet (for tests that must leave it unchanged)."""
    return _upload(demo["app"], demo["video"])[0]


def _upload(app, path, tab=None, settings=SETTINGS):
    tab, messages, thumbnails, stats, status = app.upload(str(path), *settings, tab)
    return tab, messages, thumbnails, stats, status


def _ask(app, question, tab, settings=SETTINGS):
    outputs = list(app.ask(question, *settings, tab))
    return outputs[-1], outputs


# ------------------------------------------------------------------------------------------- handlers, no browser
def test_upload_encodes_once_and_every_turn_continues_from_the_cache(demo):
    app, towers = demo["app"], demo["towers"]
    before = towers.snapshot()
    tab, messages, thumbnails, stats, status = _upload(app, demo["video"])
    after_upload = towers.snapshot()
    assert after_upload["siglip"] > before["siglip"] and after_upload["hiera"] > before["hiera"]
    assert status.startswith("Ready") and messages == []
    # 2 frames sampled from 24 at 12 fps: indices 0 and 23.
    assert [caption for _, caption in thumbnails] == ["0.00 s", "1.92 s"]
    assert TOKENS_TEXT in stats

    (tab, messages, _, stats, status, box), streamed = _ask(app, "How many chairs are in the room?", tab)
    assert len(streamed) >= 2 and box == ""  # streamed pieces, then the final state; the question box is cleared
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == tab.session.last_answer.text
    (tab, messages, _, stats, status, _), _ = _ask(app, "And how many tables?", tab)
    assert [m["content"] for m in messages[::2]] == ["How many chairs are in the room?", "And how many tables?"]
    assert towers.snapshot() == after_upload  # neither turn ran a tower
    assert "vision towers ran 1× · 2 turn(s)" in stats
    cached = tab.session.last_answer.cached_tokens
    assert cached > 692 and f"({cached:,} from the cache" in stats


def test_answer_equals_plain_generate_from_scratch(demo):
    """What the page shows is the model's own greedy answer to the whole prompt (no app-side loss in streaming)."""
    app = demo["app"]
    tab, *_ = _upload(app, demo["video"])
    (tab, messages, *_), _ = _ask(app, "Where is the ball?", tab)
    messages_in = [{"role": "user", "content": [{"type": "video", "path": str(demo["video"])},
                                                {"type": "text", "text": "Where is the ball?"}]}]
    inputs = app.processor.apply_chat_template(
        messages_in, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", num_frames=2,
        video_frames_budget=2, hiera_frames=1, siglip_pool_stride=2, hiera_pool_stride=2, add_time_instruction=True)
    with torch.inference_mode():
        output = app.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = app.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert messages[-1]["content"] == expected


def test_image_upload(demo):
    tab, messages, thumbnails, stats, status = _upload(demo["app"], demo["image"])
    assert status.startswith("Ready") and [caption for _, caption in thumbnails] == ["image 200x120"]
    assert "Hiera 1,056" in stats  # a single image: un-pooled 32 x 33
    (tab, messages, *_), _ = _ask(demo["app"], "What is it?", tab)
    assert messages[0]["content"] == "What is it?"


def test_unreadable_files_are_messages_and_the_conversation_goes_on(demo):
    app, media = demo["app"], demo["root"] / "media"
    (media / "broken.png").write_bytes(b"not a png at all")
    tab, *_ = _upload(app, demo["video"])
    (tab, messages, *_), _ = _ask(app, "First?", tab)
    for path, sentence, detail in (
            (demo["broken"], "This file could not be read as a video.", "Could not open the video 'broken.mp4'"),
            (media / "missing.mp4", "This file is no longer on the server", "missing.mp4: no such file"),
            (media / "broken.png", "This file could not be read as an image.", "broken.png: UnidentifiedImageError")):
        kept, kept_messages, _, _, status = _upload(app, path, tab)
        # a sentence for people first; the technical detail only inside a collapsed <details>
        short, _, details = status.partition("<details>")
        assert short.startswith(f"⚠️ {sentence}") and detail not in short and str(media) not in status
        assert details.startswith("<summary>Details</summary>") and detail in details
        assert kept is tab and kept_messages == messages  # the previous conversation is untouched
    (tab, messages, _, _, status, _), _ = _ask(app, "Second?", tab)
    assert status.startswith("Ready") and len(messages) == 4
    new_tab, _, _, _, status = _upload(app, demo["video"], tab)  # and the next upload works
    assert status.startswith("Ready") and new_tab is not tab


@pytest.mark.parametrize("settings, expected", [
    ((4, 3, 2, 2, True), "Hiera frames (3) must divide Frames (4)"),
    ((0, 2, 2, 2, True), "Frames must be a whole number of at least 1"),
    ((4, 2, None, 2, True), "SigLIP pool stride must be a whole number"),
    ((4, 8, 2, 2, True), "Hiera frames (8) must divide Frames (4)"),
    ((4, 2, 2.5, 2, True), "SigLIP pool stride must be a whole number of at least 1 (got 2.5)"),
])
def test_bad_settings_are_messages(demo, ready_tab, settings, expected):
    app, tab = demo["app"], ready_tab
    assert expected in app.preview(*settings)
    fresh, _, _, _, status = _upload(app, demo["video"], settings=settings)
    assert status.startswith("⚠️") and expected in status and fresh.session is None
    (same, messages, _, _, status, _), _ = _ask(app, "Why?", tab, settings=settings)
    assert expected in status and messages == [] and same is tab


def test_too_long_a_video_for_the_memory_budget(demo):
    # The fixture's budget is 0.01 GB; the tiny model caches 512 bytes a token: 64 frames = 22,144 tokens = 11 MB.
    app = demo["app"]
    assert "about 0.3 MB" in app.preview(*SETTINGS)
    tab, _, _, _, status = _upload(app, demo["video"], settings=(64, 32, 2, 2, True))
    assert "Too long for this app's memory: 64 frames are 22,144 visual tokens" in status
    assert "Sample fewer frames" in status and "--cache-budget-gb" in status.partition("<details>")[2]
    assert tab.session is None


def test_preview_shows_the_implied_tokens_before_running(demo):
    before = demo["towers"].snapshot()
    text = demo["app"].preview(8, 8, 1, 1, False)  # Hiera on every frame, nothing pooled: 8 x 27 x 28, 8 x 32 x 33
    assert "14,496 visual tokens** (SigLIP 6,048 + Hiera 8,448)" in text
    assert demo["towers"].snapshot() == before


def test_changed_settings_restart_the_conversation_on_the_same_video(demo):
    app, towers = demo["app"], demo["towers"]
    tab, *_ = _upload(app, demo["video"])
    (tab, *_), _ = _ask(app, "One?", tab)
    before = towers.snapshot()
    assert "Ready" in app.settings_changed(*SETTINGS, tab)[1]
    summary, notice = app.settings_changed(4, 2, 2, 2, True, tab)  # said before the question is asked
    assert "your next question starts a new conversation" in notice and "Hiera 544" in summary
    (tab, messages, thumbnails, stats, status, _), _ = _ask(app, "Two?", tab, settings=(4, 2, 2, 2, True))
    assert len(thumbnails) == 4 and tab.thumbnails is thumbnails  # the strip shows the frames now used
    assert towers.snapshot()["hiera"] > before["hiera"]
    assert "the settings changed" in status and [m["content"] for m in messages[::2]] == ["Two?"]
    assert "Hiera 544" in stats and "1 turn(s)" in stats  # 2 of 4 frames through Hiera: 2 x 16 x 17


def test_reset_keeps_the_encoded_video(demo):
    app, towers = demo["app"], demo["towers"]
    tab, *_ = _upload(app, demo["video"])
    (tab, *_), _ = _ask(app, "One?", tab)
    before = towers.snapshot()
    tab, messages, thumbnails, stats, status = app.reset(*SETTINGS, tab)
    assert messages == [] and len(thumbnails) == 2 and status.startswith("New conversation")
    assert "0 turn(s)" in stats and "Last turn" not in stats  # the stats are this conversation's
    (tab, messages, *_), _ = _ask(app, "Two?", tab)
    assert [m["content"] for m in messages[::2]] == ["Two?"] and towers.snapshot() == before


def test_tabs_have_their_own_conversations_and_the_oldest_cache_is_released(demo):
    app = demo["app"]
    app.max_conversations = 1
    try:
        first, *_ = _upload(app, demo["video"])
        (first, first_messages, *_), _ = _ask(app, "Question of tab one?", first)
        second, *_ = _upload(app, demo["video"])  # a second tab: the first one's cache is released
        assert first.session is None and second.session is not None
        (second, second_messages, *_), _ = _ask(app, "Question of tab two?", second)
        assert [m["content"] for m in first_messages[::2]] == ["Question of tab one?"]
        assert [m["content"] for m in second_messages[::2]] == ["Question of tab two?"]
        (first, messages, _, _, status, _), _ = _ask(app, "Still there?", first)
        assert "released" in status and [m["content"] for m in messages[::2]] == ["Still there?"]
        assert second.session is None  # and now the second tab's was released
    finally:
        app.max_conversations = 4


def test_the_question_shows_at_once_and_the_answer_streams_token_by_token(demo):
    app = demo["app"]
    ready_tab, *_ = _upload(app, demo["video"])
    forwards = []
    handle = app.model.model.language_model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        shown, messages, box, status = app.show_question("  Where is the ball? ", *SETTINGS, ready_tab)
        assert (shown, box) == ("Where is the ball?", "") and messages[-1] == {"role": "user", "content": shown}
        turns = app.ask(shown, *SETTINGS, ready_tab)
        tab, messages, *_ = next(turns)  # before the model ran: the question, and an empty answer
        assert forwards == [] and messages == [{"role": "user", "content": "Where is the ball?"},
                                               {"role": "assistant", "content": ""}]
        answers = [outputs[1][-1]["content"] for outputs in turns]
    finally:
        handle.remove()
    new_ids = tab.session.last_answer.new_ids
    # one update per token whose text is complete, each extending the last (was: text only at spaces)
    pieces = len({app.processor.decode(new_ids[:n], skip_special_tokens=True) for n in range(1, len(new_ids) + 1)
                  if not app.processor.decode(new_ids[:n], skip_special_tokens=True).endswith("\ufffd")} - {""})
    assert len(answers) - 1 == pieces >= 2
    assert all(later.startswith(earlier) for earlier, later in zip(answers, answers[1:-1]))


def test_a_too_long_question_is_refused_before_the_model_runs(demo):
    app = demo["app"]
    ready_tab, *_ = _upload(app, demo["video"])
    question = "?" * 40_000
    shown, messages, box, _ = app.show_question(question, *SETTINGS, ready_tab)
    assert box == question and messages == ready_tab.messages  # kept in the box to shorten; not put in the chat
    before = demo["towers"].snapshot()
    (tab, messages, _, _, status, box), _ = _ask(app, question, ready_tab)
    assert "40,000 characters long" in status and "up to 2,000 characters" in status
    assert tab is ready_tab and messages == [] and box == question.strip()
    assert demo["towers"].snapshot() == before and tab.session.stats.turns == 0


def test_the_summary_says_an_image_when_an_image_is_loaded(demo):
    app = demo["app"]
    tab, *_ = _upload(app, demo["image"])
    summary = app.preview(*SETTINGS, tab)
    assert summary.startswith("An image (200x120") and "A video" not in summary
    assert "A video at 2 frames" in app.preview(*SETTINGS)


def test_uploads_are_deleted_once_no_tab_uses_them(demo, tmp_path, monkeypatch):
    """Gradio keeps every upload in its folder; the app deletes one when the last tab about it is done with it."""
    import gradio

    app = demo["app"]
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    uploaded = tmp_path / "0123abcd" / "room.mp4"
    uploaded.parent.mkdir()
    shutil.copy(demo["video"], uploaded)
    assert Path(gradio.utils.get_upload_folder()) == tmp_path
    first, *_ = _upload(app, uploaded)
    second, *_ = _upload(app, uploaded)  # another tab about the same upload
    _upload(app, demo["image"], first)  # the first tab moves on: the second still needs the file
    assert uploaded.exists()
    app._forget(second)  # the second tab is closed
    assert not uploaded.exists() and not uploaded.parent.exists()
    broken = tmp_path / "4567ef" / "broken.mp4"
    broken.parent.mkdir()
    shutil.copy(demo["broken"], broken)
    _upload(app, broken)  # an upload that could not be used is not kept either
    assert not broken.exists()
    assert demo["video"].exists() and Path(app.example_video).exists()  # files outside the upload folder stay


def test_question_and_upload_limits_are_settings(demo):
    parser = app_module.build_parser()
    args = parser.parse_args([])
    assert (args.max_question_chars, args.max_file_size_mb) == (2000, 200)
    args = parser.parse_args(["--max-question-chars", "50", "--max-file-size-mb", "1.5"])
    assert (args.max_question_chars, args.max_file_size_mb) == (50, 1.5)


def test_ask_before_any_upload_says_what_to_do(demo):
    (tab, messages, _, _, status, _), _ = _ask(demo["app"], "Hello?", None)
    assert "Upload a video or an image first" in status and messages == []


def test_without_a_model_the_app_runs_the_trained_toy_and_answers_its_example_right(tmp_path):
    app = app_module.create_app(None, workdir=tmp_path, max_new_tokens=8)
    samples = tiny_model.demo_samples()
    assert app.toy_notice == tiny_model.TOY_NOTICE and "not ViCA2-7B" in app.toy_notice
    assert app.example_questions == [sample["prompt"] for sample in samples]  # asked in the words it was trained on
    settings = app_module._values(app.default_settings)
    assert settings[0] == app.model.config.video_frames_budget and settings[-1] is False  # as it was trained
    tab, *_ = app.upload_example(*settings)
    for sample in samples:  # each in a new chat about the clip, as trained: one question a conversation
        (tab, messages, *_), _ = _ask(app, sample["prompt"], tab, settings)
        assert messages[-1]["content"].strip() == sample["answer"], sample["question"]
        tab, *_ = app.reset(*settings, tab)
    page = app.build()
    assert any(getattr(block, "elem_id", None) == "toy-note" for block in page.blocks.values())


def test_cli_dispatches_to_the_app_and_reports_missing_gradio(monkeypatch, capsys):
    from vica2.tools.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--help"])
    assert exit_info.value.code == 0 and "--cache-budget-gb" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the app extra were not installed
    assert main(["app"]) == 2
    assert "pip install 'vica2-hf[app]'" in capsys.readouterr().err


def test_app_py_runs_as_a_script_outside_the_package(tmp_path):
    """A Space runs `python app.py` from the repository's files, with nothing installed as `vica2`."""
    for path in REPO_ROOT.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    shutil.copytree(REPO_ROOT / "tools", tmp_path / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "type(f).__name__.lower()]; space = runpy.run_path('app.py', run_name='space'); "
            "print(sys.modules['vica2.tools.inference'].__file__); space['main'](['--help'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    used, help_text = result.stdout.split("\n", 1)
    assert Path(used) == tmp_path / "tools" / "inference.py"  # the files beside app.py, not an installed vica2
    assert "--cache-budget-gb" in help_text


# ------------------------------------------------------------------------------------------- the page, in Chromium
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

requires_browser = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="browser tests need Debian's chromium (apt-get install chromium) and playwright (pip install playwright)",
)
# Headless (Playwright adds --headless), no sandbox (CI runs as root), and nothing that would reach the network.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000  # generous: CI shares two cores between the server and the browser


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    """The real page on 127.0.0.1 (a free port), stopped after the module's tests; its uploads, previews and
    thumbnails go to a folder of its own, which must hold no file once the app has stopped."""
    stored = tmp_path_factory.mktemp("gradio-files")
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(stored)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = demo["app"].launch("127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    assert page.max_file_size == 200 * 1024**2  # Gradio refuses larger uploads
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        page.close()
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR")
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
    # (Gradio 6 leaves one empty `tmp*` file per upload request beside them: no content of anyone's)
    assert [path for path in stored.rglob("*") if path.is_file() and path.stat().st_size] == []


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """Headless system Chromium with a fresh profile; records every URL the pages request."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    requested, console_errors = [], []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400,
                                                                                                "height": 900})
        context.on("request", lambda request: requested.append(request.url))
        context.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
        context.set_default_timeout(WAIT_MS)
        try:
            yield context, requested, console_errors
        finally:
            context.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def _open_tab(browser, server, viewport=None):
    context, *_ = browser
    page = context.new_page()
    if viewport:
        page.set_viewport_size(viewport)
    page.goto(server)
    page.wait_for_selector("#status")
    return page


def _wait_text(page, selector: str, text: str):
    page.wait_for_function("([selector, text]) => (document.querySelector(selector)?.innerText || '').includes(text)",
                           arg=[selector, text], timeout=WAIT_MS)


def _page_upload(page, path, expected_status="Ready"):
    page.locator("#media input[type=file]").set_input_files(str(path))
    _wait_text(page, "#status", expected_status)


def _page_ask(page, question: str, turns: int):
    page.fill("#question textarea", question)
    page.click("#ask")
    _wait_text(page, "#stats", f"{turns} turn(s)")
    _wait_text(page, "#status", "Ready")


# Records every text the last answer bubble shows, as the page changes it.
RECORD_ANSWERS = """() => { window.answers = [];
  new MutationObserver(() => { const bots = document.querySelectorAll('#chat [data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && text !== window.answers[window.answers.length - 1]) window.answers.push(text); })
  .observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true}); }"""


def _chat(page) -> tuple[list[str], list[str]]:
    users = [text.strip() for text in page.locator("#chat [data-testid=user]").all_inner_texts()]
    bots = [text.strip() for text in page.locator("#chat [data-testid=bot]").all_inner_texts()]
    return users, bots


@requires_browser
def test_browser_upload_ask_and_follow_up_without_re_encoding(demo, server, browser, screenshots):
    towers, app = demo["towers"], demo["app"]
    page = _open_tab(browser, server)
    assert not page.is_visible("#preview")  # the token-ratio panel starts collapsed
    page.click("#token-ratio button, #token-ratio .label-wrap")
    assert "SigLIP 420 + Hiera 272" in page.inner_text("#preview")  # the implied tokens, before anything ran
    page.click("#token-ratio button, #token-ratio .label-wrap")  # and closed again
    _page_upload(page, demo["video"])
    assert page.locator("#media-video video").get_attribute("src")  # the video the chat is about, shown
    assert "room.mp4" in page.inner_text("#media").replace("\n", "")  # and the upload box still names it
    after_upload = towers.snapshot()
    strip = page.inner_text("#frames-strip")
    assert page.locator("#frames-strip img").count() == 2 and "0.00 s" in strip and "1.92 s" in strip
    page.evaluate(RECORD_ANSWERS)
    gate = ModelGate(app.model, step_s=0.2)  # holds the model, then paces its steps so each can reach the page
    app.max_new_tokens = 8
    try:
        page.fill("#question textarea", "How many chairs are in the room?")
        page.click("#ask")
        _wait_text(page, "#chat [data-testid=user]", "How many chairs are in the room?")
        assert page.evaluate("window.answers") == [] and gate.running == 0  # shown before the model answered
        gate.open.set()
        _wait_text(page, "#stats", "1 turn(s)")
        _wait_text(page, "#status", "Ready")
    finally:
        gate.remove()
        app.max_new_tokens = 4
    answers, final = page.evaluate("window.answers"), _chat(page)[1][-1]
    assert len(answers) >= 3 and answers[-1] == final  # several updates for one answer, each extending the last
    # (the chat renders Markdown: a trailing "\\" shows until the next character makes it an escape; the random
    # model emits any byte, so backslashes are left out of the comparison)
    unescaped = [answer.replace("\\", "") for answer in answers]
    assert all(later.startswith(earlier) for earlier, later in zip(unescaped, unescaped[1:])), answers
    assert TOKENS_TEXT in page.inner_text("#stats")
    page.screenshot(path=screenshots / "1-first-answer.png")
    _page_ask(page, "And how many tables?", turns=2)
    users, bots = _chat(page)
    assert users == ["How many chairs are in the room?", "And how many tables?"] and len(bots) == 2
    assert towers.snapshot() == after_upload  # the follow-up ran no tower
    assert "vision towers ran 1× · 2 turn(s)" in page.inner_text("#stats")
    page.screenshot(path=screenshots / "2-follow-up.png")
    if os.environ.get("VICA2_APP_SCREENSHOT"):  # refresh the README's picture: VICA2_APP_SCREENSHOT=docs/app.png
        page.screenshot(path=os.environ["VICA2_APP_SCREENSHOT"])
    page.close()


@requires_browser
def test_browser_new_settings_are_announced_and_refresh_the_strip_and_stats(demo, server, browser):
    page = _open_tab(browser, server)
    _page_upload(page, demo["video"])
    _page_ask(page, "One?", turns=1)
    page.click("#token-ratio button, #token-ratio .label-wrap")
    page.fill("#frames input", "4")
    page.press("#frames input", "Enter")
    _wait_text(page, "#status", "your next question starts a new conversation")  # said before Ask
    assert page.locator("#frames-strip img").count() == 2
    _page_ask(page, "Two?", turns=1)
    assert "the settings changed" in page.inner_text("#status") and _chat(page)[0] == ["Two?"]
    assert page.locator("#frames-strip img").count() == 4  # the strip shows the frames now used
    page.click("#reset")
    _wait_text(page, "#status", "New conversation. Ready")
    stats = page.inner_text("#stats")
    assert "0 turn(s)" in stats and "Last turn" not in stats and _chat(page) == ([], [])
    page.close()


@requires_browser
def test_browser_phone_layout_puts_the_chat_right_after_the_media(demo, server, browser, screenshots):
    page = _open_tab(browser, server, viewport={"width": 390, "height": 844})
    page.click("#example")
    _wait_text(page, "#status", "Ready")
    assert page.locator("#media-video video").get_attribute("src")  # the example clip is shown
    _page_ask(page, "Where is the ball?", turns=1)
    box = {name: page.locator(selector).bounding_box() for name, selector in (
        ("media", "#media"), ("example", "#example"), ("chat", "#chat"), ("question", "#question"),
        ("bubble", "#chat [data-testid=user]"), ("toolbar", "#chat .icon-button-wrapper"))}
    assert box["media"]["y"] < box["example"]["y"] < box["chat"]["y"] < box["question"]["y"]
    # only the preview and the collapsed settings lie between the example button and the chat
    assert box["chat"]["y"] - (box["example"]["y"] + box["example"]["height"]) < 400
    assert box["bubble"]["y"] >= box["toolbar"]["y"] + box["toolbar"]["height"]  # the toolbar covers no message
    page.screenshot(path=screenshots / "6-phone.png", full_page=True)
    page.close()


@requires_browser
def test_browser_unreadable_file_shows_an_error_and_the_next_upload_works(demo, server, browser, screenshots):
    page = _open_tab(browser, server)
    _page_upload(page, demo["broken"], expected_status="This file could not be read as a video.")
    details = page.locator("#status details")
    assert details.count() == 1 and details.get_attribute("open") is None  # the technical detail, on demand
    assert not page.is_visible("#status details :text('Could not open the video')")
    page.click("#status summary")
    assert "Could not open the video 'broken.mp4'" in page.inner_text("#status details")
    page.screenshot(path=screenshots / "3-unreadable-file.png", full_page=True)
    _page_upload(page, demo["video"])
    page.fill("#question textarea", "?" * 2001)  # one character over the limit the page states
    assert "up to 2,000 characters" in page.inner_text("#limit")
    page.click("#ask")
    _wait_text(page, "#status", "Your question is 2,001 characters long")
    assert _chat(page) == ([], []) and page.input_value("#question textarea") == "?" * 2001
    _page_ask(page, "Is the ball moving?", turns=1)
    assert _chat(page)[0] == ["Is the ball moving?"]
    page.close()


class ModelGate:
    """Holds every language-model forward until opened, and records the most forwards that ever ran at once."""

    def __init__(self, model, step_s: float = 0.0):
        self.open, self.running, self.most_at_once, self.step_s = threading.Event(), 0, 0, step_s
        self.entered = threading.Event()  # a forward has reached the gate
        self.lock = threading.Lock()
        language_model = model.model.language_model
        self.handles = [language_model.register_forward_pre_hook(self._enter),
                        language_model.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self.entered.set()
        self.open.wait(WAIT_MS / 1000)
        time.sleep(self.step_s)  # pacing only (nothing is timed): lets each streamed piece reach the page
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)

    def _leave(self, *_):
        with self.lock:
            self.running -= 1

    def remove(self):
        self.open.set()
        for handle in self.handles:
            handle.remove()


@requires_browser
def test_browser_two_tabs_keep_their_own_conversations_one_generation_at_a_time(demo, server, browser, screenshots):
    first, second = _open_tab(browser, server), _open_tab(browser, server)
    for page in (first, second):
        _page_upload(page, demo["video"])
    gate = ModelGate(demo["app"].model)
    try:
        first.fill("#question textarea", "Question from the first tab?")
        first.click("#ask")  # held inside the model by the gate
        assert gate.entered.wait(WAIT_MS / 1000)  # the first tab holds the model before the second one asks
        second.fill("#question textarea", "Question from the second tab?")
        second.click("#ask")
        _wait_text(second, "#chat", "queue: 1/1")  # the second tab waits its turn, and the page says where it stands
        second.screenshot(path=screenshots / "4-second-tab-queued.png", full_page=True)
        gate.open.set()
        for page in (first, second):
            _wait_text(page, "#stats", "1 turn(s)")
    finally:
        gate.remove()
    assert gate.most_at_once == 1
    assert _chat(first)[0] == ["Question from the first tab?"]
    assert _chat(second)[0] == ["Question from the second tab?"]
    first.screenshot(path=screenshots / "5-first-tab.png", full_page=True)
    first.close()
    second.close()


@requires_browser
def test_browser_loaded_nothing_from_the_internet(server, browser):
    """Runs after the others: every request of every page went to the app's own server (no CDN, no telemetry), and
    no page logged an error."""
    _, requested, console_errors = browser
    assert console_errors == []
    assert requested, "no page was loaded"
    outside = sorted({url for url in requested if not url.startswith((server, "data:", "blob:"))})
    assert outside == []
