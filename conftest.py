"""Root pytest configuration: applies to ``tests/`` and to the notebooks nbmake executes.

Applies the library's fix for the nbclient stall on a missed ZMQ wake-up (jupyter/nbclient#312,
jupyter/nbconvert#2029; see ``isvit_viz/notebook_exec.py``): socket waits in slices of at most one
second, so a missed wake-up costs at most a second and the overall deadline is unchanged. nbmake
builds its own ``NotebookClient``, which cannot be given the library's sliced kernel client, so the
test session installs the same implementation process-wide. ``isvit-viz reproduce`` does not need
this: it uses ``notebook_exec.notebook_client``, which patches nothing globally.
"""

from __future__ import annotations

from isvit_viz.notebook_exec import install_process_wide

install_process_wide()
