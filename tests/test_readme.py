"""README's "In Python" block, run as written, and the figures the README gives for it."""

import re
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    text = README.read_text()
    section = text[text.index("## In Python") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'In Python' section has no python block"
    return match.group(1)


def test_readme_python_block_runs_and_gives_the_stated_psnr():
    namespace: dict = {}
    exec(compile(_python_block(), str(README), "exec"), namespace)  # noqa: S102 - our own README
    x, y, x_hat = namespace["x"], namespace["y"], namespace["x_hat"]
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    psnr_y = peak_signal_noise_ratio(y.clamp(0, 1), x, data_range=1.0).item()
    psnr_hat = peak_signal_noise_ratio(x_hat, x, data_range=1.0).item()

    stated = re.search(r"`y` has ([\d.]+) dB PSNR and the fast recipe gives ([\d.]+) dB", README.read_text())
    assert stated, "README no longer states the block's PSNR figures"
    stated_y, stated_hat = map(float, stated.groups())
    # The noise is drawn from a seeded generator, so y is exact; the restoration goes through the network, whose
    # float rounding differs between CPUs by far less than this.
    assert abs(psnr_y - stated_y) < 0.006, (psnr_y, stated_y)
    assert abs(psnr_hat - stated_hat) < 0.05, (psnr_hat, stated_hat)
    assert psnr_hat > psnr_y + 3.0
