"""Known-answer cases for every caption rule, the profanity and language models, and ftfy."""

from __future__ import annotations

import pytest

from dedup_assets.filters.caption import (
    fix_caption,
    language_scores,
    profanity_scores,
    rule_reasons,
    tokenize_caption,
)
from dedup_assets.filters.config import PrefilterConfig
from dedup_assets.filters.run import run_prefilter
from dedup_assets_tests.filters.conftest import index_frame

CFG = PrefilterConfig()


def caption_reasons(caption: str, cfg: PrefilterConfig) -> tuple[list[str], dict]:
    """The caption reasons and scores the real pre-filter gives a 640x480 JPEG with this caption."""
    row = run_prefilter(index_frame([{"caption": caption}]), cfg).row(0, named=True)
    scores = {k: row[k] for k in ("caption_clean", "profanity", "language", "language_confidence")}
    return [r for r in row["reasons"] if r.startswith("caption")], scores
GOOD = "a brown dog running across a green field on a sunny day"
FRENCH = "un paysage tranquille avec des collines vertes sous un ciel bleu"
GERMAN = "eine ruhige Landschaft mit grünen Hügeln unter einem blauen Himmel"


def test_a_good_descriptive_english_caption_passes_every_caption_filter() -> None:
    reasons, scores = caption_reasons(GOOD, CFG)
    assert reasons == []
    assert scores["caption_clean"] == GOOD and scores["language"] == "en"
    assert 0.0 <= scores["profanity"] < 0.5 and 0.0 < scores["language_confidence"] <= 1.0


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("#sunset #beach #love #instagood", ["caption_short", "caption_hashtags"]),
        ("@alice @bob @carol @dave", ["caption_short", "caption_handles"]),
        ("https://a.example/x http://b.example/y www.c.example", ["caption_short", "caption_urls"]),
        ("IMG_1234.JPG", ["caption_short", "caption_filename"]),
        ("DSC0001", ["caption_short", "caption_filename"]),
        ("20190312_154501.jpg", ["caption_short", "caption_filename"]),
        ("my holiday photo sunset.png", []),  # a file name among enough words is a caption
        ("cheap, best, buy, sale, free shipping, 2024, wallpaper", ["caption_seo"]),
        ("Best Wallpaper | HD Background | Free Download | 2024", ["caption_seo"]),
        ("dog, puppy, cute, animal, pet", ["caption_seo"]),  # a bare tag list
        ("a kitchen with a stove, a sink, a fridge, and a new table", []),  # a list inside a sentence
        ("a red, white, blue and green flag", []),
        ("Beautiful sunset at the beach #sunset #beach #love", []),  # 3 of 8 tokens are hashtags
        ("photo by @alice on a rainy day in Paris", []),
        ("", ["caption_missing"]),
        ("   ", ["caption_missing"]),
        (None, ["caption_missing"]),
        ("1 2 3", ["caption_short"]),  # numbers are not words
    ],
)
def test_caption_rules_known_answers(caption: str | None, expected: list[str]) -> None:
    assert rule_reasons(fix_caption(caption), CFG) == expected


@pytest.mark.parametrize(
    "n_words,expected",
    [(2, ["caption_short"]), (3, []), (64, []), (65, ["caption_long"])],
)
def test_caption_length_boundaries_in_words(n_words: int, expected: list[str]) -> None:
    assert rule_reasons(" ".join(["tree"] * n_words), CFG) == expected


def test_tag_fractions_pass_at_the_limit_and_fail_above_it() -> None:
    assert rule_reasons("red barn at dusk #farm #barn #rural", CFG) == []  # 3 of 7
    assert rule_reasons("red barn at #farm #barn #rural", CFG) == []  # 3 of 6: exactly half passes
    assert rule_reasons("red barn at dusk #farm #barn #rural #sky #hay", CFG) == ["caption_hashtags"]  # 5 of 9
    assert rule_reasons("red barn at dusk #farm #barn #rural", PrefilterConfig(max_hashtag_fraction=0.25)) == [
        "caption_hashtags"
    ]


def test_tokenizer_sorts_tokens_into_kinds() -> None:
    tok = tokenize_caption("Sunset (IMG_0042.jpg) by @ann, see www.example.com! #sky #sea")
    assert (tok.n_tokens, tok.hashtags, tok.handles, tok.urls, tok.filenames) == (8, 2, 1, 1, 1)
    assert tok.words == ["Sunset", "by", "see"]


def test_profanity_uses_the_trained_model_with_its_threshold() -> None:
    profane = "this is a fucking stupid piece of shit photo"
    reasons, scores = caption_reasons(profane, CFG)
    assert reasons == ["caption_profanity"] and scores["profanity"] >= 0.5
    reasons, scores = caption_reasons(profane, PrefilterConfig(profanity=False))
    assert reasons == [] and scores["profanity"] is None


@pytest.mark.parametrize("caption,code", [(FRENCH, "fr"), (GERMAN, "de")])
def test_other_languages_fail_when_only_english_is_allowed(caption: str, code: str) -> None:
    reasons, scores = caption_reasons(caption, CFG)
    assert reasons == ["caption_language"] and scores["language"] == code
    assert caption_reasons(caption, PrefilterConfig(languages=("en", code)))[0] == []
    reasons, scores = caption_reasons(caption, PrefilterConfig(languages=None))
    assert reasons == [] and scores["language"] is None


def test_english_with_foreign_proper_nouns_is_kept() -> None:
    for caption in ("pizza margherita with basil", "a cup of café au lait on a wooden table"):
        assert caption_reasons(caption, CFG)[0] == []


def test_mojibake_is_fixed_first_and_the_fixed_caption_is_reported() -> None:
    assert fix_caption("cafÃ© au lait") == "café au lait"
    assert fix_caption("  a  dog\n on\tgrass ") == "a dog on grass"
    _, scores = caption_reasons("a cup of cafÃ© au lait on a wooden table", CFG)
    assert scores["caption_clean"] == "a cup of café au lait on a wooden table"


def test_batched_model_scores_equal_one_at_a_time() -> None:
    texts = [GOOD, FRENCH, GERMAN, "this is a fucking stupid piece of shit photo", "a quiet street at night"]
    batch = profanity_scores(texts)
    assert batch.shape == (5,) and ((batch >= 0) & (batch <= 1)).all()
    assert [round(float(p), 6) for p in batch] == [round(float(profanity_scores([t])[0]), 6) for t in texts]
    batched, single = language_scores(texts, CFG), [language_scores([t], CFG)[0] for t in texts]
    assert [s.language for s in batched] == [s.language for s in single] == ["en", "fr", "de", "en", "en"]
    assert [s.confidence for s in batched] == pytest.approx([s.confidence for s in single], abs=1e-9)
