"""The page's chart: a Vega-Lite spec drawn by the Vega that the page serves itself, offline.

The spec is rendered here by vl-convert, which runs the same Vega and Vega-Lite as the
script the page serves, so what is checked is what a browser draws: one bar per day with
uploads, one point per day with a match rate, and x-axis labels that never overlap, the last
day's included.
"""

from __future__ import annotations

import importlib.util
import re
from datetime import date
from pathlib import Path

import pytest

from callconv.monitoring import report_queries as q

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LAST = date(2026, 11, 28)
# Vega's default axis label font is 10px sans-serif; a character is at most about 0.62 em wide there.
CHARACTER_WIDTH = 6.2


@pytest.fixture(scope="module")
def page_module():
    spec = importlib.util.spec_from_file_location(
        "call_conversions_page_chart", PROJECT_ROOT / "plugins" / "call_conversions_page.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def points(days: int, with_data=lambda index: index % 3 == 0):
    first, last = q.default_window(LAST, days)
    return [
        q.ChartPoint(
            p.day, 0.5 + (i % 5) / 10 if with_data(i) else None, 10 + i % 7 if with_data(i) or i % 3 == 1 else None
        )
        for i, p in enumerate(q.chart_points([], "a", first, last))
    ]


def render(page_module, chart_points, width: int) -> str:
    import vl_convert

    spec = page_module.chart_spec(chart_points, "shop_a")
    assert spec["width"] == "container"  # the page's chart fills its column; here it gets a fixed width
    spec["width"] = width
    return vl_convert.vegalite_to_svg(spec, vl_version=page_module._vega_version())


def visible_x_labels(svg: str) -> list[tuple[float, float, str]]:
    """(left, right, text) of each shown label of the x axis (the first axis-label group Vega writes)."""
    group = re.search(r'<g class="mark-text role-axis-label"[^>]*>(.*?)</g>', svg, re.S).group(1)
    labels = []
    label = r'<text text-anchor="(\w+)" transform="translate\(([-\d.]+),[-\d.]+\)"[^>]*opacity="([\d.]+)"[^>]*>([^<]*)<'
    for anchor, x, opacity, text in re.findall(label, group):
        if float(opacity) == 0:
            continue  # left out by Vega's label overlap removal
        width, x = len(text) * CHARACTER_WIDTH, float(x)
        left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
        labels.append((left, left + width, text))
    return labels


def mark_count(svg: str, name: str) -> int:
    group = re.search(rf'<g class="mark-\w+ role-mark {name}[^"]*"[^>]*>(.*?)</g>', svg, re.S)
    return len(re.findall(r"<path ", group.group(1))) if group else 0


@pytest.mark.parametrize("days", [7, 30, 90, 400])
def test_label_days_end_on_the_last_day_evenly_spaced(page_module, days):
    first, last = q.default_window(LAST, days)
    named = page_module.label_days(first, last)
    assert named[-1] == last and named[0] >= first
    gaps = {(later - earlier).days for earlier, later in zip(named, named[1:], strict=False)}
    assert len(gaps) <= 1, f"uneven spacing {gaps}"


@pytest.mark.parametrize("days", [7, 30, 90, 400])
@pytest.mark.parametrize("width", [320, 700, 1200])
def test_x_axis_labels_never_overlap(page_module, days, width):
    labels = visible_x_labels(render(page_module, points(days), width))
    assert len(labels) >= 2
    for (_, right, text), (left, _, next_text) in zip(labels, labels[1:], strict=False):
        assert right <= left, f"{text!r} runs into {next_text!r} ({right:.0f} > {left:.0f})"


@pytest.mark.parametrize("days", [30, 90])
def test_the_last_day_is_named_on_a_normal_screen(page_module, days):
    labels = visible_x_labels(render(page_module, points(days), 900))
    assert labels[-1][2] == LAST.strftime("%d %b")


def test_one_bar_per_day_with_uploads_and_one_point_per_day_with_a_rate(page_module):
    chart_points = points(90)
    svg = render(page_module, chart_points, 900)
    assert mark_count(svg, page_module.BARS) == sum(1 for p in chart_points if p.uploaded is not None)
    assert mark_count(svg, page_module.RATE_POINTS) == sum(1 for p in chart_points if p.match_rate is not None)
    # Days without a match result break the line into pieces: one path segment per run of days with a rate.
    line = re.search(rf'<g class="mark-line role-mark {page_module.RATE_LINE}[^"]*"[^>]*>(.*?)</g>', svg, re.S)
    assert line.group(1).count("M") > 1


def test_the_page_loads_no_script_or_style_from_elsewhere(page_module):
    first, last = q.default_window(LAST, 90)
    data = {
        "first_day": first,
        "last_day": last,
        "accounts": [
            {"id": "shop_a", "dag_id": "d", "days": [], "chart": points(90), "code_counts": [], "problems": []}
        ],
    }
    page = page_module.render_page(data, all_accounts=["shop_a"], selected=None, root="/airflow/")
    sources = re.findall(r'<(?:script|link|img|iframe)[^>]+(?:src|href)="([^"]*)"', page)
    assert sources == [f"/airflow/call-conversions/vega-embed.js?v={page_module._vega_version()}"]
    assert "@import" not in page and "url(" not in page


def test_the_served_script_is_vega_embed_from_the_installed_package(page_module):
    bundle = page_module.vega_bundle(page_module._vega_version())
    assert "window.vegaEmbed=" in bundle.replace(" ", "")
    # Nothing in it loads further code at run time.
    assert not re.search(r"\bimport\s*\(\s*['\"]https?:", bundle)


@pytest.mark.parametrize("most", [1, 3, 5, 42, 1234])
def test_the_count_axis_has_whole_numbers_only(page_module, most):
    first, last = q.default_window(LAST, 30)
    chart_points = [
        q.ChartPoint(p.day, None, most if i == 10 else (1 if i % 4 == 0 else None))
        for i, p in enumerate(q.chart_points([], "a", first, last))
    ]
    svg = render(page_module, chart_points, 700)
    # The second axis-label group Vega writes is the left (count) axis.
    group = re.findall(r'<g class="mark-text role-axis-label"[^>]*>(.*?)</g>', svg, re.S)[1]
    ticks = [text.replace(",", "") for text in re.findall(r">([^<]+)</text>", group)]
    assert ticks and all(text.isdigit() for text in ticks), ticks
    assert int(ticks[-1]) >= most
