"""Seeds mixed from several parts, so that each image, epoch, step and use gets its own random stream.

One function, two rules (both fixed: saved runs and restored images depend on the exact values):

- integers (the training data and module: ``(seed, epoch, index)``, ``(seed, 3, step, micro, rank)``): a
  splitmix64-style mix, so that nearby tuples give unrelated streams;
- ``text=True`` (restoration: ``(seed, image key, purpose)``): SHA-256 of the parts' string forms joined by
  ``\\x1f``, so ``0`` and ``"0"`` give the same seed and any string can be a part.

Both return a 63-bit integer for ``torch.Generator().manual_seed``, stable across runs, processes and machines
(unlike Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib

__all__ = ["mix_seed"]

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden ratio
_M64 = (1 << 64) - 1


def mix_seed(*parts: object, text: bool = False) -> int:
    """A 63-bit seed (``0 <= seed < 2**63``) mixed from ``parts``.

    :param parts: integers (or, with ``text``, anything with a string form).
    :param text: hash the string forms with SHA-256 (the restoration rule) instead of mixing integers.
    """
    if text:
        joined = "\x1f".join(str(p) for p in parts)
        return int.from_bytes(hashlib.sha256(joined.encode("utf-8", "surrogatepass")).digest()[:8], "little") >> 1
    h = 0
    for p in parts:
        h = (h ^ (int(p) & _M64)) * _MIX & _M64  # type: ignore[call-overload]
        h ^= h >> 31
        h = h * 0xBF58476D1CE4E5B9 & _M64
        h ^= h >> 29
    return h & ((1 << 63) - 1)
