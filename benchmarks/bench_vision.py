"""Vision encoding cost at the real ViCA2-7B tower sizes on the CPU: wall time and peak RSS.

Encodes one 8-frame video (SigLIP so400m with 26 layers on all 8 frames, SAM2.1 Hiera base-plus on every second
frame, both projectors, pooling and newline rows) with random weights, for fp32 and bf16 and vision chunk sizes
1 / 4 / 8. Each configuration runs in its own process so that its peak RSS is its own. The language model is cut to
one small layer (its width stays 3584, the projectors' output); it is not part of what is timed.

    python benchmarks/bench_vision.py [--frames 8] [--chunks 1 4 8] [--dtypes float32 bfloat16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def build_vision_model(dtype):
    import torch

    from vica2.configuration_vica2 import Vica2Config, _default_text_config
    from vica2.modeling_vica2 import Vica2Model

    text = _default_text_config()
    text.update(num_hidden_layers=1, intermediate_size=64, vocab_size=16, num_attention_heads=28, num_key_value_heads=4)
    # SigLIP so400m (26 layers) and Hiera b+ at their real sizes; the placeholders must be rows of the tiny vocabulary.
    config = Vica2Config(text_config=text, image_token_id=14, video_token_id=15)
    for sub in (config, config.text_config, config.vision_config, config.hiera_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Vica2Model(config)
    # Materialise directly in the target dtype, so that the load itself never peaks at fp32 size.
    model = model.to(dtype).to_empty(device="cpu")
    model.initialize_weights()  # the model's own random init, buffers (position ids) included
    return model.eval()


def run_one(frames: int, chunk: int, dtype_name: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    model = build_vision_model(dtype)
    config = model.config
    siglip = torch.randn(1, frames, 3, config.vision_config.image_size, config.vision_config.image_size)
    # Only the frames Hiera encodes (every k-th), as the processor prepares them.
    stride = config.video_frames_budget // config.hiera_frames
    hiera = torch.randn(1, -(-frames // stride), 3, 1024, 1024)
    siglip, hiera = siglip.to(dtype), hiera.to(dtype)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            (features,) = model.get_video_features(siglip, hiera, vision_chunk_size=chunk)
            times.append(time.perf_counter() - start)
    return {
        "frames": frames,
        "chunk": chunk,
        "dtype": dtype_name,
        "tokens": features.shape[0],
        "seconds": min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        frames, chunk, dtype = args.worker.split(",")
        print(json.dumps(run_one(int(frames), int(chunk), dtype, args.repeats)))
        return

    rows = []
    for dtype in args.dtypes:
        for chunk in args.chunks:
            worker = [sys.executable, __file__, "--worker", f"{args.frames},{chunk},{dtype}", "--repeats",
                      str(args.repeats)]
            output = subprocess.run(worker, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"done: {dtype} chunk={chunk}: {row['seconds']:.1f}s", file=sys.stderr)

    print(f"ViCA2-7B vision encoding of one {args.frames}-frame video on {os.cpu_count()} CPU cores "
          f"(torch threads = cores; best of {args.repeats})")
    print(f"{'dtype':>9} {'chunk':>5} {'tokens':>7} {'wall s':>8} {'frames/s':>9} {'peak RSS MB':>12} "
          f"{'RSS after load MB':>18} {'time vs chunk 8':>16}")
    for row in rows:
        base = next((r for r in rows if r["dtype"] == row["dtype"] and r["chunk"] == max(args.chunks)), row)
        print(f"{row['dtype']:>9} {row['chunk']:>5} {row['tokens']:>7} {row['seconds']:>8.1f} "
              f"{row['frames'] / row['seconds']:>9.2f} {row['peak_rss_mb']:>12.0f} {row['rss_after_load_mb']:>18.0f} "
              f"{row['seconds'] / base['seconds']:>15.2f}x")


if __name__ == "__main__":
    main()
