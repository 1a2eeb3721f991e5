"""Counter-based seeding: independent random streams keyed by tuples like (stream, seed, step).

Every random stream fm draws from a user seed is named in STREAMS (one table, so two uses can never
share a key prefix by accident); the values are part of the reproducibility contract (changing one
changes every sample and every training run), so they never change.

Keys are mixed by numpy's SeedSequence into 64 bits. Bulk noise (`normal`) comes from PCG64 seeded by
the whole SeedSequence (128-bit state). torch's CPU generator (mt19937) keeps only the low 32 bits of a
seed (`manual_seed(s)` and `manual_seed(s & 0xFFFFFFFF)` give the same numbers), so `torch_generator`
seeds it with exactly those 32 bits of the hash: distinct keys can collide there with probability about
2**-32 per pair, which is why large per-sample noise never comes from it.

A seed a user gives (`--seed`, `train.seed`, `fm eval --classifier-seed`, the demo's) is 32-bit, in
[0, SEED_LIMIT): SeedSequence splits a larger key into 32-bit words and pads every key to four words with
zeros, so (stream, a + b * 2**32, 0) is (stream, a, b): seed 2**32's sample 0 was seed 0's sample 1, and
torch keeps a seed's low 32 bits (seed 2**32's initial weights were seed 0's). A negative seed is masked to
64 bits (-1 is 2**64 - 1). Below SEED_LIMIT every key is one word, so no two seeds share a stream.
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
    "sde_noise": 4,  # euler-sde's noise of sample i at solver step k: (stream, seed, i, k)
    "reflow_noise": 5,  # `fm reflow`'s noise of pair i: (stream, seed, i); not sample i's, for the same seed
}


SEED_LIMIT = 2**32


def seed_problem(seed: int) -> str | None:
    """Why `seed` cannot be a user's seed (None: it can): outside [0, SEED_LIMIT) it repeats another seed's numbers."""
    if 0 <= seed < SEED_LIMIT:
        return None
    return f"a seed is a whole number from 0 to {SEED_LIMIT - 1}, got {seed} (a larger or negative one repeats another seed's random numbers)"


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator whose seed is a 32-bit hash of the integer keys (all torch keeps)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1, np.uint32)
    return torch.Generator().manual_seed(int(state[0]))


def normal(shape: tuple[int, ...], *keys: int) -> torch.Tensor:
    """float32 standard normal noise determined only by the keys (same on every machine and rank)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys])))
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
