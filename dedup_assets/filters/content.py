"""Offline content-safety scoring with NudeNet's detector (the optional `nsfw` extra).

NudeNet 3.x (MIT licence, https://github.com/notAI-tech/NudeNet) ships its ONNX detector
(`320n.onnx`, 12 MB) inside the wheel, so it runs offline on CPU through onnxruntime. It detects
body parts; the score of an image is the highest confidence among the sexual exposed classes
(EXPOSED_CLASSES below), 0 when none is detected. The default threshold (0.3) is low on purpose:
like the seed pipeline, the filter errs on the side of removal.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

EXPOSED_CLASSES = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)


class NsfwScorer:
    """Loads the detector once; scores RGB images in [0, 1]."""

    def __init__(self) -> None:
        from dedup_assets.filters.config import FilterDependencyError

        try:
            from nudenet import NudeDetector
        except ImportError as e:
            raise FilterDependencyError(
                "the nsfw filter needs the optional extra: pip install -e '.[nsfw]' (NudeNet, MIT licence)"
            ) from e
        self._detector = NudeDetector()

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.zeros(len(images), dtype=np.float32)
        for n, img in enumerate(images):
            # NudeNet converts its input with an RGBA→BGR swap (it expects OpenCV's BGR order).
            bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])
            dets = self._detector.detect(bgr)
            scores = [float(d["score"]) for d in dets if d.get("class") in EXPOSED_CLASSES]
            out[n] = max(scores, default=0.0)
        return np.clip(out, 0.0, 1.0)


@lru_cache(maxsize=1)
def get_scorer() -> NsfwScorer:
    """One detector per process."""
    return NsfwScorer()
