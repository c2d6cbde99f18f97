"""Move a sequence's KV blocks from the prefill worker to the decode worker over torch.distributed p2p.

The sender gathers the blocks of every layer into one contiguous buffer and posts `isend`; the receiver
posts `irecv` into a staging buffer and scatters it into its own blocks once the receive completes.
Both calls return at once: on NCCL the copy runs on NCCL's own stream, overlapped with the next prefill
(the sender's compute stream is not blocked); on gloo (CPU) a background thread moves the bytes.
Sends and receives pair up in the order they are posted (one ordered channel between the two ranks).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PREFILL_RANK, DECODE_RANK = 0, 1


def init_process_group(rank: int, device: torch.device, init_method: str) -> None:
    """Join the two-rank KV channel: `file://PATH` for two workers on one host (no listening socket), or
    `env://` (MASTER_ADDR/MASTER_PORT, set by the caller) for two hosts."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=2, **kwargs)


def digest(t: torch.Tensor) -> str:
    """Hash of a tensor's bytes (exact: any changed bit changes it)."""
    raw = t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass
class Transfer:
    request_id: str
    buffer: torch.Tensor  # [2, layers, n_blocks, block_size, kv_heads, head_dim], kept alive until done
    work: object
    block_ids: list[int]
    nbytes: int
    finished: threading.Event | None = field(default=None)

    def __post_init__(self):
        # gloo's p2p work reports completion only through wait(), so a helper thread waits for it;
        # NCCL's is_completed() polls the CUDA event of the transfer.
        if dist.get_backend() == "gloo":
            self.finished = threading.Event()
            threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            self.work.wait()
        finally:
            self.finished.set()

    def done(self) -> bool:
        return self.finished.is_set() if self.finished is not None else self.work.is_completed()


def send_blocks(kv_cache: torch.Tensor, block_ids: list[int], request_id: str) -> Transfer:
    index = torch.tensor(block_ids, device=kv_cache.device)
    buffer = kv_cache.index_select(2, index)  # gather on the compute stream; NCCL waits for it
    work = dist.isend(buffer, dst=DECODE_RANK)
    return Transfer(request_id, buffer, work, block_ids, buffer.numel() * buffer.element_size())


def recv_blocks(kv_cache: torch.Tensor, block_ids: list[int], request_id: str) -> Transfer:
    shape = list(kv_cache.shape)
    shape[2] = len(block_ids)
    buffer = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    work = dist.irecv(buffer, src=PREFILL_RANK)
    return Transfer(request_id, buffer, work, block_ids, buffer.numel() * buffer.element_size())


def finish_recv(kv_cache: torch.Tensor, t: Transfer) -> None:
    """Scatter a completed receive into the cache (ordered after the receive on the current stream)."""
    if t.finished is None:  # NCCL: order the scatter after the receive on this stream (gloo already waited)
        t.work.wait()
    index = torch.tensor(t.block_ids, device=kv_cache.device)
    kv_cache.index_copy_(2, index, t.buffer)
