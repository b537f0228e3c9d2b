"""The ring of past steps behind a CBN layer: its positions, kept on the host.

The entries themselves are the layer's buffers (``window_mean``, ...), so they
are saved with the model; this object owns the index arithmetic and mirrors
the ring's positions on the host. A training step then reads nothing back
from the device: on a GPU every ``int(tensor)`` waits for the device's queue
to drain. The mirror is written from the buffers once, when a checkpoint is
loaded (``load``).
"""
from __future__ import annotations

import torch
from torch import Tensor


class StepRing:
    """Ring positions of ``slots`` past steps (``window_size - 1``) for each call position.

    ``next[p]``: the slot the next step of position ``p`` is written to;
    ``filled[p]``: how many slots hold a step. Newest first, the slot ``a``
    steps back is ``(next - 1 - a) % slots``.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.next: list[int] = []
        self.filled: list[int] = []
        self._indices: dict[tuple, Tensor] = {}

    @property
    def positions(self) -> int:
        return len(self.next)

    def grow(self, positions: int) -> None:
        """Room for ``positions`` call positions (new ones empty)."""
        missing = positions - len(self.next)
        self.next += [0] * missing
        self.filled += [0] * missing

    def load(self, next_slots: Tensor | None, filled: Tensor | None) -> None:
        """Take the positions from the buffers of a loaded state (one read, at load time)."""
        self.next = [] if next_slots is None else [int(v) for v in next_slots.tolist()]
        self.filled = [] if filled is None else [int(v) for v in filled.tolist()]
        self._indices.clear()

    def ages(self, position: int, most: int) -> int:
        """How many past steps position ``position`` pools, at most ``most``."""
        return min(most, self.filled[position]) if position < self.positions else 0

    def newest_first(self, position: int, ages: int) -> tuple[int, ...]:
        """The slots of the ``ages`` newest steps at ``position``, newest first."""
        newest = self.next[position] - 1
        return tuple((newest - a) % self.slots for a in range(ages))

    def index(self, position: int, ages: int, device: torch.device) -> Tensor:
        """``newest_first`` as an index tensor, made once per distinct value.

        A fresh index tensor is a host-to-device copy, which from pageable
        memory waits for the device; there are at most ``slots^2`` of them.
        """
        key = (self.newest_first(position, ages), str(device))
        if key not in self._indices:
            self._indices[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return self._indices[key]

    def advance(self, position: int) -> None:
        """The step just written at ``position`` becomes the newest."""
        self.next[position] = (self.next[position] + 1) % self.slots
        self.filled[position] = min(self.filled[position] + 1, self.slots)

    def filled_mask(self, positions: int, device: torch.device) -> Tensor:
        """``positions x slots`` bool: which slots hold a step (for upgrading old states)."""
        mask = torch.zeros(positions, self.slots, dtype=torch.bool)
        for p in range(positions):
            for slot in self.newest_first(p, self.filled[p]):
                mask[p, slot] = True
        return mask.to(device)
