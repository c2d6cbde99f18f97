"""Disjoint SM partitions of one GPU through CUDA green contexts (driver API via cuda-bindings).

The SMs are split once: `cuDevSmResourceSplitByCount` gives a group of the asked size and the rest, so
the two parts never share an SM. (Two `torch.cuda.green_contexts.GreenContext.create` calls are not
disjoint: both get the first N SMs.) Each part gets a green context and a non-blocking stream, wrapped
for torch. Hopper hands out SMs in groups of 8, so the real sizes are read back and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SM_GRANULARITY = 8  # Hopper: a partition has at least 8 SMs, in multiples of 8
MIN_DRIVER = 12040  # CUDA 12.4 introduced green contexts


def check_sm_count(name: str, value: int | None) -> None:
    """Static checks of one user-given partition size (no GPU needed)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < SM_GRANULARITY:
        raise ValueError(f"{name} must be at least {SM_GRANULARITY}, got {value!r}")
    if value % SM_GRANULARITY:
        raise ValueError(f"{name} must be a multiple of {SM_GRANULARITY} (the SM granularity of green "
                         f"contexts on Hopper), got {value}")


def check_split(memory_sm: int | None, compute_sm: int | None, total_sms: int) -> tuple[int | None, int | None]:
    """The split to use on a GPU with `total_sms`: both given; only the memory part (the compute part is
    the rest: None); only the compute part; or neither (the planner chooses)."""
    check_sm_count("decode_memory_sm", memory_sm)
    check_sm_count("decode_compute_sm", compute_sm)
    if memory_sm is None and compute_sm is None:
        return None, None
    if memory_sm is None:
        memory_sm = (total_sms - compute_sm) // SM_GRANULARITY * SM_GRANULARITY
    rest = total_sms - memory_sm
    if compute_sm is None:
        if rest < SM_GRANULARITY:
            raise ValueError(f"decode_memory_sm = {memory_sm} leaves under {SM_GRANULARITY} of the "
                             f"{total_sms} SMs for the compute partition")
        return memory_sm, None
    if memory_sm + compute_sm > total_sms:
        raise ValueError(f"decode_memory_sm + decode_compute_sm = {memory_sm} + {compute_sm} = "
                         f"{memory_sm + compute_sm} is above the {total_sms} SMs of this GPU")
    if compute_sm < rest // SM_GRANULARITY * SM_GRANULARITY:
        # The driver cuts the SMs once (group + rest); cutting the rest again is refused
        # (CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION on H200), so SMs cannot be left idle.
        raise ValueError(f"decode_compute_sm = {compute_sm} would leave SMs idle: the compute partition is the "
                         f"{rest} SMs that decode_memory_sm = {memory_sm} leaves (give {rest // 8 * 8} "
                         "or leave it unset)")
    return memory_sm, None


def _driver():
    from cuda.bindings import driver

    return driver


def _ok(result, what: str):
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    return result[1] if len(result) == 2 else result[1:]


def capability(device: torch.device) -> tuple[bool, str]:
    """Whether disjoint SM partitions can be made on `device`, and why not."""
    if device.type != "cuda":
        return False, "CPU device: green contexts need a CUDA GPU"
    try:
        driver = _driver()
    except ImportError:
        return False, "cuda-bindings is not installed (pip install cuda-bindings): no driver API for green contexts"
    if not hasattr(driver, "cuDevSmResourceSplitByCount"):
        return False, "this cuda-bindings has no green-context API (cuDevSmResourceSplitByCount)"
    try:
        version = _ok(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    except RuntimeError as e:
        return False, f"CUDA driver unavailable: {e}"
    if int(version) < MIN_DRIVER:
        return False, f"CUDA driver {int(version) // 1000}.{int(version) % 1000 // 10} is older than 12.4"
    props = torch.cuda.get_device_properties(device)
    if "MIG" in props.name:
        return False, f"{props.name} is a MIG instance: its SMs are partitioned by MIG already"
    if props.multi_processor_count < 2 * SM_GRANULARITY:
        return False, f"{props.multi_processor_count} SMs: two partitions need at least {2 * SM_GRANULARITY}"
    return True, f"green contexts available: {props.multi_processor_count} SMs, granularity {SM_GRANULARITY}"


@dataclass
class SMPartition:
    """Two disjoint SM partitions of one GPU and a torch stream on each: the group asked for ("memory": the
    decode pipeline's attention; PD multiplexing's decode) and the rest ("compute": the GEMMs; the prefill)."""
    device: torch.device
    memory_sm: int  # real sizes, as the driver made them
    compute_sm: int
    memory_stream: torch.cuda.Stream
    compute_stream: torch.cuda.Stream
    _handles: tuple = ()  # green contexts and raw streams, kept alive with the partition

    def describe(self) -> str:
        return f"memory {self.memory_sm} SMs | compute {self.compute_sm} SMs"


def split(device: torch.device, memory_sm: int) -> SMPartition:
    """Split the GPU once into a memory part of `memory_sm` SMs and a compute part of the rest."""
    driver = _driver()
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()
    _ok(driver.cuInit(0), "cuInit")
    dev = _ok(driver.cuDeviceGet(index), "cuDeviceGet")
    whole = _ok(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                "cuDeviceGetDevResource")
    groups, _, rest = _ok(driver.cuDevSmResourceSplitByCount(1, whole, 0, memory_sm), "cuDevSmResourceSplitByCount")
    memory_res, compute_res = groups[0], rest
    handles, streams = [], []
    for resource in (memory_res, compute_res):
        desc = _ok(driver.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
        ctx = _ok(driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                  "cuGreenCtxCreate")
        raw = _ok(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
                  "cuGreenCtxStreamCreate")
        handles += [ctx, raw]
        streams.append(torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", index)))
    return SMPartition(torch.device("cuda", index), int(memory_res.sm.smCount), int(compute_res.sm.smCount),
                       streams[0], streams[1], tuple(handles))


def sm_ids(stream: torch.cuda.Stream, num_blocks: int = 2048) -> set[int]:
    """The SMs that run a small kernel launched on `stream` (each block records %smid)."""
    from splitserve.kernels.smid import record_smid

    out = torch.full((num_blocks,), -1, dtype=torch.int32, device=stream.device)
    with torch.cuda.stream(stream):
        record_smid(out)
    stream.synchronize()
    return set(out.tolist())
