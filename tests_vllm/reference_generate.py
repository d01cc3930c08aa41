"""Greedy generations of a ViCA2 folder with transformers (remote code), for the vLLM tests to compare with.

Reads a JSON list of requests on stdin (see `conftest.Reference.generate`), prints one JSON list of token lists.
"""

import json
import sys

import torch
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
        if "messages" in request:
            messages = request.pop("messages")
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **request)
            request = {k: v for k, v in request.items() if k != "add_time_instruction"}
            request.update(_media(messages))
        else:
            prompt = request.pop("prompt")
        inputs = processor(text=prompt, return_tensors="pt", **request)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        results.append(tokens[: tokens.index(EOS_TOKEN_ID) + 1] if EOS_TOKEN_ID in tokens else tokens)
    print(json.dumps(results))


def _media(messages) -> dict:
    media = {"images": [], "videos": []}
    for message in messages:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block["type"] in ("image", "video"):
                media[block["type"] + "s"].append(block.get("path") or block.get("url"))
    return {k: v for k, v in media.items() if v}


if __name__ == "__main__":
    main(sys.argv[1])
