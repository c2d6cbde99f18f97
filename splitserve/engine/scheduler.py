"""Continuous batching with chunked prefill and preemption by recompute.

Every step gives each scheduled sequence a number of new tokens (vLLM v1 style): a decode gets 1, a
prefill gets as much of its prompt as the token budget allows. Running sequences go first, so a long
prompt never stalls the decodes already in flight; when KV blocks run out, the most recently admitted
sequence is preempted (its blocks freed, to be recomputed later) — nothing is lost.

The completions of an n > 1 request share their prompt's KV: the first one prefills the prompt, the others
wait for it (while it is being prefilled) and then fork its blocks, computing only the prompt's last token.

PD multiplexing (issue 13, `multiplex=True`): the same admission, preemption, prefix caching and forks, cut
into two lanes over the one KV cache (`split_lanes`). The prefill lane computes prompt chunks up to, not
including, each prompt's last token, and never samples; every row that samples is a 1-token decode row (a
running decode, or a prompt's last token). Decode rows take nothing from the token budget, which is the
prefill chunks' alone. A prefill batch may still be running while later decode steps are scheduled: its
sequences are `busy` until the core reports it done (`prefill_done`); they are neither scheduled nor preempted
meanwhile, and no new prefill is scheduled (`schedule(prefill=False)`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, dest): before the step (forks)
    lane: str = "mixed"  # PD multiplexing: DECODE_LANE or PREFILL_LANE (split_lanes); else one mixed batch

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence (what CUDA graphs are captured for)."""
        return all(n == 1 for n in self.num_new_tokens)

    def samples(self) -> list[bool]:
        """A sequence samples a token when this step computes its last pending token."""
        return [s.num_computed_tokens + n == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens)]


DECODE_LANE, PREFILL_LANE = "decode", "prefill"


def split_lanes(batch: ScheduledBatch) -> list[ScheduledBatch]:
    """A multiplexed step as one batch per lane (`ScheduledBatch.lane`), decode lane first; an empty lane is
    left out. The decode lane holds the rows that sample (1 token each), the prefill lane the rest; block copies
    (forks) go with the decode lane, where a forked sequence computes its prompt's last token."""
    decode = ScheduledBatch([], [], list(batch.block_copies), lane=DECODE_LANE)
    prefill = ScheduledBatch([], [], lane=PREFILL_LANE)
    for seq, n, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples()):
        assert n == 1 or not samples, "a multiplexed prefill row that samples"
        lane = decode if samples else prefill
        lane.seqs.append(seq)
        lane.num_new_tokens.append(n)
    return [b for b in (decode, prefill) if b.seqs]


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 multiplex: bool = False):
        self.multiplex = multiplex  # two lanes (see split_lanes)
        self.busy: set[int] = set()  # multiplex: seq ids of the prefill batch still running
        self.finished_busy: list[Sequence] = []  # ended while busy: blocks freed once the prefill is done
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its blocks (M1: it arrived from the prefill worker)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a running sequence out without freeing its blocks (M1: it leaves for the decode worker)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED  # done here: a sibling waiting to fork from it must not wait

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, prefill: bool = True) -> ScheduledBatch:
        """The next step's rows. Multiplexed, `prefill=False` (a prefill batch is still running) schedules the
        decode rows only."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        copies: list[tuple[int, int]] = []
        preempted = False

        i = 0
        while i < len(self.running) and (budget > 0 or self.multiplex):
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget) if not self.multiplex else self._lane_tokens(seq, remaining,
                                                                                    budget if prefill else 0)
            if n == 0:  # multiplex: busy, or a prompt chunk with no room this step
                i += 1
                continue
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                # lowest priority: admitted last, not scheduled yet this step (and not busy)
                victim = next(s for s in reversed(self.running) if s.seq_id not in self.busy)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= 0 if self.multiplex and n == remaining else n  # multiplexed decode rows are out of it
            i += 1

        while prefill and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            copy = None
            if not seq.block_table:
                source = seq.fork_from
                if source is not None and source.status == SequenceStatus.RUNNING:
                    if not bm.can_fork(seq, source) or source.seq_id in self.busy:
                        break  # its sibling is still prefilling the prompt (or no block for the copy): wait
                    copy = bm.fork(seq, source)
                elif seq.sampling_params.prompt_logprobs is None:  # those need every prompt token computed
                    bm.match_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = self._lane_tokens(seq, remaining, budget) if self.multiplex else min(remaining, budget)
            if not bm.can_allocate(seq, seq.num_computed_tokens + n):
                bm.free_sequence(seq)  # give back prefix-cache hits and forked blocks; retried next step
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            if copy is not None:
                copies.append(copy)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= 0 if self.multiplex and n == remaining else n
        return ScheduledBatch(seqs, counts, copies)

    def _lane_tokens(self, seq: Sequence, remaining: int, budget: int) -> int:
        """Multiplexed: the tokens to compute for `seq` this step: 1 for its last pending token (a decode row,
        out of the budget), else a prompt chunk that stops short of the last token; 0 while it is busy."""
        if seq.seq_id in self.busy:
            return 0
        return 1 if remaining == 1 else min(remaining - 1, budget)

    def prefill_launched(self, batch: ScheduledBatch) -> None:
        self.busy = {seq.seq_id for seq in batch.seqs}

    def prefill_done(self) -> None:
        """The running prefill batch is done on the device: its blocks may go to others now."""
        self.busy = set()
        for seq in self.finished_busy:
            self.block_manager.free_sequence(seq)
        self.finished_busy = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, batch: ScheduledBatch) -> None:
        """The batch is launched: its KV is in the cache in stream order (later steps read it after this one),
        so the next schedule may count on it."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n

    def register_blocks(self, batch: ScheduledBatch) -> None:
        """Publish full computed blocks for prefix caching. Only once the step before this batch has
        resolved: the batch's inputs may be that step's placeholder tokens, and a hash must never include one."""
        for seq in batch.seqs:
            if not seq.is_finished:  # a finished one gave its blocks back
                self.block_manager.register_full_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.seq_id in self.busy:  # the prefill stream may still write its blocks: no one else may get them yet
            self.finished_busy.append(seq)
        else:
            self.block_manager.free_sequence(seq)
