"""Writing restorations: PNGs per image, metrics gathered across ranks into one CSV and a JSON summary.

Layout of ``output_dir``::

    restored/<name>.png      the restored image (always)
    degraded/<name>.png      the measurement y, clipped to [0, 1] (save_degraded)
    grid/<name>.png          degraded | restored | truth side by side (save_grid; y upsampled for SR)
    kernels/<name>.npy       the estimated blur kernel (blind_diffpir: 2-D float32, sums to one), and
    kernels/<name>.png       the same for viewing (scaled to its maximum, 4x nearest-neighbour enlarged)
    metrics/rank<r>.jsonl    per-rank part files, one JSON row per image (appended, never rewritten)
    metrics.csv              merged rows, one per image, sorted by key
    summary.json             mean of each metric, counts, the run's settings
    failed.json              only when images could not be restored: [{"key", "file", "reason"}], sorted by key

    settings.json            the settings every output in the folder was made with (written before the first image)

``<name>`` is :func:`diffpir.io.safe_output_name` of the image key, so no key (``../x``, ``/abs``, odd characters)
can leave the output folder. Every file is written atomically: the bytes go to a hidden temporary file
(``.<name>.diffpir-<pid>-<random>.tmp``) beside the final one, which is then renamed into place, so a killed run never
leaves a partial PNG, CSV or JSON under a visible name; when the next run starts it removes the temporary files of
dead diffpir processes in its own folders (not recursively, never those of a live run nor anyone else's files).
Nothing is written through a symbolic link: the part files are opened with ``O_NOFOLLOW`` and a sub-folder that is a
link stops the run. Rows are appended to the part files with ``write`` calls checked for short writes (a line that a
crash still cut short is skipped when reading, and the next run starts on a fresh line). An image counts as done when
all its requested PNGs exist and its metrics row does (for the same input file); the data module leaves done images
out (told by the writer's ``setup``), so a rerun only restores what is missing (an image whose row was lost is
restored again), and restores it exactly as an uninterrupted run would (per-image generators). A metrics row is
appended before the PNGs are written.

Settings: ``settings.json`` records the module's and the data's settings (those that change the outputs; the prior
file by its SHA-256). A rerun with the same settings resumes; a rerun with other settings is refused before anything
is written (:meth:`RestorationWriter.check_settings`), naming what differs, so a folder never mixes or misreports
settings (``overwrite`` does not lift it). A folder that holds no restoration yet (its first run failed before one,
e.g. on a mistyped path) takes the new settings.

Inputs: each metrics row records the SHA-256 of the image file it was restored from; an image whose file has changed
since (another photo under the same name) is restored again. Images inside ``output_dir`` are never inputs, even when
it lies inside the image folder.

Failures: images the data module could not prepare (see :mod:`diffpir.restoration.data`) arrive in
``batch.failures``, and any prediction carrying an ``"error"`` is one too. Each is logged (file and reason) and
appended to the part file as a ``"status": "failed"`` row; the merge lists them in ``failed.json`` and the summary,
and logs ``restored N of M images; K failed: see <output_dir>/failed.json``. :attr:`RestorationWriter.failed` is
then the number of failed images (on every rank), which ``diffpir-restore`` turns into a non-zero exit status.

Merging (rank 0, in ``on_predict_end`` after a barrier): all part files are read, rows are deduplicated by key
(the most recently written wins: reruns and any repeated images), and only keys of the current data set whose
restored PNG exists are kept. So nothing is lost or duplicated, whatever the number of ranks or a distributed
sampler's padding.
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from diffpir.checkpoints import atomic_output
from diffpir.io import remove_temp_files, safe_output_name, write_png_atomic
from diffpir.restoration.data import RestorationDataModule

SUBDIRS = ("restored", "degraded", "grid", "metrics", "kernels")
"""The writer's sub-folders of ``output_dir``."""
SETTINGS_FILE = "settings.json"
UNRECORDED = {"model": ("show_steps", "tile_batch"), "data": ("batch_size", "num_workers", "limit", "images", "truth")}
"""Settings left out of ``settings.json``: those that do not change any output (batching, progress display), and the
image and truth folders (outputs are keyed by image name, so a rerun from a moved or copied folder resumes)."""

__all__ = [
    "METRIC_ORDER",
    "RestorationWriter",
    "merge_metrics",
    "output_settings",
    "read_metric_rows",
    "write_text_atomic",
]

log = logging.getLogger(__name__)

METRIC_ORDER = ("psnr", "psnr_input", "psnr_classical", "ssim", "lpips", "kernel_ncc")
"""Metric columns of ``metrics.csv``: the restoration's PSNR beside the input's and the classical baseline's (see
:meth:`~diffpir.restoration.RestorationModule.reference_metrics`), then SSIM, LPIPS and (blind deblurring with a
known kernel) the kernel's NCC."""
FAILED = "failed"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a hidden temporary file and ``os.replace``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise OSError(
            errno.ELOOP,
            f"{path} is a symbolic link: outputs are never written through links; remove it (or choose another "
            f"output folder)",
        )


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` (without newline); start on a new line if the file's last line was cut short by a crash.

    Never follows a symbolic link (the file is opened with ``O_NOFOLLOW``, its folder must not be a link), and
    checks that every byte was written (a short write is retried; a write that makes no progress raises OSError)."""
    _refuse_link(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            _refuse_link(path)
        raise
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, f"could not append a metrics row to {path} (wrote nothing)")
            view = view[n:]
    finally:
        os.close(fd)


def read_metric_rows(parts_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest row per key over all ``*.jsonl`` part files in ``parts_dir`` (truncated lines skipped).

    Rows of failed images carry ``"status": "failed"``, the ``"input"`` file and a ``"reason"``."""
    latest: dict[str, dict[str, Any]] = {}
    for part in sorted(parts_dir.glob("*.jsonl")):
        if part.is_symlink() or not part.is_file():
            log.warning("ignored %s: not a regular file", part)
            continue
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            key = row.get("key") if isinstance(row, dict) else None
            if key is None:
                continue
            if key not in latest or row.get("written", 0) >= latest[key].get("written", 0):
                latest[key] = row
    return latest


def _mean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return math.fsum(vals) / len(vals) if vals else None


def merge_metrics(
    output_dir: str | os.PathLike, keys: Sequence[str] | None = None, settings: dict | None = None
) -> dict[str, Any]:
    """Merge the part files of ``output_dir`` into ``metrics.csv``, ``failed.json`` and ``summary.json``; return
    the summary.

    An image counts as restored when its latest row is a metrics row and its restored PNG exists, as failed when its
    latest row is a failure. The summary has ``count`` (restored), ``requested`` (the keys), ``failed`` and
    ``missing`` (requested, neither restored nor failed: a run that did not finish), the metric means and the
    settings.

    Args:
        output_dir: the writer's folder.
        keys: keep only these keys (the current data set); None keeps every key with a restored PNG or a failure.
        settings: recorded in the summary (the module's and data's hyper-parameters).
    """
    out = Path(output_dir)
    latest = read_metric_rows(out / "metrics")
    wanted = set(keys) if keys is not None else None
    latest = {k: r for k, r in latest.items() if wanted is None or k in wanted}
    failed = {k: r for k, r in latest.items() if r.get("status") == FAILED}
    rows = {
        k: r for k, r in latest.items() if k not in failed and (out / "restored" / str(r.get("file", ""))).is_file()
    }
    failures = [
        {"key": k, "file": str(failed[k].get("input", "")), "reason": str(failed[k].get("reason", ""))}
        for k in sorted(failed)
    ]
    if failures:
        write_text_atomic(out / "failed.json", json.dumps(failures, indent=2, ensure_ascii=False) + "\n")
    else:  # only when something failed; a rerun that restored what had failed removes the stale list
        (out / "failed.json").unlink(missing_ok=True)
    metrics = [m for m in METRIC_ORDER if any(m in r for r in rows.values())]
    columns = ["key", "file", *metrics, "seconds", "nfe"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for k in sorted(rows):
        r = rows[k]
        w.writerow({c: _fmt(r.get(c)) for c in columns})
    write_text_atomic(out / "metrics.csv", buf.getvalue())
    summary = {
        "count": len(rows),
        "requested": len(wanted) if wanted is not None else len(rows) + len(failed),
        "failed": len(failed),
        "missing": len(wanted - rows.keys() - failed.keys()) if wanted is not None else 0,
        "count_with_truth": sum(1 for r in rows.values() if "psnr" in r),
        "mean": {m: _mean([r.get(m) for r in rows.values()]) for m in metrics},
        "seconds_per_image": _mean([r.get("seconds") for r in rows.values()]),
        "settings": settings or {},
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def write_extra_output(folder: Path, name: str, value: Tensor) -> None:
    """A method's extra per-image output (e.g. an estimated kernel ``[kh, kw]``) as ``<folder>/<name>.npy``
    (float32) and a viewable ``<folder>/<name>.png`` (scaled to its maximum; 2-D arrays enlarged 4x), both
    written atomically."""
    import numpy as np

    arr = value.detach().cpu().float()
    with atomic_output(folder / f"{name}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr.numpy())
    img = arr if arr.ndim == 3 else arr[None]
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img / img.abs().amax().clamp_min(1e-12)
        if arr.ndim == 2:
            img = F.interpolate(img[None], scale_factor=4, mode="nearest")[0]
        write_png_atomic(img.clamp(0, 1), folder / f"{name}.png")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return "" if v is None else v


def _public(hparams: Any) -> dict[str, Any]:
    """Hyper-parameters without private entries (LightningCLI's ``_instantiator``)."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prior_digest(prior: Any) -> str | None:
    """SHA-256 of the prior file a ``model.prior`` string names (None for a Prior object)."""
    if not isinstance(prior, str) or prior.startswith("<"):
        return None
    from diffpir.priorfile import _resolve

    try:
        path = _resolve(prior)
    except (OSError, ValueError):
        return None
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def output_settings(model_hparams: Any, data_hparams: Any | None) -> dict[str, Any]:
    """The settings that determine a folder's outputs: the module's and the data's hyper-parameters, less the
    :data:`UNRECORDED` ones, with the prior file's SHA-256 (JSON types)."""
    model = {k: v for k, v in _public(model_hparams).items() if k not in UNRECORDED["model"]}
    digest = _prior_digest(model.get("prior"))
    if digest is not None:
        model["prior_sha256"] = digest
    out: dict[str, Any] = {"model": model}
    if data_hparams is not None:
        out["data"] = {k: v for k, v in _public(data_hparams).items() if k not in UNRECORDED["data"]}
    return _jsonable(out)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return diffs


def _upsample_to(y: Tensor, h: int, w: int) -> Tensor:
    """``y`` ``[C, h', w']`` shown at ``h x w`` (nearest, for SR measurements)."""
    if tuple(y.shape[-2:]) == (h, w):
        return y
    return F.interpolate(y[None], size=(h, w), mode="nearest")[0]


class RestorationWriter(BasePredictionWriter):
    """Writes what :class:`~diffpir.restoration.RestorationModule` predicts, batch by batch.

    The folder's layout, resume and settings rules: the module docstring.

    Args:
        output_dir: where everything goes.
        save_degraded: also write the measurement ``y`` (clipped to [0, 1]).
        save_grid: also write a degraded | restored | truth grid (``torchvision.utils.make_grid``).
        overwrite: restore and write images even when their outputs exist (default: skip them).
    """

    def __init__(
        self,
        output_dir: str = "outputs/restore",
        save_degraded: bool = False,
        save_grid: bool = False,
        overwrite: bool = False,
    ):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"output_dir {output_dir!r} is a file, not a folder: choose a folder")
        self.save_degraded = save_degraded
        self.save_grid = save_grid
        self.overwrite = overwrite
        self.summary: dict[str, Any] | None = None
        self.failed = 0  # images that could not be restored (after on_predict_end, on every rank)
        self.missing = 0  # requested images neither restored nor failed (after on_predict_end, on every rank)
        self._rows: dict[str, str | None] | None = None  # key -> input SHA-256 of the keys with a metrics row
        self._data: RestorationDataModule | None = None  # where the input files are (set in setup)
        self._started = False  # on_predict_start ran (else teardown merges: every image was done)

    # -- paths ------------------------------------------------------------------------------------------------
    def path(self, kind: str, key: str) -> Path:
        """``<output_dir>/<kind>/<safe name>.png`` for ``kind`` in restored, degraded, grid."""
        return self.output_dir / kind / f"{safe_output_name(key)}.png"

    def _kinds(self) -> list[str]:
        return [k for k, on in (("degraded", self.save_degraded), ("grid", self.save_grid)) if on] + ["restored"]

    def is_done(self, key: str) -> bool:
        """True when every requested output of ``key`` exists, its metrics row too (and ``overwrite`` is off), and
        its input file is the one it was restored from (same SHA-256; rows written before the digest was recorded
        count as the same)."""
        if self.overwrite or not all(self.path(kind, key).is_file() for kind in self._kinds()):
            return False
        if self._rows is None:
            self._load_rows()
        if key not in self._rows:
            return False
        recorded = self._rows[key]
        now = self._input_digest(key) if recorded else None
        if now is not None and now != recorded:  # a digest implies a data module that knows the file
            log.info("%s changed since it was restored into %s: restoring it again", self._data.input_file(key),
                     self.output_dir)  # fmt: skip
            return False
        return True

    def _input_digest(self, key: str) -> str | None:
        """SHA-256 of the file image ``key`` is read from (None when unknown: no data module, or a prior file of
        the Python API)."""
        file = self._data.input_file(key) if self._data is not None else None
        if file is None:
            return None
        try:
            st = os.stat(file)
            return _sha256(str(Path(file).resolve()), st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def _load_rows(self) -> None:
        latest = read_metric_rows(self.output_dir / "metrics")
        self._rows = {k: r.get("input_sha256") for k, r in latest.items() if r.get("status") != FAILED}

    # -- settings -----------------------------------------------------------------------------------------------
    def check_settings(self, pl_module: Any, datamodule: Any | None = None, write: bool = True) -> dict[str, Any]:
        """Refuse to write into a folder whose outputs were made with other settings; record them otherwise.

        Compares :func:`output_settings` of ``pl_module`` and ``datamodule`` with ``<output_dir>/settings.json`` (or,
        for a folder written before that file existed, with the settings in its ``summary.json``) and raises a
        ValueError naming what differs. When nothing is recorded yet and ``write``, writes ``settings.json``.
        Returns the settings.
        """
        hparams = getattr(pl_module, "hparams", pl_module)
        data_hparams = getattr(datamodule, "hparams", None) if datamodule is not None else None
        settings = output_settings(hparams, data_hparams)
        path = self.output_dir / SETTINGS_FILE
        recorded, source = None, path
        if path.is_file():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ValueError(f"{path} is not valid JSON ({err}): remove it only if the folder is empty") from None
        elif (self.output_dir / "summary.json").is_file():  # written before settings.json existed
            source = self.output_dir / "summary.json"
            try:
                old = json.loads(source.read_text(encoding="utf-8")).get("settings") or {}
            except (ValueError, AttributeError):
                old = {}
            diffs = []
            for sec in ("model", "data"):
                if isinstance(old.get(sec), dict) and sec in settings:
                    then = output_settings(old[sec], None)["model"] if sec == "model" else output_settings({}, old[sec])
                    then = then if sec == "model" else then["data"]
                    common = [k for k in settings[sec] if k in then and k != "prior_sha256"]
                    now = {k: settings[sec][k] for k in common}
                    diffs += _differences({k: then[k] for k in common}, now, f"{sec}.")
            if diffs:
                self._refuse(source, diffs)
        if recorded is not None:
            diffs = _differences(recorded, settings)
            if diffs and self._holds_restorations():
                self._refuse(source, diffs)
            if diffs:  # nothing restored under the old settings (a run that failed early): they go
                log.info("%s held no restorations: its settings are replaced (%s)", self.output_dir, diffs[0])
                recorded = None
        if recorded is None and write:
            write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return settings

    def _holds_restorations(self) -> bool:
        """Whether the folder holds a restored image or a metrics row of one (failures alone do not count)."""
        restored = self.output_dir / "restored"
        if restored.is_dir() and any(p.suffix == ".png" for p in restored.iterdir()):
            return True
        rows = read_metric_rows(self.output_dir / "metrics") if (self.output_dir / "metrics").is_dir() else {}
        return any(r.get("status") != FAILED for r in rows.values())

    def _refuse(self, source: Path, diffs: list[str]) -> None:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ValueError(
            f"the output folder {self.output_dir} holds restorations made with other settings ({shown}; see "
            f"{source}): run with the same settings to resume it, or choose another --writer.output_dir "
            f"(--writer.overwrite does not lift this: a folder never mixes settings)"
        )

    # -- writing ----------------------------------------------------------------------------------------------
    def _part(self, trainer: L.Trainer) -> Path:
        return self.output_dir / "metrics" / f"rank{trainer.global_rank}.jsonl"

    def _append_row(self, trainer: L.Trainer, item: dict[str, Any]) -> None:
        row = {
            "key": item["key"],
            "file": f"{safe_output_name(item['key'])}.png",
            **item.get("metrics", {}),
            "seconds": item.get("seconds"),
            "nfe": item.get("nfe"),
            "rank": trainer.global_rank,
            "written": time.time(),
        }
        digest = self._input_digest(str(item["key"]))
        if digest is not None:
            row["input_sha256"] = digest
        _append_line(self._part(trainer), json.dumps(row))
        if self._rows is not None:
            self._rows[str(item["key"])] = digest

    def write_failure(self, trainer: L.Trainer, key: str, file: str, reason: str) -> None:
        """Record that ``key`` (input ``file``) could not be restored, and why (logged and appended as a
        ``"status": "failed"`` row). Ignored for images that are already done."""
        if self.is_done(key):
            return  # restored by an earlier run; its input going bad since changes nothing
        where = file or key
        log.warning("skipped %s", reason if where in reason else f"{where}: {reason}")
        row = {
            "key": key,
            "input": file,
            "status": FAILED,
            "reason": reason,
            "rank": trainer.global_rank,
            "written": time.time(),
        }
        _append_line(self._part(trainer), json.dumps(row, ensure_ascii=False))

    def write_item(self, trainer: L.Trainer, item: dict[str, Any]) -> None:
        """Write one image's row and PNGs (the restored PNG last: it marks the image done)."""
        from torchvision.utils import make_grid

        key, restored = item["key"], item["restored"]
        self._append_row(trainer, item)
        y = item["degraded"].clamp(0, 1)
        if self.save_degraded:
            write_png_atomic(y, self.path("degraded", key))
        for name, value in (item.get("extras") or {}).items():
            write_extra_output(self.output_dir / name, safe_output_name(key), value)
        if self.save_grid:
            h, w = restored.shape[-2:]
            panels = [_upsample_to(y, h, w), restored.clamp(0, 1)]
            if item.get("truth") is not None:
                panels.append(item["truth"].clamp(0, 1))
            grid = make_grid(torch.stack(panels), nrow=len(panels), padding=2, pad_value=1.0)
            write_png_atomic(grid[: restored.shape[0]], self.path("grid", key))
        write_png_atomic(restored, self.path("restored", key))

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        groups = batch if isinstance(batch, (list, tuple)) else [batch]
        for group in groups:
            for f in getattr(group, "failures", None) or []:
                self.write_failure(trainer, f["key"], f.get("file", ""), f.get("reason", ""))
        for item in prediction or []:
            if item.get("error") is not None:
                self.write_failure(trainer, item["key"], str(item.get("file", "")), str(item["error"]))
            else:
                self.write_item(trainer, item)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Tell the data module which images are done (:meth:`is_done`), so that it leaves them out before the
        images are split among the ranks (every rank runs this after the data module's setup, before any writes)."""
        self._started = False
        if stage != "predict":
            return
        # the folder's settings first: a run with other settings is refused even when every image looks done
        self.check_settings(pl_module, trainer.datamodule, write=trainer.is_global_zero)
        if isinstance(trainer.datamodule, RestorationDataModule):
            self._data = trainer.datamodule
            trainer.datamodule.skip_done(self.is_done, exclude=self.output_dir)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """When every image was done already, Lightning runs no prediction (nor ``on_predict_end``): merge and
        report here (rank 0; no rank wrote anything)."""
        if stage == "predict" and not self._started and trainer.is_global_zero:
            self._merge(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the folder (no linked sub-folders; its settings were checked in :meth:`setup`), then remove the
        temporary files killed runs left (rank 0, before any rank writes) and read which images have their metrics
        row."""
        self._started = True
        for sub in SUBDIRS:
            _refuse_link(self.output_dir / sub)
        if trainer.is_global_zero:
            for p in remove_temp_files(self.output_dir, SUBDIRS):
                log.info("removed %s, left by an interrupted run", p)
        trainer.strategy.barrier("restoration_writer_clean")
        self._load_rows()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Wait for every rank, then merge the part files on rank 0 and report; :attr:`failed` on every rank."""
        trainer.strategy.barrier("restoration_writer_merge")
        failed = missing = 0
        if trainer.is_global_zero:
            failed, missing = self._merge(trainer, pl_module)
        self.failed, self.missing = (int(v) for v in trainer.strategy.broadcast((failed, missing), src=0))

    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, int]:
        dm = trainer.datamodule
        keys = list(dm.keys) if isinstance(dm, RestorationDataModule) else None
        settings = {"model": _public(pl_module.hparams)}
        if dm is not None:
            settings["data"] = _public(dm.hparams)
        settings["world_size"] = trainer.world_size
        self.summary = merge_metrics(self.output_dir, keys, settings)
        self._report(self.summary)
        self.failed, self.missing = int(self.summary["failed"]), int(self.summary["missing"])
        return self.failed, self.missing

    def _report(self, summary: dict[str, Any]) -> None:
        n, m, k, missing = summary["count"], summary["requested"], summary["failed"], summary["missing"]
        line = f"restored {n} of {m} images"
        if k:
            line += f"; {k} failed: see {self.output_dir / 'failed.json'}"
        if missing:
            line += f"; {missing} missing (not restored, not failed): run the same command again"
        if k or missing:
            log.warning("%s", line)
        else:
            log.info("%s into %s", line, self.output_dir)
