"""Multi-process runs as the docs tell users to start them: the console scripts, a shipped config, ``--trainer.strategy
ddp`` (Lightning's subprocess launcher) with 2 CPU processes (gloo), the shipped callbacks (validation, the sample grid,
checkpoints; the writer and the trajectories for restoration). A hang fails the test by timeout: each run is a process
group that is killed when its time is up. SIGTERM stops every process of a run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "train" / "smoke.yaml"
DEBLUR = ROOT / "configs" / "restore" / "deblur_gaussian.yaml"
TIMEOUT = 420  # seconds; a 2-process smoke run takes about a minute on 2 busy cores
NOISE = ("💡 Tip", "LeafSpec", "GPU available", "TPU available", "sync_dist")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc: Linux")


def console_script(name: str) -> str:
    """The installed console script next to this interpreter (what a user runs)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return str(path)


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    out.pop("DIFFPIR_DEBUG", None)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return out


def run_group(cmd: list[str], cwd: Path, timeout: float = TIMEOUT, **extra: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (DDP workers included) and fail."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:3])} ... hung for {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"), "")


def photos(folder: Path, n: int = 5, size: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BILINEAR).save(folder / f"photo{i}.png")
    return folder


def scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_train_ddp_two_processes_as_documented(tmp_path):
    images = photos(tmp_path / "photos")
    cmd = [console_script("diffpir-train"), "fit", "--config", str(SMOKE), "--data.data_dir", str(images)]
    cmd += "--data.patches_per_image 4 --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp".split()
    res = run_group(cmd, tmp_path)
    assert res.returncode == 0, res.stdout[-4000:]
    # quiet console: none of Lightning's banners, tips and false sync_dist advice
    assert not [n for n in NOISE if n in res.stdout], res.stdout[-4000:]
    run = tmp_path / "runs" / "smoke"
    # validation ran (synced metrics, finite) and the sample grid of rank 0 was written after each validation
    values = scalars(run / "version_0")
    assert values["val/loss"] and all(np.isfinite(values["val/loss"]))
    assert all(10.0 < v < 60.0 for v in values["val/psnr_sigma25"])
    grids = sorted(p.name for p in (run / "version_0" / "samples").glob("*.png"))
    assert grids == ["step0000002.png", "step0000004.png"]
    grid = np.asarray(Image.open(run / "version_0" / "samples" / grids[-1]))
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3) and grid.std() > 1.0  # 4 samples of 32 px, not blank
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and "diffpir_prior" in ckpt


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


DEADLOCK = """
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback


class Deadlock(Callback):
    \"\"\"At step 2 both ranks wait in a C++ receive that no rank sends: a collective that never completes.\"\"\"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            Path(f"blocked{trainer.global_rank}").touch()
            dist.recv(torch.zeros(1), src=1 - trainer.global_rank)
"""


@pytest.mark.slow
def test_sigterm_stops_ddp_processes_blocked_in_a_collective(tmp_path):
    """SIGTERM to the launching process, as ``kill PID`` or a scheduler sends it, while both ranks are blocked inside
    a collective (where no Python signal handler can run): every process ends, with status 128 + 15."""
    images = photos(tmp_path / "photos")
    (tmp_path / "deadlock_cb.py").write_text(DEADLOCK)
    cmd = [console_script("diffpir-train"), "fit", "--config", str(SMOKE), "--data.data_dir", str(images)]
    cmd += "--data.patches_per_image 4 --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp".split()
    cmd += ["--trainer.max_steps", "100", "--trainer.callbacks+=deadlock_cb.Deadlock"]
    extra = env(DIFFPIR_STOP_GRACE="5")
    extra["PYTHONPATH"] = os.pathsep.join([str(tmp_path), extra["PYTHONPATH"]])
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        workers: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = workers or _children(proc.pid)
            if workers and (tmp_path / "blocked0").exists() and (tmp_path / "blocked1").exists():
                break
            time.sleep(0.5)
        assert proc.poll() is None and workers, "the run did not reach the deadlock: " + proc.stderr.read().decode()
        time.sleep(1.0)  # both ranks are inside dist.recv now
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_alive(p) for p in workers), "a DDP worker outlived SIGTERM"
        assert proc.returncode == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_restore_ddp_two_processes_as_documented(tmp_path, prior_file):
    images = photos(tmp_path / "photos", n=5, size=16)
    out = tmp_path / "out"
    cmd = [console_script("diffpir-restore"), "predict", "--config", str(DEBLUR)]
    cmd += ["--model.prior", str(prior_file), "--data.images", str(images), "--writer.output_dir", str(out)]
    cmd += "--model.method.steps 4 --model.lpips false --data.degradation.kernel_size 9 --data.batch_size 2".split()
    cmd += "--trajectory.first_k 5 --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu".split()
    res = run_group(cmd, tmp_path)
    assert res.returncode == 0, res.stdout[-4000:]
    assert not [n for n in NOISE if n in res.stdout], res.stdout[-4000:]
    assert "\r" not in res.stdout  # no progress-bar redraws in a log
    names = [f"photo{i}" for i in range(5)]
    assert sorted(p.stem for p in (out / "restored").glob("*.png")) == names
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == names
    assert all(np.isfinite(float(r["psnr"])) and 0 < float(r["psnr"]) < 60 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 5 and summary["failed"] == 0 and summary["settings"]["world_size"] == 2
    events = sorted(p.name.rsplit(".", 1)[-1] for p in (out / "tensorboard").glob("events.out.tfevents.*"))
    assert events == ["rank0", "rank1"]
