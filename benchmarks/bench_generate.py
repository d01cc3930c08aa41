"""Generation speed: prefill (time to first token) and per-token decode, against the hardware floor and the plain path.

For each model size it times, on one video of random pixels:

* prefill: the vision towers + the language model over the whole prompt, up to the first new token;
* decode: every further token, from the KV cache (the towers do not run again);
* the plain reference path: generation without a KV cache, which re-runs the towers and the whole prompt for every
  token (what an implementation that merged features outside `generate` would do), timed for a few tokens;
* the floors: prefill FLOPs (counted with `torch.utils.flop_counter` on the real prefill) over the device's measured
  matmul throughput, and the bytes one decode step must read (weights + KV cache) over its measured copy bandwidth.

Sizes: `tiny` (the demo's towers at their real 384 / 1024 inputs, a 2-layer 64-wide LM), `mid` (a few-hundred-million
parameter ViCA2 shape), and `7b` (ViCA2-7B exactly, random bf16 weights; CUDA only, 64 frames).

    python benchmarks/bench_generate.py                 # tiny and mid on the CPU
    python benchmarks/bench_generate.py --sizes 7b      # on a GPU
    python benchmarks/bench_generate.py --sizes mid --compile   # static cache: eager vs torch.compile(fullgraph)

`--compile` times static-cache generation (`cache_implementation="static"`) twice, eager and with the decode step
compiled as transformers does it on a GPU (`CompileConfig(fullgraph=True)`, forced on a CPU through its private
`_compile_all_devices` flag), after one compiling warm-up run, and prints TTFT and decode ms/token with their ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def size_config(name: str):
    from vica2.configuration_vica2 import Vica2Config
    from vica2.convert_checkpoint import release_hiera_config, release_siglip_config
    from vica2.tools.demo import DEMO_TOWERS

    if name == "7b":
        return Vica2Config()
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    if name == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
        siglip, hiera = release_siglip_config(DEMO_TOWERS["siglip_vision_model"]), release_hiera_config(DEMO_TOWERS["hiera"])
    elif name == "mid":
        text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4)
        siglip = release_siglip_config({"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 7,
                                        "num_attention_heads": 6, "image_size": 384, "patch_size": 14})
        hiera = release_hiera_config({"embed_dim": 48, "num_heads": 1, "stages": [1, 2, 4, 1],
                                      "window_pos_embed_bkg_spatial_size": [14, 14], "window_spec": [8, 4, 14, 7],
                                      "global_att_blocks": [5]})
    else:
        raise ValueError(f"unknown size {name!r}")
    text.update(model_type="qwen2", vocab_size=32000, max_position_embeddings=32768, rope_parameters=rope,
                tie_word_embeddings=False)
    return Vica2Config(text_config=text, vision_config=siglip, hiera_config=hiera, image_token_id=31000,
                       video_token_id=31001)


def build_model(name: str, device: str, dtype: torch.dtype):
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration

    config = size_config(name)
    for sub in (config, config.text_config, config.vision_config, config.hiera_config):
        sub._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Vica2ForConditionalGeneration(config)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.initialize_weights()  # the model's own init, buffers (rotary, position ids) included
    return model.eval()


def video_inputs(model, frames: int, text_tokens: int = 48):
    config, device, dtype = model.config, model.device, model.dtype
    size, hiera_size = config.vision_config.image_size, config.hiera_config.image_size[0]
    stride = config.video_frames_budget // config.hiera_frames
    n_visual = sum(config.num_video_tokens(frames))
    ids = [1] * (text_tokens // 2) + [config.video_token_id] * n_visual + [2] * (text_tokens // 2)
    return {
        "input_ids": torch.tensor([ids], device=device),
        "pixel_values_videos": torch.randn(1, frames, 3, size, size, device=device, dtype=dtype),
        "hiera_pixel_values_videos": torch.randn(1, -(-frames // stride), 3, hiera_size, hiera_size, device=device,
                                                 dtype=dtype),
    }


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, inputs, new_tokens: int, use_cache: bool = True, **generate_kwargs) -> tuple[float, float]:
    """(time to first token, seconds per further token)."""
    device = str(model.device)
    first = {}

    class FirstToken:
        seen_prompt = False

        def put(self, value):
            if self.seen_prompt and "t" not in first:
                synchronize(device)
                first["t"] = time.perf_counter()
            self.seen_prompt = True

        def end(self):
            pass

    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=use_cache, streamer=FirstToken(), pad_token_id=0, **generate_kwargs)
    synchronize(device)
    end = time.perf_counter()
    return first["t"] - start, (end - first["t"]) / max(new_tokens - 1, 1)


def compiled_vs_eager(model, inputs, new_tokens: int) -> dict:
    """(TTFT, seconds per decode token) of static-cache generation, eager and with the decode step compiled."""
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles by itself only on accelerators
    static = dict(cache_implementation="static")
    timed_generate(model, inputs, 2, **static)  # warm-up
    eager = timed_generate(model, inputs, new_tokens, **static)
    timed_generate(model, inputs, new_tokens, compile_config=compile_config, **static)  # compiles the decode step
    compiled = timed_generate(model, inputs, new_tokens, compile_config=compile_config, **static)
    return {"eager": eager, "compiled": compiled}


def print_compiled_vs_eager(sizes, device: str, dtype: torch.dtype, frames: int, new_tokens: int):
    print(f"{'size':>5} {'frames':>6} {'prompt':>7} {'TTFT eager s':>13} {'compiled s':>11} {'ratio':>6} "
          f"{'decode eager ms/tok':>20} {'compiled ms/tok':>16} {'speed-up':>9}")
    for size in sizes:
        model = build_model(size, device, dtype)
        inputs = video_inputs(model, frames)
        times = compiled_vs_eager(model, inputs, new_tokens)
        (ttft_eager, decode_eager), (ttft_compiled, decode_compiled) = times["eager"], times["compiled"]
        print(f"{size:>5} {frames:>6} {inputs['input_ids'].shape[1]:>7} {ttft_eager:>13.2f} {ttft_compiled:>11.2f} "
              f"{ttft_compiled / ttft_eager:>5.2f}x {decode_eager * 1e3:>20.1f} {decode_compiled * 1e3:>16.1f} "
              f"{decode_eager / decode_compiled:>8.2f}x")
        del model


def device_peaks(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Measured matmul FLOP/s and copy bandwidth (bytes/s) of `device` in `dtype`."""
    n = 4096 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        flops.append(4 * 2 * n**3 / (time.perf_counter() - start))
    buffer = torch.empty(256 * 2**20 // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(buffer)
    bandwidth = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(buffer)
        synchronize(device)
        bandwidth.append(2 * buffer.numel() * 4 / (time.perf_counter() - start))  # read + write
    return max(flops), max(bandwidth)


def prefill_flops(model, inputs) -> float:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs, logits_to_keep=1)
    return counter.get_total_flops()


def decode_bytes(model, prompt_tokens: int) -> float:
    text = model.config.text_config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if not name.startswith(("model.vision_tower", "model.hiera_tower", "model.multi_modal_projector",
                                          "model.hiera_projector")) and "embed_tokens" not in name)
    head_dim = text.hidden_size // text.num_attention_heads
    kv_cache = 2 * text.num_hidden_layers * prompt_tokens * text.num_key_value_heads * head_dim
    return weights + kv_cache * next(model.parameters()).element_size()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid", "7b"])
    parser.add_argument("--frames", type=int, help="frames per video (default: 16 on CPU, 64 on GPU)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reference-tokens", type=int, default=3, help="tokens for the no-cache reference path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--compile", action="store_true", help="static cache: eager vs compiled decode step only")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if "7b" in args.sizes and not device.startswith("cuda"):
        parser.error("the 7b size needs a CUDA device (random bf16 weights take ~17 GB)")
    frames = args.frames or (64 if device.startswith("cuda") else 16)
    if args.compile:
        name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
        print(f"device: {name}, {dtype}; static cache, decode step eager vs torch.compile(fullgraph=True)")
        return print_compiled_vs_eager(args.sizes, device, dtype, frames, args.new_tokens)
    peak_flops, bandwidth = device_peaks(device, dtype)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, {dtype}; measured matmul {peak_flops / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")
    print(f"{'size':>5} {'params':>8} {'frames':>6} {'prompt':>7} {'TTFT s':>8} {'floor s':>8} {'x floor':>8} "
          f"{'decode ms/tok':>14} {'floor ms':>9} {'x floor':>8} {'no-cache ms/tok':>16} {'cache speed-up':>15}")
    for size in args.sizes:
        model = build_model(size, device, dtype)
        inputs = video_inputs(model, frames)
        prompt = inputs["input_ids"].shape[1]
        timed_generate(model, inputs, 2)  # warm-up
        ttft, per_token = timed_generate(model, inputs, args.new_tokens)
        _, per_token_plain = timed_generate(model, inputs, args.reference_tokens + 1, use_cache=False)
        ttft_floor = prefill_flops(model, inputs) / peak_flops
        decode_floor = decode_bytes(model, prompt) / bandwidth
        params = sum(p.numel() for p in model.parameters())
        print(f"{size:>5} {params / 1e6:>7.0f}M {frames:>6} {prompt:>7} {ttft:>8.2f} {ttft_floor:>8.2f} "
              f"{ttft / ttft_floor:>7.1f}x {per_token * 1e3:>14.1f} {decode_floor * 1e3:>9.2f} "
              f"{per_token / decode_floor:>7.1f}x {per_token_plain * 1e3:>16.1f} {per_token_plain / per_token:>14.1f}x")
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
