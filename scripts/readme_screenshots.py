#!/usr/bin/env python
"""Regenerate the README's screenshots: the HTML report of a tiny digits run, and TensorBoard's
scalars page of the same run.

    .venv/bin/python scripts/readme_screenshots.py [--out docs/img] [--keep DIR]

One `m2mdc run` of the quickstart experiment shrunk to a few minutes on two CPU cores (320
training images; 3 teacher, 2 KD and 1 repair epochs; one thread), with `logger=tensorboard`
and the quantize stage, then `m2mdc report RUN --html`. Headless Chromium (found as the
browser test finds it: `chromium`, `chromium-browser` or `google-chrome` on the PATH) opens
the report, then TensorBoard, started on a free local port for the run's event files and
stopped afterwards. Needs Playwright, the `tensorboard` and `deploy` extras (`make` installs
them) and a Chromium. The PNGs are reduced to a 256-colour palette to stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=quickstart",
    "dataset.limit_train=320",
    "dataset.limit_test=160",
    "dataset.batch_size=32",
    "kd.epochs=2",
    "slice.repair_epochs=1",
    "score.probe_samples=192",
    "prune.bn_recal_batches=4",
    "perf.threads=1",  # a steadier latency on a shared machine
    "logger=tensorboard",
    "quantize.enabled=true",
    "quantize.calibration_samples=64",
    "quantize.latency_repeats=100",
]
VIEWPORT = {"width": 1280, "height": 900}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium on the PATH (Debian: apt-get install chromium)")


def m2mdc(*args: str, cwd: Path) -> None:
    exe = Path(sys.executable).parent / "m2mdc"
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"m2mdc {args[0]} failed:\n{proc.stderr[-3000:]}")


def save_png(shot: bytes, path: Path) -> None:
    """``shot`` as a 256-colour PNG (text and flat plots lose nothing visible)."""
    from PIL import Image

    img = Image.open(io.BytesIO(shot)).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB, {img.size[0]}x{img.size[1]})")


def report_shot(browser: Any, html: Path) -> bytes:
    """The report page's group section: from its heading to the run configurations."""
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(html.as_uri(), wait_until="load")
    heads = page.locator("h2")
    top = heads.nth(0).bounding_box()
    end = heads.nth(heads.count() - 1).bounding_box()  # "Run configurations"
    if top is None or end is None or "configurations" not in heads.last.inner_text():
        raise SystemExit(f"{html}: no group section followed by the run configurations")
    clip = {"x": 0, "y": top["y"] - 16, "width": VIEWPORT["width"]}
    shot = page.screenshot(full_page=True, clip=clip | {"height": end["y"] - clip["y"] - 8})
    page.close()
    return shot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tensorboard(logdir: Path) -> Iterator[str]:
    """A TensorBoard server for ``logdir`` on a free local port (its URL), stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):  # start-up: a few seconds
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=2).close()
                break
            if proc.poll() is not None:
                raise SystemExit(f"tensorboard exited with code {proc.returncode}")
            time.sleep(0.5)
        else:
            raise SystemExit(f"tensorboard did not answer at {url}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def tensorboard_shot(browser: Any, url: str, tag_filter: str) -> bytes:
    """TensorBoard's scalars page, the tags matching ``tag_filter``, unsmoothed and scaled to
    every point (a few epochs have no outliers), once the charts drew."""
    page = browser.new_page(viewport=VIEWPORT | {"height": 1080})
    query = f"#scalars&_smoothingWeight=0&tagFilter={urllib.parse.quote(tag_filter)}"
    page.goto(url + query, wait_until="networkidle")
    outliers = page.locator("#ignore-y-outlier")  # a Polymer checkbox, not "visible" to clicks
    if outliers.get_attribute("aria-checked") == "true":
        outliers.click(force=True)
    page.wait_for_selector("tf-scalar-card", timeout=60_000)
    page.wait_for_timeout(5000)  # the charts' lines are drawn after their frames
    shot = page.screenshot()
    page.close()
    return shot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--keep", type=Path, help="work here and keep the run (default: a temp dir)")
    ap.add_argument(
        "--tags",
        default="epoch/(test_top1|train_loss)$",
        help="TensorBoard's tag filter (a regular expression)",
    )
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    exe = chromium()
    work = args.keep or Path(tempfile.mkdtemp(prefix="m2mdc-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    try:
        m2mdc("run", *TINY, f"hydra.run.dir={run}", f"cache_dir={work / 'cache'}", cwd=work)
        m2mdc("report", str(run), "--out", str(work / "report"), "--html", cwd=work)
        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            shot = report_shot(browser, work / "report" / "report.html")
            save_png(shot, args.out / "report_html.png")
            with tensorboard(run / "tracking") as url:
                save_png(tensorboard_shot(browser, url, args.tags), args.out / "tensorboard.png")
            browser.close()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
