"""Opens a page in a real headless Chromium with the network cut off: its DOM, a screenshot, and
every request the page tried to make.

The network is cut two ways: every host name resolves to NOTFOUND, and all traffic goes to a proxy
on a closed loopback port. Chromium's net log records what the page asked for anyway, so a test
can assert that a page requested nothing.

Chromium comes from Debian (deploy/scripts/install-chromium.sh). Tests that need it call
require_chromium(): it skips when Chromium is absent, unless SKEWLESS_REQUIRE_CHROMIUM=1 (.ci/run
sets it), and then it fails.
"""

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import pytest

REQUIRE_CHROMIUM = "SKEWLESS_REQUIRE_CHROMIUM"
SCREENSHOTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "screenshots")


def chromium_path() -> Optional[str]:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    path = chromium_path()
    if path is None:
        reason = "no chromium on PATH (deploy/scripts/install-chromium.sh installs it)"
        if os.environ.get(REQUIRE_CHROMIUM) == "1":
            pytest.fail(f"{reason}; {REQUIRE_CHROMIUM}=1 asks for the browser tests to run", pytrace=False)
        pytest.skip(reason)
    return path


@dataclass
class Rendered:
    dom: str                   # the DOM after rendering (--dump-dom)
    screenshot: str            # PNG under build/screenshots/
    requests: List[str] = field(default_factory=list)  # URLs the page asked the network for


def _page_requests(net_log: str) -> List[str]:
    """URLs the page asked for, from Chromium's net log: requests with an initiator (the page's
    file:// origin reads "null"); the browser's own background requests have none ("not an origin")."""
    with open(net_log) as f:
        log = json.load(f)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start_job and params.get("initiator", "not an origin") != "not an origin":
            if not str(params.get("url", "")).startswith("file:"):
                urls.append(params["url"])
    return urls


def _chromium(args: List[str], profile: str, timeout: float) -> subprocess.CompletedProcess:
    command = [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--disable-domain-reliability", "--metrics-recording-only",
               "--allow-browser-signin=false", "--disable-client-side-phishing-detection",
               "--disable-features=NetworkTimeServiceQuerying,SpellCheck,Translate,OptimizationHints,MediaRouter",
               "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {' '.join(command)}\n{done.stderr[-2000:]}")
    return done


# Run in the rendered copy only: writes each property's computed value onto the elements the
# selector matches (data-computed-<property>), for --dump-dom to show. The page itself has no script.
_COMPUTED_STYLE_SCRIPT = """<script>
for (const [selector, properties] of Object.entries(%s)) {
  for (const element of document.querySelectorAll(selector)) {
    const style = getComputedStyle(element);
    for (const property of properties) element.setAttribute("data-computed-" + property, style.getPropertyValue(property));
  }
}
</script>"""


def _with_computed_styles(page: str, computed: Mapping[str, Sequence[str]], folder: str) -> str:
    """A copy of page in folder that records the computed styles asked for (see _COMPUTED_STYLE_SCRIPT)."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    if "</body>" not in text:
        raise ValueError(f"{page}: no </body> to put the computed-style script before")
    copy = os.path.join(folder, os.path.basename(page))
    with open(copy, "w", encoding="utf-8") as f:
        f.write(text.replace("</body>", _COMPUTED_STYLE_SCRIPT % json.dumps(dict(computed)) + "</body>", 1))
    return copy


def render(page: str, name: str, width: int = 1280, height: int = 2000, timeout: float = 90.0,
           computed: Optional[Mapping[str, Sequence[str]]] = None) -> Rendered:
    """Loads page (a file path) from file:// in one Chromium run: its DOM, and a width x height
    screenshot saved as build/screenshots/<name>.png. computed ({CSS selector: [property, ...]})
    adds each matching element's computed value as attribute data-computed-<property> in the DOM
    (the browser runs a copy of the page with a script that writes them; the page is unchanged)."""
    if not os.path.isfile(page):
        raise FileNotFoundError(f"no page at {page} to open in Chromium")
    os.makedirs(SCREENSHOTS, exist_ok=True)
    screenshot = os.path.join(SCREENSHOTS, f"{name}.png")
    if os.path.exists(screenshot):
        os.remove(screenshot)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        shown = _with_computed_styles(page, computed, tempfile.mkdtemp(dir=profile)) if computed else page
        url = "file://" + os.path.abspath(shown)
        net_log = os.path.join(profile, "net-log.json")
        dom = _chromium([f"--log-net-log={net_log}", "--dump-dom", f"--screenshot={screenshot}",
                         f"--window-size={width},{height}", "--hide-scrollbars", url], profile, timeout).stdout
        requests = _page_requests(net_log)
    if not os.path.exists(screenshot):
        raise RuntimeError(f"chromium wrote no screenshot at {screenshot} for {url}")
    return Rendered(dom=dom, screenshot=screenshot, requests=requests)


def render_page(page: str, name: str, headings=(), height: int = 2000, min_ink: int = 50000,
                computed: Optional[Mapping[str, Sequence[str]]] = None) -> Rendered:
    """render() and the checks every report must pass: it asked the network for nothing, shows
    each heading as an <h2>, and its screenshot is not blank."""
    from html import escape

    rendered = render(page, name, height=height, computed=computed)
    assert rendered.requests == [], f"{page} asked the network for {rendered.requests}"
    missing = [h for h in headings if f"<h2>{escape(h, quote=False)}</h2>" not in rendered.dom]
    assert not missing, f"{page}: no <h2> heading {missing} in the rendered page"
    ink = ink_pixels(rendered.screenshot)
    assert ink > min_ink, f"{rendered.screenshot}: only {ink} non-background pixels (blank page?)"
    return rendered


def table_rows(dom: str, anchor: str) -> List[Dict[str, str]]:
    """The body rows of the first table in the rendered <section id=anchor>: each row's class, its
    cells' text, and the computed background of its first <td> (render(computed={"td": ["background-color"]}))."""
    import re

    found = re.search(rf'<section id="{re.escape(anchor)}">(.*?)</section>', dom, re.S)
    if not found:
        raise AssertionError(f"no <section id=\"{anchor}\"> in the rendered page")
    table = re.search(r"<table>(.*?)</table>", found.group(1), re.S)
    rows = []
    for attributes, body in re.findall(r"<tr([^>]*)>(.*?)</tr>", table.group(1) if table else "", re.S)[1:]:
        css_class = re.search(r'class="([^"]*)"', attributes)
        background = re.search(r'<td[^>]*data-computed-background-color="([^"]*)"', body)
        rows.append({"class": css_class.group(1) if css_class else "",
                     "cells": [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", body, re.S)],
                     "background": background.group(1) if background else ""})
    return rows


def css_rgb(colour: str) -> str:
    """"#fdecec" as a browser reports a computed colour: "rgb(253, 236, 236)"."""
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


def ink_pixels(png: str, background=(255, 255, 255), tolerance: int = 16) -> int:
    """How many pixels of the screenshot differ from the background: 0 means a blank page."""
    from PIL import Image, ImageChops

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        difference = ImageChops.difference(rgb, Image.new("RGB", rgb.size, background)).convert("L")
        return sum(difference.point(lambda v: 255 if v > tolerance else 0).histogram()[255:])


def colour_pixels(png: str, colour: str, tolerance: int = 24) -> int:
    """How many pixels are within tolerance of colour ("#0072b2"): text alone is grey, so pixels of
    a plot series' colour show that the plot was drawn."""
    from PIL import Image

    target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    with Image.open(png) as image:
        return sum(count for count, rgb in image.convert("RGB").getcolors(maxcolors=1 << 24)
                   if all(abs(a - b) <= tolerance for a, b in zip(rgb, target)))
