"""Video preprocessing cost: file -> model tensors, the release's way vs Vica2Processor, on generated 720p clips.

Generates (once, cached) two 1280x720 30 fps 60 s h264 mp4s of textured moving content, one with a keyframe every
250 frames (x264's default GOP: uniform sampling then makes the decoder walk almost every frame) and one with a
keyframe every 30, and prepares 64 frames of each for ViCA2-7B (SigLIP 384, Hiera 1024 on every 2nd frame):

  release      decode and RGB-convert every frame (as decord / the release's PyAV reader do), keep the sampled
               ones, then SigLIP preprocessing frame by frame (transformers' PIL resize / rescale / normalize, the
               release's SigLipImageProcessor) and Hiera frame by frame for all 64 frames (/255, bilinear resize
               without antialias, ImageNet normalisation: the release's SAM2 processor);
  decode       `read_video` alone, all workers: the sampled frames as RGB, no preprocessing (the floor);
  exact        Vica2Processor, exact mode: keyframe segments decoded in parallel (one worker per core), each frame's
               pixels prepared as it arrives (bit-identical to the release's for the frames the model uses);
  exact-1w     the same with `decode_workers=1` (PyAV's frame threads only);
  fast         Vica2Processor, fast mode (`fast_decode=True`: swscale resizes straight from YUV while decoding);
  exact-cuda   exact mode with `device="cuda"` (only where CUDA is available).

Each run is its own process, so its peak RSS is its own; wall time covers the preprocessing only (imports and
processor construction excluded), best of `--repeats`, the modes interleaved so that load from elsewhere spreads
over all of them. Exact mode also runs on a 15 s clip to show that its peak memory does not grow with the length.
`--quality` adds the fast mode's pixel deviation from the exact mode and its effect on the release fixture's logits.

    python benchmarks/bench_processing.py [--frames 64] [--repeats 2] [--quality] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PROMPT = "<video>\nWhere is the red ball at the end of the video?"


# ----------------------------------------------------------------------------------------------- test video
def textured_video(
    path: Path, seconds: float, keyint: int = 250, width: int = 1280, height: int = 720, fps: int = 30
) -> Path:
    """A multi-scale noise texture panning under two moving shapes; realistic bitrate (~1 Mbit/s), h264 veryfast,
    a keyframe exactly every `keyint` frames (scene-cut detection off, so the GOP length is the one asked for)."""
    import av
    import numpy as np
    from PIL import Image

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texture = np.zeros((2 * height, 2 * width, 3), np.float32)
    for scale, amplitude in ((64, 120), (16, 60), (4, 30)):
        small = rng.integers(0, 255, (2 * height // scale, 2 * width // scale, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(small).resize((2 * width, 2 * height), Image.BICUBIC), np.float32)
        texture += (smooth - 128) * amplitude / 128
    texture = np.clip(texture + 128, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(
            "libx264",
            rate=fps,
            options={"preset": "veryfast", "crf": "23", "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"},
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = texture[(2 * i) % height :][:height, (5 * i) % width :][:, :width].copy()
            cx, cy = int(width / 2 + width / 3 * np.sin(i / 20)), int(height / 2 + height / 3 * np.cos(i / 15))
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 < (height // 8) ** 2] = (230, 40, 40)
            frame[(abs(xx - (9 * i) % width) < 40) & (abs(yy - height // 3) < 60)] = (20, 200, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------------------- (a) release-style
def release_style(path: str, num_frames: int, siglip_size: int = 384, hiera_size: int = 1024, hiera_stride: int = 2):
    """Decode + RGB-convert every frame, then per-frame SigLIP and Hiera preprocessing (the release's recipes)."""
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        indices = np.linspace(0, stream.frames - 1, num_frames, dtype=int).tolist()  # decord's len(): the header count
        kept = {}
        for i, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")  # every frame is converted; only the sampled ones are kept
            if i in indices:
                kept[i] = rgb
        sampled = [kept[i] for i in indices]
    siglip = []
    for frame in sampled:
        x = resize(
            frame, (siglip_size, siglip_size), resample=PILImageResampling.BICUBIC, data_format=ChannelDimension.FIRST
        )
        x = rescale(x, 1 / 255, data_format=ChannelDimension.FIRST)
        siglip.append(normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), data_format=ChannelDimension.FIRST))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    hiera = []
    for frame in sampled:  # the release prepares all frames; its model then uses every `hiera_stride`-th
        x = torch.from_numpy(frame).permute(2, 0, 1).contiguous().float().div(255)
        x = F.interpolate(x[None], size=(hiera_size, hiera_size), mode="bilinear", align_corners=False)[0]
        hiera.append((x - mean) / std)
    return torch.from_numpy(np.stack(siglip)), torch.stack(hiera)


# ----------------------------------------------------------------------------------------------- one measured run
def build_processor(config=None):
    from transformers import AutoTokenizer

    from vica2.configuration_vica2 import Vica2Config
    from vica2.processing_vica2 import Vica2Processor

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import FIXTURE_DIR, FIXTURE_IMAGE_TOKEN_ID, FIXTURE_VIDEO_TOKEN_ID

    # ViCA2-7B's sizes; the fixture's tiny tokenizer stands in for Qwen2's (token ids are all that differ).
    config = config or Vica2Config(image_token_id=FIXTURE_IMAGE_TOKEN_ID, video_token_id=FIXTURE_VIDEO_TOKEN_ID)
    return Vica2Processor.from_model_config(config, AutoTokenizer.from_pretrained(str(FIXTURE_DIR)))


MODES = ("release", "decode", "exact", "exact-1w", "fast", "exact-cuda")


def run_mode(mode: str, path: str, frames: int, warmup: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    processor = build_processor() if mode not in ("release", "decode") else None
    options = {"exact-1w": {"decode_workers": 1}, "fast": {"fast_decode": True}, "exact-cuda": {"device": "cuda"}}
    options = options.get(mode, {})

    def prepare(video: str, num_frames: int):
        if mode == "release":
            return release_style(video, num_frames)
        if mode == "decode":
            from vica2.video_loading_vica2 import read_video

            decoded = read_video(video, num_frames)
            return decoded.frames, decoded.frames[::2]
        out = processor(text=PROMPT, videos=video, num_frames=num_frames, **options)
        if mode == "exact-cuda":
            torch.cuda.synchronize()
        return out["pixel_values_videos"][0], out["hiera_pixel_values_videos"][0]

    prepare(warmup, 2)  # imports, PIL / torch kernels, CUDA context
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    siglip, hiera = prepare(path, frames)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_before_mb": rss_before,
        "siglip_shape": list(siglip.shape),
        "hiera_shape": list(hiera.shape),
    }


def measure(mode: str, path: Path, frames: int, warmup: Path) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--video",
            str(path),
            "--frames",
            str(frames),
            "--warmup",
            str(warmup),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- quality of fast mode
def fast_mode_quality(path: Path, frames: int, logit_frames: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_fixture_config, load_fixture_model

    processor = build_processor()
    exact = processor(text=PROMPT, videos=str(path), num_frames=frames)
    fast = processor(text=PROMPT, videos=str(path), num_frames=frames, fast_decode=True)
    release_siglip, release_hiera = release_style(str(path), frames)
    report = {
        "exact_vs_release_max_abs": max(
            (exact["pixel_values_videos"][0] - release_siglip).abs().max().item(),
            (exact["hiera_pixel_values_videos"][0] - release_hiera[::2]).abs().max().item(),
        )
    }
    del release_siglip, release_hiera
    for key, name in (("pixel_values_videos", "siglip"), ("hiera_pixel_values_videos", "hiera")):
        diff = (exact[key] - fast[key]).abs()
        # In uint8 levels of the input: a normalised unit is 255 * std levels (std 0.5 for SigLIP, ~0.226 for Hiera).
        report[name] = {
            "mean_abs": diff.mean().item(),
            "max_abs": diff.max().item(),
            "p99_abs": diff.flatten()[::97].quantile(0.99).item(),
        }
    del exact, fast

    # Effect on the release fixture's logits (its towers take 384 / 1024 inputs, as ViCA2-7B's).
    fixture_processor = build_processor(load_fixture_config())
    model = load_fixture_model()
    logits = {}
    for mode in ("exact", "fast"):
        inputs = fixture_processor(text=PROMPT, videos=str(path), num_frames=logit_frames, fast_decode=mode == "fast")
        with torch.no_grad():
            logits[mode] = model(**inputs).logits[0]
    diff = (logits["exact"] - logits["fast"]).abs()
    report["fixture_logits"] = {
        "frames": logit_frames,
        "sequence_length": int(logits["exact"].shape[0]),
        "max_abs_diff": diff.max().item(),
        "last_position_max_abs_diff": diff[-1].max().item(),
        "logit_std": logits["exact"].std().item(),
        "same_next_token": bool(logits["exact"][-1].argmax() == logits["fast"][-1].argmax()),
    }
    return report


# ----------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--short-seconds", type=float, default=15.0)
    parser.add_argument("--keyints", type=int, nargs="+", default=[250, 30])
    parser.add_argument("--quality", action="store_true", help="also measure fast mode's deviation (slow)")
    parser.add_argument("--logit-frames", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vica2_bench")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.video, args.frames, args.warmup)))
        return

    import torch

    from vica2.video_loading_vica2 import default_decode_workers

    modes = [m for m in MODES if m != "exact-cuda" or torch.cuda.is_available()]
    clip = lambda seconds, keyint: textured_video(  # noqa: E731
        args.cache / f"textured_1280x720_30fps_{seconds:g}s_key{keyint}.mp4", seconds, keyint
    )
    warmup = clip(1, 250)
    print(
        f"{args.frames} frames from 1280x720 30 fps {args.seconds:g} s h264 clips; {os.cpu_count()} CPU cores, "
        f"{default_decode_workers()} available (the default decode_workers); load average before: "
        f"{os.getloadavg()[0]:.1f}"
    )
    report = {}
    for keyint in args.keyints:
        video = clip(args.seconds, keyint)
        runs = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # interleaved, so that load from elsewhere spreads over all modes
            for mode in modes:
                runs[mode].append(measure(mode, video, args.frames, warmup))
        best = {mode: min(results, key=lambda r: r["seconds"]) for mode, results in runs.items()}
        report[keyint] = {"best": best, "runs": runs}
        print_clip(f"keyframe every {keyint} frames ({video.stat().st_size / 1e6:.1f} MB)", best, runs, args.frames)
    short = clip(args.short_seconds, args.keyints[0])
    short_exact = min((measure("exact", short, args.frames, warmup) for _ in range(args.repeats)), key=lambda r: r["seconds"])
    long_exact = report[args.keyints[0]]["best"]["exact"]
    print(
        f"\nmemory vs length (exact): {args.short_seconds:g} s clip peak RSS {short_exact['peak_rss_mb']:.0f} MB, "
        f"{args.seconds:g} s clip {long_exact['peak_rss_mb']:.0f} MB"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.quality:
        report["quality"] = print_quality(fast_mode_quality(clip(args.seconds, args.keyints[0]), args.frames, args.logit_frames))
    report["short_exact"] = short_exact
    print(json.dumps(report))


def print_clip(title: str, best: dict, runs: dict, frames: int) -> None:
    release, decode = best["release"]["seconds"], best["decode"]["seconds"]
    print(f"\n{title}")
    print(f"{'mode':<12}{'wall s':>8}{'vs release':>12}{'vs decode':>11}{'peak RSS MB':>13}   all runs (s)")
    for mode, result in best.items():
        seconds = result["seconds"]
        all_runs = ", ".join(f"{r['seconds']:.2f}" for r in runs[mode])
        print(
            f"{mode:<12}{seconds:>8.2f}{release / seconds:>11.2f}x{seconds / decode:>10.2f}x"
            f"{result['peak_rss_mb']:>13.0f}   {all_runs}"
        )
    print(
        f"exact: {release / best['exact']['seconds']:.2f}x faster than release-style (target >= 2.5x), "
        f"{best['exact']['seconds'] / decode:.2f}x decode alone (target <= 1.3x); 1 worker / default workers: "
        f"{best['exact-1w']['seconds'] / best['exact']['seconds']:.2f}x"
    )


def print_quality(quality: dict) -> dict:
    print(f"\nexact mode vs release-style pixels (the frames the model uses): max |diff| {quality['exact_vs_release_max_abs']}")
    print("fast mode vs exact mode (normalised pixel units):")
    for name in ("siglip", "hiera"):
        q = quality[name]
        print(f"  {name:<7} mean |diff| {q['mean_abs']:.4f}   p99 {q['p99_abs']:.4f}   max {q['max_abs']:.4f}")
    q = quality["fixture_logits"]
    print(
        f"  fixture model logits ({q['frames']} frames, {q['sequence_length']} tokens): max |diff| "
        f"{q['max_abs_diff']:.4f} (last position {q['last_position_max_abs_diff']:.4f}; logit std "
        f"{q['logit_std']:.3f}); same next token: {q['same_next_token']}"
    )
    return quality


if __name__ == "__main__":
    main()
