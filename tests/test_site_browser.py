"""Open every page of the built site in headless Chromium, as a reader would.

The site is served on 127.0.0.1 from the folder named by CIRCUITS_BOOK_HTML (set by
`make test` after the build). Checks per chapter: every plotly figure renders, picking a
dropdown entry or moving a slider changes the figure, and the browser console shows no errors.
A full-page screenshot of each chapter is kept under _build/screenshots/.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get("CIRCUITS_BOOK_HTML", ROOT / "_build" / "html"))
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHAPTERS = ["book/zero_layer", "book/one_layer", "book/two_layer", "book/training_dynamics"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.skipif(not (SITE / "index.html").exists(), reason=f"no built site in {SITE}"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
]

# Flags that keep Chromium from reaching any host but the local server.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Returns, for every plotly figure on the page, whether it rendered and which controls it has.
FIGURES_JS = """
() => Array.from(document.querySelectorAll('.js-plotly-plot')).map((gd) => ({
    id: gd.id,
    rendered: !!gd._fullLayout && gd.querySelectorAll('svg.main-svg').length > 0,
    dropdowns: (gd.layout.updatemenus || []).filter((m) => m.type !== 'buttons').length,
    buttons: (gd.layout.updatemenus || []).filter((m) => m.type === 'buttons').length,
    sliders: gd.querySelectorAll('.slider-container').length,
}))
"""

# A fingerprint of what a figure shows: its trace data, visibility and layout title.
FINGERPRINT_JS = """
(id) => {
    const gd = document.getElementById(id);
    const traces = gd.data.map((t) => JSON.stringify([t.visible, t.x, t.y, t.z, t.cells, t.text]));
    const title = gd.layout.title && (gd.layout.title.text || gd.layout.title);
    return JSON.stringify([traces, title, gd.layout.annotations]);
}
"""


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []

    def on_console(message) -> None:
        # A failed request is reported by on_response with its address; the console line
        # for it carries no address.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    def on_response(response) -> None:
        # Browsers ask for /favicon.ico on their own; the site does not ship one.
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            errors.append(f"HTTP {response.status} for {response.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("response", on_response)
    page.goto(url, wait_until="load")
    page.wait_for_timeout(500)
    return page, errors


def operate_control(page, figure: dict) -> None:
    """Pick another dropdown entry, press another button, or move a slider to its end."""
    locator = page.locator(f"#{figure['id']}")
    locator.scroll_into_view_if_needed()
    if figure["dropdowns"]:
        header = locator.locator(".updatemenu-header-group").first
        # The header shows the active entry's label followed by an arrow.
        current = (header.text_content() or "").strip().rstrip("▼▲").strip()
        header.click()
        page.wait_for_timeout(200)
        # The last entry unless it is the one shown, as when a figure opens on its last head.
        entries = locator.locator(".updatemenu-dropdown-button")
        texts = [text.strip() for text in entries.all_text_contents()]
        others = [index for index, text in enumerate(texts) if text != current]
        entries.nth(others[-1] if others else len(texts) - 1).click()
    elif figure["buttons"]:
        locator.locator(".updatemenu-button").last.click()
    else:
        rail = locator.locator(".slider-rail-touch-rect").first
        box = rail.bounding_box()
        page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    page.wait_for_timeout(800)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_in_browser(browser, server, chapter):
    page, errors = open_page(browser, f"{server}/{chapter}.html")
    figures = page.evaluate(FIGURES_JS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{Path(chapter).name}.png"), full_page=True)

    assert figures, f"{chapter}: no plotly figure on the page"
    for figure in figures:
        assert figure["rendered"], f"{chapter}: figure {figure['id']} did not render"

    interactive = [f for f in figures if f["dropdowns"] or f["buttons"] or f["sliders"]]
    assert interactive, f"{chapter}: no figure has a dropdown, button or slider"
    for figure in interactive:
        before = page.evaluate(FINGERPRINT_JS, figure["id"])
        operate_control(page, figure)
        after = page.evaluate(FINGERPRINT_JS, figure["id"])
        assert after != before, f"{chapter}: operating the control of {figure['id']} changed nothing"

    assert errors == [], f"{chapter}: console errors {errors}"
    page.close()


def test_index_in_browser(browser, server):
    page, errors = open_page(browser, f"{server}/index.html")
    assert "Transformer Circuits" in page.title()
    assert errors == []
    page.close()
