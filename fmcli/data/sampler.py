"""Which dataset rows each rank reads at each step: epoch permutations and the rank batch sampler."""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..seeding import STREAMS, torch_generator


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch_generator(STREAMS["epoch"], seed, epoch))


class RankBatchSampler:
    """Yields this rank's micro-batches of dataset indices, forever, from an (epoch, index) position.

    Each optimizer step takes the next `global_batch` indices of the epoch's seeded permutation (an epoch
    that cannot fill a whole global batch ends early); micro-batch a of rank r is rows
    [(a*W + r)*micro, (a*W + r + 1)*micro) of that global batch.
    """

    def __init__(self, n, global_batch, micro, accum, ctx, seed, epoch, index):
        self.n, self.global_batch, self.micro, self.accum = n, global_batch, micro, accum
        self.world, self.rank, self.seed = ctx.world_size, ctx.rank, seed
        self.epoch, self.index = epoch, index

    def __iter__(self):
        epoch, index = self.epoch, self.index
        perm = epoch_permutation(self.n, self.seed, epoch)
        while True:
            if index + self.global_batch > self.n:
                epoch, index = epoch + 1, 0
                perm = epoch_permutation(self.n, self.seed, epoch)
            batch = perm[index : index + self.global_batch]
            for a in range(self.accum):
                start = (a * self.world + self.rank) * self.micro
                yield batch[start : start + self.micro].tolist()
            index += self.global_batch


def data_position(batches: int, dataset_size: int, global_batch: int) -> tuple[int, int]:
    """(epoch, index into the epoch's permutation) after `batches` global batches (drop-last epochs)."""
    epoch, k = divmod(batches, dataset_size // global_batch)
    return epoch, k * global_batch


def batch_geometry(global_batch: int, micro_batch, world: int, resumed: bool = False) -> tuple[int, int]:
    """(micro batch, accumulation steps); global = micro x accumulation x world size, exactly. A `resumed` run
    keeps its batch sizes (neither may be --set on resume), so only its process count can make them fit."""
    if micro_batch == "auto":
        raise UsageError("train.micro_batch_size='auto' must be resolved by the autotuner first")
    micro = micro_batch or global_batch // world
    if micro <= 0 or global_batch % (micro * world):
        fits = global_batch // micro_batch if micro_batch else global_batch  # process counts that divide this fit
        procs = "in one process (no --nproc/--gpus)" if fits == 1 else f"with a number of processes (--nproc/--gpus) that divides {fits}"
        todo = f"a resumed run keeps both sizes: resume {procs}" if resumed else "choose sizes with global = micro x accumulation x processes"
        raise UsageError(f"train.global_batch_size {global_batch} is not divisible by micro_batch_size {micro} x world size {world}; {todo}")
    return micro, global_batch // (micro * world)
