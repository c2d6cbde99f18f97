"""The PD control channel's messages, each kind defined once as a typed record of plain values.

Coordinator -> worker: Setup, Add (prefill), Offer (relayed to decode with its request), Accept/Reject
(relayed to prefill), Abort, GetStats, Stop. Worker -> coordinator: Hello, Ready, Outputs, Stats, Offer (prefill),
Accept/Reject (decode), Error. The core process (engine/core_client.py) uses the same records, without
the offers. KV bytes never travel here: they go worker to worker (kv_transfer.py).

A request's prompt ids travel coordinator -> prefill (Add) and coordinator -> decode (with the Offer),
never back: the coordinator attaches the request it already holds when it relays an offer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter

from splitserve.config import EngineConfig
from splitserve.engine.messages import CoreGauges, CoreOutput, CoreRequest


@dataclass(frozen=True)
class Hello:
    role: str  # "prefill" | "decode" | "core"
    pid: int


@dataclass(frozen=True)
class Setup:
    """Everything a worker needs, explicitly: its own engine config and the rendezvous of the KV channel."""
    config: EngineConfig
    # The KV channel's rendezvous: "file://PATH" on one host; "env://" for two hosts (with master_addr/master_port);
    # None for the core process (engine_core_process), which moves no KV.
    init_method: str | None = None
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class Ready:
    role: str
    max_model_len: int  # what this worker's KV cache holds
    stats: dict


@dataclass(frozen=True)
class Add:
    request: CoreRequest


@dataclass(frozen=True)
class Abort:
    request_ids: list[str]


@dataclass(frozen=True)
class Offer:
    """A prefilled sequence (first token sampled) that the prefill worker offers to the decode worker."""
    request_id: str
    output_token_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is in the offered blocks
    num_cached_tokens: int
    generator_state: bytes | None  # the request's random stream, continued on the decode side
    kv_digest: str | None  # with pd_verify_kv: hash of the blocks as sent
    request: CoreRequest | None = None  # attached by the coordinator on the way to the decode worker


@dataclass(frozen=True)
class Accept:
    request_id: str


@dataclass(frozen=True)
class Reject:
    request_id: str


@dataclass(frozen=True)
class Outputs:
    role: str
    outputs: list[CoreOutput]
    gauges: CoreGauges

    def __reduce__(self):
        # On the wire as rows of plain values: a third of the time of pickling the dataclasses, which the sending
        # core pays on its step loop every step (64 rows: 0.03 against 0.10 ms).
        return _outputs, (self.role, list(map(_core_output_row, self.outputs)), self.gauges)


_core_output_row = attrgetter(*(f.name for f in fields(CoreOutput)))


def _outputs(role: str, rows: list[tuple], gauges: CoreGauges) -> Outputs:
    return Outputs(role, [CoreOutput(*row) for row in rows], gauges)


@dataclass(frozen=True)
class Stats:
    role: str
    stats: dict


@dataclass(frozen=True)
class Error:
    role: str
    traceback: str
    refused: str | None = None  # a ValueError's message: the engine config is wrong (raised as such by the client)


@dataclass(frozen=True)
class GetStats:
    """Asks a worker for a Stats answer now (the core process: `LLM.stats()`)."""


@dataclass(frozen=True)
class Stop:
    pass
