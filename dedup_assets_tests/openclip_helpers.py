"""A tiny open_clip model for tests: registered with open_clip in the calling process only."""

from __future__ import annotations

import json
from pathlib import Path


def register_tiny_clip(folder: Path, name: str) -> str:
    """Register a 2-layer ViT CLIP (embed 32, 64-px images, a 1-layer text tower) as `name`; workers
    started later never see it. Returns the name."""
    import open_clip

    cfg = Path(folder) / f"{name}.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(cfg)
    return name
