# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2.tools`: what never ships in a converted folder.

The front-ends (`cli` = the `vica2` command, `evaluate_vsibench`, `finetune`; the web app is `app.py` at the root,
where Spaces run it) and the library they share: `shell` (options and error wrapper), `inference` (load, ask, chat,
prefix reuse), `training` (data and Trainer), `vllm_engine`, `demo` (the tiny demo model). The hub files at the root
never import this package.
"""
