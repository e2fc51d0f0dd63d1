"""The Dagster UI in a real browser: `dagster dev` on a loopback port, a partitioned backfill
launched through GraphQL and run by the daemon, and the lineage graph checked in headless Chromium.

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
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dedup_assets.warehouse import Warehouse
from dedup_assets_tests.conftest import SmallDataset

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ASSETS = ["image_index", "prefilter", "embeddings", "clusterings", "candidate_pairs",
          "duplicate_groups", "filtered_dataset", "regurgitation_audit"]


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


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test installs it)")
def test_ui_shows_lineage_and_runs_a_partitioned_backfill(small_dataset: SmallDataset, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: 2\n"
        "  pools:\n    default_limit: 1\n"
    )
    warehouse = tmp_path / "wh.duckdb"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUP_ASSETS_")}
    env.update(DAGSTER_HOME=str(home), DEDUP_ASSETS_SOURCE=str(small_dataset.root),
               DEDUP_ASSETS_WAREHOUSE=str(warehouse), DEDUP_ASSETS_MIN_SIDE="64")
    dagster = Path(sys.executable).parent / "dagster"
    log = open(tmp_path / "dagster_dev.log", "w")
    # Own process group with default signal handling, so the whole tree stops with it.
    proc = subprocess.Popen(
        [str(dagster), "dev", "-m", "dedup_assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).status == 200,
                    180, "dagster dev to serve")
        repo = _wait_until(
            lambda: _graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
            ["repositoriesOrError"]["nodes"], 120, "the code location to load")[0]
        selector = {"repositoryName": repo["name"], "repositoryLocationName": repo["location"]["name"]}
        for shard in small_dataset.shards:
            _graphql(port, """mutation($sel: RepositorySelector!, $key: String!) {
                addDynamicPartition(repositorySelector: $sel, partitionsDefName: "shards", partitionKey: $key) {
                  __typename } }""", {"sel": selector, "key": shard})
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
            shot = tmp_path / "lineage.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("DEDUP_ASSETS_SCREENSHOT"):
            shutil.copy(shot, os.environ["DEDUP_ASSETS_SCREENSHOT"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
