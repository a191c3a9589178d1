"""Execute the notebooks headless into a run folder: executed .ipynb, HTML, PNG figures, results.md."""

from __future__ import annotations

import base64
import copy
import time
from collections.abc import Sequence
from pathlib import Path

from .utils import atomic_write_bytes

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def inject_parameters(nb, params: dict) -> None:
    """Insert a cell assigning ``params`` right after the cell tagged ``parameters`` (papermill style)."""
    import nbformat

    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), -1)
    nb.cells.insert(idx + 1, cell)


def execute_notebook(path: Path, params: dict, timeout: int = 3600):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, params)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def reproduce(
    out: str | Path,
    fast: bool = True,
    notebooks: Sequence[str] | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    timeout: int = 3600,
) -> Path:
    """Run every notebook (or those named) with ``FAST=fast`` and write the artefacts under ``out``.

    Returns the path of ``results.md``. A notebook that fails is recorded as failed (its partial
    output is still exported) and the error is raised after all notebooks ran.
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
    (out / "figures").mkdir(parents=True, exist_ok=True)
    summary = [f"# isvit_viz reproduce ({'fast' if fast else 'full'} mode)", ""]
    errors = []
    for path in paths:
        t0 = time.perf_counter()
        status, err = "ok", None
        try:
            nb = execute_notebook(path, {"FAST": fast}, timeout)
        except Exception as e:  # record and continue: one failing analysis must not hide the others
            status, err = "FAILED", e
            nb = getattr(e, "nb", None) or nbformat.read(path, as_version=4)
            errors.append((path.name, e))
        wall = time.perf_counter() - t0
        atomic_write_bytes(out / path.name, nbformat.writes(nb).encode())
        html, _ = HTMLExporter().from_notebook_node(copy.deepcopy(nb))
        atomic_write_bytes(out / f"{path.stem}.html", html.encode())
        n_fig = 0
        tables = []
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                data = o.get("data", {})
                if "image/png" in data:
                    n_fig += 1
                    atomic_write_bytes(out / "figures" / f"{path.stem}_{n_fig:02d}.png", base64.b64decode(data["image/png"]))
                if "text/markdown" in data:
                    tables.append(data["text/markdown"])
        summary += [f"## {path.stem}: {status} ({wall:.0f} s, {n_fig} figures)", ""]
        if err is not None:
            summary += [f"error: `{str(err).splitlines()[0] if str(err) else type(err).__name__}`", ""]
        for t in tables:
            summary += [t, ""]
    results = out / "results.md"
    atomic_write_bytes(results, "\n".join(summary).encode())
    if errors:
        names = ", ".join(n for n, _ in errors)
        raise RuntimeError(f"notebooks failed: {names} (see {out})")
    return results
