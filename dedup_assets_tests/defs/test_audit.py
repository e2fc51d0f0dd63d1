"""An audit with nothing to audit is said loudly: an empty table, no stale page, a warning check."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetCheckSeverity, materialize

from dedup_assets.definitions import ALL_ASSETS, ALL_CHECKS, build_resources
from dedup_assets.settings import Settings
from dedup_assets.warehouse import Warehouse


def test_no_generated_folder_warns_instead_of_passing(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    settings = Settings(source=str(tmp_path / "src"), warehouse=str(tmp_path / "wh.duckdb"))
    stale = tmp_path / "wh_files" / "regurgitation_audit.html"
    stale.parent.mkdir()
    stale.write_text("<p>an earlier audit</p>")
    result = materialize(
        ALL_ASSETS + ALL_CHECKS, selection=["regurgitation_audit"], resources=build_resources(settings),
        raise_on_error=False,
    )
    evals = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    check = next(e for e in evals if e.check_name == "no_regurgitation")
    assert check.passed is False and check.severity == AssetCheckSeverity.WARN
    assert "nothing was audited" in (check.description or "")
    assert Warehouse(settings.warehouse).query("SELECT count(*) AS n FROM regurgitation_audit")["n"][0] == 0
    assert not stale.exists()
