"""Greedy generations of a ViCA2 folder with transformers (remote code), for the vLLM tests to compare with.

Reads a JSON list of requests on stdin (see `conftest.Reference.generate`), prints one JSON list with, per request,
the prompt's token ids and the generated ones.
"""

import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


EOS_TOKEN_ID = 382


def main(folder: str) -> None:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    results = []
    for request in json.load(sys.stdin):
        request = dict(request)
        max_new_tokens = request.pop("max_new_tokens")
        if "videos" in request:
            request["videos"] = _video(request["videos"])
        if "messages" in request:  # the chat as transformers renders and tokenizes it (time instruction included)
            messages = [{**m, "content": [_frames_block(b) for b in m["content"]]} for m in request.pop("messages")]
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt", **request)
        else:
            inputs = processor(text=request.pop("prompt"), return_tensors="pt", **request)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        tokens = tokens[: tokens.index(EOS_TOKEN_ID) + 1] if EOS_TOKEN_ID in tokens else tokens
        results.append({"prompt_ids": inputs["input_ids"][0].tolist(), "tokens": tokens})
    print(json.dumps(results))


def _video(video):
    """A path, or {"frames": .npy path, "pil": bool, "metadata": dict}: decoded frames (a list of PIL images with
    "pil"), with their metadata when given."""
    if not isinstance(video, dict):
        return video
    frames = np.load(video["frames"])
    frames = [Image.fromarray(frame) for frame in frames] if video.get("pil") else frames
    return (frames, video["metadata"]) if video.get("metadata") else frames


def _frames_block(block):
    if isinstance(block, dict) and block.get("type") == "video" and isinstance(block.get("video"), dict):
        video = _video(block["video"])
        block = {**block, "video": video[0] if isinstance(video, tuple) else video}
        if isinstance(video, tuple):
            block["metadata"] = video[1]
    return block


if __name__ == "__main__":
    main(sys.argv[1])
