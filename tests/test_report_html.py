"""``m2mdc report --html``: one self-contained page, checked in a real browser (headless
Chromium through Playwright) when one is installed (``make test`` installs Debian's)."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest

from m2mdc.report import main
from tests.test_report import R18, write_run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
SEEDS = (42, 99, 123)
PEERS = {
    "peer_torch_pruning": (78.0, 5_000_000, 13_950_000),
    "peer_torch_pruning_latency": (77.0, 4_000_000, 11_000_000),
}


@pytest.fixture(scope="module")
def html_report(tmp_path_factory) -> tuple[Path, int]:
    """A report over two groups (resnet18 with the two peers, 3 seeds; resnet34, 1 seed)."""
    root = tmp_path_factory.mktemp("html")
    for seed in SEEDS:
        write_run(root / "runs", f"r18-{seed}", seed=seed, rows=dict(R18) | PEERS)
    write_run(root / "runs", "r34-42", seed=42, rows=dict(R18), model="resnet34")
    out = root / "rep"
    assert main([str(root / "runs"), "--out", str(out), "--html"]) == 0
    return out / "report.html", 2


def _tables(page_html: str) -> list[str]:
    return re.findall(r"<table>.*?</table>", page_html, flags=re.S)


def test_page_is_self_contained(html_report):
    path, _ = html_report
    page = path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<script" not in page and "<link" not in page
    imgs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "Run configurations" in page and "prune.ratio: 0.4" in page  # the configs, YAML


def test_tables_match_the_markdown_report(html_report):
    path, n_groups = html_report
    page = path.read_text()
    md = path.with_suffix(".md").read_text()
    # every markdown table is an HTML table with the same number of body rows
    md_tables = re.findall(r"(?:^\|.*\|\n)+", md, flags=re.M)
    md_rows = [t.count("\n") - 2 for t in md_tables]  # minus the header and the rule
    html_rows = [t.count("<tr>") - 1 for t in _tables(page)]
    assert html_rows == md_rows
    # per group: seeds + mean, then one compute row per model row
    assert html_rows[0] == len(SEEDS) + 1 and html_rows[1] == len(R18) + len(PEERS)
    sections = re.findall(r"^## ", md, flags=re.M)
    assert len(re.findall(r"^## g\d+: ", md, flags=re.M)) == n_groups
    assert page.count("<h2>") == len(sections) + 1  # and the run configurations


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.mark.slow
def test_page_renders_in_a_real_browser(html_report):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium)")
    from PIL import Image

    path, _ = html_report
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri(), wait_until="load")
        rows = page.locator("table tbody tr").count()
        tables = page.locator("table").count()
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        shot = page.screenshot(full_page=True)
        browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"report_html-{os.getpid()}.png").write_bytes(shot)
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    md_tables = _tables(path.read_text())
    assert tables == len(md_tables)
    assert rows == sum(t.count("<tr>") - 1 for t in md_tables)
    assert len(widths) == 3 and all(w > 100 for w in widths)  # every plot decoded
    img = Image.open(io.BytesIO(shot)).convert("L")
    lo, hi = img.getextrema()
    assert img.size[0] == 1280 and img.size[1] > 900 and hi - lo > 100  # not blank
