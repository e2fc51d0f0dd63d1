"""dedup-assets: Dagster assets that make image-text training sets safe to train on."""

__version__ = "0.1.0"
