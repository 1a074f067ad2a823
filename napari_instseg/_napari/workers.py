"""Background workers of the plugin's panels, whose errors the panel itself reports.

napari's ``thread_worker`` re-raises a worker's exception in the main thread unless an
``errored`` handler is given when the worker is made (a handler connected later comes too
late: superqt has connected its ``reraise`` by then). In napari that re-raise and napari's
own relay of worker errors pop a notification with the full traceback beside the panel's
status line; in a script without ``napari.run()`` the exception raised in a Qt slot aborts
the whole process. :func:`make_worker` gives every worker its ``errored`` handler up front
and leaves the message to the panel: one line that says what failed and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker

_log = logging.getLogger(__name__)


def make_worker(func: Callable[[], Any], errored: Callable[[Exception], None]) -> Any:
    """A napari worker running ``func``, not started, whose errors go to ``errored`` only.

    Parameters
    ----------
    func : callable
        The work, called without arguments in the worker thread.
    errored : callable
        Called in the main thread with the exception ``func`` raised; the panel says it in
        its status line and makes its buttons usable again. Nothing is re-raised and napari
        shows no traceback notification (the traceback goes to this module's logger: at
        debug level for an ``OSError`` or ``ValueError``, at error level for anything else,
        which may be a bug).

    Returns
    -------
    napari.qt.threading.FunctionWorker
        The worker; connect its other signals, then ``start()`` it.
    """

    def handle(err: Exception) -> None:
        # bad input or a missing file: the status line says all; anything else may be a
        # bug, whose traceback goes to the terminal for a report
        expected = isinstance(err, (OSError, ValueError))
        level = logging.DEBUG if expected else logging.ERROR
        _log.log(level, "worker %s failed", getattr(func, "__qualname__", func), exc_info=err)
        errored(err)

    worker = create_worker(func, _connect={"errored": handle}, _start_thread=False)
    relay = getattr(worker, "_relay_error", None)  # napari's traceback notification
    if relay is not None:
        try:
            worker.errored.disconnect(relay)
        except (TypeError, RuntimeError):  # not connected (another napari version)
            pass
    return worker


def failure_message(what: str, err: BaseException, todo: str) -> str:
    """One status line: what failed, why (the error), what to do.

    Parameters
    ----------
    what : str
        The action, e.g. ``"Prediction"``.
    err : BaseException
        The error the worker raised.
    todo : str
        What the user can do about it (a sentence).

    Returns
    -------
    str
        e.g. ``"Prediction failed: Model weights file not found: x. Choose ..."``.
    """
    reason = str(err).strip() or type(err).__name__
    if not isinstance(err, (OSError, ValueError)):  # unexpected: name the kind of error
        reason = f"{type(err).__name__}: {reason}"
    reason = reason.rstrip(".")
    return f"{what} failed: {reason}. {todo}".strip()
