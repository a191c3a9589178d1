"""Root pytest configuration: applies to ``tests/`` and to the notebooks nbmake executes.

Work-around for a known upstream stall when nbclient executes cells that create ipywidgets
(jupyter/nbclient#312, jupyter/nbconvert#2029): nbclient waits for the cell's ``execute_reply``
with one ``shell_channel.get_msg(timeout=<cell timeout>)``; the ZMQ socket's edge-triggered
wake-up is sometimes missed, so the reply, already delivered, is only read when the whole cell
timeout (900 s here) runs out. Seen on this project's widget notebooks under CPU load: a
notebook that runs in ~1 minute took 15. Waiting in slices of at most one second re-checks the
socket each time, so a missed wake-up costs at most a second; the overall deadline is unchanged.
Only the test session is affected; the library does not depend on jupyter_client.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

try:
    from jupyter_client.channels import AsyncZMQSocketChannel
except ImportError:  # the notebook extras are not installed: nothing to patch
    AsyncZMQSocketChannel = None

_SLICE_S = 1.0

if AsyncZMQSocketChannel is not None and not getattr(AsyncZMQSocketChannel.get_msg, "_isvit_sliced", False):
    _get_msg = AsyncZMQSocketChannel.get_msg

    async def _sliced_get_msg(self: Any, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await _get_msg(self, timeout=_SLICE_S if left is None else min(_SLICE_S, left))
            except Empty:
                if left is not None and left <= _SLICE_S:
                    raise

    _sliced_get_msg._isvit_sliced = True  # type: ignore[attr-defined]
    AsyncZMQSocketChannel.get_msg = _sliced_get_msg  # type: ignore[method-assign]
