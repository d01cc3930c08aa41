"""Shared test helpers: the release fixture, tiny random ViCA2 models, Hiera/SigLIP reference preprocessing."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's own byte-identical copy of ../shared/fixtures (the reference; tests/test_fixture_copy.py checks
# the two agree), so a clone anywhere tests itself.
FIXTURES = REPO_ROOT / "tests" / "fixtures"
FIXTURE_DIR = Path(os.environ.get("VICA2_FIXTURE_DIR", FIXTURES / "vica2_tiny_raw"))
FIXTURE_7B_KEYS = FIXTURE_DIR.parent / "vica2_7b_raw_keys.json"

# The fixture's tokenizer has 383 tokens; ours appends <image> and <video> to it.
FIXTURE_IMAGE_TOKEN_ID = 383
FIXTURE_VIDEO_TOKEN_ID = 384

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pytest_sessionstart(session):
    # A missing parity fixture fails the run: skipping every parity test would pass a run that checked nothing.
    missing = [str(path) for path in (FIXTURE_DIR / "model.safetensors", FIXTURE_7B_KEYS) if not path.is_file()]
    if missing:
        raise pytest.UsageError(
            f"Release fixture missing: {', '.join(missing)}. The repository carries it in tests/fixtures/ "
            "(restore it with git checkout tests/fixtures, or point VICA2_FIXTURE_DIR at a copy)."
        )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of the default suite)")
    config.addinivalue_line("markers", "distributed: multi-process launches (CI runs them once: `-m 'not distributed'`)")


def set_attn_implementation(config, implementation: str):
    """Select the attention backend of a Vica2Config and all of its sub-configs (before building a model)."""
    for sub in (config, config.text_config, config.vision_config, config.hiera_config):
        sub._attn_implementation = implementation
    return config


def tiny_config(siglip_image_size: int = 56, hiera_image_size: int = 64, **overrides):
    """A tiny random ViCA2 config; small images keep the towers fast while every code path stays real.

    SigLIP 56 / 14 -> 4x4 grid; Hiera 64 -> 16x16 after patch-embed, 2x2 at stage 4 (window 14 at stage 3 pads
    4 -> 14, as the 7B model pads 64 -> 70).
    """
    from vica2.configuration_vica2 import Vica2Config

    text = {
        "model_type": "qwen2",
        "vocab_size": 420,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 380,
        "eos_token_id": 382,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": siglip_image_size,
        "patch_size": 14,
        "vision_use_head": False,
    }
    hiera = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 8,
        "num_attention_heads": 1,
        "image_size": [hiera_image_size, hiera_image_size],
        "blocks_per_stage": [1, 2, 2, 1],
        "embed_dim_per_stage": [8, 16, 32, 64],
        "num_attention_heads_per_stage": [1, 2, 4, 8],
        "window_size_per_stage": [8, 4, 14, 7],
        "global_attention_blocks": [4],
        "window_positional_embedding_background_size": [14, 14],
    }
    pinpoints = [[h, w] for h in (siglip_image_size, 2 * siglip_image_size, 3 * siglip_image_size)
                 for w in (siglip_image_size, 2 * siglip_image_size, 3 * siglip_image_size)]
    kwargs = dict(
        text_config=text,
        vision_config=vision,
        hiera_config=hiera,
        image_token_id=FIXTURE_IMAGE_TOKEN_ID,
        video_token_id=FIXTURE_VIDEO_TOKEN_ID,
        image_grid_pinpoints=pinpoints,
        video_frames_budget=8,
        hiera_frames=4,
    )
    kwargs.update(overrides)
    return Vica2Config(**kwargs)


def tiny_model(seed: int = 0, attn_implementation: str = "eager", **config_overrides):
    """A tiny random `Vica2ForConditionalGeneration` in eval mode with deterministic weights."""
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration

    torch.manual_seed(seed)
    config = set_attn_implementation(tiny_config(**config_overrides), attn_implementation)
    model = Vica2ForConditionalGeneration(config).eval()
    # Non-zero biases (the default init zeroes them) so that every path carries signal.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.05)
    return model


def random_video_pixels(config, num_frames: int, seed: int = 0, num_videos: int = 1):
    """Random SigLIP and Hiera pixel tensors of the sizes `config` expects, all frames for both streams."""
    generator = torch.Generator().manual_seed(seed)
    siglip = config.vision_config.image_size
    hiera = config.hiera_config.image_size[0]
    return (
        torch.randn(num_videos, num_frames, 3, siglip, siglip, generator=generator),
        torch.randn(num_videos, num_frames, 3, hiera, hiera, generator=generator),
    )


def token_ratio(config, num_videos: int = 1, **overrides) -> torch.Tensor:
    """The `video_token_ratio` the processor hands the model: one (video_frames_budget, hiera_frames,
    siglip_pool_stride, hiera_pool_stride) row per video, the config's values unless overridden."""
    from vica2.configuration_vica2 import TOKEN_RATIO_ARGS

    row = [overrides.get(name, getattr(config, name)) for name in TOKEN_RATIO_ARGS]
    return torch.tensor([row] * num_videos)


# ----------------------------------------------------------------------------------------- hostile model folders
HOSTILE_DAMAGES = ("truncated weights", "mismatched sizes", "deep config")


def damaged_model_copy(source: Path, folder: Path, damage: str) -> Path:
    """A copy of the converted model folder `source` at `folder`, damaged as `damage` (one of HOSTILE_DAMAGES)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "mismatched sizes":
        tensors = load_file(weights)
        tensors["lm_head.weight"] = torch.zeros(tensors["lm_head.weight"].shape[0] + 1, 64)
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        (folder / "config.json").write_text("[" * 10**6 + "]" * 10**6)
    return folder


# ----------------------------------------------------------------------------------------- release fixture
def fixture_available() -> bool:
    return (FIXTURE_DIR / "model.safetensors").is_file()


requires_fixture = pytest.mark.skipif(not fixture_available(), reason=f"release fixture not found at {FIXTURE_DIR}")


def load_fixture_config(attn_implementation: str = "eager"):
    from vica2.convert_checkpoint import release_config_to_vica2

    raw = json.loads((FIXTURE_DIR / "config.json").read_text())
    towers = json.loads((FIXTURE_DIR / "tower_configs.json").read_text())
    config = release_config_to_vica2(
        raw, towers, image_token_id=FIXTURE_IMAGE_TOKEN_ID, video_token_id=FIXTURE_VIDEO_TOKEN_ID
    )
    return set_attn_implementation(config, attn_implementation)


def load_fixture_model(attn_implementation: str = "eager", dtype=torch.float32):
    """The release fixture's weights renamed into our model with `release_key_to_hub` (strict)."""
    from safetensors.torch import load_file

    from vica2.convert_checkpoint import release_key_to_hub
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration

    config = load_fixture_config(attn_implementation)
    model = Vica2ForConditionalGeneration(config)
    state = {}
    for key, value in load_file(FIXTURE_DIR / "model.safetensors").items():
        mapped = release_key_to_hub(key, config.vision_config.num_hidden_layers)
        if mapped is not None:
            state[mapped] = value
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def reference_hiera_pixels(frames_uint8: np.ndarray, size: int = 1024, antialias: bool = False) -> torch.Tensor:
    """The release's SAM2 preprocessing, written out independently for tests: /255, bilinear resize without
    antialias (torchvision 0.16), ImageNet normalisation. (T, H, W, 3) uint8 -> (T, 3, size, size) float32."""
    x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def fixture_sample(name: str) -> dict:
    """Arrays of a fixture sample ('video' or 'image') as torch tensors / numpy arrays."""
    folder = FIXTURE_DIR / name
    summary = json.loads((folder / "summary.json").read_text())
    frames = np.load(folder / ("frames_uint8.npy" if name == "video" else "image_uint8.npy"))
    if name == "image":
        frames = frames[None]
    sample = {
        "summary": summary,
        "frames_uint8": frames,
        "siglip_pixel_values": torch.from_numpy(np.load(folder / "siglip_pixel_values.npz")["pixel_values"]),
        "hiera_pixel_values": reference_hiera_pixels(frames),
        "input_ids": np.load(folder / "input_ids.npy")[0].tolist(),
        "loss_input_ids": np.load(folder / "loss_input_ids.npy")[0].tolist(),
        "loss_labels": np.load(folder / "loss_labels.npy")[0].tolist(),
        "logits": torch.from_numpy(np.load(folder / "logits.npy")),
        "inputs_embeds": torch.from_numpy(np.load(folder / "inputs_embeds.npy")),
        "siglip_features": torch.from_numpy(np.load(folder / "siglip_features.npy")),
        "hiera_features": torch.from_numpy(np.load(folder / "hiera_features.npy")),
        "siglip_tower_features": torch.from_numpy(np.load(folder / "siglip_tower_features.npy")),
        "hiera_tower_features": torch.from_numpy(np.load(folder / "hiera_tower_features.npy")),
        "generated_ids": np.load(folder / "generated_ids.npy")[0].tolist(),
        "prompt": (folder / "prompt.txt").read_text(),
        "question": (folder / "question.txt").read_text(),
    }
    return sample


def expand_release_ids(ids: list[int], num_tokens: int, token_id: int) -> list[int]:
    """Replace the release's single -200 image marker with `num_tokens` placeholder ids."""
    position = ids.index(-200)
    return ids[:position] + [token_id] * num_tokens + ids[position + 1 :]


def expand_release_labels(ids: list[int], labels: list[int], num_tokens: int) -> list[int]:
    """Labels aligned with `expand_release_ids(ids, ...)`: the visual positions are ignored (-100)."""
    position = ids.index(-200)
    return labels[:position] + [-100] * num_tokens + labels[position + 1 :]


def fixture_prompt_ids(sample: dict, name: str) -> torch.Tensor:
    """The sample's (1, L) prompt ids with the release's -200 marker expanded into our placeholders."""
    count = sample["summary"]["num_siglip_tokens"] + sample["summary"]["num_hiera_tokens"]
    token = FIXTURE_VIDEO_TOKEN_ID if name == "video" else FIXTURE_IMAGE_TOKEN_ID
    return torch.tensor([expand_release_ids(sample["input_ids"], count, token)])


def fixture_model_inputs(sample: dict, name: str) -> dict:
    """Model pixel kwargs for a fixture sample (videos get all frames; the model strides Hiera itself)."""
    if name == "video":
        return {
            "pixel_values_videos": sample["siglip_pixel_values"][None],
            "hiera_pixel_values_videos": sample["hiera_pixel_values"][None],
        }
    height, width = sample["frames_uint8"].shape[1:3]
    return {
        "pixel_values": sample["siglip_pixel_values"][None],
        "image_sizes": torch.tensor([[height, width]]),
        "hiera_pixel_values": sample["hiera_pixel_values"],
    }


@pytest.fixture(scope="session")
def fixture_model():
    if not fixture_available():
        pytest.skip(f"release fixture not found at {FIXTURE_DIR}")
    return load_fixture_model("eager")


def _auto_registries():
    """Every mapping of transformers' auto classes that `register(...)` writes to (their `_extra_content`)."""
    import transformers.models.auto as auto

    found = []
    for module_name in ("configuration_auto", "modeling_auto", "image_processing_auto", "processing_auto",
                        "tokenization_auto", "video_processing_auto", "feature_extraction_auto"):
        try:
            module = __import__(f"{auto.__name__}.{module_name}", fromlist=["_"])
        except ImportError:
            continue
        for value in vars(module).values():
            if isinstance(getattr(value, "_extra_content", None), dict):
                found.append(value._extra_content)
    return found


@contextlib.contextmanager
def _auto_class_registrations_kept():
    registries = _auto_registries()
    saved = [dict(registry) for registry in registries]
    try:
        yield
    finally:
        for registry, before in zip(registries, saved):
            registry.clear()
            registry.update(before)


@pytest.fixture(autouse=True)
def _restore_auto_class_registrations():
    """Loading without remote code registers the installed vica2 classes with the auto classes, process-wide; a test
    that does so must not change what a later test's `from_pretrained(..., trust_remote_code=True)` resolves to."""
    with _auto_class_registrations_kept():
        yield


@pytest.fixture(autouse=True, scope="module")
def _restore_auto_class_registrations_of_the_module():
    """The same for a test module's module-scoped fixtures (a model loaded once for the module): they run before the
    per-test snapshot above, so only a snapshot taken before them (autouse fixtures of a scope come first) undoes
    their registrations."""
    with _auto_class_registrations_kept():
        yield


@contextlib.contextmanager
def media_server(files: dict):
    """A 127.0.0.1 HTTP server serving `files` (path -> bytes; anything else is a 404) for the test's duration;
    yields (base URL, list of requested paths)."""
    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
