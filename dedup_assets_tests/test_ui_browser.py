"""The Dagster UI in a real browser, as a user meets it after a CLI run: `dedup-assets run` writes the
settings file, `dedup-assets dev` starts `dagster dev` on a loopback port and serves the review pages;
through GraphQL a partitioned backfill and a corpus run are launched and run by the daemon (the corpus
run keeps the CLI run's audit result: the settings file carries the generated folder), then a run
without a generated folder must warn, never pass. Headless Chromium checks the lineage graph, a column
schema and a review link that opens.

Marked `browser`; `make test` installs Debian's chromium and runs it. Set
DEDUP_ASSETS_SCREENSHOT=docs/lineage.png to refresh the README's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset
from dedup_assets_tests.test_cli import _cli

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ASSETS = ["image_index", "prefilter", "embeddings", "clusterings", "candidate_pairs",
          "duplicate_groups", "filter_classifiers", "filtered_dataset", "regurgitation_audit"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        body = json.loads(r.read())
    assert "errors" not in body, body
    return body["data"]


def _wait_until(fn, timeout: float, what: str, interval: float = 1.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # server not up yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _launch(port: int, selector: dict, job: str, assets: list[str] | None = None, config: dict | None = None) -> str:
    params = {"selector": {**selector, "jobName": job}, "runConfigData": config or {}}
    if assets:
        params["selector"]["assetSelection"] = [{"path": [a]} for a in assets]
    res = _graphql(port, """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
        ... on RunConfigValidationInvalid { errors { message } } } }""", {"p": params})["launchRun"]
    assert res["__typename"] == "LaunchRunSuccess", res
    return res["run"]["runId"]


def _wait_run(port: int, run_id: str, timeout: float) -> str:
    return _wait_until(
        lambda: (s := _graphql(port, """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }""",
                               {"id": run_id})["runOrError"]["status"]) in ("SUCCESS", "FAILURE", "CANCELED") and s,
        timeout, f"run {run_id} to finish", interval=2.0)


def _latest_check(home: Path, asset: str, check: str):  # noqa: ANN202
    from dagster import AssetCheckKey, AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(home)) as inst:
        (rec,) = inst.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey(asset), check), limit=1)
        return rec.event.dagster_event.event_specific_data


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test installs it)")
def test_ui_after_a_cli_run_keeps_its_settings_links_its_pages_and_runs_a_backfill(
    small_dataset: SmallDataset, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: 2\n"
        "  pools:\n    default_limit: 1\n"
    )
    warehouse = tmp_path / "wh.duckdb"
    port, reports = _free_port(), _free_port()
    base = f"http://127.0.0.1:{reports}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_ASSETS_")}
    env.update(DAGSTER_HOME=str(home))
    # a CLI run first, as `make demo` does: it writes $DAGSTER_HOME/dedup_assets.env for the UI
    cli = subprocess.run(
        _cli() + ["run", "--source", str(small_dataset.root), "--generated", str(small_dataset.generated),
                  "--warehouse", str(warehouse), "--min-side", "64", "--report-base-url", base],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    log = open(tmp_path / "dagster_dev.log", "w")
    # Own process group with default signal handling, so the whole tree stops with it.
    proc = subprocess.Popen(
        _cli() + ["dev", "--workspace", str(tmp_path / "none.yaml"), "--", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).status == 200,
                    180, "dagster dev to serve")
        repo = _wait_until(
            lambda: _graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
            ["repositoriesOrError"]["nodes"], 120, "the code location to load")[0]
        selector = {"repositoryName": repo["name"], "repositoryLocationName": repo["location"]["name"]}
        launched = _graphql(port, """mutation($keys: [String!]) {
            launchPartitionBackfill(backfillParams: {partitionNames: $keys,
                assetSelection: [{path: ["image_index"]}]}) {
              __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
            {"keys": small_dataset.shards})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        status = _wait_until(
            lambda: (s := _graphql(port, """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
                ... on PartitionBackfill { status } } }""", {"id": launched["backfillId"]})
                ["partitionBackfillOrError"]["status"]) not in ("REQUESTED",) and s,
            300, "the backfill to finish", interval=2.0)
        assert status in ("COMPLETED", "COMPLETED_SUCCESS"), status
        shards = Warehouse(warehouse).query("SELECT DISTINCT shard FROM image_index ORDER BY shard")["shard"].to_list()
        assert shards == small_dataset.shards

        # the corpus from the UI: the settings file gives it the CLI run's generated folder, so the audit
        # (emptied here, to see the UI's run write it again) finds the planted copies again
        Warehouse(warehouse).replace_table("regurgitation_audit", Warehouse(warehouse).query(
            "SELECT * FROM regurgitation_audit LIMIT 0"))
        assert _wait_run(port, _launch(port, selector, "corpus_job"), 420) == "SUCCESS"
        flagged = set(Warehouse(warehouse).query(
            "SELECT DISTINCT generated FROM regurgitation_audit WHERE flagged")["generated"].to_list())
        assert set(small_dataset.generated_copies) <= flagged
        assert _latest_check(home, "regurgitation_audit", "no_regurgitation").passed is False

        # the review page is a link that opens, served by `dedup-assets dev`
        with urllib.request.urlopen(f"{base}/duplicate_groups.html", timeout=10) as r:
            assert r.status == 200 and b"<h1>Duplicate groups</h1>" in r.read()

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/asset-groups", wait_until="networkidle", timeout=120_000)
            skip = page.get_by_role("button", name="Skip")  # the first-visit community dialog
            if skip.count():
                skip.first.click()
            # the global lineage starts with one box per group; its context menu expands them all
            page.get_by_text("ingest", exact=True).first.wait_for(timeout=60_000)
            # a first-visit dialog may open only now, over the graph: dismiss it before the right-click
            page.wait_for_timeout(1500)
            if skip.count():
                skip.first.click()
            page.keyboard.press("Escape")
            page.locator(".dagster-backdrop").first.wait_for(state="detached", timeout=10_000)
            page.mouse.click(700, 150, button="right")
            page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
            for name in ASSETS:  # long names are shown middle-truncated ("regurgitati…_audit")
                label = re.compile(rf"^({re.escape(name)}|{re.escape(name[:8])}.*….*{re.escape(name[-5:])})$")
                page.get_by_text(label).first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)  # let the expanded layout settle and the edges draw
            shot = tmp_path / "lineage.png"
            page.screenshot(path=str(shot), full_page=True)
            # an asset page: its column schema with descriptions, and the review page as a link
            page.goto(f"http://127.0.0.1:{port}/assets/filtered_dataset", wait_until="networkidle", timeout=120_000)
            page.get_by_text("loss weight restoring the pre-filter cluster distribution").first.wait_for(timeout=60_000)
            page.goto(f"http://127.0.0.1:{port}/assets/duplicate_groups", wait_until="networkidle", timeout=120_000)
            link = page.locator(f"a[href='{base}/duplicate_groups.html']")
            link.first.wait_for(timeout=60_000)
            browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("DEDUP_ASSETS_SCREENSHOT"):
            shutil.copy(shot, os.environ["DEDUP_ASSETS_SCREENSHOT"])

        # an audit launched from the UI with no generated folder warns; it never passes vacuously
        no_gen = {"resources": {"dataset": {"config": {"source": str(small_dataset.root), "generated": None}}}}
        assert _wait_run(port, _launch(port, selector, "corpus_job", ["regurgitation_audit"], no_gen), 300) == "SUCCESS"
        check = _latest_check(home, "regurgitation_audit", "no_regurgitation")
        assert check.passed is False and check.severity.value == "WARN"
        assert not (tmp_path / "wh_files" / "regurgitation_audit.html").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
