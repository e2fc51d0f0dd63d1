"""What a user trains on: kept/removed accounting, reweighting, export (pure, no Dagster)."""
