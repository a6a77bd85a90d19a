"""The one HTML/SVG toolkit every page uses: a self-contained page, tables, inline SVG plots.

A page written here needs nothing from the network (no script, style sheet, font or image from
elsewhere) and no JavaScript: it renders offline, behind a proxy and in a headless browser.

Every function returns markupsafe.Markup; any plain string given as content is escaped, so
values read from data (feature names, categories, slice names) cannot inject markup. Markup is
the escaping type Jinja2 uses (installed with TFX), which spares a hand-written safe-string type.
"""

import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

from markupsafe import Markup, escape  # noqa: F401 (Markup is part of the API)

NOT_DEFINED = "not defined"
# Colours readable by the colour-blind (Okabe and Ito), one per series in order.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00")
# The background of a flagged table row: a lighter red than the FAIL badge, which stays visible on it.
FLAGGED_BACKGROUND = "#fdecec"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;margin:24px;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}p.subtitle{color:#555;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 10px;border:1px solid #d6d6d6}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.undefined,span.undefined{color:#888;font-style:italic}span.ci{color:#666;font-size:12px;white-space:nowrap}
span.verdict{font-weight:600;padding:0 6px;border-radius:3px}span.pass{background:#d8f0dd;color:#14532d}
span.fail{background:#fbdcdc;color:#7f1d1d}span.unknown{background:#eee;color:#444}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{font-weight:600}dd{margin:0}
div.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{background:#fff;border:1px solid #e2e2e2}
svg.plot text{font:11px system-ui,sans-serif;fill:#333}svg.plot .axis{stroke:#999;stroke-width:1}
svg.plot .grid{stroke:#eee;stroke-width:1}svg.plot .diagonal{stroke:#bbb;stroke-dasharray:4 3}
""" + f"tr.flagged>td,tr.flagged>th{{background:{FLAGGED_BACKGROUND}}}tr.flagged>th{{color:#7f1d1d}}\n"


def number(value: Any, digits: int = 4) -> str:
    """A metric for display: None, NaN and infinities (what TFMA reports for a metric a slice
    cannot define, e.g. AUC with one class present) read as "not defined", never as 0."""
    if value is None or isinstance(value, bool):
        return NOT_DEFINED if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else NOT_DEFINED
    return str(value)


def interval(value: Optional[float], lower: Optional[float], upper: Optional[float], digits: int = 4) -> Markup:
    """A value with its confidence interval: 0.9123 [0.9001, 0.9240]."""
    if number(value) == NOT_DEFINED:
        return Markup("<span class='undefined'>{}</span>").format(NOT_DEFINED)
    shown = escape(number(value, digits))
    if number(lower) == NOT_DEFINED or number(upper) == NOT_DEFINED:
        return Markup(shown)
    return Markup("{} <span class='ci'>[{}, {}]</span>").format(shown, number(lower, digits), number(upper, digits))


def verdict(passed: Optional[bool]) -> Markup:
    """A threshold's verdict badge: pass, FAIL, or "not checked" when it was not evaluated."""
    if passed is None:
        return Markup("<span class='verdict unknown'>not checked</span>")
    return Markup("<span class='verdict pass'>pass</span>" if passed else "<span class='verdict fail'>FAIL</span>")


def _cell(value: Any) -> Markup:
    if isinstance(value, Markup):
        return Markup("<td>{}</td>").format(value)
    text = number(value)
    if text == NOT_DEFINED:
        return Markup("<td class='undefined'>{}</td>").format(text)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Markup("<td class='num'>{}</td>").format(text)
    return Markup("<td>{}</td>").format(text)


def table(head: Sequence[Any], rows: Iterable[Sequence[Any]], caption: Optional[str] = None,
          row_headers: bool = True, flagged: Iterable[bool] = ()) -> Markup:
    """A table; numbers are right-aligned, None/NaN cells read "not defined". With row_headers the
    first cell of each row is a <th> (slice or feature names). flagged, one flag per row, marks
    the rows that need the reader's attention (an anomaly, a failed threshold): class 'flagged',
    a red background."""
    rows, flags = list(rows), list(flagged)
    if flags and len(flags) != len(rows):
        raise ValueError(f"table: flagged has {len(flags)} flags for {len(rows)} rows; give one per row (or none)")
    parts = [Markup("<table>")]
    if caption:
        parts.append(Markup("<caption>{}</caption>").format(caption))
    parts.append(Markup("<tr>") + Markup("").join(Markup("<th>{}</th>").format(h) for h in head) + Markup("</tr>"))
    for i, row in enumerate(rows):
        cells = list(row)
        first = Markup("<th>{}</th>").format(cells[0]) if row_headers and cells else _cell(cells[0]) if cells else ""
        opening = Markup("<tr class='flagged'>") if flags and flags[i] else Markup("<tr>")
        parts.append(opening + first + Markup("").join(_cell(c) for c in cells[1:]) + Markup("</tr>"))
    parts.append(Markup("</table>"))
    return Markup("\n").join(parts)


def definitions(pairs: Iterable[Tuple[Any, Any]]) -> Markup:
    """A term/value list (<dl>), for a page's key facts."""
    return Markup("<dl>{}</dl>").format(Markup("").join(
        Markup("<dt>{}</dt><dd>{}</dd>").format(k, v if isinstance(v, Markup) else number(v)) for k, v in pairs))


def paragraph(text: Any) -> Markup:
    return Markup("<p>{}</p>").format(text)


def section(heading: str, *parts: Any, level: int = 2, anchor: Optional[str] = None) -> Markup:
    """A heading and its content; plain-string parts become escaped paragraphs."""
    body = Markup("\n").join(p if isinstance(p, Markup) else paragraph(p) for p in parts)
    anchor_attr = Markup(" id='{}'").format(anchor) if anchor else Markup("")
    return Markup("<section{}><h{}>{}</h{}>\n{}</section>").format(anchor_attr, level, heading, level, body)


def plots(*svgs: Markup) -> Markup:
    """Plots side by side, wrapping on narrow screens."""
    return Markup("<div class='plots'>{}</div>").format(Markup("").join(svgs))


def document(title: str, *parts: Any, subtitle: Optional[str] = None) -> str:
    """A whole page: doctype, inline CSS, the title as <h1>, then the parts."""
    sub = Markup("<p class='subtitle'>{}</p>").format(subtitle) if subtitle else Markup("")
    body = Markup("\n").join(p if isinstance(p, Markup) else paragraph(p) for p in parts)
    return str(Markup("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
                      "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                      "<title>{}</title><style>{}</style></head>\n<body><h1>{}</h1>{}\n{}\n</body></html>\n")
               .format(title, Markup(_CSS), title, sub, body))


def write(path: str, title: str, *parts: Any, subtitle: Optional[str] = None) -> str:
    """Writes document(...) to path (creating its folder); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(document(title, *parts, subtitle=subtitle))
    return path


# --- inline SVG plots ---------------------------------------------------------------------

_W, _H = 420, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 14, 40, 58


def _ticks(low: float, high: float, count: int = 5) -> Sequence[float]:
    if not high > low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _frame(kind: str, title: str, x_label: str, y_label: str, points: int, width: int, height: int) -> Markup:
    return Markup("<svg class='plot' data-kind='{}' data-points='{}' xmlns='http://www.w3.org/2000/svg' "
                  "width='{}' height='{}' viewBox='0 0 {} {}' role='img' aria-label='{}'><title>{}</title>"
                  "<text x='{}' y='14' text-anchor='middle' font-weight='600'>{}</text>"
                  "<text x='{}' y='{}' text-anchor='middle'>{}</text>"
                  "<text transform='translate(12,{}) rotate(-90)' text-anchor='middle'>{}</text>").format(
        kind, points, width, height, width, height, title, title, width / 2, title,
        (_LEFT + width - _RIGHT) / 2, height - 6, x_label, (_TOP + height - _BOTTOM) / 2, y_label)


def _legend(names: Sequence[str], width: int) -> Markup:
    items = Markup("").join(
        Markup("<rect x='{}' y='{}' width='10' height='10' fill='{}'/><text x='{}' y='{}'>{}</text>").format(
            _LEFT + i * 110, 22, PALETTE[i % len(PALETTE)], _LEFT + 14 + i * 110, 31, name)
        for i, name in enumerate(names))
    return Markup("<g class='legend'>{}</g>").format(items) if len(names) > 1 else Markup("")


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def bars(title: str, categories: Sequence[Any], series: Mapping[str, Sequence[Optional[float]]],
         x_label: str = "", y_label: str = "share of rows", width: int = _W, height: int = _H) -> Markup:
    """Grouped bars: one group per category (histogram bucket or top value), one bar per series
    (e.g. train and eval, or served and training). Missing values count as 0."""
    names = list(series)
    values = {n: [0.0 if v is None or not math.isfinite(v) else float(v) for v in series[n]] for n in names}
    for n in names:
        if len(values[n]) != len(categories):
            raise ValueError(f"bars({title!r}): series {n!r} has {len(values[n])} values for "
                             f"{len(categories)} categories; give one value per category")
    top = max([v for n in names for v in values[n]] + [0.0]) or 1.0
    y_max = _ticks(0.0, top)[-1] if _ticks(0.0, top)[-1] >= top else top
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    group = plot_w / max(len(categories), 1)
    bar = group * 0.8 / max(len(names), 1)
    parts = [_frame("bars", title, x_label, y_label, len(categories) * len(names), width, height),
             _legend(names, width)]
    for t in _ticks(0.0, y_max):
        y = _TOP + plot_h * (1 - t / y_max)
        parts.append(Markup("<line class='grid' x1='{}' x2='{}' y1='{}' y2='{}'/><text x='{}' y='{}' "
                            "text-anchor='end'>{}</text>").format(_LEFT, width - _RIGHT, _fmt(y), _fmt(y),
                                                                 _LEFT - 4, _fmt(y + 4), f"{t:g}"))
    for i, category in enumerate(categories):
        for j, n in enumerate(names):
            v = values[n][i]
            h = plot_h * v / y_max
            parts.append(Markup("<rect class='bar' data-series='{}' x='{}' y='{}' width='{}' height='{}' fill='{}'>"
                                "<title>{}: {} = {}</title></rect>").format(
                n, _fmt(_LEFT + i * group + group * 0.1 + j * bar), _fmt(_TOP + plot_h - h), _fmt(bar), _fmt(h),
                PALETTE[j % len(PALETTE)], n, category, f"{v:.4g}"))
        if len(categories) <= 12 or i % math.ceil(len(categories) / 12) == 0:
            label = str(category)
            parts.append(Markup("<text x='{}' y='{}' text-anchor='end' transform='rotate(-35 {} {})'>{}</text>").format(
                _fmt(_LEFT + (i + 0.5) * group), height - _BOTTOM + 12, _fmt(_LEFT + (i + 0.5) * group),
                height - _BOTTOM + 12, label if len(label) <= 14 else label[:13] + "…"))
    parts.append(Markup("<line class='axis' x1='{}' x2='{}' y1='{}' y2='{}'/>").format(
        _LEFT, width - _RIGHT, _TOP + plot_h, _TOP + plot_h))
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


def lines(title: str, series: Mapping[str, Sequence[Tuple[float, float]]], x_label: str, y_label: str,
          x_range: Tuple[float, float] = (0.0, 1.0), y_range: Tuple[float, float] = (0.0, 1.0),
          diagonal: bool = False, width: int = _W, height: int = _H) -> Markup:
    """Line plot of (x, y) points per series (ROC, precision-recall, calibration); diagonal draws
    y = x (a random classifier's ROC, perfect calibration). Points with NaN are left out."""
    (x0, x1), (y0, y1) = x_range, y_range
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"lines({title!r}): x_range {x_range} and y_range {y_range} must each run low to high")
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def xy(x: float, y: float) -> str:
        return f"{_fmt(_LEFT + plot_w * (x - x0) / (x1 - x0))},{_fmt(_TOP + plot_h * (1 - (y - y0) / (y1 - y0)))}"

    clean = {n: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for n, pts in series.items()}
    parts = [_frame("lines", title, x_label, y_label, sum(len(p) for p in clean.values()), width, height),
             _legend(list(clean), width)]
    for t in _ticks(x0, x1):
        px = _LEFT + plot_w * (t - x0) / (x1 - x0)
        parts.append(Markup("<line class='grid' x1='{}' x2='{}' y1='{}' y2='{}'/><text x='{}' y='{}' "
                            "text-anchor='middle'>{}</text>").format(_fmt(px), _fmt(px), _TOP, _TOP + plot_h,
                                                                    _fmt(px), _TOP + plot_h + 14, f"{t:g}"))
    for t in _ticks(y0, y1):
        py = _TOP + plot_h * (1 - (t - y0) / (y1 - y0))
        parts.append(Markup("<line class='grid' x1='{}' x2='{}' y1='{}' y2='{}'/><text x='{}' y='{}' "
                            "text-anchor='end'>{}</text>").format(_LEFT, width - _RIGHT, _fmt(py), _fmt(py),
                                                                 _LEFT - 4, _fmt(py + 4), f"{t:g}"))
    parts.append(Markup("<rect class='axis' fill='none' x='{}' y='{}' width='{}' height='{}'/>").format(
        _LEFT, _TOP, plot_w, plot_h))
    if diagonal:
        parts.append(Markup("<polyline class='diagonal' fill='none' points='{} {}'/>").format(
            xy(max(x0, y0), max(x0, y0)), xy(min(x1, y1), min(x1, y1))))
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        parts.append(Markup("<polyline class='series' data-series='{}' data-points='{}' fill='none' stroke='{}' "
                            "stroke-width='2' points='{}'/>").format(name, len(pts), colour,
                                                                     " ".join(xy(x, y) for x, y in pts)))
        if len(pts) <= 40:
            parts.extend(Markup("<circle class='point' cx='{}' cy='{}' r='2.5' fill='{}'/>").format(
                *xy(x, y).split(","), colour) for x, y in pts)
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


# --- added for the release review page (ops/review.py) --------------------------------------

def code(text: str) -> Markup:
    """A command for the reader to copy, in a monospace box (e.g. the `make promote` to run)."""
    return Markup("<pre class='command' style='background:#f4f6f8;border:1px solid #d6d6d6;padding:6px 12px;"
                  "display:inline-block;margin:4px 0'><code>{}</code></pre>").format(text)
