"""Decode attention's launch at a large batch (issue 15's P4: Qwen3-8B heads, batch 256, ctx 2048): the shipped
tiles (16 keys, one warp, six stages) against other tile widths, warps and pipeline depths, each timed as a CUDA
graph of 10 calls over one layer's 2.1 GB of K/V. Prints GB/s of K/V read, beside the device copy bandwidth.
With --grid: the shipped launch and the best three of batch 256, ctx 2048 over batch x ctx, to choose by.
Usage: python scripts/probe_attention_launch.py OUT_JSON [BATCH] [CTX] [BLOCK_SIZE] | OUT_JSON --grid
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from splitserve.bench.timing import graph_seconds_per_call
from splitserve.bench.workloads import device_copy_bandwidth
from splitserve.kernels.paged_attention import DECODE_LAUNCH, paged_attention


def decode_batch(batch: int, ctx: int, bs: int, hq: int = 32, hkv: int = 8, d: int = 128):
    """q, caches, block tables (a random permutation of the blocks), query starts and lengths of `batch` decode
    rows with `ctx` keys each (Qwen3-8B heads by default)."""
    blocks_per_seq = ctx // bs
    nblocks = batch * blocks_per_seq
    k_cache = torch.randn(nblocks, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(nblocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    return q, k_cache, torch.randn_like(k_cache), tables, qsl, lens


def time_launch(q, k_cache, v_cache, tables, qsl, lens, ctx: int, launch: dict) -> float:
    """Seconds per call, as a graph of 10 calls replayed 5 times (after one replay)."""
    return graph_seconds_per_call(
        lambda i: paged_attention(q, k_cache, v_cache, tables, qsl, lens, 1, ctx, q.shape[-1]**-0.5, launch=launch),
        calls=10, replays=5, warmup=1)


def grid(out: str) -> None:
    bs = 16
    launches = {"shipped": dict(DECODE_LAUNCH), "n64w2s4": {"BLOCK_N": 64, "num_warps": 2, "num_stages": 4},
                "n32w1s4": {"BLOCK_N": 32, "num_warps": 1, "num_stages": 4},
                "n64w4s4": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}}
    result = {"device": torch.cuda.get_device_name(), "launches": launches, "points": []}
    for batch, ctx in itertools.product([1, 4, 16, 64, 128, 256, 512], [512, 2048, 8192]):
        q, k_cache, v_cache, tables, qsl, lens = decode_batch(batch, ctx, bs)
        row = {"batch": batch, "ctx": ctx}
        for name, launch in launches.items():
            paged_attention(q, k_cache, v_cache, tables, qsl, lens, 1, ctx, q.shape[-1]**-0.5, launch=launch)
            row[name] = time_launch(q, k_cache, v_cache, tables, qsl, lens, ctx, launch) * 1e6  # µs per call
        result["points"].append(row)
        print(f"b{batch} ctx{ctx}: " + " ".join(f"{n} {row[n]:.1f}us (x{row[n] / row['shipped']:.3f})"
                                               for n in launches), flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    out = sys.argv[1]
    if sys.argv[2:3] == ["--grid"]:
        return grid(out)
    batch, ctx, bs = [int(a) for a in sys.argv[2:5]] + [256, 2048, 16][len(sys.argv[2:5]):]
    torch.manual_seed(0)
    q, k_cache, v_cache, tables, qsl, lens = decode_batch(batch, ctx, bs)
    d = q.shape[-1]
    kv_bytes = 2 * k_cache.numel() * 2
    copy = device_copy_bandwidth(q.device) / 1e9
    result = {"device": torch.cuda.get_device_name(), "batch": batch, "ctx": ctx, "block_size": bs,
              "copy_GBps": copy, "kv_GB": kv_bytes / 1e9, "shipped": DECODE_LAUNCH, "configs": {}}
    ref = paged_attention(q, k_cache, v_cache, tables, qsl, lens, 1, ctx, d**-0.5).float()
    configs = [dict(DECODE_LAUNCH)] + [{"BLOCK_N": n, "num_warps": w, "num_stages": s} for n, w, s in
                                        itertools.product([16, 32, 64], [1, 2, 4], [3, 4, 6, 8])]
    for launch in configs:
        name = f"n{launch['BLOCK_N']}w{launch['num_warps']}s{launch['num_stages']}"
        if name in result["configs"]:
            continue
        try:
            got = paged_attention(q, k_cache, v_cache, tables, qsl, lens, 1, ctx, d**-0.5, launch=launch).float()
            assert (got - ref).abs().max().item() < 2e-2
            ms = time_launch(q, k_cache, v_cache, tables, qsl, lens, ctx, launch) * 1e3
            result["configs"][name] = {"ms": ms, "GBps": kv_bytes / ms / 1e6}
        except Exception as e:
            result["configs"][name] = {"error": str(e).splitlines()[0][:200]}
    ok = sorted((v["ms"], k) for k, v in result["configs"].items() if "ms" in v)
    shipped = next(iter(result["configs"].values()))  # the first config is the shipped one
    print(f"copy {copy:.0f} GB/s; shipped {shipped['ms']:.3f} ms ({shipped['GBps']:.0f} GB/s); best: " +
          ", ".join(f"{k} {ms:.3f} ms ({kv_bytes / ms / 1e6:.0f} GB/s)" for ms, k in ok[:6]), flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
