"""Headless notebook execution: the stall fix (one implementation for the library and the test
session), reproduce() on a widget notebook, and HTML reports that contain every figure."""

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest

from isvit_viz import notebook_exec as ne
from isvit_viz.reproduce import (
    PLOTLY,
    WIDGET_STATE,
    WIDGET_VIEW,
    _browser_for_kaleido,
    _plotly_png_exporter,
    plotly_html,
    render_widget,
    reproduce,
    static_copy,
    write_figures,
)

ROOT = Path(__file__).resolve().parents[1]
FAKE_PNG = base64.b64encode(b"\x89PNG not a real image").decode()


class MissedWakeupChannel:
    """A socket whose wake-up is missed: a message that arrives during a wait is only seen by the
    next call, as in jupyter/nbclient#312."""

    def __init__(self) -> None:
        self.queue: list[dict] = []
        self.timeouts: list[float | None] = []

    async def get_msg(self, timeout: float | None = None) -> dict:
        self.timeouts.append(timeout)
        if self.queue:
            return self.queue.pop(0)
        await asyncio.sleep(3600 if timeout is None else timeout)
        raise Empty


def _deliver_after(ch: MissedWakeupChannel, delay: float, get_msg, timeout: float | None) -> tuple[dict, float]:
    async def main() -> tuple[dict, float]:
        loop = asyncio.get_running_loop()
        loop.call_later(delay, ch.queue.append, {"msg": "reply"})
        t0 = time.monotonic()
        msg = await get_msg(ch, timeout=timeout)
        return msg, time.monotonic() - t0

    return asyncio.run(main())


def test_missed_wakeup_costs_one_slice_not_the_timeout():
    ch = MissedWakeupChannel()
    # unsliced, a reply delivered after 50 ms is not read within a second (it would take the full 30 s)
    with pytest.raises(asyncio.TimeoutError):
        _deliver_after(ch, 0.05, lambda c, timeout: asyncio.wait_for(MissedWakeupChannel.get_msg(c, timeout), 1.0), 30)
    ch = MissedWakeupChannel()
    msg, wall = _deliver_after(ch, 0.05, ne.sliced(MissedWakeupChannel.get_msg, slice_s=0.1), 30)
    assert msg == {"msg": "reply"} and wall < 0.5
    assert ch.timeouts[0] == 0.1 and all(t <= 0.1 for t in ch.timeouts)
    # no timeout (IOPub): waits forever, still in slices
    ch = MissedWakeupChannel()
    msg, wall = _deliver_after(ch, 0.25, ne.sliced(MissedWakeupChannel.get_msg, slice_s=0.1), None)
    assert msg == {"msg": "reply"} and 0.25 <= wall < 1.0 and len(ch.timeouts) >= 3
    assert all(t == 0.1 for t in ch.timeouts)


def test_sliced_keeps_the_overall_deadline():
    ch = MissedWakeupChannel()
    get = ne.sliced(MissedWakeupChannel.get_msg, slice_s=0.1)
    t0 = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(get(ch, timeout=0.35))
    wall = time.monotonic() - t0
    assert 0.35 <= wall < 1.0  # the deadline is kept: not cut short, not extended by more than a slice
    assert ch.timeouts[0] == 0.1 and all(t <= 0.1 for t in ch.timeouts) and len(ch.timeouts) >= 4
    assert ne.sliced(get) is get  # idempotent: never wrapped twice


def test_library_client_is_sliced_and_test_session_is_patched():
    km = ne.SlicedAsyncKernelManager(kernel_name="python3")
    kc = km.client()
    assert isinstance(kc, ne.SlicedAsyncKernelClient)
    assert kc.shell_channel_class is ne.SlicedZMQSocketChannel and kc.iopub_channel_class is ne.SlicedZMQSocketChannel
    assert ne.SlicedZMQSocketChannel.get_msg._isvit_sliced
    client = ne.notebook_client(nbformat.v4.new_notebook(), 60)
    assert client.kernel_manager_class is ne.SlicedAsyncKernelManager and client.timeout == 60
    # the root conftest.py installs the same implementation for nbmake's own NotebookClient
    assert ne.is_installed_process_wide()


def test_importing_the_library_patches_nothing_globally():
    code = (
        "import isvit_viz, isvit_viz.reproduce, isvit_viz.notebook_exec as ne; "
        "from jupyter_client.channels import AsyncZMQSocketChannel as C; "
        "assert not ne.is_installed_process_wide() and not hasattr(C.get_msg, '_isvit_sliced'); "
        "ne.install_process_wide(); ne.install_process_wide(); "
        "assert ne.is_installed_process_wide() and not hasattr(C.get_msg.__wrapped__, '_isvit_sliced'); print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _state(name: str, **kw) -> dict:
    return {
        "model_name": name,
        "model_module": "@jupyter-widgets/controls",
        "model_module_version": "2.0.0",
        "state": {"_model_name": name, **kw},
    }


def test_render_widget_from_saved_state(tmp_path):
    png = {"output_type": "display_data", "metadata": {}, "data": {"image/png": FAKE_PNG, "text/plain": "<Figure>"}}
    text = {"output_type": "stream", "name": "stdout", "text": "hello\n"}
    states = {
        "box": _state("VBoxModel", children=["IPY_MODEL_row", "IPY_MODEL_ro", "IPY_MODEL_out"]),
        "row": _state("HBoxModel", children=["IPY_MODEL_q", "IPY_MODEL_b"]),
        "q": _state("DropdownModel", description="quantizer", index=1, _options_labels=["log2", "sulq"]),
        "b": _state("IntSliderModel", description="bits", value=3),
        "ro": _state("HTMLModel", value="<code>RESULT x</code>"),
        "out": _state("OutputModel", outputs=[png, text]),
    }
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": states, "version_major": 2, "version_minor": 0}}
    view = nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "box"}, "text/plain": "VBox()"})
    fig = {"data": [{"type": "scatter", "y": [1, 2]}], "layout": {}}
    nb.cells = [nbformat.v4.new_code_cell("w", outputs=[view]), nbformat.v4.new_code_cell("f", outputs=[])]
    nb.cells[1].outputs = [nbformat.v4.new_output("display_data", data={PLOTLY: fig}) for _ in range(2)]
    st = static_copy(nb)
    assert "widgets" not in st.metadata and "widgets" in nb.metadata  # the original is left intact
    outs = st.cells[0].outputs
    assert [list(o.get("data", {})) or o["output_type"] for o in outs] == [["text/html"], ["image/png", "text/plain"], "stream"]
    head = outs[0]["data"]["text/html"]
    assert "quantizer: <b>sulq</b>" in head and "bits: <b>3</b>" in head and head.count("RESULT x") == 1
    assert outs[1]["data"]["image/png"] == FAKE_PNG and outs[2]["text"] == "hello\n"
    plotly = [o["data"]["text/html"] for o in st.cells[1].outputs]
    assert "window.define = undefined" in plotly[0] and "window.define" not in plotly[1]
    assert sum(p.count("Plotly.newPlot(") for p in plotly) == 2 and len(plotly[0]) > len(plotly[1]) + 1_000_000
    assert render_widget("missing", {})[0]["data"]["text/html"].count("no saved state") == 1
    # figure files: the widget's frame, each plotly figure as HTML (+ PNG when an exporter is given)
    folder = tmp_path / "figures"
    counts = write_figures(st, "t", folder, to_png=lambda fig: b"png of " + json.dumps(fig["data"]).encode())
    assert counts == {"png": 1, "plotly": 2, "plotly_png": 2}
    assert sorted(p.name for p in folder.iterdir()) == [
        "plotly.min.js",
        "t_01.png",
        "t_02.html",
        "t_02.png",
        "t_03.html",
        "t_03.png",
    ]
    assert base64.b64encode((folder / "t_01.png").read_bytes()).decode() == FAKE_PNG
    assert (folder / "t_02.png").read_bytes() == b'png of [{"type": "scatter", "y": [1, 2]}]'
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in (folder / "t_03.html").read_text()


def test_no_browser_means_no_plotly_png(monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chromium")  # kaleido must never download a browser
    with _plotly_png_exporter() as to_png:
        assert to_png is None


def test_plotly_html_is_offline():
    page = plotly_html({"data": [{"type": "bar", "y": [1]}], "layout": {}}, include_plotlyjs=True)
    # plotly.js itself mentions cdn.plot.ly (a geo topojson default): check that nothing is loaded from a URL
    assert "<script src=" not in page and 'src="https://cdn.plot.ly' not in page and "Plotly.newPlot(" in page
    assert "height:525px;" in page


def _count(page: str) -> dict[str, int]:
    return {
        "png": len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)),  # plotly.js holds such URLs too
        "plotly": page.count("Plotly.newPlot("),
        "plotlyjs": page.count("window._isvitDefine = window.define"),
        "result": page.count("RESULT sulq bits=3"),
    }


def _widget_notebook(folder: Path) -> None:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("FAST = None")
    p.metadata["tags"] = ["parameters"]
    nb.cells = [
        p,
        nbformat.v4.new_code_cell(
            "%matplotlib inline\nimport os\nos.environ['OMP_NUM_THREADS'] = '1'\nimport torch\nfrom isvit_viz import viz\n"
            "vals = torch.rand(5000, generator=torch.Generator().manual_seed(0)) ** 4\n"
            "viz.quantizer_explorer(vals, bits=3, eta=1e-3)"
        ),
        nbformat.v4.new_code_cell("viz.plot_transfer_curves(3, backend='plotly')"),
        nbformat.v4.new_code_cell(
            "import plotly.graph_objects as go\ngo.Figure(go.Bar(y=[3, 1, 2])).show()\nprint('FAST is', FAST)"
        ),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "w.ipynb")


@pytest.mark.notebook
def test_reproduce_widget_notebook_html_has_every_figure(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    _widget_notebook(nbdir)
    fail = nbformat.v4.new_notebook()
    fail.cells = [
        nbformat.v4.new_code_cell("print('before the error')\nimport ipywidgets as W\nW.IntSlider(7, description='kept')"),
        nbformat.v4.new_code_cell("1 / 0"),
    ]
    nbformat.write(fail, nbdir / "v_fails.ipynb")
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="notebooks failed: v_fails.ipynb"):
        reproduce(out, fast=True, notebook_dir=nbdir, timeout=600)
    results = (out / "results.md").read_text()
    # a failing notebook is reported with the kernel's error and exported with its partial outputs
    assert "## v_fails: FAILED" in results and "error: `ZeroDivisionError: division by zero`" in results
    partial = nbformat.read(out / "v_fails.ipynb", as_version=4)
    assert "kept: <b>7</b>" in (out / "v_fails.html").read_text()  # the widget state of the cells that ran is kept
    assert partial.cells[0].metadata.tags == ["injected-parameters"]  # no `parameters` cell: injected first
    assert (
        partial.cells[1].outputs[0]["text"] == "before the error\n"
        and partial.cells[2].outputs[0]["ename"] == "ZeroDivisionError"
    )
    assert "## w: ok" in results and "3 figures: 1 PNG, 2 plotly" in results and "1 widgets" in results
    executed = json.loads((out / "w.ipynb").read_text())
    assert WIDGET_STATE in executed["metadata"]["widgets"]  # the .ipynb keeps the live widget
    assert any(WIDGET_VIEW in o.get("data", {}) for c in executed["cells"] for o in c.get("outputs", []))
    page = (out / "w.html").read_text()
    # the widget's histogram frame, both plotly figures with plotly.js inlined once, the readout once
    assert _count(page) == {"png": 1, "plotly": 2, "plotlyjs": 1, "result": 1}
    assert "bits: <b>3</b>" in page and "quantizer: <b>sulq</b>" in page and "FAST is True" in page
    assert WIDGET_VIEW not in page and "unpkg.com" not in page and 'src="https://cdn.plot.ly' not in page
    figs = sorted(p.name for p in (out / "figures").iterdir())
    # plotly figures are HTML, plus a PNG where kaleido finds a local Chromium (CI installs one)
    plotly_png = ["w_02.png", "w_03.png"] if _browser_for_kaleido() else []
    assert [f for f in figs if f.startswith("w_")] == sorted(["w_01.png", "w_02.html", "w_03.html", *plotly_png])
    assert "plotly.min.js" in figs
    assert (out / "figures" / "w_01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
