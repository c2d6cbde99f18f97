"""Incremental inputs of the count-based logit processors (repetition, frequency, presence penalties).

A runner keeps, on its device, one [rows, V] `seen` (token in prompt or output) and one [rows, V] `counts`
(occurrences in the output) slab. Each penalised sequence owns a row while it runs; a step scatters only the
tokens appended since that row was last brought up to date (one token per sequence in decode), so the host
work per step is O(batch), not O(all tokens of all sequences).

Correctness does not depend on the engine telling us anything: a row is a cache of a pure function of the
sequence's token ids, and it is rebuilt from those ids whenever it cannot be shown to be current:
- a Sequence object the state has not seen (a new request, an n > 1 child, a sequence that arrived from
  another process in a PD hand-over) gets a fresh row built from all its tokens;
- the entry remembers the Sequence by weak reference (never by `seq_id`, which another process may reuse),
  how many of its tokens the row holds, the last of them and the prompt length; if the sequence got
  shorter, its token at that position changed, or its prompt length changed, the row is rebuilt;
- preemption (recompute) keeps the token ids, so the row stays valid; a row whose sequence is not in the
  current batch (finished, aborted, preempted, moved away) may be reclaimed when rows run out, and is
  rebuilt if that sequence comes back.
Async scheduling: a sequence's last token may still be a placeholder (the previous step's sample, not on the
host yet). Its row takes that token from the previous step's token tensor, on the device, so penalties never
make the host wait.
Row 0 stays all zero: batch rows without a count-based penalty read it.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from splitserve.engine.sequence import PLACEHOLDER


class _Entry:
    __slots__ = ("ref", "row", "num_done", "last", "num_prompt")

    def __init__(self, seq, row: int):
        self.ref = weakref.ref(seq)
        self.row = row
        self.num_done = 0  # tokens of seq.token_ids the row holds
        self.last = -1  # seq.token_ids[num_done - 1] when num_done > 0
        self.num_prompt = seq.num_prompt_tokens


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.num_rows = 0
        self.seen: torch.Tensor | None = None  # [num_rows, V] bool
        self.counts: torch.Tensor | None = None  # [num_rows, V] float32
        self.entries: dict[int, _Entry] = {}  # id(seq) -> entry (validated by the weak reference)
        self.free: list[int] = []
        self.rebuilds = 0  # rows built from a whole sequence (tests and benchmarks read it)
        self._steady: _Steady | None = None  # the last call's batch, for the next call's fast path

    def _grow(self, need: int) -> None:
        rows = max(need, 2 * self.num_rows, 9)
        seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=self.device)
        if self.num_rows:
            seen[: self.num_rows] = self.seen
            counts[: self.num_rows] = self.counts
        self.free += range(max(self.num_rows, 1), rows)  # row 0 is the zero row
        self.free.sort(reverse=True)  # pop() hands out the lowest row: rows tend to follow batch order
        self.seen, self.counts, self.num_rows = seen, counts, rows

    def _take_row(self, live: set[int], need: int) -> int:
        if not self.free:  # reclaim the rows of sequences outside this batch
            for key in [k for k in self.entries if k not in live]:
                self.free.append(self.entries.pop(key).row)
            self.free.sort(reverse=True)
        if not self.free:
            self._grow(max(need + 1, 2 * self.num_rows))
        return self.free.pop()

    def rows_for(self, seqs: list, used: list[bool], to_device,
                 pending: tuple[torch.Tensor, dict[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the rows of `seqs[i]` with `used[i]` up to date; returns ([B, V] seen, [B, V] counts) for the
        batch (row 0, all zero, for the others): a view of the slab when the rows are consecutive, else a
        gather. `pending`: the previous step's (sampled tokens on the device, seq_id -> its index), for a
        last token that is still a placeholder."""
        V = self.vocab_size
        steady = self._steady
        if steady is not None and pending is not None and steady.seqs == seqs and steady.used == used:
            out = steady.advance(self, pending, to_device)
            if out is not None:
                return out
        live = {id(s) for s, u in zip(seqs, used) if u}
        if self.num_rows < len(live) + 1:
            self._grow(len(live) + 1)
        rows = np.zeros(len(seqs), dtype=np.int64)
        seen_idx, count_idx, reset = [], [], []
        device_rows, device_src = [], []  # placeholders: (row, index into the pending step's tokens)
        for i, (seq, u) in enumerate(zip(seqs, used)):
            if not u:
                continue
            key, ids = id(seq), seq.token_ids
            e = self.entries.get(key)
            n = len(ids)
            if e is None or e.ref() is not seq:  # (an id reused by a new object keeps the dead one's row)
                row = self._take_row(live, len(live)) if e is None else e.row
                e = self.entries[key] = _Entry(seq, row)
                reset.append(row)
            elif (n < e.num_done or e.num_prompt != seq.num_prompt_tokens
                  or (e.num_done and e.last != PLACEHOLDER and ids[e.num_done - 1] != e.last)):
                e.num_done, e.num_prompt = 0, seq.num_prompt_tokens
                reset.append(e.row)
            rows[i] = e.row
            start = e.num_done
            if start == n:
                continue
            if start == 0:
                self.rebuilds += 1
            base, real = e.row * V, n
            if ids[-1] == PLACEHOLDER:  # sampled by the pending step: an output token, on the device only
                device_rows.append(e.row)
                device_src.append(pending[1][seq.seq_id])
                real = n - 1
            if real - start == 1:  # decode: one new token (in the output once the prompt is in)
                flat = base + ids[real - 1]
                seen_idx.append(flat)
                if start >= e.num_prompt:
                    count_idx.append(flat)
            elif real > start:
                new = np.asarray(ids[start:real], dtype=np.int64) + base
                seen_idx.extend(new.tolist())
                out_from = max(e.num_prompt - start, 0)
                count_idx.extend(new[out_from:].tolist())
            e.num_done, e.last = n, ids[-1]
        if reset:
            r = to_device(np.asarray(reset, dtype=np.int64))
            self.seen.index_fill_(0, r, False)  # fills, not `[r] = 0`: a Python value set by index is copied
            self.counts.index_fill_(0, r, 0.0)  # from pageable host memory, which waits for the whole stream
        if seen_idx:
            packed = to_device(np.asarray(seen_idx + count_idx, dtype=np.int64))
            self.seen.view(-1).index_fill_(0, packed[: len(seen_idx)], True)
            if count_idx:
                c = packed[len(seen_idx):]
                self.counts.view(-1).index_add_(0, c, torch.ones(c.shape, dtype=torch.float32, device=self.device))
        if device_rows:
            rows_src = to_device(np.asarray([device_rows, device_src], dtype=np.int64))
            flat = rows_src[0] * V + pending[0][rows_src[1]]
            self.seen.view(-1).index_fill_(0, flat, True)
            self.counts.view(-1).index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=self.device))
        first = int(rows[0])
        if first > 0 and np.array_equal(rows, np.arange(first, first + len(rows))):
            select = None
        else:
            select = to_device(rows)
        self._steady = _Steady(list(seqs), list(used), [self.entries[id(s)] for s, u in zip(seqs, used) if u],
                               first, select)
        return self._steady.tensors(self)


class _Steady:
    """A call's batch, kept for the next call (strong references: the batch is alive anyway). The steady decode
    step is the same sequences in the same rows, each one token longer: the placeholder the pending step samples.
    Then one device update serves the whole batch; the host only checks each sequence's length and last token."""

    __slots__ = ("seqs", "used", "entries", "first", "select")

    def __init__(self, seqs: list, used: list[bool], entries: list[_Entry], first: int, select):
        self.seqs, self.used, self.entries, self.first, self.select = seqs, used, entries, first, select

    def tensors(self, state: PenaltyState) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, V] seen, [B, V] counts): a view of consecutive rows, else a gather."""
        if self.select is None:
            n = len(self.seqs)
            return state.seen[self.first: self.first + n], state.counts[self.first: self.first + n]
        return state.seen.index_select(0, self.select), state.counts.index_select(0, self.select)

    def advance(self, state: PenaltyState, pending: tuple[torch.Tensor, dict[int, int]], to_device):
        """Bring the rows up by one placeholder each, or None (nothing changed) when this is not a steady step."""
        tokens, index = pending
        src = []
        for e in self.entries:
            seq = e.ref()
            ids = seq.token_ids
            i = index.get(seq.seq_id)
            if i is None or len(ids) != e.num_done + 1 or ids[-1] != PLACEHOLDER:
                return None
            src.append(i)
        for e in self.entries:
            e.num_done += 1
            e.last = PLACEHOLDER
        if src:
            rows_src = to_device(np.asarray([[e.row for e in self.entries], src], dtype=np.int64))
            flat = rows_src[0] * state.vocab_size + tokens[rows_src[1]]
            state.seen.view(-1).index_fill_(0, flat, True)
            state.counts.view(-1).index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=state.device))
        return self.tensors(state)
