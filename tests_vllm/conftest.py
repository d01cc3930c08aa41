"""vLLM tests: a tiny converted ViCA2 folder, real videos, and one vLLM engine shared by the module's tests.

These run in their own environment (`make test-vllm`: vLLM's CPU build pins its own torch / transformers) and are
skipped where vLLM is not installed. Settings that keep a CPU run small and hermetic are set before vLLM loads:
no hub access, module / vLLM caches in a temporary folder, a 1 GiB KV cache, one process, eager mode.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch


_CACHE = tempfile.mkdtemp(prefix="vica2-vllm-tests-")
for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_MODULES_CACHE": os.path.join(_CACHE, "modules"),
    "VLLM_CACHE_ROOT": os.path.join(_CACHE, "vllm"),
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm sets up its environment)")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _main_test_helpers():
    """The main suite's helpers (tests/conftest.py: tiny configs, the fixture), under a name of their own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vica2_main_test_helpers", REPO_ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _main_test_helpers()
FIXTURE_DIR, FIXTURE_IMAGE_TOKEN_ID = _helpers.FIXTURE_DIR, _helpers.FIXTURE_IMAGE_TOKEN_ID
fixture_available, tiny_config, media_server = _helpers.fixture_available, _helpers.tiny_config, _helpers.media_server

requires_fixture_tokenizer = pytest.mark.skipif(
    not fixture_available(), reason=f"release fixture (its tokenizer) not found at {FIXTURE_DIR}"
)

# The fixture's tokenizer has 383 tokens before <image> (383) and <video> (384): only ids below can be generated.
GENERATABLE = FIXTURE_IMAGE_TOKEN_ID
EOS_TOKEN_ID = 382


def vllm_tiny_config():
    """A tiny ViCA2 whose LLM head size (64 / 2 = 32) vLLM's CPU attention supports."""
    config = tiny_config()
    text = config.text_config
    text.num_attention_heads, text.num_key_value_heads = 2, 1
    config.generatable_vocab_size = GENERATABLE
    return config


def build_hub_folder(folder: Path, seed: int = 0, config=None) -> Path:
    """A converted-style ViCA2 folder (weights, configs, tokenizer, processor, remote code) of a tiny random model
    (`config`: another ViCA2 config, e.g. the benchmarks' mid-size one)."""
    from transformers import AutoTokenizer, GenerationConfig

    from vica2.convert_checkpoint import MODEL_AUTO_MAP, PROCESSOR_AUTO_MAP
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration
    from vica2.processing_vica2 import Vica2Processor

    torch.manual_seed(seed)
    config = config or vllm_tiny_config()
    config.architectures = ["Vica2ForConditionalGeneration"]
    config.auto_map = {**MODEL_AUTO_MAP, **PROCESSOR_AUTO_MAP}  # what the converter writes
    model = Vica2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero biases and a sharper head, so that every path changes the greedy tokens
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.05)
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID, bos_token_id=380).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURE_DIR))
    Vica2Processor.from_model_config(config, tokenizer).save_pretrained(folder)
    _add_newline_merges(folder / "tokenizer.json")
    return folder


def _add_newline_merges(path: Path) -> None:
    """Qwen2's vocabulary has tokens for runs of newlines and for "." followed by them (its pre-tokenizer keeps
    ".\n\n" one piece); the fixture's tiny one has neither. Added here, so that the tests meet the boundary ViCA2's
    time instruction ends on: "...this video.\n\n{question}" tokenizes as one ".\n\n" token, which no prompt split
    after the "." reproduces. They take the ids of the bytes 0x00 and 0x01 (never in a test's text): transformers
    numbers the special tokens after the vocabulary, so it must not grow."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    for byte, token in (("Ā", "ĊĊ"), ("ā", ".ĊĊ")):
        vocab[token] = vocab.pop(byte)
    data["model"]["merges"] += ["Ċ Ċ", ". ĊĊ"]
    path.write_text(json.dumps(data))


def write_video(path: Path, num_frames: int, fps: int = 10, width: int = 96, height: int = 72, seed: int = 0) -> Path:
    """An h264 mp4 of a moving bar over a seeded gradient (PyAV)."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.roll(base, 3 * i, axis=1)
            frame[height // 3 : height // 2, (5 * i) % width : (5 * i) % width + 8] = (250, 250, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: Path, width: int = 150, height: int = 100, seed: int = 1) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(path)
    return path


def vllm_decoded_video(path: Path, num_frames: int):
    """(frames, metadata) as vLLM's own video loader gives them (what `vllm serve` does with a video_url)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    return VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(Path(path).read_bytes(), num_frames=num_frames)


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory):
    if not fixture_available():
        pytest.skip(f"release fixture (its tokenizer) not found at {FIXTURE_DIR}")
    from importlib.metadata import entry_points

    if not any(e.name == "vica2" for e in entry_points(group="vllm.general_plugins")):
        pytest.fail("ViCA2's vLLM plugin is not installed in this environment (an install older than its entry point "
                    "in setup.cfg): run `pip install --no-deps -e .` here.")
    return build_hub_folder(tmp_path_factory.mktemp("vica2-tiny"))


@pytest.fixture(scope="session")
def llm(hub_folder, media):
    """The one offline engine of the session (test_offline, test_evaluate), in vLLM's default execution mode: the
    language model compiled (the server tests run eager)."""
    from vllm import LLM

    # Blocks of 32 tokens (the least the CPU attention takes; its default is 128, longer than these prompts): a paged cache
    # stores whole blocks, so a prefix is reused up to its last full block.
    engine = LLM(**engine_kwargs(hub_folder, enforce_eager=False, enable_prefix_caching=True, disable_log_stats=False,
                                 block_size=32, allowed_local_media_path=str(Path(media["long"]).parent),
                                 media_io_kwargs={"video": {"num_frames": 8}}))
    yield engine
    del engine


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return {
        "long": write_video(folder / "long.mp4", num_frames=30, seed=0),  # more frames than sampled
        "short": write_video(folder / "short.mp4", num_frames=6, seed=2),  # fewer: the release repeats frames
        "other": write_video(folder / "other.mp4", num_frames=20, seed=3),
        "image": write_image(folder / "image.png"),
        "not_a_video": _write_bytes(folder / "broken.mp4", b"this is not a video" * 10),
    }


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def reference(hub_folder):
    """transformers on the same folder (remote code), greedy: the judge of every vLLM answer."""
    return Reference(hub_folder)


class Reference:
    """Greedy transformers generations, computed in a fresh process: once a vLLM engine exists, vLLM has patched
    the library's decoder classes for its compiler and they no longer run outside vLLM."""

    def __init__(self, folder: Path):
        self.folder = folder

    def generate(self, requests: list[dict]) -> list[list[int]]:
        """The generated ids of each request: {"prompt": str, "max_new_tokens": int, **processor kwargs (videos /
        images as paths, videos as `frames_file(...)`)}, or {"messages": [...], ...}: the chat as
        `processor.apply_chat_template(..., tokenize=True)` renders it (the time instruction included)."""
        return [result["tokens"] for result in self.run(requests)]

    def run(self, requests: list[dict]) -> list[dict]:
        """Per request: {"prompt_ids": the prompt's token ids, "tokens": the generated ids}."""
        import subprocess

        result = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("reference_generate.py")), str(self.folder)],
            input=json.dumps(requests),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])


def frames_file(folder: Path, frames, pil: bool = False, metadata: dict | None = None) -> dict:
    """Decoded frames for the reference (saved as .npy): as an array, or a list of PIL images, with their metadata."""
    path = Path(folder) / f"frames-{len(list(Path(folder).glob('frames-*.npy')))}.npy"
    np.save(path, np.asarray(frames))
    return {"frames": str(path), "pil": pil, "metadata": metadata}


# vLLM does not know `generatable_vocab_size`: every test engine masks the ids above it, as the model does.
LOGITS_PROCESSOR = "vica2.tools.vllm_logits:GeneratableVocabLimit"


def engine_kwargs(folder: Path, **overrides) -> dict:
    """What every test engine shares: our remote code through vLLM's Transformers backend (with ViCA2's processor,
    the package's vLLM plugin), small and exact."""
    kwargs = dict(
        model=str(folder),
        trust_remote_code=True,
        model_impl="transformers",
        dtype="float32",
        enforce_eager=True,
        logits_processors=[LOGITS_PROCESSOR],
        max_model_len=2048,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 1, "video": 1},
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


def greedy(max_tokens: int = 12, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)  # the engine masks ids >= GENERATABLE
