"""Counter-based seeding: independent random streams keyed by tuples like (stream, seed, step).

Every random stream fm draws from a user seed is named in STREAMS (one table, so two uses can never
share a key prefix by accident); the values are part of the reproducibility contract (changing one
changes every sample and every training run), so they never change.

Keys are mixed by numpy's SeedSequence into 64 bits. Bulk noise (`normal`) comes from PCG64 seeded by
the whole SeedSequence (128-bit state). torch's CPU generator (mt19937) keeps only the low 32 bits of a
seed (`manual_seed(s)` and `manual_seed(s & 0xFFFFFFFF)` give the same numbers), so `torch_generator`
seeds it with exactly those 32 bits of the hash: distinct keys can collide there with probability about
2**-32 per pair, which is why large per-sample noise never comes from it.
"""

from __future__ import annotations

import numpy as np
import torch

# name -> the first key of the stream (the rest: seed, then a counter such as step, epoch or sample index)
STREAMS = {
    "sample_noise": 1,  # generate.py: initial noise of sample i, keyed (seed, i): same on any batch/rank split
    "train_step": 2,  # train.py: noise, times, condition dropout and flips of global batch b, keyed (seed, b)
    "epoch_order": 3,  # train.py: the data permutation of each epoch, keyed (seed, epoch)
}


def stream(name: str) -> int:
    """The key prefix of a named stream (KeyError for a name not in STREAMS)."""
    return STREAMS[name]


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator whose seed is a 32-bit hash of the integer keys (all torch keeps)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(1, np.uint32)
    return torch.Generator().manual_seed(int(state[0]))


def normal(shape: tuple[int, ...], *keys: int) -> torch.Tensor:
    """float32 standard normal noise determined only by the keys (same on every machine and rank)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys])))
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
