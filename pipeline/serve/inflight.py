"""The batches in flight: prepared (features computed, inference started), not yet
finished (outputs produced, handed to the checkpoint). A FIFO, so batches leave oldest
first and outputs, changelog records and offsets go out in input order.

How many may wait: `depth` (`processing.inference_depth`), and `COMMIT_AHEAD` more while
an exactly-once transaction commits on its helper thread (the next batch's outputs would
wait for it, so the loop prepares further batches instead). A batch whose inference is done
is finished before the next is prepared, unless a commit is under way: its outputs would
only wait out the preparation. With the input idle, none waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from typing import Any, Generic, Protocol, TypeVar

from confluent_kafka import Message

from pipeline.serve.commit import Checkpoint, Rewind

# Batches the loop prepares beyond `inference_depth` while an exactly-once transaction
# commits on its helper thread: each holds at most `consumer.max_batch` events and their
# features, and the commit (tens of ms) spans a few batches at a backlog.
COMMIT_AHEAD = 8


class Prepared(Protocol):
    """What the queue needs of a batch: its inference, running or done."""

    @property
    def inference(self) -> Future[Any]:
        """The engines' work on the batch."""
        ...


B = TypeVar("B", bound=Prepared)


class InFlight(Generic[B]):
    """Prepared batches, oldest first, with the rules for when each is finished."""

    def __init__(
        self,
        prepare: Callable[[list[Message], Checkpoint], B],
        finish: Callable[[B, Checkpoint], None],
        depth: int,
    ) -> None:
        """`prepare` makes a batch of messages (moving the state on), `finish` produces
        its outputs and hands it to the checkpoint; at most `depth` wait (see the module).
        """
        self._prepare = prepare
        self._finish = finish
        self._depth = depth
        self._batches: deque[B] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[B]:
        return iter(self._batches)

    def add(self, messages: list[Message], checkpoint: Checkpoint) -> None:
        """Prepare a batch of `messages` and queue it behind the others."""
        self._batches.append(self._prepare(messages, checkpoint))

    def admit(self, messages: list[Message], checkpoint: Checkpoint) -> None:
        """`add`, first finishing the batches whose inference is done: their outputs would
        wait out this preparation for nothing. Not while a transaction commits: they would
        wait for that, and the loop with them.
        """
        batches = self._batches
        while batches and batches[0].inference.done() and not checkpoint.committing():
            self._finish(batches.popleft(), checkpoint)
        self.add(messages, checkpoint)

    def ahead(self, checkpoint: Checkpoint) -> int:
        """How many prepared batches may wait to be finished now."""
        return self._depth + COMMIT_AHEAD if checkpoint.committing() else self._depth

    def finish_due(self, checkpoint: Checkpoint, idle: bool) -> None:
        """Finish the oldest batches until no more than `ahead` wait; all of them when the
        input is `idle`.
        """
        batches = self._batches
        while batches and (idle or len(batches) > self.ahead(checkpoint)):
            self._finish(batches.popleft(), checkpoint)

    def drain(self, checkpoint: Checkpoint) -> None:
        """Finish every batch, oldest first; may raise Rewind."""
        self.finish_due(checkpoint, idle=True)

    def discard(self) -> None:
        """Drop every batch after a rollback (their state is restored anew), once the
        inference thread is done with them.
        """
        wait_for([batch.inference for batch in self._batches])
        self._batches.clear()

    def settle(self, checkpoint: Checkpoint) -> str | None:
        """In a rebalance callback: finish the batches while their partitions are still
        owned. A rollback met here drops the rest and is returned, for the loop to rewind
        outside the callback.
        """
        try:
            self.drain(checkpoint)
        except Rewind as rewind:
            self.discard()
            return str(rewind)
        return None
