"""pipelines/pages.py: escaping, undefined values, the SVG plots' geometry, and a page rendered in
headless Chromium with the network cut off."""

import math
import re

import pytest

from pipelines import pages
from tests import browser


def test_values_from_data_are_escaped_everywhere():
    hostile = "<script>alert(1)</script>"
    doc = pages.document(hostile, pages.section(hostile, pages.table(["slice", "auc"], [[hostile, 0.5]])),
                         pages.bars(hostile, [hostile], {hostile: [1.0]}), hostile)
    assert "<script>" not in doc
    assert doc.count("&lt;script&gt;") >= 6


def test_undefined_metrics_read_not_defined_never_zero():
    assert [pages.number(v) for v in (None, math.nan, math.inf, 0.0, 3, 0.12345)] == [
        "not defined", "not defined", "not defined", "0.0000", "3", "0.1235"]
    row = pages.table(["slice", "auc"], [["payment_type=Dispute", math.nan]])
    assert "<td class='undefined'>not defined</td>" in row and "0.0000" not in row
    assert pages.interval(0.91, 0.9, 0.93) == "0.9100 <span class='ci'>[0.9000, 0.9300]</span>"
    assert pages.interval(None, 0.1, 0.2) == "<span class='undefined'>not defined</span>"
    assert pages.interval(0.5, None, 0.2) == "0.5000"


def test_flagged_rows_carry_the_class_and_a_flag_per_row_is_required():
    html = pages.table(["feature", "value"], [["fare", 0.3], ["trip_miles", 0.01], ["payment_type", 0.25]],
                       flagged=[True, False, True])
    rows = re.findall(r"<tr(?: class='(\w+)')?><th>(\w+)</th>", html)[1:]  # after the head row
    assert rows == [("flagged", "fare"), ("", "trip_miles"), ("flagged", "payment_type")]
    assert "flagged" not in pages.table(["a"], [["x"], ["y"]])
    with pytest.raises(ValueError, match="flagged has 1 flags for 2 rows"):
        pages.table(["a"], [["x"], ["y"]], flagged=[True])


def test_bars_draw_one_rect_per_category_and_series_scaled_to_the_largest():
    svg = pages.bars("fare", ["0-5", "5-10", "10+"], {"train": [0.2, 0.6, 0.2], "eval": [0.3, 0.3, 0.4]})
    rects = re.findall(r"<rect class='bar' data-series='(\w+)' x='[\d.]+' y='[\d.]+' width='[\d.]+' "
                       r"height='([\d.]+)'", svg)
    assert [s for s, _ in rects] == ["train", "eval"] * 3
    heights = {(s, i // 2): float(h) for i, (s, h) in enumerate(rects)}
    assert heights[("train", 1)] == pytest.approx(3 * heights[("train", 0)], rel=0.01)
    assert heights[("eval", 2)] == pytest.approx(heights[("eval", 0)] * 4 / 3, rel=0.01)
    with pytest.raises(ValueError, match="series 'eval' has 2 values for 3 categories"):
        pages.bars("fare", ["a", "b", "c"], {"train": [1, 2, 3], "eval": [1, 2]})


def test_lines_map_the_unit_square_onto_the_plot_area_and_drop_nan_points():
    svg = pages.lines("ROC", {"model": [(0, 0), (0.5, math.nan), (1, 1)]}, "fpr", "tpr", diagonal=True)
    points = re.search(r"class='series' data-series='model' data-points='2'.*?points='([^']+)'", svg).group(1)
    (x0, y0), (x1, y1) = [tuple(map(float, p.split(","))) for p in points.split()]
    assert x0 < x1 and y0 > y1  # (0,0) bottom-left, (1,1) top-right: SVG's y grows downwards
    frame = re.search(r"<rect class='axis' fill='none' x='(\d+)' y='(\d+)' width='(\d+)' height='(\d+)'", svg)
    left, top, w, h = map(float, frame.groups())
    assert (x0, y0, x1, y1) == (left, top + h, left + w, top)
    assert "class='diagonal'" in svg
    with pytest.raises(ValueError, match="x_range"):
        pages.lines("bad", {}, "x", "y", x_range=(1, 0))


def test_a_page_references_nothing_outside_itself():
    doc = pages.document("t", pages.plots(pages.lines("c", {"m": [(0, 0), (1, 1)]}, "x", "y")))
    assert not re.search(r"<(script|link|img|iframe)\b", doc)
    assert not re.search(r"(src|href)=", doc) and "@import" not in doc and "url(" not in doc


def test_a_page_renders_offline_in_chromium_with_its_table_and_plots(tmp_path):
    browser.require_chromium()
    path = pages.write(str(tmp_path / "page.html"), "Toolkit check", pages.section(
        "Metrics by slice", pages.table(["slice", "examples", "auc"], [["payment_type=Cash", 812, None],
                                                                       ["Overall", 1500, 0.9412]],
                                        flagged=[True, False]), anchor="metrics"),
        pages.plots(pages.bars("trip_miles", ["0-1", "1-2", "2-5"], {"train": [0.2, 0.5, 0.3],
                                                                   "eval": [0.25, 0.45, 0.3]}),
                    pages.lines("ROC", {"model": [(0, 0), (0.1, 0.6), (0.3, 0.9), (1, 1)]}, "fpr", "tpr")))
    page = browser.render_page(path, "pages_toolkit", ["Metrics by slice"], height=900, min_ink=20000,
                               computed={"td": ["background-color"]})
    assert "payment_type=Cash" in page.dom
    # The flagged row's cells are red, the other row's are not.
    flagged, plain = browser.table_rows(page.dom, "metrics")
    assert (flagged["class"], flagged["background"]) == ("flagged", browser.css_rgb(pages.FLAGGED_BACKGROUND))
    assert plain["class"] == "" and plain["background"] == "rgba(0, 0, 0, 0)"
    assert re.search(r"<td class=\"undefined\"[^>]*>not defined</td>", page.dom)
    assert len(re.findall(r"<rect class=\"bar\"", page.dom)) == 6
    assert re.search(r"data-series=\"model\" data-points=\"4\"", page.dom)
    assert browser.colour_pixels(page.screenshot, pages.PALETTE[0]) > 300  # the bars and the ROC line


def test_the_browser_helper_sees_a_page_that_reaches_for_the_network(tmp_path):
    browser.require_chromium()
    path = tmp_path / "leaky.html"
    path.write_text("<!doctype html><p>facets<img src='https://cdn.example.com/facets.png'>")
    page = browser.render(str(path), "leaky_control", height=200)
    assert page.requests == ["https://cdn.example.com/facets.png"]
