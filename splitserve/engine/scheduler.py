"""Continuous batching with chunked prefill and preemption by recompute.

Every step gives each scheduled sequence a number of new tokens (vLLM v1 style): a decode gets 1, a
prefill gets as much of its prompt as the token budget allows. Running sequences go first, so a long
prompt never stalls the decodes already in flight; when KV blocks run out, the most recently admitted
sequence is preempted (its blocks freed, to be recomputed later) — nothing is lost.

The completions of an n > 1 request share their prompt's KV: the first one prefills the prompt, the others
wait for it (while it is being prefilled) and then fork its blocks, computing only the prompt's last token.

PD multiplexing (issue 13, `multiplex=True`): the same admission, preemption, prefix caching and forks, but
decode rows (a running sequence whose prompt is done: 1 token) no longer take from the token budget, which is
the prefill chunks' alone, and `split_lanes` cuts the step into a decode batch and a prefill batch over the one
KV cache. A sequence whose prefill samples its first token in step N is a decode row from step N + 1.
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


def is_decode_row(seq: Sequence, num_new_tokens: int) -> bool:
    """One new token after a computed prompt (also a recomputed one after preemption, once its KV is back)."""
    return num_new_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens


def split_lanes(batch: ScheduledBatch) -> list[ScheduledBatch]:
    """A scheduled step as one batch per lane (`ScheduledBatch.lane`), decode lane first; an empty lane is
    left out. Block copies (forks) go with the prefill lane: a forked sequence still computes its prompt's
    last token."""
    decode = ScheduledBatch([], [], lane=DECODE_LANE)
    prefill = ScheduledBatch([], [], list(batch.block_copies), lane=PREFILL_LANE)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        lane = decode if is_decode_row(seq, n) else prefill
        lane.seqs.append(seq)
        lane.num_new_tokens.append(n)
    assert prefill.seqs or not batch.block_copies, "a block copy without its forked sequence"
    return [b for b in (decode, prefill) if b.seqs]


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 multiplex: bool = False):
        self.multiplex = multiplex  # decode rows outside the token budget (see split_lanes)
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

    def schedule(self) -> ScheduledBatch:
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
            decode = self.multiplex and is_decode_row(seq, remaining)
            if not decode and budget <= 0:  # multiplex: no budget left for this prefill; decodes still go
                i += 1
                continue
            n = 1 if decode else min(remaining, budget)
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]  # lowest priority: admitted last, not scheduled yet this step
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            if not decode:
                budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            copy = None
            if not seq.block_table:
                source = seq.fork_from
                if source is not None and source.status == SequenceStatus.RUNNING:
                    if not bm.can_fork(seq, source):
                        break  # its sibling is still prefilling the prompt (or no block for the copy): wait
                    copy = bm.fork(seq, source)
                elif seq.sampling_params.prompt_logprobs is None:  # those need every prompt token computed
                    bm.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
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
            budget -= n
        return ScheduledBatch(seqs, counts, copies)

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
        self.block_manager.free_sequence(seq)
