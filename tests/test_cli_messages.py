"""What the console scripts say: errors that concern the whole run come once, on one line, before the prior loads,
naming the option; jsonargparse's wrappers keep the real reason; help is short and described; a new ``fit`` never
silently overwrites an earlier run's checkpoints, which follow the logger's run name."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffpir.restoration.module as restoration_module
from diffpir.cli.restore import main as restore_main
from diffpir.cli.train import main as train_main
from diffpir.models import build_unet
from diffpir.restoration import Degradation
from diffpir.training import DiffusionModule

ROOT = Path(__file__).resolve().parents[1]
DEBLUR = ROOT / "configs" / "restore" / "deblur_gaussian.yaml"
SMOKE = ROOT / "configs" / "train" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["diffpir"])  # LightningCLI warns about pytest's own arguments


@pytest.fixture
def no_prior_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the prior was loaded before the settings were checked")

    monkeypatch.setattr(restoration_module, "load_prior", refuse)


def _one_error(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.degradation.sigma_n", "-0.1"], "--data.degradation: sigma_n must be a number >= 0, got -0.1"),
        (["--data.degradation.task", "deblur", "--data.degradation.kernel", "nokernel.npy"], "'nokernel.npy' does"),
        (["--data.degradation.task", "deblur", "--data.degradation.kernel", "{tmp}/k.txt"], "unreadable type '.txt'"),
        (["--data.degradation.kernel_size", "8"], "kernel_size must be an odd number of pixels (e.g. 61), got 8"),
        (["--data.mode", "real", "--data.images", "{tmp}", "--data.degradation.task", "inpaint_box"], "mask"),
        (["--data.degradation.task", "inpaint_random", "--data.degradation.missing", "1.5"], "got 1.5"),
    ],
    ids=["negative-sigma", "missing-kernel", "txt-kernel", "even-kernel", "real-inpaint-no-mask", "missing-1.5"],
)
def test_whole_run_errors_fail_once_before_the_prior_loads(args, message, tmp_path, capsys, no_prior_loading):
    (tmp_path / "k.txt").write_text("0 1 0\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as info:
        restore_main(["predict", "--config", str(DEBLUR), "--writer.output_dir", str(tmp_path / "o"), *args])
    assert info.value.code == 1
    line = _one_error(capsys.readouterr().err, "diffpir-restore")
    assert message in line and "Union subtypes" not in line, line
    if "inpaint_box" in args:
        assert "--data.degradation.mask" in line
    assert not (tmp_path / "o").exists()


def test_a_text_file_given_as_prior_is_reported_by_its_name(tmp_path, capsys):
    fake = tmp_path / "fake.ckpt"
    fake.write_text("hello\n")
    with pytest.raises(SystemExit) as info:
        restore_main(["predict", "--config", str(DEBLUR), "--model.prior", str(fake), "--writer.output_dir", "o"])
    line = _one_error(capsys.readouterr().err, "diffpir-restore")
    assert info.value.code == 1 and "fake.ckpt" in line and "hello" not in line and "not a torch checkpoint" in line


def test_predict_help_is_short_and_described(capsys):
    with pytest.raises(SystemExit) as info:
        restore_main(["predict", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "torch.nn" not in out and "Conv2d" not in out  # --model.prior lists no network classes
    assert len(out.splitlines()) < 800  # was 1325 lines
    flat = " ".join(out.split())  # help wraps lines
    for option, words in [
        ("--model.prior PRIOR", "a prior file"),
        ("--model.method METHOD", "the restoration method"),
    ]:
        described = flat.split(f"  {option} ".strip(), 2)  # usage line, then the described entry
        assert len(described) == 3 and words in described[2][:160], option
    # the method's settings: --model.method.help <class>, described by the sampler's docstring (written once)
    with pytest.raises(SystemExit) as info:
        restore_main(["predict", "--model.method.help", "DiffPIRMethod"])
    flat = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    for option, words in [
        ("--model.method.steps STEPS", "number of sampling steps"),
        ("--model.method.lambda_ LAMBDA_", "weight of the data term"),
        ("--model.method.zeta ZETA", "share of fresh noise"),
        ("--model.method.t_start T_START", "first timestep"),
        ("--model.method.eta ETA", "DDIM stochasticity"),
        ("--model.method.guidance_scale GUIDANCE_SCALE", "x0_pred + s"),
        ("--model.method.init {auto,noise,measurement,classical,official}", "starts from pure noise"),
        ("--model.method.output {x0_pred,x0_hat,iterate}", "what the last step returns"),
        ("--model.method.batch_invariant {true,false}", "run every image on its own"),
    ]:
        described = flat.split(f"  {option} ".strip(), 2)
        assert len(described) == 3 and words in described[2][:160], option


def test_sigma_n_above_one_warns_with_the_fix():
    with pytest.warns(UserWarning, match=r"sigma_n=25 is far above 1.*25/255 = 0\.098"):
        Degradation(task="denoise", sigma_n=25)


def _photos(folder: Path, n: int = 4, size: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BILINEAR).save(folder / f"p{i}.png")
    return folder


def test_train_ckpt_path_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.ckpt").write_text("hello\n")
    args = ["fit", "--config", str(SMOKE), "--data.data_dir", str(_photos(tmp_path / "data"))]
    with pytest.raises(SystemExit) as info:
        train_main([*args, "--ckpt_path", "notes.ckpt"])
    line = _one_error(capsys.readouterr().err, "diffpir-train")
    assert info.value.code == 1 and "--ckpt_path 'notes.ckpt' is not a checkpoint" in line
    assert not (tmp_path / "runs").exists()


def test_one_run_one_folder_and_no_silent_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(SMOKE), "--data.data_dir", str(_photos(tmp_path / "data"))]
    fit += ["--data.crop_size", "16", "--trainer.max_steps", "2"]
    train_main(fit)
    last = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # the same run again, without --ckpt_path: refused, nothing overwritten
    with pytest.raises(SystemExit) as info:
        train_main(fit)
    line = _one_error(capsys.readouterr().err, "diffpir-train")
    assert info.value.code == 1 and "--ckpt_path last" in line and "--trainer.logger.init_args.name" in line
    assert last.read_bytes() == before
    # another run name: the checkpoints move with the logs
    train_main([*fit, "--trainer.logger.init_args.name", "other"])
    other = tmp_path / "runs" / "other"
    assert torch.load(other / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert list(other.glob("version_0/samples/*.png")) and last.read_bytes() == before
    # resuming the first run is what --ckpt_path last is for
    train_main([*fit[:-1], "3", "--ckpt_path", "last"])
    assert torch.load(last, weights_only=True)["global_step"] == 3


def test_init_from_of_another_architecture_names_the_option():
    module = DiffusionModule(build_unet("tiny"), init_from="natural")
    with pytest.raises(ValueError) as info:
        module.setup("fit")
    message = str(info.value)
    assert "\n" not in message and message.endswith("--model.net.init_args.preset_or_config natural")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "deblur_motion", "kernel_size": 7}, "a motion kernel must be at least 9, got 7"),
        ({"task": "deblur_gaussian", "kernel_size": 60}, "kernel_size must be an odd number of pixels"),
        ({"task": "inpaint_random", "missing": -0.5}, r"missing must be a fraction in \[0, 1\], got -0.5"),
        ({"task": "inpaint_mask", "mask": "no/such/mask.png"}, "mask 'no/such/mask.png' does not exist"),
    ],
)
def test_degradation_settings_are_checked_once_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Degradation(**kwargs)
    Degradation(task="sr_x4", kernel_size=60)  # the size of a generated kernel only matters where one is generated


def test_restore_messages_in_the_command_line_words(tmp_path, capsys, no_prior_loading):
    """Found by a review: options the run decides itself, a file as output folder, the preset hint."""
    base = ["predict", "--config", str(DEBLUR)]
    with pytest.raises(SystemExit) as info:  # the data's channels follow the prior
        restore_main([*base, "--writer.output_dir", str(tmp_path / "o"), "--data.channels", "1"])
    assert info.value.code == 1
    assert "--data.channels is not an option here" in _one_error(capsys.readouterr().err, "diffpir-restore")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        restore_main([*base, "--writer.output_dir", str(tmp_path / "afile")])
    assert "is a file, not a folder" in _one_error(capsys.readouterr().err, "diffpir-restore")
    real = ["--data.mode", "real", "--data.images", str(tmp_path), "--data.degradation.kernel_std_max", "3.0"]
    with pytest.raises(SystemExit):
        restore_main([*base, "--writer.output_dir", str(tmp_path / "o"), *real])
    assert "--data.degradation.kernel_std_max null" in _one_error(capsys.readouterr().err, "diffpir-restore")


def test_a_state_dict_of_no_preset_names_the_restore_option(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "resnet.pt")
    with pytest.raises(SystemExit):
        restore_main(["predict", "--config", str(DEBLUR), "--model.prior", str(tmp_path / "resnet.pt"),
                      "--writer.output_dir", str(tmp_path / "o")])  # fmt: skip
    line = _one_error(capsys.readouterr().err, "diffpir-restore")
    assert "pass --model.preset NAME" in line and "preset=" not in line
