"""Fine-tuning across processes, on the CPU over gloo: 2-process DDP and DeepSpeed ZeRO-2 / ZeRO-3 (through
torchrun, the deepspeed launcher and accelerate launch) equal a 1-process run with the same global batch, with
gradient accumulation and activation checkpointing; ZeRO-3 saves a normal checkpoint; the launches that would train
wrongly without an error are refused; the FSDP config's wrap classes exist in the model.

Marked `distributed` (several real launches, ~4 minutes): CI runs them once, on the newest transformers.
DeepSpeed compiles one op on first use (~95 s); it is cached in the venv (TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT


av = pytest.importorskip("av")

from test_finetune import COLORS, NUM_FRAMES, batch_of, dataset, make_tiny, video_record, write_video  # noqa: E402


pytestmark = pytest.mark.distributed

requires_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="these launches are only wrong on a machine without GPUs")

FINETUNE = str(REPO_ROOT / "tools" / "finetune.py")
GLOBAL_BATCH = 4
ACCUMULATION = 2
STEPS = 2  # 8 records, one epoch
TOLERANCE = 1e-5  # per-step losses and saved weights (measured here: ~5e-7 and ~3e-6)

# Every run the same recipe: the release's stage-2/3 trainable parts (all but Hiera), AdamW, constant LR.
RECIPE = [
    "--num_frames", str(NUM_FRAMES), "--max_steps", str(STEPS), "--gradient_accumulation_steps", str(ACCUMULATION),
    "--gradient_checkpointing", "True", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
    "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "True",
]


def free_port() -> str:
    with socket.socket() as sock:  # other test runs on this machine may hold the launchers' default port
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launcher(name: str) -> list[str]:
    """A 2-process launch of finetune.py with torchrun, the deepspeed launcher or accelerate launch (with the shipped
    accelerate_config.yaml: DeepSpeed ZeRO-3 from ds_zero3.json)."""
    port = free_port()
    return {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port],
        "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(REPO_ROOT / "accelerate_config.yaml"), "--num_processes", "2", "--main_process_port", port],
        "accelerate-cpu": [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--main_process_port", port],
    }[name]


def environment() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # DeepSpeed's compiled op
    return env


def finetune(workspace: Path, output: str, launch: list[str], *args: str, cwd: Path | None = None):
    """Run finetune.py on the workspace's checkpoint and data (paths relative to `cwd`, default the workspace)."""
    cwd = cwd or workspace
    data = [
        "--model_name_or_path", os.path.relpath(workspace / "checkpoint", cwd),
        "--data_path", os.path.relpath(workspace / "train.json", cwd), "--media_root", os.path.relpath(workspace, cwd),
        "--output_dir", os.path.relpath(workspace / output, cwd),
    ]
    command = [*launch, FINETUNE, *data, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment(), timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny checkpoint and 8 records of equal length (4 videos, one-character answers): no padding anywhere."""
    folder = tmp_path_factory.mktemp("distributed")
    model, processor = make_tiny()
    model.save_pretrained(folder / "checkpoint")
    processor.save_pretrained(folder / "checkpoint")
    for index, color in enumerate(COLORS):
        write_video(folder / f"{index}.mp4", color)
    records = [video_record(f"{index % len(COLORS)}.mp4", str(index + 1)) for index in range(2 * len(COLORS))]
    (folder / "train.json").write_text(json.dumps(records))
    return folder


@pytest.fixture(scope="module")
def one_process(workspace):
    result = finetune(workspace, "one", [sys.executable], "--per_device_train_batch_size", str(GLOBAL_BATCH // ACCUMULATION),
                      "--use_cpu", "True", *RECIPE)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"World size 1 (not_parallel); per-device batch 2 x gradient accumulation 2 x 1 processes = global batch {GLOBAL_BATCH}" in result.stderr
    return workspace / "one"


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def weights(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def assert_same_training(output: Path, reference: Path, stderr: str, engine: str) -> None:
    per_device = GLOBAL_BATCH // ACCUMULATION // 2
    assert (f"World size 2 ({engine}); per-device batch {per_device} x gradient accumulation {ACCUMULATION} x 2 "
            f"processes = global batch {GLOBAL_BATCH}") in stderr
    assert len(losses(output)) == STEPS
    assert losses(output) == pytest.approx(losses(reference), abs=TOLERANCE, rel=0)
    trained, expected = weights(output), weights(reference)
    assert max_difference(trained, expected) < TOLERANCE
    assert max_difference(expected, weights(reference.parent / "checkpoint")) > 100 * TOLERANCE  # it did train


def test_ddp_two_processes_equal_one_process(workspace, one_process):
    result = finetune(workspace, "ddp", launcher("torchrun"), "--per_device_train_batch_size", "1", "--use_cpu", "True",
                      *RECIPE)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_training(workspace / "ddp", one_process, result.stderr, "distributed")


@requires_deepspeed
@pytest.mark.parametrize(
    "stage, launch",
    [("zero2", "torchrun"), ("zero3", "deepspeed"), ("zero3", "accelerate")],
)
def test_deepspeed_two_processes_equal_one_process_and_save_a_normal_checkpoint(
    stage, launch, workspace, one_process, tmp_path
):
    from transformers import AutoModelForImageTextToText

    output = f"{stage}-{launch}"
    # The shipped configs are named relative to the repository: started from another folder, finetune.py finds them.
    config = [] if launch == "accelerate" else ["--deepspeed", f"ds_{stage}.json"]
    result = finetune(workspace, output, launcher(launch), "--per_device_train_batch_size", "1", "--use_cpu", "True",
                      *config, *RECIPE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_training(workspace / output, one_process, result.stderr, f"DeepSpeed ZeRO-{stage[-1]}")

    # A normal save's files and key names (ZeRO-3 gathers its partitions into the usual model.safetensors).
    assert sorted(path.name for path in (workspace / output).iterdir()) == sorted(
        path.name for path in one_process.iterdir()
    )
    reloaded, info = AutoModelForImageTextToText.from_pretrained(
        workspace / output, trust_remote_code=True, output_loading_info=True
    )
    assert not any(info.values()), info
    reference = AutoModelForImageTextToText.from_pretrained(one_process, trust_remote_code=True)
    _, processor = make_tiny()
    batch = {k: v for k, v in batch_of(dataset([video_record("0.mp4", "1")], processor, workspace)).items()
             if k != "labels"}
    with torch.no_grad():
        actual, expected = reloaded.eval()(**batch).logits, reference.eval()(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE)


@cpu_only
@pytest.mark.parametrize(
    "launch, args, message",
    [
        ("torchrun", [], "2 processes were launched but training is not distributed"),
        ("torchrun", ["--ddp_backend", "gloo"], "the data is split across 2 processes but their gradients would never"),
        ("accelerate-cpu", [], "`accelerate launch --cpu --num_processes N` started one process"),
    ],
    ids=["torchrun-without-use_cpu", "gloo-without-use_cpu", "accelerate-cpu-one-process"],
)
def test_launches_that_would_train_wrongly_are_refused(launch, args, message, workspace):
    result = finetune(workspace, "refused", launcher(launch), "--per_device_train_batch_size", "1", *args, *RECIPE)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("finetune.py: refused: ")]
    assert refusals and all(message in line for line in refusals), result.stderr[-4000:]
    assert "Traceback" not in result.stderr.split("finetune.py: refused")[0]  # refused before anything else failed
    assert not (workspace / "refused").exists()


def test_fsdp_config_wraps_the_model_block_classes():
    """Trainer cannot run FSDP on a CPU: checked here is that accelerate finds every class to wrap in a built model
    (it raises on a name it cannot find), and that together they hold every block of the three towers."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    from transformers import TrainingArguments

    config = json.loads((REPO_ROOT / "fsdp_config.json").read_text())
    model, _ = make_tiny()
    classes = [get_module_class_from_name(model, name) for name in config["transformer_layer_cls_to_wrap"]]
    assert all(classes), config["transformer_layer_cls_to_wrap"]
    inner = model.model
    blocks = [*inner.language_model.layers, *inner.vision_tower.encoder.layers, *inner.hiera_tower.blocks]
    assert all(isinstance(block, tuple(classes)) for block in blocks)
    # TrainingArguments reads the file as shipped (FSDP2, the classes handed to accelerate's plugin).
    args = TrainingArguments(output_dir="unused", fsdp="full_shard", fsdp_config=str(REPO_ROOT / "fsdp_config.json"),
                             use_cpu=True, report_to="none")
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"].split(",") == config["transformer_layer_cls_to_wrap"]
