"""Sphinx extension that renders executed chapters and serves plotly.js locally.

`make book` copies book/ to .executed/ and executes every notebook there with
nbmake, so the committed notebooks never contain outputs. While Sphinx reads a
chapter, this extension copies the outputs of its executed copy into it. It does
so only when the code cells of both notebooks are identical. Otherwise it warns
and renders the chapter without outputs, because they would belong to other code.

Figures from circuits.viz.show carry text/html and plotly's JSON mime type.
myst-nb warns on every mime type it has no renderer for, even one it would
not pick, so the extension removes the JSON before myst-nb reads the chapter.
A figure with the JSON only comes from plotly's own renderers, which the book
cannot draw, and gets a warning that names circuits.viz.show.

It also writes plotly.min.js from the installed plotly package into the site's
_static/ folder and loads it on every HTML page, where circuits.viz figures call
Plotly.newPlot.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
from plotly.offline import get_plotlyjs
from sphinx.util import logging

logger = logging.getLogger(__name__)

PLOTLY_JS = "plotly.min.js"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def merge_outputs(source, executed):
    """Copy outputs and execution counts from `executed` into a copy of `source`.

    Returns None when the code cells of the two notebooks differ in number,
    order or text. Markdown cells may differ: the result keeps those of `source`.
    """
    source_code = [cell for cell in source.cells if cell.cell_type == "code"]
    executed_code = [cell for cell in executed.cells if cell.cell_type == "code"]
    if [cell.source for cell in source_code] != [cell.source for cell in executed_code]:
        return None

    merged = copy.deepcopy(source)
    merged_code = [cell for cell in merged.cells if cell.cell_type == "code"]
    for cell, executed_cell in zip(merged_code, executed_code):
        cell.outputs = copy.deepcopy(executed_cell.outputs)
        cell.execution_count = executed_cell.execution_count
    return merged


def remove_plotly_json(notebook) -> int:
    """Remove plotly's JSON mime type from every output of `notebook`.

    Returns how many outputs carried the JSON without a text/html fallback.
    """
    figures_without_html = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME not in data:
                continue
            if "text/html" not in data:
                figures_without_html += 1
            del data[PLOTLY_MIME]
    return figures_without_html


def executed_copy_path(srcdir, notebook_dir, executed_dir, source_path):
    """Return where `make book` puts the executed copy of `source_path`.

    Returns None for a file outside `notebook_dir`, which has no executed copy.
    """
    srcdir = Path(srcdir)
    try:
        relative = Path(source_path).relative_to(srcdir / notebook_dir)
    except ValueError:
        return None
    return srcdir / executed_dir / relative


def insert_executed_outputs(app, docname, content):
    """Replace a chapter's source text with the chapter plus its executed outputs."""
    source_path = Path(app.env.doc2path(docname))
    if source_path.suffix != ".ipynb":
        return
    executed_path = executed_copy_path(
        app.srcdir,
        app.config.circuits_notebook_dir,
        app.config.circuits_executed_dir,
        source_path,
    )
    if executed_path is None:
        return

    if not executed_path.is_file():
        logger.warning(
            "no executed copy at %s, so the chapter is rendered without outputs. "
            "Run `make book` to execute the chapters.",
            executed_path,
            location=docname,
            type="circuits",
            subtype="executed",
        )
        return

    source = nbformat.reads(content[0], as_version=4)
    executed = nbformat.read(executed_path, as_version=4)
    merged = merge_outputs(source, executed)
    if merged is None:
        logger.warning(
            "the code cells of %s differ from this chapter, so the chapter is "
            "rendered without outputs. Run `make book` to execute it again.",
            executed_path,
            location=docname,
            type="circuits",
            subtype="executed",
        )
        return

    figures_without_html = remove_plotly_json(merged)
    if figures_without_html:
        logger.warning(
            "%d plotly figure(s) carry only plotly's JSON output, which the book "
            "cannot draw. Display figures with circuits.viz.show(fig).",
            figures_without_html,
            location=docname,
            type="circuits",
            subtype="plotly",
        )
    content[0] = nbformat.writes(merged)


def write_plotly_js(app):
    """Write the installed plotly.js bundle to the site's _static/ folder.

    It runs before the pages are written, so Sphinx finds the file and adds the
    same ?v= checksum to its script tag in every build.
    """
    if app.builder.format != "html":
        return
    static_dir = Path(app.outdir) / "_static"
    static_dir.mkdir(parents=True, exist_ok=True)
    (static_dir / PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")


def set_default_theme_mode(app, config) -> None:
    """Give the theme a colour mode before the reader picks one.

    Without it, pydata-sphinx-theme (0.17, under sphinx-book-theme 1.3) starts every fresh
    browser profile in mode "" and logs "Got invalid theme mode" to the console.
    """
    context = dict(config.html_context or {})
    context.setdefault("default_mode", "auto")
    config.html_context = context


def remove_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated script entries from a page.

    Jupyter Book 1 registers sphinx-thebe's inline configuration script twice, and the second
    copy fails in the browser ("Identifier 'THEBE_JS_URL' has already been declared").
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen = set()
    unique = []
    for script in scripts:
        # An inline script's filename is None in one copy and "" in the other, so compare what
        # the page would contain.
        key = (str(getattr(script, "filename", script) or ""),
               getattr(script, "attributes", {}).get("body"))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.add_config_value("circuits_notebook_dir", "book", "env")
    app.add_config_value("circuits_executed_dir", ".executed", "env")
    app.connect("source-read", insert_executed_outputs)
    app.connect("builder-inited", write_plotly_js)
    app.connect("config-inited", set_default_theme_mode)
    # Runs after the other extensions (priority 500) have added their scripts.
    app.connect("html-page-context", remove_duplicate_scripts, priority=900)
    # Non-HTML builders ignore JavaScript files.
    app.add_js_file(PLOTLY_JS)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
