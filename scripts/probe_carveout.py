"""Do cuBLAS GEMMs lose to wave quantisation on a green-context partition, and does telling cuBLASLt the
partition's SM count (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, torch's SM carve-out) win it back?

cuBLAS sizes a GEMM's grid for the SMs the device reports (132 on an H200). On a partition of 84 SMs a grid
of 132 persistent CTAs runs in two rounds. Per partition size and Qwen3-8B projection shape, GPU time of
F.linear on the partition's stream alone: cuBLAS (default), cuBLASLt, cuBLASLt with the carve-out set to the
SMs outside the partition; the whole GPU for reference. Prefill row counts on the prefill side (the rest of a
split whose decode side has D SMs), decode row counts on the decode side. Also the same prefill GEMMs while
decode GEMMs run on the other side (the case PD multiplexing lives in).
Usage: python3 scripts/probe_carveout.py OUT.json
"""
import json
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from splitserve.pipeline import green

dev = torch.device("cuda", 0)
TOTAL = torch.cuda.get_device_properties(dev).multi_processor_count
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}  # K, N
W = {k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.02 for k, (kk, n) in SHAPES.items()}
X = torch.randn(8192, 12288, device=dev, dtype=torch.bfloat16)


@contextmanager
def blas(mode: str, sms: int):
    prev = torch.backends.cuda.preferred_blas_library()
    if mode != "cublas":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    if mode == "cublaslt_target":
        torch._C._set_sm_carveout_experimental(TOTAL - sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(prev)


def gemms(rows: int, reps: int = 1) -> None:
    for _ in range(reps):
        for name, (k, _) in SHAPES.items():
            F.linear(X[:rows, :k], W[name])


def timed(stream, rows: int, mode: str, sms: int, iters: int = 10, side=None) -> float:
    """ms per pass over the four shapes, on `stream`; `side`: (stream, rows, sms) of GEMMs kept running beside."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), blas(mode, sms):
        gemms(rows, 2)
    if side is not None:
        s_stream, s_rows, s_sms = side
        s_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s_stream), blas("cublas", s_sms):
            gemms(s_rows, 800)  # outlasts the timed passes below (checked: `beside`)
        end_side = torch.cuda.Event()
        end_side.record(s_stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream), blas(mode, sms):
        start.record()
        gemms(rows, iters)
        end.record()
    end.synchronize()
    beside = side is None or not end_side.query()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    return ms if beside else float("nan")


def main(out: str) -> None:
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "total_sms": TOTAL,
           "shapes_K_N": SHAPES, "rows": {}}
    whole = torch.cuda.Stream()
    modes = ["cublas", "cublaslt", "cublaslt_target"]
    for rows in (2048, 8192):
        res["rows"][f"whole_{rows}"] = {m: timed(whole, rows, m, TOTAL) for m in ("cublas", "cublaslt")}
    for decode_sm in (32, 48, 64, 96):
        part = green.split(dev, decode_sm)
        d, p = part.memory_sm, part.compute_sm
        for rows in (2048, 8192):
            res["rows"][f"prefill_{p}sm_{rows}"] = {m: timed(part.compute_stream, rows, m, p) for m in modes}
            res["rows"][f"prefill_{p}sm_{rows}_beside_decode_{d}sm_64rows"] = {
                m: timed(part.compute_stream, rows, m, p, side=(part.memory_stream, 64, d)) for m in modes}
        for rows in (32, 64, 128):
            res["rows"][f"decode_{d}sm_{rows}"] = {m: timed(part.memory_stream, rows, m, d) for m in modes}
        print(json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in res["rows"].items()
                          if f"_{d}sm" in k or f"_{p}sm" in k}), flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
