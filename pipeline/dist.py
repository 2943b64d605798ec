"""Several processes on one job (torchrun): who this process is, and how the processes agree.

Everything here comes from torch.distributed over the env:// rendezvous torchrun provides. A plain
run (no torchrun variables) is a job of one: every call below is then the identity, with no
process group at all, so the single-process path is what it always was.

Coordination only moves a few small Python objects (decisions, chunk lists, error messages), so it
always goes over gloo, on CPU and GPU machines alike: the forward passes themselves never talk.
"""
from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.util import UserError

# A barrier waits for the slowest rank's share of the work, which a resume can make hours longer
# than the others' (all the damaged chunks may be one rank's): the timeout only catches a hung
# peer, since a dead one closes its sockets and fails the collective at once.
TIMEOUT = datetime.timedelta(hours=float(os.environ.get("TC_DIST_TIMEOUT_HOURS", "24")))
# fault_point's variables; TC_KILL_RANK keeps them for one rank only (the tests kill one rank)
FAULT_VARS = ("TC_KILL_AT", "TC_INTERRUPT_AT", "TC_TRAIN_KILL_AT_STEP")


class JobStopped(UserError):
    """Another process of this job failed or ended: this one stops too, in one line."""


@dataclass
class Job:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False   # started by torchrun (even as a job of one)
    joined: bool = False     # a torch.distributed process group is up
    # what a stopped rank tells the user to do (tc cache's words; tc train sets its own)
    hint: str = ("re-run the same command to continue (committed chunks are kept, whoever wrote them; any "
                 "number of processes may resume)")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def stopped(self, why: str) -> JobStopped:
        return JobStopped(f"rank {self.rank} of {self.world} stopped: {why}; {self.hint}")

    def _collective(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError:   # gloo's word for a peer that went away (torchrun's report names it)
            raise self.stopped("another process of this job ended") from None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.joined:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.joined:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        self._collective(lambda: dist.all_gather_object(out, obj))
        return out

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank."""
        if not self.joined:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return bool(t.item())

    def barrier(self) -> None:
        if self.joined:
            import torch.distributed as dist

            self._collective(dist.barrier)

    def device(self, device: str) -> str:
        """One GPU per process on a node: a bare 'cuda' becomes this process's own."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.joined else device

    # -- running a step on rank 0, or on every rank, so that a failure is one line for the job

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and hand its result to every rank. If it raises a UserError, rank 0
        raises it (its one line) and the others stop quietly."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UserError as e:
                error = e
        failed, result = self.broadcast((error is not None, result))
        if error is not None:
            raise error
        if failed:
            quiet_exit()
        return result

    def on_all(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank, then agree: if any raised, the lowest rank that did raises its error
        (one line, or a traceback for a bug) and the others stop quietly."""
        result, error = None, None
        try:
            result = fn()
        except JobStopped:
            raise   # a peer is gone: there is no one left to agree with
        except Exception as e:   # not KeyboardInterrupt: Ctrl-C reaches every rank by itself
            if not self.joined:
                raise
            error = e
        failed = self.gather(error is not None)
        if any(failed):
            if failed.index(True) == self.rank:
                raise error
            quiet_exit()
        return result


def quiet_exit() -> None:
    """Leave without a word: another rank of the job has said what went wrong."""
    raise SystemExit(2)


def from_env() -> Job:
    """This process's place in the job: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return Job()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers: launch with torchrun") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is outside WORLD_SIZE {world}: launch with torchrun")
    return Job(rank, world, local_rank, launched=True)


def join(job: Job) -> Job:
    """Join the process group torchrun set up (env://). A SIGTERM (torchrun stopping the job because
    another rank ended) then becomes one line instead of a silent death or a traceback."""
    if not job.launched:
        return job
    import torch.distributed as dist

    scoped = os.environ.get("TC_KILL_RANK")
    if scoped is not None and scoped != str(job.rank):
        for name in FAULT_VARS:
            os.environ.pop(name, None)
    dist.init_process_group("gloo", init_method="env://", rank=job.rank, world_size=job.world, timeout=TIMEOUT)
    job.joined = True

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second one ends it at once
        raise job.stopped("another process of this job ended")
    signal.signal(signal.SIGTERM, on_term)
    return job


def leave(job: Job) -> None:
    if job.joined:
        import torch.distributed as dist

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            dist.destroy_process_group()
        except Exception:   # a peer already gone: nothing left to tidy
            pass
        job.joined = False


def quiet_stdout(job: Job):
    """Rank 0 speaks for the job: the other ranks' stdout (counts, notes, the summary) goes nowhere."""
    import contextlib

    if job.main:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))


