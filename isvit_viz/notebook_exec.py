"""Headless notebook execution that does not stall on a missed ZMQ wake-up (jupyter/nbclient#312).

nbclient waits for a cell's ``execute_reply`` with one ``shell_channel.get_msg(timeout=<cell
timeout>)`` and reads IOPub with ``get_msg(timeout=None)``. The asyncio ZMQ socket's wake-up is
edge-triggered and is sometimes missed (seen on this project's widget notebooks under CPU load:
kernel and client both idle, the reply already delivered), so the message is only read when the
whole cell timeout runs out, or never on IOPub. Waiting in slices of at most ``SLICE_S`` seconds
re-checks the socket each time: a missed wake-up costs at most one slice, and the overall deadline
is unchanged.

One implementation, two ways to apply it:

- :func:`notebook_client` (used by :mod:`isvit_viz.reproduce`) builds an nbclient ``NotebookClient``
  whose kernel client uses :class:`SlicedZMQSocketChannel`; nothing global is touched, so importing
  isvit_viz never changes jupyter_client.
- :func:`install_process_wide` patches ``AsyncZMQSocketChannel.get_msg`` itself. The test session
  (root ``conftest.py``) needs this because nbmake builds its own ``NotebookClient`` that we cannot
  configure.

jupyter_client and nbclient are imported here, so import this module only to execute notebooks.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from queue import Empty
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import Type, default

SLICE_S = 1.0
"""Longest single wait on a ZMQ socket (s): the most a missed wake-up can cost."""

GetMsg = Callable[..., Awaitable[dict[str, Any]]]


def sliced(get_msg: GetMsg, slice_s: float | None = None) -> GetMsg:
    """Wrap an async ``get_msg(self, timeout=None)`` so it waits in slices of at most ``slice_s``
    seconds (default :data:`SLICE_S`, read at call time) until ``timeout`` seconds have passed
    (``None``: forever), then raises ``queue.Empty`` as the original does. Idempotent."""
    if getattr(get_msg, "_isvit_sliced", False):
        return get_msg

    @functools.wraps(get_msg)
    async def get_msg_sliced(self: Any, timeout: float | None = None) -> dict[str, Any]:
        step = SLICE_S if slice_s is None else slice_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(self, timeout=step if left is None else min(step, left))
            except Empty:
                if left is not None and left <= step:
                    raise

    get_msg_sliced._isvit_sliced = True  # type: ignore[attr-defined]
    return get_msg_sliced


class SlicedZMQSocketChannel(AsyncZMQSocketChannel):
    """``AsyncZMQSocketChannel`` whose ``get_msg`` waits in slices of at most :data:`SLICE_S`."""

    get_msg = sliced(AsyncZMQSocketChannel.get_msg)  # type: ignore[assignment]


class SlicedAsyncKernelClient(AsyncKernelClient):
    """Kernel client whose shell, IOPub, stdin and control channels are :class:`SlicedZMQSocketChannel`."""

    shell_channel_class = Type(SlicedZMQSocketChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedZMQSocketChannel)  # type: ignore[assignment]
    stdin_channel_class = Type(SlicedZMQSocketChannel)  # type: ignore[assignment]
    control_channel_class = Type(SlicedZMQSocketChannel)  # type: ignore[assignment]


class SlicedAsyncKernelManager(AsyncKernelManager):
    """Kernel manager whose ``client()`` is a :class:`SlicedAsyncKernelClient`."""

    @default("client_class")
    def _client_class_default(self) -> str:
        return f"{__name__}.SlicedAsyncKernelClient"

    @default("client_factory")
    def _client_factory_default(self) -> type:
        return SlicedAsyncKernelClient


def notebook_client(nb: Any, timeout: float | None, cwd: str | None = None, **kwargs: Any) -> Any:
    """An nbclient ``NotebookClient`` for ``nb`` with the stall fix applied to its kernel client only.

    ``timeout`` is the per-cell deadline in seconds (``None``: none); ``cwd`` the kernel's working
    folder. IOPub is given 60 s after a cell's reply (nbclient's 4 s can pass under CPU load) and a
    missing IOPub ``idle`` raises instead of silently dropping the cell's last outputs. ``kwargs``
    go to ``NotebookClient`` (they override these settings).
    """
    from nbclient import NotebookClient

    settings: dict[str, Any] = {
        "timeout": timeout,
        "kernel_name": "python3",
        "kernel_manager_class": SlicedAsyncKernelManager,
        "iopub_timeout": 60,
        "raise_on_iopub_timeout": True,
        "resources": {"metadata": {"path": cwd}} if cwd else {},
    }
    return NotebookClient(nb, **{**settings, **kwargs})


def install_process_wide() -> None:
    """Patch ``jupyter_client.channels.AsyncZMQSocketChannel.get_msg`` with :func:`sliced` for the
    whole process (idempotent). For code that builds its own ``NotebookClient`` (nbmake in the test
    session); library code uses :func:`notebook_client` instead."""
    AsyncZMQSocketChannel.get_msg = sliced(AsyncZMQSocketChannel.get_msg)  # type: ignore[method-assign]


def is_installed_process_wide() -> bool:
    """Whether :func:`install_process_wide` has patched jupyter_client in this process."""
    return bool(getattr(AsyncZMQSocketChannel.get_msg, "_isvit_sliced", False))
