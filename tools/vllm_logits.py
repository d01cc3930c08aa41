# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2's generatable-vocabulary limit as a vLLM logits processor, for every request of a server or engine:

    vllm serve MODEL ... --logits-processors vica2.tools.vllm_logits:GeneratableVocabLimit
    LLM(model=MODEL, ..., logits_processors=[GeneratableVocabLimit])

The model masks the logits of ids at or above `config.generatable_vocab_size` (the release could never emit its
untrained rows nor `<image>` / `<video>`), but vLLM computes logits with its own head and never runs that mask: this
processor applies the same limit. vLLM has two logits-processor interfaces (the V1 model runner's,
`vllm.v1.sample.logits_processor`, and the V2 runner's, `vllm.v1.worker.gpu.sample.logits_processor`, the only one
from vLLM 0.34 on); the class implements both, so one dotted name works with either runner.
"""

from __future__ import annotations


_BASES = []
try:  # the V1 model runner (vLLM <= 0.33; vLLM 0.32's CPU build)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor

    _BASES.append(_V1LogitsProcessor)
except ImportError:
    pass
try:  # the V2 model runner (vLLM >= 0.32 on GPUs; all of vLLM 0.34)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor

    _BASES.append(_V2LogitsProcessor)
except ImportError:
    pass


class GeneratableVocabLimit(*_BASES):
    """Logits of token ids at or above the model config's `generatable_vocab_size` are -inf (none when it is unset)."""

    def __init__(self, vllm_config, *runner_args):  # V1: (device, is_pin_memory); V2: (request states)
        self.limit = getattr(vllm_config.model_config.hf_config, "generatable_vocab_size", None)

    def apply(self, logits, ctx=None):  # V2 passes the batch layout, not needed here
        if self.limit is not None and self.limit < logits.shape[-1]:
            logits[..., self.limit :] = float("-inf")
        return logits

    # V1 interface
    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy token

    def update_state(self, batch_update) -> None:
        pass  # the same limit for every request

    # V2 interface
    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self.limit is not None


__all__ = ["GeneratableVocabLimit"]
