"""Counter-based seeding: independent random streams keyed by tuples like (seed, step) or (seed, index).

torch's CPU generator keeps only 32 bits of its seed, so `seed * 2**32 + i` would collide across seeds.
Keys are mixed by numpy's SeedSequence instead; bulk noise comes from PCG64 (128-bit state).
"""

from __future__ import annotations

import numpy as np
import torch

# The named random streams: the first key of every draw, so that streams keyed by the same user seed never
# overlap. Values are part of the reproducibility contract (changing one changes every run's numbers).
STREAMS = {
    "sample_noise": 1,  # initial noise of sample i: (stream, seed, i)
    "step": 2,  # a training step's noise, times, dropout and flips: (stream, seed, global batch index)
    "epoch": 3,  # the data order of an epoch: (stream, seed, epoch)
    "reflow_noise": 4,  # `fm reflow`'s noise of pair i: (stream, seed, i); not sample i's, for the same seed
}


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator whose seed is a hash of the integer keys."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) | (int(state[1]) << 32))


def normal(shape: tuple[int, ...], *keys: int) -> torch.Tensor:
    """float32 standard normal noise determined only by the keys (same on every machine and rank)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys])))
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
