"""The pre-filter config: CC defaults, validation messages, describe(), dependency checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dedup_assets.filters.config import FilterDependencyError, PrefilterConfig, check_dependencies


def test_defaults_are_the_conceptual_captions_values_and_describe_lists_every_threshold() -> None:
    cfg = PrefilterConfig()
    assert (cfg.min_side, cfg.max_aspect_ratio, cfg.languages, cfg.nsfw) == (400, 2.0, ("en",), False)
    d = cfg.describe()
    json.dumps(d)  # goes into Dagster metadata as JSON
    for name in ("min_side", "max_aspect_ratio", "max_file_bytes", "caption_min_words", "caption_max_words",
                 "max_hashtag_fraction", "max_handle_fraction", "max_url_fraction", "max_seo_fraction",
                 "profanity_threshold", "min_language_confidence", "nsfw_threshold", "allowed_formats"):
        assert d[name] == (list(getattr(cfg, name)) if isinstance(getattr(cfg, name), tuple) else getattr(cfg, name))
    assert d["languages"] == ["en"] and d["caption_length_unit"] == "words"
    assert d["package_versions"]["alt-profanity-check"] is not None


def test_lists_from_run_config_become_tuples_and_formats_upper_case() -> None:
    cfg = PrefilterConfig(languages=["en", "de"], allowed_formats=["jpeg", "png"])  # type: ignore[arg-type]
    assert cfg.languages == ("en", "de") and cfg.allowed_formats == ("JPEG", "PNG")
    hash(cfg)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio is long side / short side"),
        ({"min_side": 0}, "min_side must be at least 1"),
        ({"caption_min_words": 5, "caption_max_words": 4}, "caption_min_words <= caption_max_words"),
        ({"profanity_threshold": 1.5}, "profanity_threshold must be between 0 and 1"),
        ({"languages": "en"}, r"tuple of strings, e.g. \('en',\)"),
        ({"languages": ("EN",)}, "lower-case ISO 639-1"),
        ({"languages": ("xx",)}, "no model for \\['xx'\\]"),
        ({"languages": ()}, "use None to disable"),
        ({"allowed_formats": ()}, "allowed_formats is empty"),
        ({"max_file_bytes": 0}, "max_file_bytes must be positive or None"),
    ],
)
def test_invalid_config_fails_with_a_message_that_says_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefilterConfig(**kwargs)


@pytest.mark.parametrize(
    "module,cfg,hint",
    [
        ("nudenet", PrefilterConfig(nsfw=True),
         "filter 'nsfw' is enabled but the package 'nudenet' is not installed: pip install -e '.[nsfw]' or set nsfw=False"),
        ("profanity_check", PrefilterConfig(),
         "filter 'profanity' is enabled but the package 'alt-profanity-check' is not installed: "
         "pip install -e . or set profanity=False"),
        ("lingua", PrefilterConfig(),
         "filter 'languages' is enabled but the package 'lingua-language-detector' is not installed: "
         "pip install -e . or set languages=None"),
    ],
)
def test_an_enabled_filter_without_its_package_raises_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, module: str, cfg: PrefilterConfig, hint: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(FilterDependencyError) as err:
        check_dependencies(cfg)
    assert str(err.value) == hint


def test_a_disabled_filter_needs_no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("nudenet", "profanity_check", "lingua"):
        monkeypatch.setitem(sys.modules, module, None)
    check_dependencies(PrefilterConfig(nsfw=False, profanity=False, languages=None))


def test_a_package_that_is_there_but_breaks_on_import_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "nudenet.py").write_text("raise RuntimeError('onnxruntime: illegal instruction')\n")
    monkeypatch.delitem(sys.modules, "nudenet", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FilterDependencyError, match=r"failed to import \(RuntimeError: onnxruntime.*set nsfw=False"):
        check_dependencies(PrefilterConfig(nsfw=True))
