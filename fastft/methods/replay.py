"""Experience replay for continual fine-tuning: a fixed-size buffer of earlier tasks' examples (reservoir sampling,
so every example seen so far is in it with the same probability capacity / seen) mixed into the new task's batches.

    buffer = ReplayBuffer(capacity=1000, seed=0)
    buffer.extend(task1_dataset)                                   # after (or while) training task 1
    collator = ReplayCollator(base_collator, buffer, ratio=0.25)   # a quarter of each batch replayed
    Trainer(model=model, train_dataset=task2_dataset, data_collator=collator, ...)

`buffer.state_dict()` / `load_state_dict` save it (examples, count seen, random state) with a checkpoint.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Optional

from torch.utils.data import Dataset


class ReplayBuffer:
    """At most `capacity` examples (any picklable objects, e.g. dicts of token ids), a uniform sample of all the
    examples `add` has seen (Vitter's algorithm R)."""

    def __init__(self, capacity: int, seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.seen = 0
        self.items: list[Any] = []
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, example: Any) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(example)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.items[slot] = example

    def extend(self, examples: Iterable[Any]) -> None:
        for example in examples:
            self.add(example)

    def sample(self, k: int) -> list[Any]:
        """k examples drawn uniformly with replacement."""
        if not self.items:
            raise ValueError("the replay buffer is empty: add examples of earlier tasks before sampling")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        return [self.items[self._rng.randrange(len(self.items))] for _ in range(k)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "items": list(self.items),
                "rng_state": self._rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["items"]) > state["capacity"]:
            raise ValueError(f"state holds {len(state['items'])} items for a capacity of {state['capacity']}")
        self.capacity, self.seen, self.items = state["capacity"], state["seen"], list(state["items"])
        self._rng.setstate(state["rng_state"])


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")


def replayed_count(new: int, ratio: float) -> int:
    """How many replayed examples join `new` new ones so that they make `ratio` of the batch (rounded)."""
    return round(new * ratio / (1 - ratio))


class ReplayCollator:
    """A data collator (what transformers' Trainer takes as `data_collator`) that appends replayed examples to each
    batch of new ones, replayed_count(len(batch), ratio) of them, before calling `collator` on the whole list."""

    def __init__(self, collator: Callable[[list], Any], buffer: ReplayBuffer, ratio: float):
        _check_ratio(ratio)
        if ratio > 0 and len(buffer) == 0:
            raise ValueError("the replay buffer is empty: nothing to mix in at ratio > 0")
        self.collator, self.buffer, self.ratio = collator, buffer, ratio

    def __call__(self, examples: list) -> Any:
        return self.collator(list(examples) + self.buffer.sample(replayed_count(len(examples), self.ratio)))


class ReplayDataset(Dataset):
    """The new task's dataset with replayed examples interleaved: of every len(dataset) / (1 - ratio) items, a
    fraction `ratio` comes from the buffer (a fixed draw per index, from `seed`); for a Trainer that shuffles, the
    batches hold `ratio` replayed examples on average."""

    def __init__(self, dataset, buffer: ReplayBuffer, ratio: float, seed: int = 0):
        _check_ratio(ratio)
        if ratio > 0 and len(buffer) == 0:
            raise ValueError("the replay buffer is empty: nothing to mix in at ratio > 0")
        self.dataset, self.ratio = dataset, ratio
        extra = replayed_count(len(dataset), ratio)
        rng = random.Random(seed)
        self.replayed = [buffer.items[rng.randrange(len(buffer))] for _ in range(extra)]

    def __len__(self) -> int:
        return len(self.dataset) + len(self.replayed)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        n = len(self.dataset)
        return self.dataset[index] if index < n else self.replayed[index - n]


def fill_from(buffer: ReplayBuffer, dataset, limit: Optional[int] = None) -> ReplayBuffer:
    """Stream (the first `limit` examples of) a dataset through the buffer; returns the buffer."""
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        buffer.add(dataset[i])
    return buffer
