# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2's multimodal processor for vLLM's Transformers backend, installed as the `vllm.general_plugins` entry point
`vica2` (setup.cfg): vLLM calls `register()` in each of its processes, and ViCA2 checkpoints served by the backend
(`model_impl` "auto" or "transformers") then use it; other models keep the backend's own processor.

The backend runs our remote code (model and processor) as it is; two things about ViCA2's videos it cannot express,
so this subclass says them (the rest is the backend's):
- Decoded frames without metadata (a (T, H, W, 3) array, a list of PIL images) are videos too, taken as already
  sampled, as transformers takes them. The backend asks every video for metadata once the video processor samples
  frames (`do_sample_frames`), and ViCA2's does sample the frames of a (frames, metadata) pair.
- A chat's video carries the release's time instruction when its timing is known, as
  `Vica2Processor.apply_chat_template` writes it: `<video>`s, "\n", the instruction, "\n\n", then the text. vLLM renders
  the chat before it decodes the video, so the template cannot write the instruction; told `engine_expands_videos`
  (`vica2 serve` sets it for every chat; offline `LLM.chat(..., chat_template_kwargs=...)`), it writes
  `<video><video>` for a video the engine expands (a content part without a source; without the variable, the plain
  `<video>\n` that any engine understands), and this processor replaces that pair with the
  placeholders followed by the tokens of "\n{instruction}\n\n" (or of "\n" when the timing is unknown). The
  replacement is tokenized on its own and ends where the prompt's text starts after a special token, so the prompt
  equals transformers' token for token (Qwen2's pre-tokenizer joins the instruction's final "." with the newlines
  after it: splitting the prompt anywhere inside that run would not). A prompt written by hand (`LLM.generate`) has
  one `<video>`, which becomes its placeholders only, as in `Vica2Processor.__call__`.
"""

from __future__ import annotations

import dataclasses


def register() -> None:
    """Give the Transformers backend ViCA2's processor for ViCA2 checkpoints (idempotent: plugins load per process)."""
    from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM

    factories = TransformersMultiModalForCausalLM._processor_factory
    if getattr(factories.info, "vica2", False):
        return
    processing_info, processor = _classes()

    def info(ctx):
        is_vica2 = getattr(ctx.model_config.hf_config, "model_type", None) == "vica2"
        return (processing_info if is_vica2 else factories.info)(ctx)

    def build(info, dummy_inputs, **kwargs):
        return (processor if isinstance(info, processing_info) else factories.processor)(info, dummy_inputs, **kwargs)

    info.vica2 = True
    TransformersMultiModalForCausalLM._processor_factory = dataclasses.replace(factories, info=info, processor=build)


def _classes():
    import torch
    from vllm.model_executor.models.transformers.multimodal import MultiModalProcessingInfo, MultiModalProcessor
    from vllm.multimodal.parse import MultiModalDataParser
    from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails, cached_encode

    from ..processing_vica2 import time_instruction
    from ..video_processing_vica2 import as_metadata

    class VideoParser(MultiModalDataParser):
        def _get_video_with_metadata(self, video):
            frames, metadata = super()._get_video_with_metadata(video)
            return frames, {} if metadata is None else metadata  # {}: frames without metadata, already sampled

    class Vica2ProcessingInfo(MultiModalProcessingInfo):
        def get_data_parser(self):
            return VideoParser(
                video_needs_metadata=True,  # keeps each video's metadata with its frames
                expected_hidden_size=self._get_expected_hidden_size(),
                allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
            )

    class Vica2MultiModalProcessor(MultiModalProcessor):
        def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
            hf_inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
            if "video_metadata" in hf_inputs.hf_data:
                hf_inputs.hf_data["video_metadata"] = [m or None for m in hf_inputs.hf_data["video_metadata"]]
                hf_inputs.hf_data["return_metadata"] = True  # the sampled frames' timing, for the time instruction
            return hf_inputs

        def _postprocess_hf_mm_data(self, hf_data, hf_kwargs, processed):
            """Each video's replacement ids become its placeholders + what a chat puts after them."""
            metadata = processed.pop("video_metadata", None)
            if metadata is None or "video_replacement_ids" not in processed:
                return processed
            tokenizer = self.info.get_tokenizer()
            # a checkpoint trained without the time instruction (the built-in tiny model) says so in its processor
            add_time = self.info.get_hf_processor().add_time_instruction
            sizes = processed["video_replacement_sizes"].tolist()
            seqs = []
            for seq, item in zip(processed["video_replacement_ids"].split(sizes), metadata):
                instruction = time_instruction(as_metadata(item)) if add_time else None
                after = "\n" if instruction is None else f"\n{instruction}\n\n"
                seqs.append(seq.tolist() + cached_encode(tokenizer, after, add_special_tokens=False))
            processed["video_replacement_ids"] = torch.tensor([token for seq in seqs for token in seq])
            processed["video_replacement_sizes"] = torch.tensor([len(seq) for seq in seqs])
            return processed

        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            """Per item: the chat form (`<video><video>`, videos only) first, else its one placeholder."""
            hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
            updates = []
            for modality, items in out_mm_kwargs.items():
                token = getattr(hf_processor, f"{modality}_token_id")
                chat = [item.pop(f"{modality}_replacement_ids").data.tolist() for item in items]
                alone = [[token] * seq.count(token) for seq in chat]
                if modality == "video":
                    updates.append(PromptReplacement(modality, [token, token], _details(chat, token)))
                updates.append(PromptReplacement(modality, [token], _details(alone, token)))
            return updates

    def _details(seqs, token):
        return lambda index: PromptUpdateDetails.select_token_id(seqs[index], token)

    return Vica2ProcessingInfo, Vica2MultiModalProcessor
