"""`search`, `prune` and `compare` as a torchrun job: rank 0 runs the command as one process would (the search, the
allocation, the checks, every file and the report) and the other ranks join each of its fine-tunings.

While rank 0 searches, for minutes or hours, the other ranks wait on the job's store (torchrun's key-value store),
never in a collective, which would fail after the 30 s timeout:
- rank 0 posts under `job/N` either `fit` (and then broadcasts the fine-tuning's model, data, settings and
  arguments, and every rank trains), or, once the command has ended, `done` (or `stop` when it failed: rank 0
  reports the error);
- every rank adds to its own counter `beat/R` every 2 s from a thread. A waiting rank watches rank 0's counter all
  the time, rank 0 watches the others' whenever it is about to fine-tune: a peer whose counter stood still for
  twice the collective timeout (60 s by default) ends the job with one line naming it. A rank that dies stops the
  job at once: torchrun's agent ends the others.
Store operations come one at a time (a lock): the main thread and the heartbeat share one client. What a fine-tuning
trains travels over the process group each time (its data included: Fashion-MNIST's fine-tune split is 43 MB), so
the other ranks need neither the model nor the data on their disks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import torch.distributed as dist

from qlp_compress.base.errors import QLPError, first_line
from qlp_compress.train import ranks

BEAT_SECONDS = 2.0  # how often every rank adds to its counter
POLL_SECONDS = 0.2  # how often a waiting rank looks for rank 0's next word


class Beats:
    """This rank's heartbeat (a daemon thread) and what it has seen of its peers' counters; a peer is silent once
    its counter has stood still for `silence` seconds."""

    def __init__(self, me: int, peers: list[int], silence: float):
        store = dist.distributed_c10d._get_default_store()  # the job's store, joined by init_process_group
        self.store, self.lock = dist.PrefixStore("qlp", store), threading.Lock()
        self.me, self.peers, self.silence = me, peers, silence
        self.seen = {r: (-1, time.monotonic()) for r in peers}  # peer → (its count, when it last changed)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="qlp-heartbeat", daemon=True)
        self.thread.start()

    def call(self, method: str, *args):
        """A store operation; a store that cannot be reached (rank 0's machine gone) is one line."""
        try:
            with self.lock:
                return getattr(self.store, method)(*args)
        except Exception as e:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise QLPError(f"rank {self.me} lost the job's store at {where} ({first_line(e)}); the machine of rank 0 "
                           "or torchrun's agent is gone: rerun the job") from None

    def _beat(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(QLPError):  # the main thread reports a lost store
                self.call("add", f"beat/{self.me}", 1)
                for r in self.peers:
                    self.look(r)
            self.stopped.wait(BEAT_SECONDS)

    def look(self, r: int) -> None:
        count = self.call("add", f"beat/{r}", 0)
        if count != self.seen[r][0]:
            self.seen[r] = (count, time.monotonic())

    def check_peers(self, peers: set[int] | None = None) -> None:
        """Raise, in one line, for the first peer (of `peers`, default all) that is silent."""
        for r in sorted(self.peers if peers is None else peers):
            self.look(r)
            quiet = time.monotonic() - self.seen[r][1]
            if quiet > self.silence:
                raise QLPError(f"rank {self.me}: rank {r} has been silent for {quiet:.0f} s (no heartbeat: it hangs, "
                               "or its machine or network is gone), so the job stopped; rerun it, and check rank "
                               f"{r}'s machine")

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


_leader: Beats | None = None  # rank 0's heartbeat while it leads a job; None elsewhere
_posted = 0  # the words rank 0 has posted


def leading() -> bool:
    """Whether this is rank 0 leading a job (its fine-tunings are shared with the other ranks)."""
    return _leader is not None


def _post(word: str) -> None:
    global _posted
    _leader.call("set", f"job/{_posted}", word)
    _posted += 1


@contextlib.contextmanager
def lead(silence: float) -> Iterator[None]:
    """Rank 0's part: the command runs within, alone (ranks.alone) except in `together`; at the end the others are
    told `done` (`stop` after an error) and rank 0 waits until each has read it, or has gone silent."""
    global _leader
    _leader = Beats(0, list(range(1, dist.get_world_size())), silence)
    word = "stop"
    try:
        with ranks.alone():
            yield
        word = "done"
    finally:
        try:
            _post(word)
            _wait_for_acks()
        except QLPError:
            pass  # the store is gone: the others notice it themselves, and the command's result (or error) stands
        finally:
            _leader.stop()
            _leader = None


def _wait_for_acks() -> None:
    waiting = set(_leader.peers)
    while waiting:
        waiting = {r for r in waiting if not _leader.call("check", [f"ack/{r}"])}
        try:
            _leader.check_peers(waiting)
        except QLPError:
            return  # a silent peer cannot read the word; the command's own result (or error) stands
        time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def together(payload: tuple) -> Iterator[None]:
    """Rank 0, about to fine-tune: every other rank must be alive; they are told `fit` and given `payload` (what
    they train: rank 0's model, data, settings and arguments), and within, every rank trains together."""
    _leader.check_peers()
    _post("fit")
    with ranks.alone(False):
        ranks.from_main(payload)
        yield


def follow(train: Callable[..., object], silence: float) -> str:
    """A rank other than 0: wait for rank 0's words, `train(*payload)` for each `fit`; returns the last word
    (`done`, or `stop` when rank 0 failed and reports it)."""
    me = ranks.rank()
    beats = Beats(me, [0], silence)
    try:
        n = 0
        while True:
            while not beats.call("check", [f"job/{n}"]):
                beats.check_peers()
                time.sleep(POLL_SECONDS)
            word = beats.call("get", f"job/{n}").decode()
            n += 1
            if word != "fit":
                beats.call("set", f"ack/{me}", "1")
                return word
            train(*ranks.from_main(None))
    finally:
        beats.stop()
