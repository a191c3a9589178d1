"""Execute the notebooks headless into a run folder: executed .ipynb, HTML, figure files, results.md.

The HTML report is made from a static copy of each executed notebook (:func:`static_copy`), because
nbconvert cannot show the two kinds of interactive output the notebooks use: plotly figures (only the
``application/vnd.plotly.v1+json`` mimetype, "not able to be represented") get an inline HTML
rendering with plotly.js included once per page (works offline), and ipywidgets get a static
snapshot built from the widget state nbclient saved (controls as text, HTML readouts as they are,
Output widgets with their figures and text). The executed .ipynb keeps the live outputs.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import html
import importlib.util
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .utils import atomic_write_bytes

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
FAST_CELL_TIMEOUT_S = 3600
"""Per-cell deadline in fast mode (s). Full mode has none: its cells run for hours on a CPU. A stalled
ZMQ wake-up no longer waits for this deadline (see :mod:`isvit_viz.notebook_exec`)."""

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PLOTLY = "application/vnd.plotly.v1+json"
_SNAPSHOT_NOTE = (
    '<div style="font-size:smaller;color:#777">Static snapshot of an interactive widget as the run left it; '
    "open the notebook in JupyterLab to use its controls.</div>"
)


def inject_parameters(nb, params: dict) -> None:
    """Insert a cell assigning ``params`` right after the cell tagged ``parameters`` (papermill style)."""
    import nbformat

    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), -1)
    nb.cells.insert(idx + 1, cell)


def execute_notebook(path: Path, params: dict, timeout: float | None = FAST_CELL_TIMEOUT_S, nb=None):
    """Execute the notebook at ``path`` with ``params`` injected, in its own folder, and return it.

    ``nb``: the notebook node to execute in place (default: read from ``path``); pass one to keep the
    partial outputs when a cell fails. ``timeout``: per-cell deadline in seconds (``None``: none). The
    kernel client waits on its sockets in slices of at most a second, so a missed wake-up costs at
    most a second, not the deadline.
    """
    import nbformat

    from .notebook_exec import notebook_client

    if nb is None:
        nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, params)
    client = notebook_client(nb, timeout, cwd=str(path.parent))
    try:
        client.execute()
    except Exception:
        client.set_widgets_metadata()  # nbclient saves widget state on success only; keep what ran
        raise
    return nb


def _error_line(err: BaseException) -> str:
    """One line naming the error; for a failed cell, the kernel's exception (not nbclient's preamble)."""
    ename, evalue = getattr(err, "ename", None), str(getattr(err, "evalue", "") or "")
    if ename:
        return f"{ename}: {evalue.splitlines()[0]}" if evalue else ename
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ---- static rendering of widgets and plotly figures ------------------------------------------


def widget_states(nb) -> dict[str, dict[str, Any]]:
    """``model_id -> state`` of the widgets saved in ``nb``'s metadata (empty if none were saved)."""
    saved = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return {mid: entry.get("state", {}) for mid, entry in saved.items()}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return " - ".join(_fmt(x) for x in v)
    return str(v)


def _control_html(state: dict[str, Any]) -> str | None:
    """``description: value`` of a control widget, or ``None`` for a widget that holds no value."""
    if "_options_labels" in state and "index" in state:
        idx = state["index"]
        idx = idx if isinstance(idx, (list, tuple)) else [idx]
        labels = state["_options_labels"]
        value = ", ".join(labels[i] for i in idx if i is not None and 0 <= i < len(labels))
    elif "value" in state:
        value = _fmt(state["value"])
    elif state.get("_model_name") == "ButtonModel":
        value = None
    else:
        return None
    desc = state.get("description", "")
    if value is None:
        text = f"[{html.escape(desc)}]"
    else:
        text = f"{html.escape(desc)}: <b>{html.escape(value)}</b>" if desc else f"<b>{html.escape(value)}</b>"
    return f'<span style="margin-right:1.5em">{text}</span>'


def _widget_items(model_id: str, states: dict[str, dict[str, Any]], depth: int = 0) -> list[tuple[str, Any]]:
    """Static pieces of widget ``model_id``: ``("html", fragment)`` or ``("output", nbformat output)``."""
    state = states.get(model_id)
    if state is None or depth > 50:
        return [("html", f"<div><em>[widget {html.escape(model_id)}: no saved state]</em></div>")]
    name = state.get("_model_name", "")
    if name == "OutputModel":
        return [("output", o) for o in state.get("outputs", [])]
    if name in ("HTMLModel", "HTMLMathModel"):
        return [("html", f"<div>{state.get('value', '')}</div>")]
    if name == "LabelModel":
        return [("html", f"<div>{html.escape(str(state.get('value', '')))}</div>")]
    if "children" in state:  # VBox, HBox, GridBox, Tab, Accordion, ...
        parts = [it for ref in state["children"] for it in _widget_items(ref.removeprefix("IPY_MODEL_"), states, depth + 1)]
        if name in ("HBoxModel", "GridBoxModel") and parts and all(kind == "html" for kind, _ in parts):
            return [("html", "<div>" + "".join(frag for _, frag in parts) + "</div>")]
        return parts
    control = _control_html(state)
    return [("html", control)] if control else []


def render_widget(model_id: str, states: dict[str, dict[str, Any]]) -> list[Any]:
    """Static nbformat outputs for widget ``model_id``: a note, its controls and HTML readouts as
    ``text/html``, and the outputs its Output widgets hold (figures, text) as they are."""
    import nbformat

    outs: list[Any] = []
    html_run = [_SNAPSHOT_NOTE]
    for kind, item in _widget_items(model_id, states):
        if kind == "html":
            html_run.append(item)
            continue
        if html_run:
            outs.append(nbformat.v4.new_output("display_data", data={"text/html": "".join(html_run)}))
            html_run = []
        out = nbformat.from_dict(copy.deepcopy(item))
        outs.extend(_static_outputs([out], states))  # an Output widget may itself display widgets
    if html_run:
        outs.append(nbformat.v4.new_output("display_data", data={"text/html": "".join(html_run)}))
    return outs


def _static_outputs(outputs: list[Any], states: dict[str, dict[str, Any]]) -> list[Any]:
    result = []
    for o in outputs:
        view = o.get("data", {}).get(WIDGET_VIEW)
        if view is None:
            result.append(o)
        else:
            result.extend(render_widget(view.get("model_id", ""), states))
    return result


def plotly_html(fig: dict[str, Any], include_plotlyjs: bool) -> str:
    """HTML rendering of a plotly figure dict (the ``application/vnd.plotly.v1+json`` payload).

    ``include_plotlyjs``: inline plotly.js first (once per page; no CDN, works offline). It is
    loaded with ``define`` hidden: the require.js that nbconvert's page loads when online would capture
    the UMD builds of plotly.js 2.x (plotly < 6) as an anonymous AMD module and leave ``window.Plotly``
    unset; later builds set ``window.Plotly`` themselves.
    """
    import plotly.io as pio

    # a fixed default height: a 100 % high div can collapse to nothing inside nbconvert's output area
    div = pio.to_html(
        fig, config=fig.get("config"), include_plotlyjs=False, full_html=False, validate=False, default_height="525px"
    )
    if not include_plotlyjs:
        return div
    from plotly.offline import get_plotlyjs

    loader = (
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'}; window._isvitDefine = window.define; window.define = undefined;</script>"
        f'<script charset="utf-8">{get_plotlyjs()}</script>'
        "<script>window.define = window._isvitDefine;</script>"
    )
    return loader + div


def static_copy(nb):
    """A copy of executed notebook ``nb`` that nbconvert renders completely: every widget output is
    replaced by :func:`render_widget`'s static snapshot, every plotly output gets a ``text/html``
    rendering beside its plotly mimetype (plotly.js inlined once), and the saved widget state is
    dropped (nbconvert would otherwise load the widget manager from a CDN)."""
    nb = copy.deepcopy(nb)
    states = widget_states(nb)
    nb.metadata.pop("widgets", None)
    plotlyjs_done = False
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        cell.outputs = _static_outputs(cell.outputs, states)
        for o in cell.outputs:
            data = o.get("data", {})
            if PLOTLY in data and "text/html" not in data:
                data["text/html"] = plotly_html(data[PLOTLY], include_plotlyjs=not plotlyjs_done)
                plotlyjs_done = True
    return nb


# ---- figure files ------------------------------------------------------------------------------


def _browser_for_kaleido() -> str | None:
    """A Chromium that kaleido can drive offline, or ``None`` (kaleido must never download one)."""
    if importlib.util.find_spec("kaleido") is None:
        return None
    found = os.environ.get("BROWSER_PATH") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None
    )
    return found if found and Path(found).exists() else None


@contextlib.contextmanager
def _plotly_png_exporter() -> Iterator[Any]:
    """Yields ``fig_dict -> PNG bytes`` via kaleido's sync server, or ``None`` when no browser is found
    or kaleido fails to start (then plotly figures are written as HTML only)."""
    browser = _browser_for_kaleido()
    if browser is None:
        yield None
        return
    import kaleido
    import plotly.io as pio

    try:
        kaleido.start_sync_server(silence_warnings=True)
    except Exception:  # no usable browser after all: HTML figures only
        yield None
        return
    try:
        yield lambda fig: pio.to_image(fig, format="png")
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


def write_figures(nb, stem: str, folder: Path, to_png: Any = None) -> dict[str, int]:
    """Write every figure of static notebook ``nb`` (see :func:`static_copy`) into ``folder`` as
    ``<stem>_NN.png`` (matplotlib and widget frames; plotly too when ``to_png`` is given) and
    ``<stem>_NN.html`` (plotly, with ``plotly.min.js`` written once beside them).

    Returns counts ``{"png": ..., "plotly": ..., "plotly_png": ...}``.
    """
    import plotly.io as pio

    counts = {"png": 0, "plotly": 0, "plotly_png": 0}
    n = 0
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if PLOTLY in data:
                n += 1
                counts["plotly"] += 1
                if not (folder / "plotly.min.js").exists():
                    from plotly.offline import get_plotlyjs

                    atomic_write_bytes(folder / "plotly.min.js", get_plotlyjs().encode())
                page = pio.to_html(data[PLOTLY], include_plotlyjs="directory", full_html=True, validate=False)
                atomic_write_bytes(folder / f"{stem}_{n:02d}.html", page.encode())
                if to_png is not None:
                    try:
                        atomic_write_bytes(folder / f"{stem}_{n:02d}.png", to_png(data[PLOTLY]))
                        counts["plotly_png"] += 1
                    except Exception:  # a failed static export must not lose the run; the HTML is there
                        pass
            elif "image/png" in data:
                n += 1
                counts["png"] += 1
                atomic_write_bytes(folder / f"{stem}_{n:02d}.png", base64.b64decode(data["image/png"]))
    return counts


def reproduce(
    out: str | Path,
    fast: bool = True,
    notebooks: Sequence[str] | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    timeout: float | None = None,
) -> Path:
    """Run every notebook (or those named) with ``FAST=fast`` and write the artefacts under ``out``:
    the executed ``<name>.ipynb``, a self-contained ``<name>.html`` (every figure, plotly and widget
    snapshots included; see :func:`static_copy`), ``figures/<name>_NN.png|html`` and ``results.md``.

    ``timeout``: per-cell deadline in seconds; default :data:`FAST_CELL_TIMEOUT_S` in fast mode and
    none in full mode. Returns the path of ``results.md``. A notebook that fails is recorded as failed
    (its partial output is still exported) and the error is raised after all notebooks ran.
    """
    import nbformat
    from nbconvert import HTMLExporter

    out = Path(out)
    paths = sorted(notebook_dir.glob("*.ipynb"))
    if notebooks:
        wanted = set(notebooks)
        paths = [p for p in paths if p.stem in wanted or p.name in wanted]
        missing = wanted - {p.stem for p in paths} - {p.name for p in paths}
        if missing:
            raise ValueError(
                f"unknown notebooks {sorted(missing)}; available: {[p.stem for p in sorted(notebook_dir.glob('*.ipynb'))]}"
            )
    if not paths:
        raise ValueError(f"no notebooks found in {notebook_dir}")
    if timeout is None and fast:
        timeout = FAST_CELL_TIMEOUT_S
    (out / "figures").mkdir(parents=True, exist_ok=True)
    summary = [f"# isvit_viz reproduce ({'fast' if fast else 'full'} mode)", ""]
    errors = []
    with _plotly_png_exporter() as to_png:
        for path in paths:
            t0 = time.perf_counter()
            status, err = "ok", None
            nb = nbformat.read(path, as_version=4)
            try:
                execute_notebook(path, {"FAST": fast}, timeout, nb=nb)
            except Exception as e:  # record and continue: one failing analysis must not hide the others
                status, err = "FAILED", e  # nb keeps the outputs up to the failing cell
                errors.append((path.name, e))
            wall = time.perf_counter() - t0
            atomic_write_bytes(out / path.name, nbformat.writes(nb).encode())
            static = static_copy(nb)
            html_page, _ = HTMLExporter().from_notebook_node(static)
            atomic_write_bytes(out / f"{path.stem}.html", html_page.encode())
            counts = write_figures(static, path.stem, out / "figures", to_png)
            n_widgets = sum(WIDGET_VIEW in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
            tables = [
                o["data"]["text/markdown"] for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})
            ]
            figs = f"{counts['png'] + counts['plotly']} figures: {counts['png']} PNG, {counts['plotly']} plotly"
            if counts["plotly"]:
                figs += f" ({counts['plotly_png']} also as PNG)"
            summary += [f"## {path.stem}: {status} ({wall:.0f} s, {figs}, {n_widgets} widgets)", ""]
            if err is not None:
                summary += [f"error: `{_error_line(err)}`", ""]
            for t in tables:
                summary += [t, ""]
    results = out / "results.md"
    atomic_write_bytes(results, "\n".join(summary).encode())
    if errors:
        names = ", ".join(n for n, _ in errors)
        raise RuntimeError(f"notebooks failed: {names} (see {out})")
    return results
