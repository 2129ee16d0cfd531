"""Checks on the book's sources, its Sphinx extension and the built site.

The built-site checks read the folder named by CIRCUITS_BOOK_HTML, which
`make test` sets after it builds the book. Without that variable they read
_build/html when it exists and are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from circuits.viz import PlotlyFigure

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ["book/zero_layer", "book/one_layer", "book/two_layer", "book/training_dynamics"]


def load_extension():
    path = ROOT / "book" / "_ext" / "circuits_book.py"
    spec = importlib.util.spec_from_file_location("circuits_book", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for chapter in toc.get("chapters", []):
        files.append(chapter["file"])
        files.extend(section["file"] for section in chapter.get("sections", []))
    return files


def committed_notebooks() -> list[Path]:
    return sorted((ROOT / "book").glob("*.ipynb"))


# Sources


def test_config_turns_execution_off():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())

    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True


def test_toc_lists_the_chapters():
    assert toc_files()[0] == "book/intro"
    for chapter in CHAPTERS:
        assert chapter in toc_files()


def test_toc_files_exist():
    for entry in toc_files():
        candidates = [ROOT / f"{entry}{suffix}" for suffix in (".md", ".ipynb")]
        assert any(path.is_file() for path in candidates), f"{entry} in _toc.yml has no file"


def test_every_notebook_in_toc():
    listed = set(toc_files())
    for path in committed_notebooks():
        entry = path.relative_to(ROOT).with_suffix("").as_posix()
        assert entry in listed, f"{entry} is executed by `make book` but missing from _toc.yml"


@pytest.mark.parametrize("path", committed_notebooks(), ids=lambda path: path.name)
def test_committed_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"cell {index} of {path.name} has outputs; run `make strip`"
        assert cell.execution_count is None, (
            f"cell {index} of {path.name} has an execution count; run `make strip`"
        )


# Extension


def chapter(*code: str, markdown: str = "# Title") -> nbformat.NotebookNode:
    return new_notebook(
        cells=[new_markdown_cell(markdown)] + [new_code_cell(c) for c in code],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )


def executed(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    result = nbformat.from_dict(nbformat.v4.upgrade(notebook))
    count = 0
    for cell in result.cells:
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            cell.outputs = [new_output("stream", name="stdout", text=f"output {count}\n")]
    return result


def test_merge_copies_outputs():
    extension = load_extension()
    source = chapter("a = 1", "print(a)")

    merged = extension.merge_outputs(source, executed(source))

    code = [cell for cell in merged.cells if cell.cell_type == "code"]
    assert [cell.outputs[0].text for cell in code] == ["output 1\n", "output 2\n"]
    assert [cell.execution_count for cell in code] == [1, 2]
    assert all(cell.outputs == [] for cell in source.cells if cell.cell_type == "code")


def test_merge_keeps_current_markdown():
    extension = load_extension()
    old = chapter("a = 1", markdown="# Old title")
    new = chapter("a = 1", markdown="# New title")

    merged = extension.merge_outputs(new, executed(old))

    assert merged.cells[0].source == "# New title"
    assert merged.cells[1].outputs[0].text == "output 1\n"


@pytest.mark.parametrize(
    "current",
    [("a = 2", "print(a)"), ("a = 1",), ("a = 1", "print(a)", "print(a + 1)"), ("print(a)", "a = 1")],
    ids=["edited", "removed", "added", "reordered"],
)
def test_merge_rejects_changed_code(current):
    extension = load_extension()
    old = chapter("a = 1", "print(a)")

    assert extension.merge_outputs(chapter(*current), executed(old)) is None


def test_remove_plotly_json_keeps_html():
    extension = load_extension()
    notebook = chapter("show(fig)", "fig.show()")
    notebook.cells[1].outputs = [
        new_output(
            "display_data",
            data={"text/html": "<div></div>", extension.PLOTLY_MIME: {"data": []}},
        )
    ]
    notebook.cells[2].outputs = [new_output("display_data", data={extension.PLOTLY_MIME: {}})]

    figures_without_html = extension.remove_plotly_json(notebook)

    assert figures_without_html == 1
    assert set(notebook.cells[1].outputs[0].data) == {"text/html"}
    assert notebook.cells[2].outputs[0].data == {}


def test_duplicate_inline_scripts_removed():
    from sphinx.builders.html._assets import _JavaScript

    extension = load_extension()
    thebe = "const THEBE_JS_URL = 1"
    context = {
        "script_files": [
            _JavaScript("_static/a.js"),
            _JavaScript(None, body=thebe),
            _JavaScript("", body=thebe, priority=600),
            _JavaScript("_static/a.js"),
            _JavaScript(None, body="const other = 2"),
        ]
    }

    extension.remove_duplicate_scripts(None, "page", "page.html", context, None)

    kept = [(script.filename or "", script.attributes.get("body")) for script in
            context["script_files"]]
    assert kept == [("_static/a.js", None), ("", thebe), ("", "const other = 2")]


def test_theme_mode_defaults_to_auto():
    from types import SimpleNamespace

    extension = load_extension()
    config = SimpleNamespace(html_context={"other": 1})
    extension.set_default_theme_mode(None, config)
    assert config.html_context == {"other": 1, "default_mode": "auto"}

    chosen = SimpleNamespace(html_context={"default_mode": "dark"})
    extension.set_default_theme_mode(None, chosen)
    assert chosen.html_context["default_mode"] == "dark"


def test_site_pages_declare_theme_mode(site):
    for entry in toc_files():
        text = (site / f"{entry}.html").read_text(encoding="utf-8")
        assert 'data-default-mode="auto"' in text, entry


def test_executed_copy_path_mirrors_book(tmp_path):
    extension = load_extension()

    inside = extension.executed_copy_path(
        tmp_path, "book", ".executed", tmp_path / "book" / "one_layer.ipynb"
    )
    outside = extension.executed_copy_path(
        tmp_path, "book", ".executed", tmp_path / "other" / "notes.ipynb"
    )

    assert inside == tmp_path / ".executed" / "one_layer.ipynb"
    assert outside is None


def test_build_renders_executed_figure(tmp_path):
    # A one-chapter book with the repository's config and extension, whose
    # executed copy contains what circuits.viz.show outputs in a kernel.
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: book/figure\n"
    )
    shutil.copytree(ROOT / "book" / "_ext", tmp_path / "book" / "_ext")
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    source = chapter("show(fig)\nprint('after the figure')", markdown="# Figure\n\nMath: $W_U W_E$")
    nbformat.write(source, tmp_path / "book" / "figure.ipynb")

    figure = PlotlyFigure(go.Figure(go.Bar(y=[3, 1, 2], name="integration-bar")))
    run = nbformat.from_dict(nbformat.v4.upgrade(source))
    run.cells[1].execution_count = 1
    run.cells[1].outputs = [
        new_output("display_data", data=figure._repr_mimebundle_()),
        new_output("stream", name="stdout", text="after the figure\n"),
    ]
    (tmp_path / ".executed").mkdir()
    nbformat.write(run, tmp_path / ".executed" / "figure.ipynb")

    # Files outside book/ are never pages, even ones Sphinx could not parse,
    # such as a template in a package of a virtual environment.
    template = tmp_path / "extras" / ".venv-x" / "lib" / "card_template.md"
    template.parent.mkdir(parents=True)
    template.write_text("---\n{{ card_data }}\n---\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "scratch.md").write_text("---\n{{ broken }}\n---\n")

    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    build = subprocess.run(
        [str(jupyter_book), "build", str(tmp_path), "--all", "-W"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    page = (tmp_path / "_build" / "html" / "book" / "figure.html").read_text(encoding="utf-8")
    assert f'<div id="{figure.div_id}" class="plotly-graph-div"' in page
    assert '"name":"integration-bar"' in page
    assert "after the figure" in page
    assert "_static/plotly.min.js" in page
    assert "_static/mathjax/tex-chtml.js" in page
    assert (tmp_path / "_build" / "html" / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert not (tmp_path / "_build" / "html" / "notes").exists()


# Built site


def built_site() -> Path:
    configured = os.environ.get("CIRCUITS_BOOK_HTML")
    if configured:
        site = Path(configured)
        if not site.is_absolute():
            site = ROOT / site
        assert (site / "index.html").is_file(), f"CIRCUITS_BOOK_HTML={configured} has no index.html"
        return site
    site = ROOT / "_build" / "html"
    if not (site / "index.html").is_file():
        pytest.skip("no built book in _build/html; run `make book` first")
    return site


@pytest.fixture(scope="module")
def site() -> Path:
    return built_site()


class ResourceParser(HTMLParser):
    """Collect the URLs a page loads and the text of its inline styles."""

    LOADING_ATTRIBUTES = {"script": "src", "link": "href", "img": "src", "iframe": "src"}

    def __init__(self):
        super().__init__()
        self.resources: list[tuple[str, str]] = []
        self.stylesheets: list[str] = []
        self.inline_styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        name = self.LOADING_ATTRIBUTES.get(tag)
        if name and attributes.get(name):
            self.resources.append((tag, attributes[name]))
        if tag == "link" and "stylesheet" in (attributes.get("rel") or "").split():
            self.stylesheets.append(attributes.get("href") or "")
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.inline_styles.append(data)


CSS_URL = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE)
CSS_IMPORT = re.compile(r"@import\s+(?:url\()?\s*['\"]?([^'\")\s;]+)", re.IGNORECASE)


def is_external(url: str) -> bool:
    return re.match(r"\s*(https?:)?//", url, re.IGNORECASE) is not None


def css_urls(text: str) -> list[str]:
    return [match[1] for match in CSS_URL.findall(text)] + CSS_IMPORT.findall(text)


def strip_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]


def site_pages(site: Path) -> list[Path]:
    return [
        path
        for path in sorted(site.rglob("*.html"))
        if path.relative_to(site).parts[0] not in {"_static", "_sources"}
    ]


def parse_page(path: Path) -> ResourceParser:
    parser = ResourceParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_site_has_every_toc_page(site):
    for entry in toc_files():
        assert (site / f"{entry}.html").is_file(), f"{entry}.html is missing from {site}"


def test_pages_load_nothing_external(site):
    pages = site_pages(site)
    assert pages, f"no HTML pages in {site}"

    for page in pages:
        parser = parse_page(page)
        external = [(tag, url) for tag, url in parser.resources if is_external(url)]
        assert external == [], f"{page.relative_to(site)} loads external resources: {external}"
        for style in parser.inline_styles:
            inline_external = [url for url in css_urls(style) if is_external(url)]
            assert inline_external == [], (
                f"an inline style in {page.relative_to(site)} loads {inline_external}"
            )


def test_stylesheets_load_nothing_external(site):
    pending = []
    for page in site_pages(site):
        for href in parse_page(page).stylesheets:
            if not is_external(href):
                pending.append((page.parent / strip_query(href)).resolve())

    checked = set()
    while pending:
        stylesheet = pending.pop()
        if stylesheet in checked:
            continue
        checked.add(stylesheet)
        assert stylesheet.is_file(), f"stylesheet {stylesheet} is linked but missing"
        text = stylesheet.read_text(encoding="utf-8", errors="replace")
        for url in css_urls(text):
            assert not is_external(url), f"{stylesheet.relative_to(site)} loads {url}"
            if url.startswith("data:"):
                continue
            if strip_query(url).endswith(".css"):
                pending.append((stylesheet.parent / strip_query(url)).resolve())

    assert checked, "no page links a stylesheet"


def test_plotly_js_is_local_copy(site):
    plotly_js = site / "_static" / "plotly.min.js"

    assert plotly_js.is_file()
    assert plotly_js.read_text(encoding="utf-8") == get_plotlyjs()


def test_toc_pages_load_plotly_js_once(site):
    for entry in toc_files():
        page = site / f"{entry}.html"
        scripts = [url for tag, url in parse_page(page).resources if tag == "script"]
        plotly = [url for url in scripts if strip_query(url).endswith("_static/plotly.min.js")]
        assert len(plotly) == 1, f"{page.relative_to(site)} loads plotly.min.js {len(plotly)} times"


def test_math_pages_load_local_mathjax(site):
    for page in site_pages(site):
        text = page.read_text(encoding="utf-8")
        scripts = [url for tag, url in parse_page(page).resources if tag == "script"]
        mathjax = [url for url in scripts if "mathjax" in url.lower()]
        if 'class="math' not in text:
            continue
        assert mathjax, f"{page.relative_to(site)} has math but loads no MathJax"
        for url in mathjax:
            assert (page.parent / strip_query(url)).resolve().is_file(), (
                f"{page.relative_to(site)} loads {url}, which is not in the site"
            )


class LinkParser(HTMLParser):
    """Collect the href of every link and the id of every element of a page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        if tag == "a" and attributes.get("href"):
            self.hrefs.append(attributes["href"])


def parse_links(path: Path) -> LinkParser:
    parser = LinkParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def results_table(site: Path) -> str:
    text = (site / "book" / "intro.html").read_text(encoding="utf-8")
    match = re.search(r'<table class="results-table">.*?</table>', text, re.DOTALL)
    assert match, "the introduction has no results table"
    return match.group(0)


def test_results_table_links_reach_sections(site):
    parser = LinkParser()
    parser.feed(results_table(site))
    assert len(parser.hrefs) >= 16
    for href in parser.hrefs:
        page, anchor = href.split("#")
        target = site / "book" / page
        assert target.is_file(), f"the results table links to a missing page: {href}"
        assert anchor in parse_links(target).ids, f"{page} has no section #{anchor}"


def page_text(site: Path, chapter: str) -> str:
    text = (site / "book" / f"{chapter}.html").read_text(encoding="utf-8")
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def test_results_table_agrees_with_chapters(site):
    table = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", results_table(site)))
    copying = re.search(r"(\d+) of (\d+) heads have a positive copying score", table)
    assert copying, "no copying-head count in the results table"
    assert f"{copying[1]} of {copying[2]} heads copy" in page_text(site, "one_layer")

    previous = re.search(r"Previous-token head (L0H\d+) \(score (\d\.\d{3})\)", table)
    assert previous, "no previous-token head in the results table"
    assert f"Previous-token head: {previous[1]} (score {previous[2]})" in page_text(
        site, "two_layer")


# Pages carry their figures' data inline, so this is also a bound on what a reader downloads.
MAX_PAGE_BYTES = 10 * 2**20


def test_pages_stay_under_size_limit(site):
    for page in site_pages(site):
        size = page.stat().st_size
        assert size <= MAX_PAGE_BYTES, (
            f"{page.relative_to(site)} is {size / 2**20:.1f} MiB, over the 10 MiB limit; "
            "downsample or crop its figures"
        )
