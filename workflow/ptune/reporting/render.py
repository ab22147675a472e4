"""Render the report's facts as HTML and as Markdown, from two Jinja2 templates that share their number formats.

HTML is autoescaped; Markdown cells escape what Markdown or the HTML it may carry would interpret, so text from
the data (contents, labels, predictions) shows as written.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping

import jinja2

from .figures import LABELS


def num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def signed(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def count(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def seconds(value) -> str:
    return "n/a" if value is None else f"{value:,.1f} s"


def md_cell(text) -> str:
    """One Markdown table cell (or quote line) showing `text` literally."""
    text = html.escape(str(text), quote=False)
    for ch in "\\`*_[]|#":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\r", "").replace("\n", "<br>") or "(empty)"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ptune.reporting", "templates"),
        autoescape=jinja2.select_autoescape(["html", "html.j2"], default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        num=num,
        signed=signed,
        count=count,
        mib=mib,
        seconds=seconds,
        md=md_cell,
        metric=lambda name: LABELS.get(name, name),
    )
    return env


def _data_uris(images: Mapping[str, bytes]) -> dict[str, str]:
    return {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in images.items()}


def render_html(facts: dict, images: Mapping[str, bytes]) -> str:
    return _env().get_template("report.html.j2").render(**facts, images=_data_uris(images))


def render_markdown(facts: dict, images: Mapping[str, bytes]) -> str:
    return _env().get_template("report.md.j2").render(**facts, images=_data_uris(images))
