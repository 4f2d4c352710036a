"""A seeded, shuffling, resumable batch loader: its position (epoch, offset) is part of every checkpoint.

Epoch e visits the samples in the order of a permutation drawn from (seed, e) alone, so a resumed run sees
exactly the batches the uninterrupted run would have seen, mid-epoch included. Ranks (torchrun) split each global
batch of batch_size * world samples: this is the one place where data is sharded. A rank whose share of the last
global batch of an epoch is empty gets a `StandIn`: a real batch to run (DDP and FSDP need every rank's forward and
backward) whose loss the loop counts zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from phi3v.errors import InputError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class StandIn:
    """What a rank gets for an empty share of a global batch: `batch` is run so the collectives match, counts zero."""

    batch: object

    def to(self, device) -> StandIn:
        return StandIn(self.batch.to(device))


class Loader:
    """Endless batches over `samples` (epoch after epoch), each made by `collate(list_of_samples)`; the last batch
    of an epoch may be smaller. `state_dict()` is the position of the next batch."""

    def __init__(self, samples: Sequence, batch_size: int, collate: Callable[[list], object], seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world: int = 1):
        if not samples:
            raise InputError("no samples to train on: every record was bad or the data file is empty")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.samples, self.batch_size, self.collate = samples, batch_size, collate
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world
        self.epoch, self.offset = 0, 0  # offset: samples of this epoch already handed out (all ranks)
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.samples) // (self.batch_size * self.world))

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = epoch_order(len(self.samples), self.seed, self.epoch, self.shuffle)
        return self._order

    def next_indices(self) -> list[int]:
        """Sample indices of this rank's next batch (empty when the epoch's last chunk has fewer samples than
        ranks); moves the position on."""
        if self.offset >= len(self.samples):
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        step = self.batch_size * self.world
        chunk = self._epoch_order()[self.offset:self.offset + step]
        self.offset += len(chunk)
        return chunk[self.rank::self.world]

    def __iter__(self) -> Iterator:
        while True:
            chunk = self.next_indices()
            if chunk:
                yield self.collate([self.samples[i] for i in chunk])
            else:  # the same stand-in on every step, so it weighs nothing and moves no RNG
                yield StandIn(self.collate([self.samples[self._epoch_order()[0]]]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") != len(self.samples) or state.get("seed") != self.seed:
            raise InputError(f"the checkpoint's data position is for {state.get('num_samples')} samples with seed "
                             f"{state.get('seed')}, but this run has {len(self.samples)} with seed {self.seed}: "
                             "resume with the same data, bad-record policy and seed")
        self.epoch, self.offset, self._order = state["epoch"], state["offset"], None
