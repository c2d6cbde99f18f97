"""Shared checker: Triton kernels vs the torch reference backend on random paged layouts."""

import torch

from splitserve.layers.attention import AttentionMetadata, TorchBackend


def check_case(hq, hkv, d, bs, qlens, ctx, device="cpu", dtype=torch.float32, tol=1e-5, seed=0):
    from splitserve.kernels.kv_store import store_kv
    from splitserve.kernels.paged_attention import paged_attention

    g = torch.Generator().manual_seed(seed)
    ref = TorchBackend()
    seq_lens = [c + q for c, q in zip(ctx, qlens)]
    nblocks = sum(-(-s // bs) for s in seq_lens) + 3
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    k_cache, v_cache = rand(nblocks, bs, hkv, d), rand(nblocks, bs, hkv, d)
    perm = torch.randperm(nblocks, generator=g).tolist()
    width = max(-(-s // bs) for s in seq_lens)
    tables, slots = [], []
    for c, s in zip(ctx, seq_lens):
        blocks = [perm.pop() for _ in range(-(-s // bs))]
        tables.append(blocks + [0] * (width - len(blocks)))
        slots += [blocks[p // bs] * bs + p % bs for p in range(c, s)]
    num_tokens = sum(qlens)
    qkv = rand(num_tokens + 1, hq + 2 * hkv, d)  # k, v as strided views of a fused QKV, plus a padding row
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    slot_mapping = torch.tensor(slots + [-1], dtype=torch.int64, device=device)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref.store_kv(k[:-1], v[:-1], kc_ref, vc_ref, slot_mapping[:-1])
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), "store_kv differs from the reference"
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    bt = torch.tensor(tables, dtype=torch.int32, device=device)
    meta = AttentionMetadata(slot_mapping, cu, lens, bt, max(qlens), max(seq_lens))
    scale = d**-0.5
    q = q[:-1].contiguous()
    # The reference in fp32 from the same (rounded) inputs
    expect = ref.attend(q.float(), kc_ref.float(), vc_ref.float(), meta, scale)
    got = paged_attention(q, k_cache, v_cache, bt, cu, lens, max(qlens), max(seq_lens), scale).float()
    assert not got.isnan().any()
    err = ((got - expect).norm() / expect.norm()).item()
    assert err < tol, (hq, hkv, d, bs, qlens, ctx, err)
    return err


CPU_CASES = [
    (4, 2, 16, 4, [1, 1, 1], [0, 5, 9]),  # decode, GQA 2, lengths cross block boundaries
    (6, 2, 16, 8, [7, 1, 12], [0, 13, 3]),  # mixed prefill (with a cached prefix) + decode, GQA 3
    (4, 4, 32, 16, [20, 3], [17, 0]),  # MHA, chunked prefill over a prefix
    (8, 1, 16, 4, [1, 2], [30, 6]),  # MQA
]
