"""Offline content-safety scoring with NudeNet's detector (the optional `nsfw` extra).

NudeNet 3.4 ships its detector, `320n.onnx` (12 MB, a YOLOv8n trained by the NudeNet authors),
inside the wheel; it runs offline on CPU through onnxruntime and needs OpenCV for preprocessing.

Licence: the wheel's metadata says MIT, but the LICENSE files inside the same wheel (3.4.2) are
the GNU AGPL-3.0, and the author said in notAI-tech/NudeNet#177 (2026-01) that the YOLOv8-based
model "has to be AGPL" and that the PyPI licence would be corrected (#198 asks the same about the
bundled model and is open). Treat NudeNet and `320n.onnx` as AGPL-3.0: fine to run internally to
filter a data set; distributing it, or offering it as a network service, brings AGPL duties.
That is one more reason it is an optional extra and off by default.

Score: the detector finds body parts with a class and a confidence. The score of an image is the
highest confidence among the sexual *exposed* classes (EXPOSED_CLASSES: exposed female breast,
female and male genitalia, buttocks, anus), 0 when none is found; covered parts, faces, feet,
armpits, bellies and male chests do not count (beach and sports photos would fail otherwise).
The detector reports nothing under 0.2, so scores are 0 or in [0.2, 1]. The default threshold
(0.3) is low on purpose: like the seed pipeline, the filter errs toward removal. It does remove
innocent pictures: blurred skin-coloured ellipses on a plain background score 0.4-0.7, and one of
the 60 synthetic scenes of the sample data scores 0.38. NudeNet does not detect violence: the
violent-content half of the seed's filters has no offline model here.

Grain: one score per image.
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
    """NudeNet's detector, loaded once from inside the installed package; scores RGB images."""

    def __init__(self, batch_size: int = 16) -> None:
        from dedup_assets.filters.config import FilterDependencyError

        try:
            from nudenet import NudeDetector
        except ImportError as e:
            raise FilterDependencyError(
                "filter 'nsfw' is enabled but the package 'nudenet' is not installed: "
                "pip install -e '.[nsfw]' or set nsfw=False"
            ) from e
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # No model_path: NudeDetector opens the 320n.onnx inside its own package (offline).
        self._detector = NudeDetector()
        self.batch_size = batch_size

    @staticmethod
    def _to_bgr(image: Image.Image) -> np.ndarray:
        # NudeNet's own path is cv2.imread (BGR); its preprocessing then swaps channels twice.
        # Handing it the same BGR array makes the model see exactly what it sees from a file.
        rgb = np.asarray(image.convert("RGB"))
        return np.ascontiguousarray(rgb[:, :, ::-1])

    def detections(self, images: Sequence[Image.Image]) -> list[list[dict]]:
        """NudeNet's raw detections per image ({'class', 'score', 'box'} dicts)."""
        arrays = [self._to_bgr(im) for im in images]
        out: list[list[dict]] = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            out.extend(self._detector.detect_batch(chunk, batch_size=len(chunk)))
        return out

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 scores in [0, 1], one per image: the highest exposed-class confidence, 0 if none."""
        scores = np.zeros(len(images), dtype=np.float32)
        for n, dets in enumerate(self.detections(images)):
            scores[n] = max((float(d["score"]) for d in dets if d.get("class") in EXPOSED_CLASSES), default=0.0)
        return np.clip(scores, 0.0, 1.0)


@lru_cache(maxsize=4)
def get_scorer(batch_size: int = 16) -> NsfwScorer:
    """One detector per process (and batch size): loading the ONNX session takes about a second."""
    return NsfwScorer(batch_size=batch_size)
