# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2's generatable-vocabulary limit as a vLLM logits processor, for every request of a server or engine:

    vllm serve MODEL ... --logits-processors vica2.tools.vllm_logits:GeneratableVocabLimit
    LLM(model=MODEL, ..., logits_processors=[GeneratableVocabLimit])

(`vica2 serve` and the evaluator's vLLM engine pass it themselves.) ViCA2's vocabulary ends with the placeholders
(`<image>`, `<video>`) and other ids the model never generates; its config's `generatable_vocab_size` says where the
generatable ids end and transformers' `generate` masks the rest. vLLM computes logits with its own head and never runs
that mask, so without this processor a request could produce placeholder ids unless its caller passes
`allowed_token_ids`. The limit is applied after vLLM's `logit_bias` (in both runners), so no bias brings those ids
back. A model whose config has no `generatable_vocab_size` is left as it is.

vLLM has two logits-processor interfaces (the V1 model runner's, `vllm.v1.sample.logits_processor`, and the V2
runner's, `vllm.v1.worker.gpu.sample.logits_processor`: vLLM's default on GPUs and the only one from vLLM 0.34 on);
each runner refuses a class that does not subclass its own, so the class implements both and one dotted name works
with either. Importing this module imports only those interfaces (no torch).
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
    """Sets the logits of ids >= the config's `generatable_vocab_size` to -inf for every request (none when unset)."""

    def __init__(self, vllm_config, *runner_args):  # V1: (device, is_pin_memory); V2: (request states)
        self.limit = getattr(vllm_config.model_config.hf_config, "generatable_vocab_size", None)

    def apply(self, logits, ctx=None):  # V2 passes the batch layout: every row is masked, so it is not needed
        if self.limit is not None and self.limit < logits.shape[-1]:
            logits[..., self.limit :] = float("-inf")
        return logits

    # V1 interface
    def is_argmax_invariant(self) -> bool:
        return self.limit is None  # masking ids can change the greedy choice

    def update_state(self, batch_update) -> None:
        pass  # the same limit for every request: nothing to track

    # V2 interface
    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self.limit is not None


__all__ = ["GeneratableVocabLimit"]
