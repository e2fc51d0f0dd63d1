"""Dagster wiring, one module per stage (thin: read, call the pure module, write, report)."""

import warnings

from dagster import BetaWarning

# `backfill_policy` is marked beta; we rely on it on purpose (see partitions.py) and do not want
# every command a user runs to print the warning.
warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")
# Source code references (definitions.catalog_assets) are beta too; they only add links to the catalog.
warnings.filterwarnings(
    "ignore", category=BetaWarning,
    message=r".*(CodeReference|code_references|AnchorBasedFilePathMapping).*",
)
