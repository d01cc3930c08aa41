"""Conversion throughput and peak memory on a synthetic ~3 GB release checkpoint in 3 shards.

    .venv/bin/python benchmarks/bench_convert.py [--size-gb 3] [--keep]

Builds a release-layout folder (real SigLIP so400m / Hiera b+ tower shapes, a shortened Qwen2 with the real
152,064-row vocabulary, bf16, random weights, 3 safetensors shards + index) in a temporary folder ($TMPDIR), then
  1. copies the shard files (plain `shutil.copyfile`, the same bytes): the I/O baseline,
  2. converts it in a subprocess (`convert_checkpoint.py`), once with output shards of the input shards' size and
     once with the default 5GB,
and prints wall time (each step until its output is synced to disk), GB/s against the copy, the converter's fixed
start-up cost (imports), and the conversion's peak RSS against the largest shard (target: peak RSS <= 2 x largest
shard + 1 GB). Everything is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file


from vica2 import convert_checkpoint as cc


REPO_ROOT = Path(__file__).resolve().parents[1]

FIXTURE_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "vica2_tiny_raw"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "generation_config.json")
GB = 1e9

def release_config(num_layers: int) -> dict:
    """The 7B release config with a narrower, shorter Qwen2 (vocabulary, towers and projector widths kept)."""
    raw = json.loads((FIXTURE_DIR.parent / "vica2_7b_raw_config.json").read_text())
    raw.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=num_layers, num_attention_heads=16,
               num_key_value_heads=2, torch_dtype="bfloat16")
    return raw


def release_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Release key -> shape, in the model's order, plus the stored-but-unused SigLIP post_layernorm."""
    shapes = cc.expected_tensors(cc.release_config_to_vica2(raw))
    release = {cc.hub_key_to_release(name): shape for name, shape in shapes.items()}
    for suffix in ("weight", "bias"):
        release[f"model.vision_tower.vision_tower.vision_model.post_layernorm.{suffix}"] = (1152,)
    return release


def choose_layers(target_bytes: float) -> int:
    """The number of Qwen2 layers that brings the bf16 checkpoint closest to `target_bytes`."""
    def size(layers):
        return 2 * sum(_numel(s) for s in release_shapes(release_config(layers)).values())

    fixed, per_layer = 2 * size(1) - size(2), size(2) - size(1)  # the size is linear in the layer count
    return max(1, round((target_bytes - fixed) / per_layer))


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def build_release(folder: Path, target_bytes: float, num_shards: int) -> list[Path]:
    """Write the synthetic release shard by shard (only one shard in memory); return the shard paths."""
    raw = release_config(choose_layers(target_bytes))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE_DIR / name, folder / name)
    shapes = release_shapes(raw)
    total = 2 * sum(_numel(s) for s in shapes.values())
    meta = {key: torch.empty(shape, dtype=torch.bfloat16, device="meta") for key, shape in shapes.items()}
    # The smallest shard size that gives `num_shards` files (tensors are not split, so total / n may give more).
    factor = 1.0
    while len((split := split_torch_state_dict_into_shards(meta, max_shard_size=int(total / num_shards * factor)))
              .filename_to_tensors) > num_shards:
        factor += 0.02
    generator = torch.Generator().manual_seed(0)
    for filename, keys in split.filename_to_tensors.items():
        shard = {key: torch.randn(shapes[key], generator=generator).mul_(0.02).to(torch.bfloat16) for key in keys}
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return [folder / name for name in split.filename_to_tensors]


def timed_copy(shards: list[Path], destination: Path) -> float:
    destination.mkdir()
    start = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, destination / shard.name)
    os.sync()  # until the bytes are on disk, as for the conversions
    return time.perf_counter() - start


def measured_run(command: list[str]) -> tuple[float, float]:
    """(wall seconds until its output is on disk, peak RSS in bytes) of `command`, run from a small wrapper process.

    Linux hands a child the parent's RSS high-water mark across fork/exec, so a child of this (large) process would
    report at least our own peak; a fresh wrapper's children report only their own.
    """
    script = (
        "import os, resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "os.sync()\n"
        "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    os.sync()  # no dirty pages of an earlier step throttle this one
    result = subprocess.run([sys.executable, "-c", script, *command], check=True, capture_output=True, text=True)
    seconds, peak = result.stdout.split()
    return float(seconds), float(peak)


def conversion_command(release: Path, output: Path, max_shard_size: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "convert_checkpoint.py"), "--input-dir", str(release),
            "--output-dir", str(output), "--max-shard-size", max_shard_size]


def startup_command() -> list[str]:
    """A process that only imports what a conversion imports: the fixed time and memory in every conversion."""
    return [sys.executable, "-c", "import transformers, vica2.convert_checkpoint, vica2.modeling_vica2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        start = time.perf_counter()
        shards = build_release(work / "release", args.size_gb * GB, args.shards)
        size = sum(shard.stat().st_size for shard in shards)
        largest_input = max(shard.stat().st_size for shard in shards)
        print(f"synthetic release: {size / GB:.2f} GB in {len(shards)} shards (largest {largest_input / GB:.2f} GB), "
              f"built in {time.perf_counter() - start:.1f} s", flush=True)
        os.sync()
        copy_seconds = timed_copy(shards, work / "copy")
        print(f"plain copy (+ sync):  {copy_seconds:6.2f} s  {size / copy_seconds / GB:5.2f} GB/s")
        startup_seconds, startup_peak = measured_run(startup_command())
        print(f"start-up only (imports): {startup_seconds:.2f} s, peak RSS {startup_peak / GB:.2f} GB", flush=True)
        output_shard = f"{int(largest_input / 1e6) + 1}MB"
        for label, max_shard_size in (("output shards = input shard size", output_shard), ("default 5GB", "5GB")):
            output = work / f"out-{max_shard_size}"
            seconds, peak = measured_run(conversion_command(work / "release", output, max_shard_size))
            outputs = sorted(output.glob("*.safetensors"))
            largest = max([largest_input] + [path.stat().st_size for path in outputs])
            target = 2 * largest + 1 * GB
            print(
                f"convert ({label}, --max-shard-size {max_shard_size}): {seconds:6.2f} s  "
                f"{size / seconds / GB:5.2f} GB/s ({copy_seconds / seconds:.2f}x copy speed; without start-up "
                f"{size / (seconds - startup_seconds) / GB:.2f} GB/s); {len(outputs)} output "
                f"shard(s); peak RSS {peak / GB:.2f} GB vs largest shard {largest / GB:.2f} GB "
                f"({peak / largest:.2f}x); target <= {target / GB:.2f} GB: {'met' if peak <= target else 'MISSED'}"
            )
            shutil.rmtree(output)
        # The same conversion inside this (already warm) process: the streaming work alone, without start-up.
        import vica2.modeling_vica2  # noqa: F401 - imported before the clock starts

        os.sync()
        start = time.perf_counter()
        cc.convert_checkpoint(work / "release", work / "in-process", max_shard_size=output_shard, progress=False)
        os.sync()
        seconds = time.perf_counter() - start
        print(f"convert in-process (warm imports, --max-shard-size {output_shard}): {seconds:6.2f} s  "
              f"{size / seconds / GB:5.2f} GB/s ({copy_seconds / seconds:.2f}x copy speed)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
