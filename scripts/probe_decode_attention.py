"""Why decode attention loses bandwidth on a green-context partition, and which kernel shape keeps it.

Times, on the whole GPU and on partitions, graph replays of:
- the shipped paged-attention kernel (one program per (sequence, KV head), K/V gathered token by token),
  over tile width, warps and pipeline stages;
- a decode-only variant that walks the context one KV block (16 tokens) at a time, loading each K/V tile
  with one TMA descriptor load (or one pointer load) after one scalar block-table load.
Each on its own and beside a GEMM load on the other partition (what the pipeline's attention stage sees).
Usage: python scripts/probe_decode_attention.py [BATCH] [CTX] [SMS...]
"""

import json
import os
import sys

import torch
import triton
import triton.language as tl

from splitserve.kernels.paged_attention import paged_attention


@triton.jit
def _decode_block_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_desc, v_desc, out_ptr, block_tables_ptr, seq_lens_ptr,
                         scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
                         KV_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr, SUB: tl.constexpr):
    """One KV block (16 tokens) per step: the block id is one scalar load, the K/V tile one contiguous-row
    load (TMA or pointer), so Triton can pipeline num_stages blocks ahead without register staging."""
    kv_head, seq = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    m = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + m
    m_valid = m < GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + head[:, None] * stride_qh + d[None, :], mask=m_valid[:, None], other=0.0)
    t = tl.arange(0, KV_BLOCK_SIZE)
    table = block_tables_ptr + seq * stride_bt
    num_blocks = tl.cdiv(seq_len, KV_BLOCK_SIZE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for b in range(0, num_blocks, SUB):
        for i in tl.static_range(SUB):
            blk = tl.load(table + b + i, mask=b + i < num_blocks, other=0)
            n = (b + i) * KV_BLOCK_SIZE + t
            valid = n < seq_len
            if USE_TMA:
                k = k_desc.load([blk * KV_BLOCK_SIZE, kv_head * HEAD_DIM])
                v = v_desc.load([blk * KV_BLOCK_SIZE, kv_head * HEAD_DIM])
                v = tl.where(valid[:, None], v, 0.0)  # slots past the context may hold anything
            else:
                offs = blk.to(tl.int64) * stride_kb + t * stride_ks + kv_head * stride_kh
                k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
                v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + seq * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None])


def block_attention(q, k_cache, v_cache, tables, lens, scale, variant: dict):
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, heads, dim = q.shape
    num_blocks, bs, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    k_desc = TensorDescriptor.from_tensor(k_cache.view(num_blocks * bs, kv_heads * dim), [bs, dim])
    v_desc = TensorDescriptor.from_tensor(v_cache.view(num_blocks * bs, kv_heads * dim), [bs, dim])
    compiled = _decode_block_kernel[(kv_heads, batch)](
        q, k_cache, v_cache, k_desc, v_desc, out, tables, lens, scale, q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        KV_BLOCK_SIZE=bs, GROUP=heads // kv_heads, HEAD_DIM=dim,
        BLOCK_M=max(16, triton.next_power_of_2(heads // kv_heads)), **variant)
    return out, compiled


def main() -> None:
    from splitserve.pipeline import green

    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    sms_list = [int(x) for x in sys.argv[3:]] or [48, 64, 80]
    dev = torch.device("cuda", 0)
    heads, kv_heads, dim, bs = 32, 8, 128, 16  # Qwen3-8B attention, splitserve's KV block size
    blocks_per_seq = -(-ctx // bs)
    num_blocks = 200_000
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = ((torch.arange(batch, device=dev)[:, None] * blocks_per_seq
               + torch.arange(blocks_per_seq, device=dev)[None, :]) % num_blocks).int()
    q = torch.randn(batch, heads, dim, device=dev, dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    nbytes = 2 * batch * ctx * kv_heads * dim * 2
    scale = dim**-0.5

    def shipped(launch):
        return lambda: paged_attention(q, k_cache, v_cache, tables, qsl, lens, 1, ctx, scale, num_splits=1,
                                       launch=launch)

    variants = {"shipped (decode default)": (shipped({}), None)}
    for bn, warps, stages in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (16, 1, 4), (16, 1, 8), (16, 2, 6), (32, 1, 6),
                              (32, 2, 4), (32, 4, 4), (16, 4, 6)]:
        variants[f"shipped BN{bn} w{warps} st{stages}"] = (
            shipped({"BLOCK_N": bn, "num_warps": warps, "num_stages": stages}), None)
    for tma, sub, stages, warps in [(0, 1, 6, 1), (1, 1, 6, 1)]:
        v = dict(USE_TMA=tma, SUB=sub, num_stages=stages, num_warps=warps)
        variants[f"block {'tma' if tma else 'ptr'} sub{sub} st{stages} w{warps}"] = (
            (lambda v=v: block_attention(q, k_cache, v_cache, tables, lens, scale, v)[0]), v)

    # partitions: (attention's stream on the memory partition, the compute partition's for the contention run)
    streams = {"all": (torch.cuda.Stream(), None)}
    keep = []
    for sms in sms_list:
        part = green.split(dev, sms)
        streams[str(part.memory_sm)] = (part.memory_stream, part.compute_stream)
        keep.append(part)
    # FFN-like load for the other partition: gate/up GEMMs of a 512-row micro-batch (Qwen3-8B)
    x = torch.randn(512, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, 24576, device=dev, dtype=torch.bfloat16)
    y = x @ w

    def gemm_load(stream):  # launched eagerly: ~45 ms of GEMMs on that partition
        def launch():
            with torch.cuda.stream(stream):
                for _ in range(150):
                    torch.matmul(x, w, out=y)
        return launch

    gemm_loads = {name: gemm_load(other) for name, (_, other) in streams.items() if other is not None}
    reference = shipped({})().float()

    def timed(graph, stream, load=None) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5 if load is None else 3):
            torch.cuda.synchronize()
            if load is not None:
                load()
            with torch.cuda.stream(stream):
                start.record(stream)
                graph.replay()
                end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 10)
        torch.cuda.synchronize()
        return sorted(times)[len(times) // 2]

    results = []
    for name, (fn, _variant) in variants.items():
        row = {"variant": name}
        try:
            out = fn()
            torch.cuda.synchronize()
            row["max_err_vs_shipped"] = float((out.float() - reference).abs().max())
            assert row["max_err_vs_shipped"] < 2e-2, row
            for sname, (stream, _) in streams.items():
                with torch.cuda.stream(stream):
                    fn()
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for _ in range(10):
                        fn()
                row[sname] = round(nbytes / (timed(graph, stream) / 1e3) / 1e9)
                if sname in gemm_loads:
                    row[sname + "+gemm"] = round(nbytes / (timed(graph, stream, gemm_loads[sname]) / 1e3) / 1e9)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results.append(row)
        print(json.dumps(row), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, f"decode-attention-b{batch}-ctx{ctx}.json"), "w") as f:
            json.dump({"batch": batch, "ctx": ctx, "unit": "GB/s of K+V read", "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
