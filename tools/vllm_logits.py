# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2's generatable-vocabulary limit as a vLLM (V1) logits processor, for every request of an engine:

    vllm serve MODEL --logits-processors vica2.tools.vllm_logits:GeneratableVocabLimit
    vllm.LLM(MODEL, logits_processors=[GeneratableVocabLimit])

ViCA2's vocabulary ends with the placeholders (`<image>`, `<video>`) and other ids the model never generates; its
config's `generatable_vocab_size` says where the generatable ids end and transformers' `generate` masks the rest.
vLLM reads logits from the language-model head, so without this processor a request can produce placeholder ids
unless its caller passes `allowed_token_ids`. A model whose config has no `generatable_vocab_size` is left as it is.

Importing this module only imports vLLM's logits-processor interface (vLLM must be installed).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor


class GeneratableVocabLimit(LogitsProcessor):
    """Sets the logits of ids >= the config's `generatable_vocab_size` to -inf for every request (after vLLM's
    `logit_bias`, so no bias can bring them back)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.limit = getattr(vllm_config.model_config.hf_config, "generatable_vocab_size", None)

    def is_argmax_invariant(self) -> bool:
        return self.limit is None  # masking ids can change the greedy choice

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass  # the same for every request: nothing to track

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and self.limit < logits.shape[-1]:
            logits[:, self.limit :] = float("-inf")
        return logits


__all__ = ["GeneratableVocabLimit"]
