"""The prompt queue: a dataset cursor over epochs, a seeded shuffle per epoch, re-queueing at the front, resume.

Contract:
- Epoch e visits every prompt once, in the order `permutation(seed, e)` (or source order when shuffle is off);
  the same seed gives the same order on every machine (numpy's PCG64 seeded with (seed, e)).
- `draw()` returns a copy of the next prompt with `epoch` (the epoch it was drawn in) and `attempt` (how many
  times it was drawn before in that epoch) set. Re-queued prompts come first, oldest re-queue first when several
  are re-queued together (`push_front(prompts)` keeps their order).
- `state_dict()` / `load_state_dict()` round-trip the cursor, the epoch and the re-queued prompts as plain JSON
  values; loading into a queue built from a different dataset is an error naming the mismatch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import msgspec
import numpy as np

from pipeline.contracts.records import Prompt


class PromptQueue:
    def __init__(self, prompts: list[Prompt], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("prompt queue: the dataset has no prompts")
        self._prompts = list(prompts)
        self._index: dict[str, int] = {}
        for i, p in enumerate(self._prompts):
            if p.prompt_id in self._index:
                raise ValueError(
                    f"prompt queue: duplicate prompt_id {p.prompt_id!r} (rows {self._index[p.prompt_id]} and {i})"
                )
            self._index[p.prompt_id] = i
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)
        self._front: deque[tuple[int, int, int]] = deque()  # (row, attempt, epoch)

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def requeued(self) -> int:
        """Prompts waiting at the front."""
        return len(self._front)

    def _permutation(self, epoch: int) -> list[int]:
        n = len(self._prompts)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def draw(self) -> Prompt:
        if self._front:
            row, attempt, epoch = self._front.popleft()
        else:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            row, attempt, epoch = self._order[self.cursor], 0, self.epoch
            self.cursor += 1
        return msgspec.structs.replace(self._prompts[row], attempt=attempt, epoch=epoch)

    def push_front(self, prompts: Iterable[Prompt]) -> None:
        """Put prompts back at the front, keeping their order (the first is drawn next). Their `attempt` and
        `epoch` are kept as given (the caller decides whether this counts as a new attempt)."""
        items = [(self._row(p.prompt_id), p.attempt, p.epoch) for p in prompts]
        self._front.extendleft(reversed(items))

    def _row(self, prompt_id: str) -> int:
        try:
            return self._index[prompt_id]
        except KeyError:
            raise KeyError(f"prompt queue: unknown prompt_id {prompt_id!r}") from None

    def state_dict(self, front_first: Iterable[Prompt] = ()) -> dict:
        """Cursor state; `front_first` (e.g. prompts in flight) is saved ahead of the re-queued ones."""
        extra = [[p.prompt_id, p.attempt, p.epoch] for p in front_first]
        front = [[self._prompts[row].prompt_id, attempt, epoch] for row, attempt, epoch in self._front]
        return {
            "n_prompts": len(self._prompts),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "front": extra + front,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n_prompts"] != len(self._prompts):
            raise ValueError(
                f"prompt queue: the checkpoint was taken over {state['n_prompts']} prompts, this dataset has "
                f"{len(self._prompts)} (data.train_path changed?)"
            )
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
        self._front = deque((self._row(pid), int(attempt), int(epoch)) for pid, attempt, epoch in state["front"])
