"""Hostile inputs (issue 14): checkpoints that carry code reached through URLs, ``file://`` and configs; prior files
that describe huge networks or schedules, FIFOs, corrupt files; links planted in the output folder; reruns with other
settings; NaN restorations; short writes; colliding names; signals; EXIF orientation. Each case checks what the user
gets: the exit status, a one-line message, and that nothing ran, hung, leaked or was lost.

The console-script cases run ``diffpir-train`` / ``diffpir-restore`` as a user would (subprocesses with timeouts);
the rest call the same code in-process. CPU, the tiny UNet, 16-48 px images.
"""

from __future__ import annotations

import errno
import functools
import http.server
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import Malicious, quiet_trainer, tiny_unet
from PIL import Image, ImageOps
from safetensors.torch import save_file

import diffpir.restoration.writer as writer_mod
from diffpir.checkpoints import check_ckpt_args, file_kind, local_file
from diffpir.cli.restore import main as restore_main
from diffpir.cli.train import human_size
from diffpir.io import read_image, safe_output_name
from diffpir.methods import DiffPIRMethod
from diffpir.prior import Prior
from diffpir.priorfile import BUNDLED_DIR, METADATA_KEY, export_prior, load_prior, prior_payload
from diffpir.restoration import Degradation, RestorationDataModule, RestorationModule, RestorationWriter
from diffpir.sampler import DiffPIR
from diffpir.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "train" / "smoke.yaml"
DENOISE = ROOT / "configs" / "restore" / "denoise.yaml"
QUICK = "--model.method.steps 3 --model.lpips false --trainer.accelerator cpu --trainer.devices 1"
QUICK += " --trainer.enable_progress_bar false --trajectory.first_k 0"
TIMEOUT = 300  # seconds for one console-script run on a busy shared CPU; a hang fails the test, never stalls CI


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def _evil_ckpt(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint that runs ``os.makedirs(marker)`` when unpickled."""
    payload = {"state_dict": {"w": torch.zeros(2)}, "global_step": 7, "pytorch-lightning_version": "2.6.0"}
    payload["x"] = Malicious(str(marker))
    torch.save(payload, path)
    return path


def _script(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(found).exists(), f"console script {name} not installed"
    return found


def _run(args: list[str], cwd: Path, timeout: float = TIMEOUT, umask: int | None = None):
    """Run a console script as a user would, with this checkout's code first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("DIFFPIR_DEBUG", None)
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [_script(args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=pre,
    )


def _rgb(size: int = 16, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it close)."""
    low = (np.random.default_rng(seed).random((3, 3, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def _images(folder: Path, n: int, size: int = 16, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names or [f"img{i}" for i in range(n)]):
        Image.fromarray(_rgb(size, 100 + i)).save(folder / f"{name}.png")
    return folder


def _train_images(folder: Path, n: int = 6, size: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_smooth(size, size, i)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def tiny_net():
    return tiny_unet()


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffpir-restore"])


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """``diffpir-restore`` adds a stderr handler to the ``diffpir`` logger once; bind it to this test's stderr."""
    logger = logging.getLogger("diffpir")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


def _trainer(writer: RestorationWriter) -> L.Trainer:
    return quiet_trainer(callbacks=[writer])


def _predict(prior, images: Path, out: Path, spec: Degradation | None = None, mode="benchmark", **module_kw):
    kw = {"steps": 3, "lpips": False, **module_kw}
    method = DiffPIRMethod(**{k: kw.pop(k) for k in DiffPIR.PARAMS if k in kw})
    module = RestorationModule(prior, method=method, **kw)
    spec = spec or Degradation(task="denoise", sigma_n=0.1)
    data = RestorationDataModule(str(images), mode=mode, degradation=spec, batch_size=2)
    writer = RestorationWriter(str(out))
    _trainer(writer).predict(module, datamodule=data, return_predictions=False)
    return module, writer


def _restore_args(prior: Path, images: Path, out: Path, *extra: str) -> list[str]:
    args = ["predict", "--config", str(DENOISE), "--model.prior", str(prior), "--data.images", str(images)]
    return [*args, "--writer.output_dir", str(out), *QUICK.split(), *extra]


def _main(args: list[str]) -> int:
    """``diffpir-restore`` in-process; its exit status."""
    try:
        restore_main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _one_line_error(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1-2. Checkpoints through URLs, file:// and configs never run code
# ---------------------------------------------------------------------------------------------------------
class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        type(self).requests.append(self.path)


@pytest.fixture(scope="module")
def evil_site(tmp_path_factory):
    """A local HTTP server on 127.0.0.1 serving ``evil.ckpt`` (and the same file on disk for file:// URLs)."""
    root = tmp_path_factory.mktemp("site")
    marker = root / "pwned"
    _evil_ckpt(root / "evil.ckpt", marker)
    handler = functools.partial(_Recorder, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt"
    (root / "evil.yaml").write_text(f"ckpt_path: {url}\n")
    yield SimpleNamespace(
        url=url,
        cfg_url=url.replace("evil.ckpt", "evil.yaml"),
        file_url=(root / "evil.ckpt").as_uri(),
        path=root / "evil.ckpt",
        marker=marker,
    )
    server.shutdown()


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


URL_CASES = {
    # name: (console script args with {url}, {file_url}, {data}, {cfg_*}; exit status; what the message says)
    "train_fit_flag_http": (["diffpir-train", "fit", "--ckpt_path", "{url}"], 1, "is a URL"),
    "train_validate_config_http": (["diffpir-train", "validate", "--config", "{cfg_http}"], 1, "is a URL"),
    "train_validate_config_file_url_weights_only_false": (
        ["diffpir-train", "validate", "--config", "{cfg_file}"],
        1,
        "weights_only: false is refused",
    ),
    "train_validate_config_from_a_url": (["diffpir-train", "validate", "--config", "{cfg_url}"], 2, "evil.yaml"),
    "train_fit_flag_file_url": (["diffpir-train", "fit", "--ckpt_path", "{file_url}"], 1, "is a URL"),
    "train_fit_init_from_http": (["diffpir-train", "fit", "--model.init_from", "{url}"], 1, "is a URL"),
    "train_export_http": (["diffpir-train", "export", "--ckpt", "{url}", "--out", "x.safetensors"], 1, "is a URL"),
    "restore_flag_http": (["diffpir-restore", "predict", "--ckpt_path", "{url}"], 2, "ckpt_path"),
    "restore_config_file_url_weights_only_false": (
        ["diffpir-restore", "predict", "--config", "{cfg_file}"],
        2,
        "ckpt_path",
    ),
    "restore_prior_http": (["diffpir-restore", "predict", "--model.prior", "{url}"], 1, "is a URL"),
    "restore_prior_file_url": (["diffpir-restore", "predict", "--model.prior", "{file_url}"], 1, "is a URL"),
}


@pytest.mark.parametrize("case", list(URL_CASES))
def test_checkpoints_from_urls_and_configs_never_run_code(case, evil_site, tmp_path):
    args, status, says = URL_CASES[case]
    data = _train_images(tmp_path / "data")
    cfg_http = _write(tmp_path / "evil_http.yaml", f"ckpt_path: {evil_site.url}\n")
    cfg_file = _write(tmp_path / "evil_file.yaml", f"ckpt_path: {evil_site.file_url}\nweights_only: false\n")
    fill = {"url": evil_site.url, "file_url": evil_site.file_url, "cfg_http": cfg_http, "cfg_file": cfg_file}
    fill["cfg_url"] = evil_site.cfg_url
    argv = [a.format(**fill) for a in args]
    if argv[0] == "diffpir-train" and argv[1] != "export":
        argv[2:2] = ["--config", str(SMOKE), "--data.data_dir", str(data), "--data.crop_size", "16"]
    elif argv[0] == "diffpir-restore":
        argv[2:2] = ["--config", str(DENOISE), "--data.images", str(_images(tmp_path / "in", 1)), *QUICK.split()]
    _Recorder.requests.clear()
    proc = _run(argv, cwd=tmp_path)
    assert proc.returncode == status, (case, proc.stderr[-3000:])
    assert says in proc.stderr and "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
    if status == 1:
        _one_line_error(proc.stderr, argv[0])
    assert not evil_site.marker.exists(), f"{case}: the payload ran"
    assert _Recorder.requests == [], f"{case}: something was downloaded: {_Recorder.requests}"
    assert not list(tmp_path.rglob("*.ckpt")), f"{case}: training ran"


def test_restore_has_no_checkpoint_options(capsys):
    with pytest.raises(SystemExit) as info:
        restore_main(["predict", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.prior" in out and "--ckpt_path" not in out and "--weights_only" not in out


def test_local_pickle_checkpoint_is_refused_even_with_weights_only_false(evil_site, tmp_path, capsys, monkeypatch):
    """A local hostile file given to fit (flag) with ``weights_only`` asked false by a flag is refused; with the
    flag left out it is loaded by the guarded loader, which refuses the pickle (nothing runs either way)."""
    from diffpir.cli.train import main as train_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffpir-train"])
    data = _train_images(tmp_path / "data")
    base = ["fit", "--config", str(SMOKE), "--data.data_dir", str(data), "--data.crop_size", "16"]
    for extra, says in [
        (["--ckpt_path", str(evil_site.path), "--weights_only", "false"], "weights_only: false is refused"),
        (["--ckpt_path", str(evil_site.path)], "GLOBAL os.makedirs"),
        (["--ckpt_path", str(tmp_path)], "is a folder"),
        (["--ckpt_path", "registry:evil"], "model registry"),
    ]:
        with pytest.raises(SystemExit) as info:
            train_main(base + extra)
        err = capsys.readouterr().err
        assert info.value.code == 1 and says in err and "Traceback" not in err, (extra, err[-1500:])
        assert not evil_site.marker.exists()


def test_checkpoint_hyper_parameters_cannot_choose_classes(tmp_path, capsys, monkeypatch):
    """A weights-only-clean checkpoint whose ``hyper_parameters`` name a class to build (``model.net.class_path``):
    LightningCLI used to read them into the config, importing the module it names."""
    from diffpir.cli.train import main as train_main

    marker = tmp_path / "imported"
    (tmp_path / "evil_net_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).mkdir()\nimport torch\nclass Net(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffpir-train"])
    ckpt = tmp_path / "clean.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {"class_path": "evil_net_mod.Net"}}}, ckpt)
    data = _train_images(tmp_path / "data")
    args = ["validate", "--config", str(SMOKE), "--data.data_dir", str(data), "--data.crop_size", "16"]
    with pytest.raises(BaseException):  # noqa: B017 (the checkpoint does not fit: any error will do)
        train_main([*args, "--ckpt_path", str(ckpt)])
    assert not marker.exists() and "evil_net_mod" not in sys.modules


@pytest.mark.parametrize(
    "path",
    [
        "http://h/x.ckpt",
        "https://h/x.ckpt",
        "file:///etc/passwd",
        "s3://b/x.ckpt",
        "simplecache::http://h/x",
        "ftp://h",
    ],
)
def test_local_file_refuses_urls(path):
    with pytest.raises(ValueError, match="is a URL"):
        local_file(path)
    with pytest.raises(ValueError, match="is a URL"):
        check_ckpt_args(path)
    with pytest.raises(ValueError, match="is a URL"):
        load_prior(path)


def test_guarded_trainer_loads_with_weights_only_whatever_it_is_asked(evil_site):
    from diffpir.checkpoints import guard_checkpoint_loading

    trainer = guard_checkpoint_loading(L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False))
    for weights_only in (False, None, True):
        with pytest.raises(ValueError, match="refused to load"):
            trainer.strategy.load_checkpoint(str(evil_site.path), weights_only=weights_only)
    with pytest.raises(ValueError, match="is a URL"):
        trainer.strategy.load_checkpoint(evil_site.url, weights_only=False)
    assert not evil_site.marker.exists()


def test_guarded_strategy_pickles_for_ddp_spawn_and_stays_guarded(evil_site):
    """ddp_spawn pickles the trainer (its strategy included) into the processes it starts: the guard must pickle, and
    the copy each process loads with must still refuse what the original refuses."""
    import pickle

    from diffpir.checkpoints import GuardedCheckpointLoader, guard_checkpoint_loading

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="ddp_spawn", logger=False, enable_checkpointing=False)
    guard_checkpoint_loading(trainer)
    copy = pickle.loads(pickle.dumps(trainer.strategy))
    assert isinstance(copy.load_checkpoint, GuardedCheckpointLoader)
    for weights_only in (False, None):
        with pytest.raises(ValueError, match="refused to load"):
            copy.load_checkpoint(str(evil_site.path), weights_only=weights_only)
    with pytest.raises(ValueError, match="is a URL"):
        copy.load_checkpoint(evil_site.url, weights_only=False)
    assert not evil_site.marker.exists()


@pytest.mark.parametrize("option", ["export", "--model.init_from", "--ckpt_path"])
def test_torch_files_named_safetensors_are_read_by_their_contents(option, tmp_path, capsys, monkeypatch):
    """torch.load picks its safetensors reader by the name alone: a checkpoint named ``.safetensors`` loads (by its
    contents, still weights-only), and a pickle named so is refused with one line, never a SafetensorError."""
    from diffpir.cli.train import main as train_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffpir-train"])
    data = _train_images(tmp_path / "data")
    fit = ["fit", "--config", str(SMOKE), "--data.data_dir", str(data), "--data.crop_size", "16"]
    train_main([*fit, "--trainer.max_steps", "1"])
    ckpt = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    named = tmp_path / "ckpt.safetensors"
    shutil.copy(ckpt, named)
    marker = tmp_path / "ran"
    evil = _evil_ckpt(tmp_path / "evil.safetensors", marker)
    spec = torch.load(ckpt, weights_only=True)["diffpir_prior"]["state_dict"]

    def run(path: Path) -> Path:
        """``option`` given ``path``; returns the file the run writes."""
        if option == "export":
            train_main(["export", "--ckpt", str(path), "--out", str(tmp_path / "out.safetensors")])
            return tmp_path / "out.safetensors"
        if option == "--ckpt_path":  # resume the run to step 2
            train_main([*fit, "--ckpt_path", str(path), "--trainer.max_steps", "2"])
            return ckpt
        name = f"from_{path.stem}"  # a new run from the file's weights (lr 0: they stay as loaded)
        train_main([*fit, "--model.init_from", str(path), "--model.lr", "0", "--trainer.logger.init_args.name", name])
        return tmp_path / "runs" / name / "checkpoints" / "last.ckpt"

    out = run(named)
    if option == "export":
        assert torch.equal(load_prior(out).net.out[2].weight, spec["out.2.weight"])
    elif option == "--ckpt_path":
        assert torch.load(out, weights_only=True)["global_step"] == 2
    else:
        assert torch.equal(torch.load(out, weights_only=True)["state_dict"]["net.out.2.weight"], spec["out.2.weight"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(evil)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "refused to load" in err and "GLOBAL os.makedirs" in err, err[-2000:]
    assert "Traceback" not in err and "SafetensorError" not in err and "header too large" not in err, err[-2000:]
    _one_line_error(err, "diffpir-train")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# 3, 15. Hostile and broken prior files
# ---------------------------------------------------------------------------------------------------------
def _prior_with(path: Path, net, payload: object, raw: str | None = None) -> Path:
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = raw if raw is not None else json.dumps(payload)
    save_file(tensors, str(path), metadata={METADATA_KEY: meta})
    return path


def _payload(net, **changes) -> dict:
    p = prior_payload(net, NoiseSchedule.linear())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        p[section][name] = value
    return p


def _cosine_betas(T: int) -> list[float]:
    def ab(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - ab(i + 1) / ab(i), 0.999) for i in range(T)]


HOSTILE_PRIORS = {
    # name: (how to make it, what the error says)
    "schedule_T_3e9": (lambda net: _payload(net, schedule__T=3e9), r"schedule T must lie in \[2, 100000\]"),
    "schedule_T_200k": (lambda net: _payload(net, schedule__T=200_000), r"schedule T must lie in"),
    "schedule_T_nan": (lambda net: _payload(net, schedule__T=float("nan")), r"schedule T must be an integer"),
    "betas_200k": (
        lambda net: {**_payload(net), "schedule": {"kind": "betas", "betas": [0.01] * 200_001}},
        r"list of 2 to 100000",
    ),
    "beta_one": (
        lambda net: {**_payload(net), "schedule": {"kind": "betas", "betas": [0.01] * 9 + [1.0]}},
        r"betas\[9\] = 1.0",
    ),
    "beta_zero": (lambda net: {**_payload(net), "schedule": {"kind": "betas", "betas": [0.0, 0.5]}}, r"betas\[0\]"),
    "beta_end_one": (lambda net: _payload(net, schedule__beta_end=1.0), r"beta_end must lie in \(0, 1\)"),
    "num_res_blocks_1e6": (lambda net: _payload(net, unet__num_res_blocks=1_000_000), r"num_res_blocks must lie"),
    "num_res_blocks_more_than_tensors": (lambda net: _payload(net, unet__num_res_blocks=40), r"holds only"),
    "channel_mult_1e5": (lambda net: _payload(net, unet__channel_mult=[1] * 100_000), r"channel_mult must be a list"),
    "channel_mult_huge": (lambda net: _payload(net, unet__channel_mult=[1, 1e9]), r"channel_mult entries"),
    "model_channels_1e9": (lambda net: _payload(net, unet__model_channels=10**9), r"model_channels must lie"),
    "in_channels_negative": (lambda net: _payload(net, unet__in_channels=-3), r"in_channels must lie"),
    "unknown_unet_key": (lambda net: _payload(net, unet__evil=1), r"unknown UNet config entries \['evil'\]"),
    "unet_not_a_dict": (lambda net: {**_payload(net), "unet": [1, 2]}, r"UNet config must be a mapping"),
    "no_unet": (lambda net: {k: v for k, v in _payload(net).items() if k != "unet"}, r"must be a mapping"),
    "format_2": (lambda net: {**_payload(net), "format": 2}, r"unsupported diffpir prior format 2"),
    "payload_list": (lambda net: [1, 2, 3], r"not a JSON object"),
    "metadata_not_json": (None, r"not JSON"),
    "wider_than_weights": (lambda net: _payload(net, unet__model_channels=64), r"does not fit the UNet described"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PRIORS))
def test_hostile_prior_metadata_is_refused_before_anything_is_built(case, tiny_net, tmp_path):
    make, says = HOSTILE_PRIORS[case]
    path = tmp_path / f"{case}.safetensors"
    if make is None:
        _prior_with(path, tiny_net, None, raw="{not json")
    else:
        _prior_with(path, tiny_net, make(tiny_net))
    assert path.stat().st_size < 4_000_000
    start = time.process_time()
    with pytest.raises(ValueError, match=says) as info:
        load_prior(str(path))
    assert str(path) in str(info.value)
    assert time.process_time() - start < 30  # refused, not built (a generous bound: the case would take minutes)


def test_hostile_priors_in_a_memory_capped_process(tiny_net, tmp_path):
    """The huge cases again in a child process capped at 6 GB of address space with a 120 s timeout: before the
    bounds, T = 3e9 asked for 22 GiB and 1e6 res blocks built for minutes."""
    files = []
    for case in ("schedule_T_3e9", "num_res_blocks_1e6", "channel_mult_1e5"):
        files.append(str(_prior_with(tmp_path / f"{case}.safetensors", tiny_net, HOSTILE_PRIORS[case][0](tiny_net))))
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from diffpir.priorfile import load_prior
        for f in sys.argv[1:]:
            try:
                load_prior(f)
                print("LOADED", f)
            except ValueError as err:
                print("REFUSED", f)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("REFUSED") == 3, proc.stdout + proc.stderr[-2000:]


def test_fifo_device_and_folder_priors_are_refused_without_opening(tmp_path):
    fifo = tmp_path / "prior.safetensors"
    os.mkfifo(fifo)
    cases = [(fifo, "is a FIFO"), (tmp_path, "is a folder"), (Path("/dev/zero"), "not a regular file")]
    code = "from diffpir.priorfile import load_prior\nimport sys\ntry:\n    load_prior(sys.argv[1])\n"
    code += "except ValueError as e:\n    print(e)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for path, says in cases:  # in a child with a timeout: opening the FIFO would block for ever
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, env=env
        )
        assert says in proc.stdout, (path, proc.stdout, proc.stderr[-1000:])
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_fifo_image_is_refused_not_a_hang(prior_file, tmp_path):
    images = _images(tmp_path / "in", 2)
    os.mkfifo(images / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file"):
        read_image(images / "pipe.png")
    _, writer = _predict(str(prior_file), images, tmp_path / "out")  # not listed as an image: never opened
    assert writer.failed == 0 and len(list((tmp_path / "out" / "restored").glob("*.png"))) == 2


BROKEN = {
    "truncated_half": lambda b: b[: len(b) // 2],
    "truncated_header": lambda b: b[:20],
    "header_garbage": lambda b: (
        b[:8] + b"{" + b"\x00" * (int.from_bytes(b[:8], "little") - 1) + b[8 + int.from_bytes(b[:8], "little") :]
    ),
    "header_length_lies": lambda b: (len(b) * 2).to_bytes(8, "little") + b[8:],
    "zero_bytes": lambda b: b"",
    "eight_bytes": lambda b: b[:8],
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_corrupt_or_truncated_safetensors_is_a_one_line_error(case, prior_file, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BROKEN[case](prior_file.read_bytes()))
    with pytest.raises(ValueError) as info:
        load_prior(str(bad))
    assert str(bad) in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        restore_main(_restore_args(bad, _images(tmp_path / "in", 1), tmp_path / "out"))
    assert exit_info.value.code == 1
    line = _one_line_error(capsys.readouterr().err, "diffpir-restore")
    assert str(bad) in line


def test_truncated_prior_through_the_console_script(prior_file, tmp_path):
    bad = tmp_path / "download.safetensors"
    bad.write_bytes(prior_file.read_bytes()[:-100])
    proc = _run(["diffpir-restore", *_restore_args(bad, _images(tmp_path / "in", 1), tmp_path / "out")], tmp_path)
    assert proc.returncode == 1
    assert "truncated or corrupt" in _one_line_error(proc.stderr, "diffpir-restore")


# ---------------------------------------------------------------------------------------------------------
# 5. Safetensors never taken for a pickle
# ---------------------------------------------------------------------------------------------------------
def test_100_cosine_exports_load_back_their_own_schedule(tiny_net, tmp_path):
    starts_like_pickle = 0
    for T in range(100, 200):
        betas = _cosine_betas(T)
        path = export_prior(tiny_net, NoiseSchedule(np.asarray(betas)), tmp_path / f"c{T}.safetensors")
        starts_like_pickle += path.read_bytes()[:1] == b"\x80"
        assert file_kind(path) == "safetensors", T
        loaded = load_prior(str(path))
        assert loaded.schedule.T == T
        np.testing.assert_array_equal(loaded.schedule.host("betas"), np.asarray(betas))
    assert starts_like_pickle >= 1  # the case of the bug is among them (the header length's low byte is 0x80)


def test_file_kind_sniffs_every_format(tmp_path):
    for n in (0x80, 0x0280, 0x0380, 0x1080):  # header lengths starting with the pickle opcode
        p = tmp_path / f"h{n}.bin"
        p.write_bytes(n.to_bytes(8, "little") + b"{" + b" " * (n - 1))
        assert file_kind(p) == "safetensors"
    for proto in (2, 4, 5):
        p = tmp_path / f"p{proto}.pt"
        with open(p, "wb") as f:
            torch.save({"w": torch.zeros(3)}, f, _use_new_zipfile_serialization=False, pickle_protocol=proto)
        assert file_kind(p) == "pickle", proto
    torch.save({"w": torch.zeros(3)}, tmp_path / "z.pt")
    assert file_kind(tmp_path / "z.pt") == "torch_zip"
    (tmp_path / "t.txt").write_text("hello world")
    assert file_kind(tmp_path / "t.txt") == "unknown"


def test_export_of_a_cosine_prior_keeps_its_schedule(tiny_net, tmp_path, capsys):
    """``diffpir-train export`` of an export whose header starts with 0x80 writes the same schedule again."""
    from diffpir.cli.train import export_main

    for T in range(100, 200):
        src = export_prior(tiny_net, NoiseSchedule(np.asarray(_cosine_betas(T))), tmp_path / "src.safetensors")
        if src.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no export starting with 0x80 among T = 100..199")
    out = export_main(["--ckpt", str(src), "--out", str(tmp_path / "again.safetensors")])
    np.testing.assert_array_equal(load_prior(str(out)).schedule.host("betas"), np.asarray(_cosine_betas(T)))


# ---------------------------------------------------------------------------------------------------------
# 4. Links and other runs' files in the output folder
# ---------------------------------------------------------------------------------------------------------
def test_planted_symlink_part_file_is_never_written_through(prior_file, tmp_path, capsys):
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    outside = tmp_path / "outside.jsonl"
    outside.write_text("precious\n")
    (out / "metrics").mkdir(parents=True)
    (out / "metrics" / "rank0.jsonl").symlink_to(outside)
    with pytest.raises(SystemExit) as info:
        restore_main(_restore_args(prior_file, images, out))
    assert info.value.code == 1
    assert "symbolic link" in _one_line_error(capsys.readouterr().err, "diffpir-restore")
    assert outside.read_text() == "precious\n"


@pytest.mark.parametrize("sub", ["metrics", "restored"])
def test_linked_output_subfolder_is_refused(prior_file, tmp_path, sub, capsys):
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / sub).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SystemExit) as info:
        restore_main(_restore_args(prior_file, images, out))
    assert info.value.code == 1
    assert "symbolic link" in _one_line_error(capsys.readouterr().err, "diffpir-restore")
    assert list(elsewhere.iterdir()) == []


def test_append_line_refuses_a_link_directly(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    link = tmp_path / "rank0.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        writer_mod._append_line(link, '{"key": "evil"}')
    assert target.read_text() == ""


def test_output_dir_dot_leaves_other_files_alone(prior_file, tmp_path, monkeypatch):
    images = _images(tmp_path / "in", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    live = os.getppid()
    keep = [
        work / ".a.b.tmp",
        work / ".notes.txt.tmp",
        work / "project" / ".draft.png.x1y2.tmp",
        work / f".other.png.diffpir-{live}-abcd.tmp",  # another live run's write in progress
        work / "restored" / f".img9.png.diffpir-{live}-abcd.tmp",
    ]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("keep me")
    assert _main(_restore_args(prior_file, images, Path("."))) == 0
    assert all(p.read_text() == "keep me" for p in keep)
    assert sorted(p.name for p in (work / "restored").glob("*.png")) == ["img0.png", "img1.png"]


# ---------------------------------------------------------------------------------------------------------
# 6. Reruns with other settings
# ---------------------------------------------------------------------------------------------------------
def test_rerun_with_other_settings_is_refused_and_records_stay_true(prior_file, tmp_path, capsys):
    images = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    args = _restore_args(prior_file, images, out)
    assert _main(args) == 0
    before = {n: (out / n).read_bytes() for n in ("config.yaml", "summary.json", "settings.json", "metrics.csv")}
    pngs = {p.name: p.read_bytes() for p in (out / "restored").iterdir()}
    capsys.readouterr()
    for extra, named in [
        (["--model.method.lambda_", "3.0"], "model.method.init_args.lambda_: 7.0 there, 3.0 now"),
        (["--data.degradation.sigma_n", "0.2"], "data.degradation.sigma_n"),
        (["--model.method.steps", "4"], "model.method.init_args.steps: 3 there, 4 now"),
        (["--data.seed", "5"], "data.seed"),
        (["--writer.overwrite", "true", "--model.method.zeta", "0.5"], "model.method.init_args.zeta"),
    ]:
        with pytest.raises(SystemExit) as info:
            restore_main(args + extra)
        assert info.value.code == 1
        line = _one_line_error(capsys.readouterr().err, "diffpir-restore")
        assert "other settings" in line and named in line and "another --writer.output_dir" in line, line
        assert {n: (out / n).read_bytes() for n in before} == before
        assert {p.name: p.read_bytes() for p in (out / "restored").iterdir()} == pngs
    # The same settings resume (batching is not a setting of the outputs).
    (out / "restored" / "img1.png").unlink()
    assert _main(args + ["--data.batch_size", "3"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "restored").iterdir()} == pngs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 3 and summary["settings"]["model"]["method"]["init_args"]["lambda_"] == 7.0


def test_a_changed_prior_file_is_other_settings(tiny_net, tmp_path):
    images = _images(tmp_path / "in", 1)
    prior = tmp_path / "p.safetensors"
    export_prior(tiny_net, None, prior)
    _predict(str(prior), images, tmp_path / "out")
    export_prior(tiny_net, NoiseSchedule.linear(500), prior)  # same name, other weights' file
    with pytest.raises(ValueError, match="prior_sha256"):
        _predict(str(prior), images, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# 7. Non-finite restorations are failures
# ---------------------------------------------------------------------------------------------------------
class NaNNet(torch.nn.Module):
    in_channels, out_channels, size_multiple, has_attention, image_size = 3, 3, 1, False, 16

    def forward(self, x, t):
        return torch.full_like(x, float("nan"))


def test_nan_restorations_fail_and_are_retried(prior_file, tmp_path):
    images = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    module, writer = _predict(Prior(NaNNet()), images, out, tile_size=None)
    assert writer.failed == 3 and module.images_sampled == 3
    assert not (out / "restored").exists() or not list((out / "restored").iterdir())
    failed = json.loads((out / "failed.json").read_text())
    assert [f["key"] for f in failed] == ["img0", "img1", "img2"]
    assert all("NaN or infinite" in f["reason"] for f in failed)
    module, writer = _predict(Prior(NaNNet()), images, out, tile_size=None)
    assert module.images_sampled == 3  # retried, not skipped as done


def test_huge_lambda_through_the_cli_exits_nonzero(prior_file, tmp_path, capsys):
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        restore_main(_restore_args(prior_file, images, out, "--model.method.lambda_", "1e300"))
    assert info.value.code == 1
    failed = json.loads((out / "failed.json").read_text())
    assert len(failed) == 2 and all("NaN or infinite" in f["reason"] for f in failed)
    assert json.loads((out / "summary.json").read_text())["count"] == 0


# ---------------------------------------------------------------------------------------------------------
# 8. Short writes, lost rows, missing images
# ---------------------------------------------------------------------------------------------------------
def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(writer_mod.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    part = tmp_path / "rank0.jsonl"
    rows = [json.dumps({"key": f"k{i}", "psnr": 20.0 + i, "pad": "x" * 50}) for i in range(5)]
    for r in rows:
        writer_mod._append_line(part, r)
    assert part.read_text().splitlines() == rows


def test_a_write_that_makes_no_progress_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="wrote nothing"):
        writer_mod._append_line(tmp_path / "rank0.jsonl", '{"key": "a"}')


def test_lost_row_is_restored_again_and_a_full_disk_is_an_error(prior_file, tmp_path, monkeypatch):
    images = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    _predict(str(prior_file), images, out)
    ref = (out / "restored" / "img1.png").read_bytes()
    # The row of img1 is lost (a full disk), its PNG is there: a rerun restores it again and adds the row.
    part = out / "metrics" / "rank0.jsonl"
    part.write_text("".join(ln + "\n" for ln in part.read_text().splitlines() if '"img1"' not in ln))
    module, writer = _predict(str(prior_file), images, out)
    assert module.images_sampled == 1 and writer.missing == 0
    assert (out / "restored" / "img1.png").read_bytes() == ref
    assert json.loads((out / "summary.json").read_text())["count"] == 3
    # ENOSPC while appending a row stops the run with an error (not a silent loss).
    (out / "restored" / "img2.png").unlink()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod.os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        _predict(str(prior_file), images, out)


def test_exit_status_is_nonzero_when_images_are_missing(prior_file, tmp_path, monkeypatch, capsys, caplog):
    images = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    real = RestorationWriter.write_item

    def lossy(self, trainer, item):  # the images of img1 vanish (a lost write the writer cannot see)
        if item["key"] != "img1":
            real(self, trainer, item)

    monkeypatch.setattr(RestorationWriter, "write_item", lossy)
    caplog.set_level(logging.WARNING, logger="diffpir")
    with pytest.raises(SystemExit) as info:
        restore_main(_restore_args(prior_file, images, out))
    assert info.value.code == 1
    assert json.loads((out / "summary.json").read_text())["missing"] == 1
    assert any("1 missing" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------
# 9-11. Names, limits, output sizes
# ---------------------------------------------------------------------------------------------------------
def test_output_names_are_injective(prior_file, tmp_path):
    hashed = safe_output_name("my photo")
    names = ["my photo", hashed, f"{hashed}-{hashed[-8:]}", "deadbeef", "a-0123abcd", "plain"]
    assert len({safe_output_name(n) for n in names}) == len(names)
    images = _images(tmp_path / "in", len(names), names=names)
    _, writer = _predict(str(prior_file), images, tmp_path / "out")
    assert len(list((tmp_path / "out" / "restored").glob("*.png"))) == len(names) and writer.missing == 0
    assert safe_output_name("plain") == "plain" and safe_output_name("img_01.v2-x") == "img_01.v2-x"
    rng = np.random.default_rng(0)
    keys = {"".join(rng.choice(list("ab-_. /0123456789abcdef"), size=int(rng.integers(1, 14)))) for _ in range(4000)}
    keys = {k for k in keys if k.strip()}
    assert len({safe_output_name(k) for k in keys}) == len(keys)


def test_colliding_output_names_are_refused(prior_file, tmp_path, monkeypatch):
    images = _images(tmp_path / "in", 2, names=["a", "b"])
    monkeypatch.setattr("diffpir.restoration.data.safe_output_name", lambda key: "same")
    with pytest.raises(ValueError, match=r"would both be written as same\.png"):
        RestorationDataModule(str(images)).setup("predict")


@pytest.mark.parametrize("option, value, says", [
    ("--data.limit", "-1", "limit must be at least 1"),
    ("--data.limit", "0", "limit must be at least 1"),
    ("--data.crop", "0", "crop must be a positive size"),
    ("--data.degradation.scale", "0", "scale must be an integer >= 1"),
    ("--data.degradation.sigma_n", "1e300", "sigma_n must lie in [0, 1]"),
])  # fmt: skip
def test_bad_numbers_are_one_line_errors(prior_file, tmp_path, capsys, option, value, says):
    args = _restore_args(prior_file, _images(tmp_path / "in", 2), tmp_path / "out", option, value)
    if "scale" in option or "sigma_n" in option:
        args += ["--data.degradation.task", "sr", "--data.mode", "real"]
    with pytest.raises(SystemExit) as info:
        restore_main(args)
    assert info.value.code == 1
    assert says in _one_line_error(capsys.readouterr().err, "diffpir-restore")
    assert not (tmp_path / "out" / "restored").exists()


@pytest.mark.parametrize("kw", [{"sigma_n": float("nan")}, {"sigma_n": -0.1}, {"scale": 0}, {"scale": 2.5}])
def test_bad_degradation_numbers_in_the_api(kw):
    with pytest.raises(ValueError, match="sigma_n must (lie|be a number)|scale must be an integer"):
        Degradation(task="sr", **kw)


def test_real_mode_sr_checks_the_output_size(prior_file, tmp_path):
    images = _images(tmp_path / "in", 1, size=32)
    spec = Degradation(task="sr", scale=200, sigma_n=0.05)
    start = time.process_time()
    _, writer = _predict(str(prior_file), images, tmp_path / "out", spec, mode="real")
    assert time.process_time() - start < 60
    reason = json.loads((tmp_path / "out" / "failed.json").read_text())[0]["reason"]
    assert "6400x6400 = 40960000 pixels, above the limit of 33554432" in reason and writer.failed == 1


# ---------------------------------------------------------------------------------------------------------
# 13. SIGTERM
# ---------------------------------------------------------------------------------------------------------
def test_sigterm_stops_at_the_next_image_and_the_rerun_finishes(prior_file, tmp_path):
    images = _images(tmp_path / "in", 8, size=48)
    out = tmp_path / "out"
    argv = ["diffpir-restore", *_restore_args(prior_file, images, out, "--model.method.steps", "50")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([_script(argv[0]), *argv[1:]], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "restored").glob("*.png")) if (out / "restored").is_dir() else []:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the signal: make the run longer"
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM was ignored: the run went on")
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    done = sorted(p.name for p in (out / "restored").glob("*.png"))
    assert 1 <= len(done) < 8
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for p in done:
        assert read_image(out / "restored" / p).shape == (3, 48, 48)
    rerun = _run(argv, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list((out / "restored").glob("*.png"))) == 8


# ---------------------------------------------------------------------------------------------------------
# 14. EXIF orientation
# ---------------------------------------------------------------------------------------------------------
def _with_orientation(path: Path, arr: np.ndarray, orientation: int, fmt: str) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(path, format=fmt, exif=exif, **extra)
    return path


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "JPEG"])
def test_exif_orientation_is_applied_when_reading(tmp_path, fmt):
    arr = _smooth(12, 20, 3)
    for orientation in range(1, 9):
        path = _with_orientation(tmp_path / f"o{orientation}.{fmt.lower()}", arr, orientation, fmt)
        with Image.open(_with_orientation(tmp_path / "ref.png", arr, orientation, "PNG")) as ref:
            upright = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
        expect = torch.from_numpy(upright.copy()).permute(2, 0, 1).float() / 255
        got = read_image(path)
        assert got.shape == expect.shape, (fmt, orientation)
        if fmt == "JPEG":
            assert (got - expect).abs().mean() < 0.02, (fmt, orientation)
        else:
            assert torch.equal(got, expect), (fmt, orientation)
        if fmt == "PNG":
            assert torch.equal(read_image(path, 3, dtype=torch.uint8), (expect * 255).round().byte()), orientation


def test_sideways_phone_photo_is_restored_upright(prior_file, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    arr = _smooth(16, 24, 1)  # stored landscape, tagged "rotate 90": a portrait 24x16 photo
    _with_orientation(images / "phone.png", arr, 6, "PNG")
    _predict(str(prior_file), images, tmp_path / "out")
    assert read_image(tmp_path / "out" / "restored" / "phone.png").shape == (3, 24, 16)


# ---------------------------------------------------------------------------------------------------------
# 15. Animated images, bundled names
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["gif", "webp", "png"])
def test_animated_images_fail_with_a_clear_reason(prior_file, tmp_path, suffix):
    images = _images(tmp_path / "in", 1)
    frames = [Image.fromarray(_rgb(16, s)) for s in (1, 2, 3)]
    frames[0].save(images / f"anim.{suffix}", save_all=True, append_images=frames[1:])
    _, writer = _predict(str(prior_file), images, tmp_path / "out")
    failed = json.loads((tmp_path / "out" / "failed.json").read_text())
    assert [f["key"] for f in failed] == ["anim"] and "is animated (3 frames)" in failed[0]["reason"]


def test_bundled_prior_names_are_not_shadowed_by_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "natural").mkdir()  # a folder named like the default prior
    (tmp_path / "digits").write_bytes(b"not a prior")  # a file named like a bundled prior
    for name in ("natural", "digits"):
        prior = load_prior(name)
        ref = load_prior(str(BUNDLED_DIR / f"{name}.safetensors"))
        assert all(torch.equal(a, b) for a, b in zip(prior.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_prior("./digits")  # the local file stays reachable as a path


# ---------------------------------------------------------------------------------------------------------
# 16. Export file mode and size
# ---------------------------------------------------------------------------------------------------------
def test_export_follows_the_umask_and_prints_a_sensible_size(prior_file, tmp_path):
    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        out = tmp_path / f"u{umask:o}.safetensors"
        proc = _run(["diffpir-train", "export", "--ckpt", str(prior_file), "--out", str(out)], tmp_path, umask=umask)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert stat.S_IMODE(out.stat().st_mode) == mode, (oct(umask), oct(out.stat().st_mode))
        assert f"({human_size(out.stat().st_size)})" in proc.stdout and " kB)" in proc.stdout, proc.stdout
    assert [human_size(n) for n in (0, 999, 33_000, 1_234_567, 3 * 10**9)] == [
        "0 B",
        "999 B",
        "33.0 kB",
        "1.2 MB",
        "3.0 GB",
    ]
