"""Hypernymization: known answers, and precision/recall on a labelled set of captions made here."""

from __future__ import annotations

import numpy as np
import polars as pl

from dedup_assets.filters.hypernym import gazetteer, hypernymize, hypernymize_frame

PEOPLE = ["John Smith", "Mary Johnson", "David Miller", "Linda Garcia", "James Wilson", "Susan Moore"]
PLACES = [("Sydney", "city"), ("Chicago", "city"), ("France", "country"), ("Japan", "country"),
          ("Texas", "state"), ("Berlin", "city")]
TEMPLATES = ["a photo of {p} walking in {c}", "{p} speaks at a conference in {c}", "portrait of {p}, {c}",
             "tourists near the river in {c}", "an old map of {c} on a wooden table"]
DISTRACTORS = ["Reading a book by the window", "a nice view of the hills", "Orange juice on a table",
               "Apple pie with cream", "the Golden Gate Bridge at dusk", "a Labrador puppy on the grass",
               "Happy Birthday balloons", "Summer dress on sale", "a Ford truck parked outside",
               "Christmas lights in the street"]


def _labelled(seed: int = 0) -> list[tuple[str, set[str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(120):
        t = TEMPLATES[rng.integers(len(TEMPLATES))]
        p, (c, _) = PEOPLE[rng.integers(len(PEOPLE))], PLACES[rng.integers(len(PLACES))]
        names = {c} | ({p} if "{p}" in t else set())
        out.append((t.format(p=p, c=c), names))
    return out + [(d, set()) for d in DISTRACTORS]


def test_known_answers() -> None:
    assert hypernymize("a photo of John Smith walking in Chicago")[0] == "a photo of person walking in city"
    assert hypernymize("students at Stanford University")[0] == "students at organization"
    assert hypernymize("Reading a book by the window") == ("Reading a book by the window", [])
    assert hypernymize(None) == (None, [])
    # only the names change: digits, other scripts, punctuation and full stops stay as they were
    assert hypernymize("John Smith in 2019 at 3.5 m")[0] == "person in 2019 at 3.5 m"
    assert hypernymize("a day in Zürich with John Smith.")[0] == "a day in city with person."
    assert hypernymize("Mary Johnson (left) in Sydney!")[0] == "person (left) in city!"
    assert hypernymize("Apple Inc. unveils a phone")[0] == "organization unveils a phone"


def test_precision_and_recall_on_labelled_captions() -> None:
    gaz = gazetteer()
    tp = fp = fn = 0
    for caption, names in _labelled():
        found = {n for n, _ in hypernymize(caption, gaz)[1]}
        tp += len(found & names)
        fp += len(found - names)
        fn += len(names - found)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)  # on names the gazetteers hold


def test_frame_counts_replacements() -> None:
    df = pl.DataFrame({"image_id": ["s/a", "s/b"], "shard": ["s", "s"],
                       "caption_clean": ["John Smith in Sydney", "a red bicycle"]})
    out = hypernymize_frame(df)
    assert out["caption_hypernymized"].to_list() == ["person in city", "a red bicycle"]
    assert out["replacements"].to_list() == [2, 0]
