"""``m2mdc report --html``: the report as one self-contained page.

The page is the report's own markdown (the same tables and notes as ``report.md``) rendered by
the ``markdown`` package, with every plot inlined as a base64 PNG, the CSS inline, and each
group's run configuration at the end. It loads nothing from the network or the disk, so it can
be mailed, attached to a ticket or opened from a cluster's scratch space.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

import markdown
import yaml

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1f2328; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fafbfc; }
img { max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }
code, pre { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
details { margin: .5em 0 1em; } summary { cursor: pointer; color: #0969da; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_html(
    report_md: str,
    images: Mapping[str, bytes],
    groups: Sequence[Mapping[str, Any]],
    title: str = "m2mdc report",
) -> str:
    """The page: ``report_md`` (whose image links name the keys of ``images``) as HTML with
    the images inlined, then each group's configuration (YAML)."""
    for name, png in images.items():
        report_md = report_md.replace(f"]({name})", f"]({data_uri(png)})")
    body = markdown.markdown(report_md, extensions=["tables", "md_in_html"])
    configs = [
        f"<details><summary>{html.escape(str(g['id']))}: {html.escape(str(g['label']))}"
        f"</summary><pre>{html.escape(yaml.safe_dump(dict(g['config']), sort_keys=True))}"
        "</pre></details>"
        for g in groups
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
            body,
            "<h2>Run configurations</h2>",
            *configs,
            "</body></html>",
            "",
        ]
    )
