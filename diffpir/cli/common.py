"""What the console entry points share: a quiet console, progress bars, stopping on SIGTERM."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

# -- a quiet console -------------------------------------------------------------------------------------------------

_NOISE_PREFIXES = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:")


class _DropLightningNoise(logging.Filter):
    """Drops Lightning's advertising and device banners (the litlogger tip, "GPU/TPU available")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE_PREFIXES)


def quiet_console() -> None:
    """Keep the console to what concerns the run (set ``DIFFPIR_DEBUG=1`` to see everything).

    Silenced: Lightning's litlogger tip and its "GPU available / TPU available" lines, torch's deprecation of
    ``LeafSpec`` that Lightning's ``_pytree`` triggers on every run. (The validation metrics are logged with
    ``sync_dist=True``, so Lightning has no ``sync_dist`` advice to give under DDP.) Warnings about the user's
    settings stay."""
    if os.environ.get("DIFFPIR_DEBUG"):
        return
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningNoise) for f in logger.filters):
            logger.addFilter(_DropLightningNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # The demo and diffpir-tune build the restore CLI with args= while their own flags are in sys.argv.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # Child processes of Lightning's DDP launcher re-run the command: they inherit the filters through here.


def progress_bars_wanted() -> bool:
    """Whether to draw progress bars: only on a terminal (a log file would fill with ``\r`` redraws)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


# -- stopping on SIGTERM --------------------------------------------------------------------------------------------

STOP_GRACE_S = 60.0
"""Seconds a process may take to stop after SIGTERM / SIGINT before it is ended hard (``DIFFPIR_STOP_GRACE``)."""

_watchdog: threading.Thread | None = None
_children: Callable[[], Iterable[int]] | None = None


def set_child_processes(children: Callable[[], Iterable[int]] | None) -> None:
    """Tell the stop watchdog how to find the processes this one launched (Lightning's DDP workers)."""
    global _children
    _children = children


def _signal_children(signum: int) -> None:
    try:
        pids = list(_children()) if _children is not None else []
    except Exception:  # the launcher may be half set up: nothing to forward then
        pids = []
    for pid in pids:
        try:
            os.kill(int(pid), signum)
        except (OSError, ValueError):
            pass


def install_stop_watchdog(grace: float | None = None) -> bool:
    """Make SIGTERM (and Ctrl-C) stop this process and the DDP processes it launched, also when the main thread
    is blocked inside a collective (a Python signal handler only runs when the main thread gets back to Python).

    The C-level signal handler writes the signal number to a pipe (``signal.set_wakeup_fd``); a daemon thread reads
    it, forwards SIGTERM to the child processes, and lets Lightning stop gracefully (its handler raises at the next
    step, ``ModelCheckpoint(save_on_exception=True)`` saves). If the process is still alive ``grace`` seconds later
    (default :data:`STOP_GRACE_S`, or ``DIFFPIR_STOP_GRACE``), or at a second signal, it ends with status
    ``128 + signum`` and the children get SIGKILL. Returns False where it cannot be installed (not the main
    thread, no ``set_wakeup_fd``); idempotent. It changes the whole process's signal handling, so the console
    scripts install it only when they own the process (``main()`` called without arguments), never when a
    program or a test calls ``main([...])``."""
    global _watchdog
    if _watchdog is not None:
        return True
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "set_wakeup_fd"):
        return False
    if grace is None:
        try:
            grace = float(os.environ.get("DIFFPIR_STOP_GRACE", STOP_GRACE_S))
        except ValueError:
            grace = STOP_GRACE_S
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(r)
        os.close(w)
        return False
    # SIGTERM needs a Python-level handler for the C handler (and the pipe) to see it; Lightning installs its own
    # during fit/predict and calls this one too. Outside them, SIGTERM ends the process at once, as by default.
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _exit_on_signal)

    def watch() -> None:
        first: int | None = None
        timer: threading.Timer | None = None
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            for signum in data:
                if signum not in (signal.SIGTERM, signal.SIGINT):
                    continue
                if signum == signal.SIGTERM:
                    _signal_children(signal.SIGTERM)
                if first is None:
                    first = signum
                    timer = threading.Timer(grace, _hard_exit, args=(signum,))
                    timer.daemon = True
                    timer.start()
                else:
                    if timer is not None:
                        timer.cancel()
                    _hard_exit(signum)

    _watchdog = threading.Thread(target=watch, name="diffpir-stop-watchdog", daemon=True)
    _watchdog.start()
    return True


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def stop_gracefully_on_sigterm() -> None:
    """Drop the watchdog's exit-at-once SIGTERM handler, so that Lightning's own handler (installed when a run
    starts) only records the signal and the run stops at its next check (restoration: before the next image, nothing
    partial left). The watchdog's pipe still sees the signal: the grace-period hard stop and the forwarding to DDP
    processes stay. A no-op unless the watchdog installed that handler."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _exit_on_signal:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _hard_exit(signum: int) -> None:
    _signal_children(signal.SIGKILL)
    try:
        sys.stderr.write(f"diffpir: ended by signal {signum} before a clean stop (DIFFPIR_STOP_GRACE)\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def config_dir(kind: str = "restore") -> Path:
    """The shipped configs of ``kind`` (``restore``, ``train``): the top-level ``configs/<kind>`` folder that users
    edit when running from a checkout, else the copy inside the installed package (``diffpir.configs``, mapped from
    ``configs/`` by pyproject.toml, read through :mod:`importlib.resources`)."""
    checkout = Path(__file__).resolve().parents[2] / "configs" / kind
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("diffpir.configs") / kind))


__all__ = [
    "config_dir",
    "USER_ERRORS",
    "report_error",
    "STOP_GRACE_S",
    "install_stop_watchdog",
    "progress_bars_wanted",
    "quiet_console",
    "set_child_processes",
]


# -- one-line errors -----------------------------------------------------------------------------------------------

# What the CLIs report in one line (exit status 1) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, pickle.UnpicklingError)

_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path")


def _reason(err: BaseException) -> BaseException:
    """The error that says why: jsonargparse wraps the error of a dataclass or class it could not build (e.g.
    ``Degradation``'s "sigma_n must be a number >= 0") in "Does not validate against any of the Union subtypes";
    follow ``__cause__`` down to the first error that is not such a wrapper."""
    seen: set[int] = set()
    while str(err).lstrip().startswith(_WRAPPERS) and err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def report_error(prog: str, err: BaseException) -> None:
    """Print ``<prog>: error: <message>`` for a user-facing error and exit with status 1 (re-raise it instead
    when ``DIFFPIR_DEBUG`` is set)."""
    if os.environ.get("DIFFPIR_DEBUG"):
        raise err
    err = _reason(err)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    if lines[0].startswith("Does not validate against any of the Union subtypes"):
        # jsonargparse wraps what a class refused (e.g. Degradation's checks) in a union error: show the reason
        reasons = [ln[2:] for ln in lines if ln.startswith("- ") and not ln.startswith("- Expected a <class")]
        lines = reasons[:1] or lines
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a file: say so, and why
        why = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln][:1]
        lines = [
            "refused to load a checkpoint: it carries code or Python objects, not just tensors and plain "
            "containers, and files are never loaded in a way that could run code.",
            *why,
        ]
    print(f"{prog}: error: {' '.join(lines[:2])}", file=sys.stderr)
    print(f"{prog}: (set DIFFPIR_DEBUG=1 for the traceback)", file=sys.stderr)
    raise SystemExit(1)
