# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune ViCA2 with the library's Trainer: the release's stage recipes, your own data, LoRA, DeepSpeed.

    # one process (CPU or one GPU); `python -m vica2.tools.finetune` is the same
    python tools/finetune.py --model_name_or_path ViCA2-7B-hf --data_path data.yaml --media_root /data \
        --stage stage3 --output_dir out --bf16 True --gradient_checkpointing True

    # several GPUs: torchrun / deepspeed / accelerate launch, with --deepspeed ds_zero3.json
    torchrun --nproc_per_node 8 tools/finetune.py ... --deepspeed ds_zero3.json
    accelerate launch --config_file accelerate_config.yaml tools/finetune.py ...

The shipped configs (ds_zero2.json, ds_zero3.json, fsdp_config.json, accelerate_config.yaml's DeepSpeed file) are
found by name from any working directory. Launches that would train wrongly without an error (processes that do
not train together, data split without gradient sync, a world size other than the launcher's) are refused.
The model and processor load as every front-end loads them (`vica2.tools.inference.load_model_and_processor`): the
installed vica2 classes; `--trust_remote_code True` runs the folder's own code.

`--data_path` is a .json / .jsonl file of the release's LLaVA-style records or a YAML mixture of them with
sampling strategies ("all", "first:1000", "end:500", "random:10%"). See docs_fragments/finetune.md and
`python tools/finetune.py --help`. Needs the repository installed (`pip install -e '.[train,video]'`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from transformers import HfArgumentParser, set_seed
from transformers.integrations import deepspeed_config
from transformers.training_args import ParallelMode
from transformers.utils import logging as hf_logging

from vica2.configuration_vica2 import TOKEN_RATIO_ARGS
from vica2.tools.inference import UsageError, check_model_path, load_model_and_processor
from vica2.tools.shell import FLAGS, add_model_options, guarded
from vica2.tools.training import (
    FULL_MINUS_HIERA,
    LABEL_MODES,
    LANGUAGE_MODEL_LORA_TARGETS,
    STAGES,
    Vica2DataCollator,
    Vica2SupervisedDataset,
    Vica2Trainer,
    Vica2TrainingArguments,
    add_lora,
    apply_token_ratio,
    check_record,
    load_data_mixture,
    lora_config,
    lora_modules_to_save,
    set_trainable_parts,
    trainable_summary,
)


logger = hf_logging.get_logger("vica2.finetune")
PROG = "finetune.py"
# The shared model options in HfArgumentParser's style (float32 master weights: use --bf16 for mixed precision; no
# --device: the Trainer places the model).
MODEL_OPTIONS = {"model_flag": "--model_name_or_path", "model_required": True, "dtype_default": "float32",
                 "device": False, "separator": "_"}
FLAG_NAMES = {**FLAGS, "model_path": "--model_name_or_path", "dtype": "--dtype", "attn_implementation":
              "--attn_implementation"}


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "A .json / .jsonl file of records, or a YAML mixture of them."})
    media_root: str = field(default=".", metadata={"help": "Folder that relative media paths are resolved against."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder of image records (default media_root)."})
    video_folder: str | None = field(default=None, metadata={"help": "Folder of video records (default media_root)."})
    num_frames: int | None = field(
        default=None, metadata={"help": "Frames sampled per video (default: the checkpoint's frame budget, 64)."}
    )
    add_time_instruction: bool = field(
        default=True, metadata={"help": "Add the release's time instruction after each video (training used it)."}
    )
    label_mode: str = field(
        default="assistant",
        metadata={"help": "assistant: supervise the answers only; release: the release's labels (also every "
                  "newline, <|im_start|> and <|im_end|>).", "choices": list(LABEL_MODES)},
    )
    model_max_length: int = field(default=32768, metadata={"help": "Longer examples are cut at the end."})
    check_media: bool = field(default=True, metadata={"help": "Drop records whose media files are missing, up front."})


@dataclass
class TuningArguments:
    stage: str | None = field(
        default=None,
        metadata={"help": "A release recipe: sets the trainable parts, learning_rate and vision_tower_lr unless "
                  "given. stage1: spatial projector warm-up (lr 1e-3); stage2 / stage3: full model minus Hiera "
                  "(lr 1e-5, towers 2e-6).", "choices": list(STAGES)},
    )
    trainable_parts: str | None = field(
        default=None,
        metadata={"help": "Comma-separated parts to train, release names (mm_vision_tower, mm_mlp_adapter, "
                  "mm_language_model, sam_tower, sam_projector) or ours (vision_tower, hiera_tower, "
                  "multi_modal_projector, hiera_projector, image_newline, language_model, lm_head), a stage, "
                  f"'all' or 'none'. Default: the stage's, else {FULL_MINUS_HIERA} (everything but Hiera); with "
                  "--lora: none (adapters only), else these parts train fully next to the adapters."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model (PEFT)."})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(
        default=LANGUAGE_MODEL_LORA_TARGETS, metadata={"help": "Regex of the module names that get adapters."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also save the model with the adapters merged, to OUTPUT_DIR/merged."}
    )
    video_frames_budget: int | None = field(default=None, metadata={"help": "Token ratio: SigLIP frame budget."})
    hiera_frames: int | None = field(default=None, metadata={"help": "Token ratio: Hiera frames at the budget."})
    siglip_pool_stride: int | None = field(default=None, metadata={"help": "Token ratio: SigLIP video pool stride."})
    hiera_pool_stride: int | None = field(default=None, metadata={"help": "Token ratio: Hiera video pool stride."})


def given_options(argv: list[str]) -> set[str]:
    """The option names written on the command line (so that a stage recipe only fills in the others)."""
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def apply_stage(tuning: TuningArguments, training: Vica2TrainingArguments, given: set[str]) -> None:
    if tuning.stage is not None:
        recipe = STAGES[tuning.stage]
        logger.warning(f"Stage {tuning.stage}: {recipe.description} (DeepSpeed config: {recipe.deepspeed}).")
        if tuning.trainable_parts is None:
            tuning.trainable_parts = recipe.trainable_parts
        if "learning_rate" not in given:
            training.learning_rate = recipe.learning_rate
        if "vision_tower_lr" not in given:
            training.vision_tower_lr = recipe.vision_tower_lr
    if tuning.trainable_parts is None:
        tuning.trainable_parts = "none" if tuning.lora else FULL_MINUS_HIERA


def model_option_parser(parser=None):
    """`parser` (default a new HfArgumentParser) with the shared model options, finetune's style."""
    return add_model_options(parser if parser is not None else HfArgumentParser([]), **MODEL_OPTIONS)


def load(args) -> tuple:
    """(model, processor) for training, loaded as every front-end loads them; the model left on the CPU for the
    Trainer (or DeepSpeed ZeRO-3, which partitions it while it loads) to place. A tokenizer or processor that would
    need code from the folder is refused unless `--trust_remote_code True`."""
    model, processor = load_model_and_processor(args.model, args.dtype, None,
                                                attn_implementation=args.attn_implementation,
                                                trust_remote_code=args.trust_remote_code)
    keep_used_weight_conversions(model)
    set_use_cache(model, False)  # no KV cache while training: it only costs memory (restored before saving)
    return model, processor


def keep_used_weight_conversions(model) -> None:
    """Save with the checkpoint's own key names after a ZeRO-3 load, as after any other load.

    `save_pretrained` undoes the key conversions recorded at load. The normal load records only those that matched
    the checkpoint (transformers' core_model_loading.py); its ZeRO-3 load (integrations/deepspeed.py) records every
    candidate, so a save renamed keys that were never renamed (`model.language_model.*` became
    `model.language_model.model.*`). Keep the used ones, as the normal load does.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions and all(hasattr(conversion, "was_used") for conversion in conversions):
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def set_use_cache(model, value: bool) -> None:
    # The language model reads its own sub-config.
    for config in (model.config, model.config.text_config):
        config.use_cache = value


def prepare_model(model, tuning: TuningArguments):
    """Freeze / unfreeze the parts, or wrap with LoRA adapters (the listed parts then train fully beside them)."""
    if not tuning.lora:
        set_trainable_parts(model, tuning.trainable_parts)
        return model
    config = lora_config(
        r=tuning.lora_r,
        lora_alpha=tuning.lora_alpha,
        lora_dropout=tuning.lora_dropout,
        target_modules=tuning.lora_target_modules,
        modules_to_save=lora_modules_to_save(tuning.trainable_parts) or None,
    )
    return add_lora(model, config)


def check_before_loading(data: DataArguments, training: Vica2TrainingArguments, model_args) -> list[dict]:
    """The user's mistakes in options and data, found before the slow model load (one line each, by `guarded`);
    returns the data's records (`load_data_mixture`: bad JSON / YAML name the file and line)."""
    for flag, value in (("--num_frames", data.num_frames), ("--model_max_length", data.model_max_length),
                        ("--gradient_accumulation_steps", training.gradient_accumulation_steps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1.")
    check_model_path(model_args.model)
    records = load_data_mixture(data.data_path, seed=training.seed)
    problems = [check_record(record) for record in records]
    if all(problems):  # nothing could train: say why now, not after the model loaded
        raise UsageError(f"--data_path {data.data_path}: none of its {len(records)} records can be trained on "
                         f"(e.g. {problems[0] if problems else 'it holds no records'}).")
    return records


def build_dataset(data: DataArguments, processor, records: list[dict]) -> Vica2SupervisedDataset:
    options = {name: value for name, value in asdict(data).items() if name != "data_path"}  # the dataset's own
    return Vica2SupervisedDataset(records, processor, **options)


def save_outputs(trainer: Vica2Trainer, processor, tuning: TuningArguments) -> None:
    """The model (or the adapters) and the processor to `output_dir`; with --merge_lora, a merged copy too."""
    output_dir = Path(trainer.args.output_dir)
    set_use_cache(trainer.model, True)
    trainer.save_model(str(output_dir))  # also saves the processor (processing_class)
    trainer.save_state()
    if tuning.lora and tuning.merge_lora and trainer.args.should_save:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output_dir / "merged")
        processor.save_pretrained(output_dir / "merged")


# ----------------------------------------------------------------------------------------------- launching
SHIPPED_CONFIG_OPTIONS = ("--deepspeed", "--fsdp_config")
DEEPSPEED_INSTALL_HINT = "DeepSpeed is not installed: `pip install deepspeed` (or `pip install 'vica2-hf[deepspeed]'`)."
HERE = Path(__file__).resolve().parents[1]  # the repository root, where the shipped configs are


def shipped_config(path: str) -> str:
    """`path` as given when it exists; else the config of that name shipped at the repository root (so that
    `--deepspeed ds_zero3.json` and accelerate_config.yaml's relative DeepSpeed file work from any folder)."""
    if Path(path).exists() or Path(path).is_absolute() or not (HERE / path).is_file():
        return path
    return str(HERE / path)


def locate_shipped_configs(argv: list[str]) -> list[str]:
    """argv with the config files of `SHIPPED_CONFIG_OPTIONS` located; accelerate's DeepSpeed file too (its
    launcher passes it in ACCELERATE_DEEPSPEED_CONFIG_FILE, relative to where it was started)."""
    located = list(argv)
    for index, arg in enumerate(located):
        option, equals, value = arg.partition("=")
        if option not in SHIPPED_CONFIG_OPTIONS:
            continue
        if equals:
            located[index] = f"{option}={shipped_config(value)}"
        elif index + 1 < len(located):
            located[index + 1] = shipped_config(located[index + 1])
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = shipped_config(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    return located


def wants_deepspeed(argv: list[str]) -> bool:
    named = any(arg.partition("=")[0] == "--deepspeed" for arg in argv)
    return named or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launcher_world_size() -> int:
    """How many processes the launcher started: torchrun, deepspeed and accelerate's GPU launchers set
    WORLD_SIZE, mpirun its own variables."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def launch_problem(training_args, launched: int) -> str | None:
    """Why this launch would train wrongly without any error (None when it is sound). Reading `world_size` sets
    up the devices and the process group, before the model is built (ZeRO-3 builds it partitioned)."""
    world = training_args.world_size
    if launched > 1 and world == 1:
        return (f"{launched} processes were launched but training is not distributed (each would train alone on all "
                "the data and write the same output_dir): on a machine without GPUs add --use_cpu True.")
    if world > 1 and training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        return (f"the data is split across {world} processes but their gradients would never be averaged "
                f"(--ddp_backend {training_args.ddp_backend} without a device for it): on a machine without GPUs "
                "add --use_cpu True.")
    if world != launched:
        return f"training runs on {world} processes but the launcher started {launched}."
    if launched == 1 and os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" and os.environ.get(
        "MASTER_ADDR"
    ):
        # accelerate's CPU launcher sets MASTER_ADDR for --num_processes > 1, then starts one process unless
        # given an mpirun hostfile.
        return ("`accelerate launch --cpu --num_processes N` started one process (its CPU launcher needs "
                "--mpirun_hostfile): use `torchrun --nproc_per_node N finetune.py ... --use_cpu True`.")
    return None


def attach_deepspeed(training_args) -> None:
    """Let DeepSpeed's communication layer use the process group before the model is built.

    With ZeRO-3 `from_pretrained` builds the model partitioned (`deepspeed.zero.Init`, through the
    `HfDeepSpeedConfig` that TrainingArguments registers), and DeepSpeed reads the world size from its own layer
    while it reads the config, before it would set that layer up itself: the batch sizes then fail its check. On
    GPUs accelerate sets it up; with --use_cpu accelerate makes a plain torch (gloo) group, so attach it here.
    """
    if training_args.deepspeed_plugin is None or not torch.distributed.is_initialized():
        return
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def batch_summary(training_args) -> str:
    world, per_device = training_args.world_size, training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    engine = training_args.parallel_mode.value
    if training_args.deepspeed_plugin is not None:
        engine = f"DeepSpeed ZeRO-{deepspeed_config()['zero_optimization'].get('stage', 0)}"
    return (f"World size {world} ({engine}); per-device batch {per_device} x gradient accumulation {accumulation} "
            f"x {world} processes = global batch {per_device * accumulation * world}.")


def main(argv: list[str] | None = None) -> Vica2Trainer:
    argv = locate_shipped_configs(sys.argv[1:] if argv is None else argv)
    if wants_deepspeed(argv) and importlib.util.find_spec("deepspeed") is None:
        sys.exit(f"{PROG}: {DEEPSPEED_INSTALL_HINT}")
    parser = model_option_parser(HfArgumentParser((DataArguments, TuningArguments, Vica2TrainingArguments)))
    data_args, tuning_args, training_args, model_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity(training_args.get_process_log_level())
    problem = launch_problem(training_args, launcher_world_size())
    if problem is not None:
        sys.exit(f"{PROG}: refused: {problem}")
    attach_deepspeed(training_args)
    if training_args.should_log:
        logger.warning(batch_summary(training_args))
    apply_stage(tuning_args, training_args, given_options(argv))
    set_seed(training_args.seed)

    # The user's mistakes (bad options, unreadable data, a missing folder, a release checkpoint, an unknown dtype)
    # are one line each, exit code 2: the options and the data before the slow model load.
    records = guarded(PROG, lambda: check_before_loading(data_args, training_args, model_args), debug=False,
                      flags=FLAG_NAMES)
    loaded = records if isinstance(records, int) else guarded(PROG, lambda: load(model_args), debug=False,
                                                              flags=FLAG_NAMES)
    if isinstance(loaded, int):
        sys.exit(loaded)
    model, processor = loaded
    apply_token_ratio(model, processor, **{name: getattr(tuning_args, name) for name in TOKEN_RATIO_ARGS})
    model = prepare_model(model, tuning_args)
    logger.warning(trainable_summary(model))

    dataset = guarded(PROG, lambda: build_dataset(data_args, processor, records), debug=False, flags=FLAG_NAMES)
    if isinstance(dataset, int):  # e.g. every record's media is missing
        sys.exit(dataset)
    logger.warning(f"{len(dataset)} training records; skipped up front: {dataset.skipped or 'none'}.")
    trainer = Vica2Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=Vica2DataCollator(pad_token_id=processor.tokenizer.pad_token_id),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_outputs(trainer, processor, tuning_args)
    # Counted across this process's dataloader workers (each rank reads, and counts, its own share of the data).
    logger.warning(f"Skipped training records: {dataset.skipped or 'none'}.")
    return trainer


if __name__ == "__main__":
    main()
