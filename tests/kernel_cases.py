"""Shared checker: Triton kernels vs the torch reference backend on random paged layouts."""

import torch

from splitserve.layers.attention import AttentionMetadata, TorchBackend


def check_case(hq, hkv, d, bs, qlens, ctx, device="cpu", dtype=torch.float32, tol=1e-5, seed=0,
               num_splits=None):
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
    got = paged_attention(q, k_cache, v_cache, bt, cu, lens, max(qlens), max(seq_lens), scale,
                          num_splits=num_splits).float()
    assert not got.isnan().any()
    err = ((got - expect).norm() / expect.norm()).item()
    assert err < tol, (hq, hkv, d, bs, qlens, ctx, err)
    return err


CPU_CASES = [
    (4, 2, 16, 4, [1, 1, 1], [0, 5, 9]),  # decode, GQA 2, lengths cross block boundaries
    (6, 2, 16, 8, [7, 1, 12], [0, 13, 3]),  # mixed prefill (with a cached prefix) + decode, GQA 3
    (4, 4, 32, 16, [20, 3], [17, 0]),  # MHA, chunked prefill over a prefix
    (8, 1, 16, 4, [1, 2], [30, 6]),  # MQA
    # tiles inside one KV block (block-table read once per tile): decode 16-key tiles on 16- and 32-token
    # blocks, prefill 64-key tiles on 64-token blocks
    (8, 2, 16, 16, [1, 1, 1, 1], [0, 15, 16, 50]),
    (4, 2, 16, 32, [1, 1, 1], [31, 32, 77]),
    (4, 2, 16, 64, [20, 1, 3], [70, 130, 0]),
]
# decode with the context split over several programs (flash-decoding), incl. splits left empty
SPLIT_CASES = [
    ((4, 2, 16, 4, [1, 1, 1, 1], [0, 5, 70, 200]), 3),
    ((6, 2, 16, 8, [1, 1], [129, 1]), 5),
    ((8, 2, 16, 16, [1, 1, 1], [0, 47, 300]), 4),
]


def check_fused(device="cpu", dtype=torch.float32, seed=0):
    """Fused RMSNorm(+residual), q/k-norm in place, rotary and SiLU-and-mul vs the torch reference."""
    from splitserve.kernels.fused import rms_norm, rotary_, silu_and_mul
    from splitserve.layers.activation import silu_and_mul_torch
    from splitserve.layers.norm import rms_norm_torch
    from splitserve.layers.rotary import rotary_torch

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    exact = dtype == torch.float32

    def same(a, b, what):
        if exact:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), what
        else:  # bf16/fp16: the same roundings; allow one unit in the last place for exp/rsqrt differences
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert err < 1e-2, (what, err)

    for t, n in ((5, 64), (3, 96), (17, 1024)):
        x, res, w = rand(t, n), rand(t, n), rand(n)
        same(rms_norm(x, w, 1e-6), rms_norm_torch(x, w, 1e-6), "rms_norm")
        o, r = rms_norm(x, w, 1e-6, res)
        o_ref, r_ref = rms_norm_torch(x, w, 1e-6, res)
        same(o, o_ref, "rms_norm+residual")
        assert torch.equal(r, r_ref), "residual sum"
        gu = rand(t, 2 * n)
        same(silu_and_mul(gu), silu_and_mul_torch(gu), "silu_and_mul")
    # q/k heads inside a fused QKV output: in-place norm and rotary on strided views
    t, hq, hk, d, max_pos = 7, 4, 2, 32, 64
    qkv = rand(t, (hq + 2 * hk) * d)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    wq = rand(d)
    q_ref = rms_norm_torch(q.clone(), wq, 1e-6)
    rms_norm(q, wq, 1e-6, out=q)
    same(q, q_ref, "q-norm in place")
    positions = torch.randint(0, max_pos, (t,), generator=g).to(device)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((emb, emb), -1)
    cos_sin = torch.stack((emb.cos(), emb.sin()), 1).to(device)
    q_ref, k_ref = rotary_torch(q.clone(), k.clone(), positions, cos_sin)
    rotary_(q, k, positions, cos_sin)
    same(q, q_ref, "rotary q")
    same(k, k_ref, "rotary k")


# (T, Hq, Hkv, D, block_size, qk_norm, rope scaling): GQA, MQA and MHA, odd T, head_dim 64 and 128, with and
# without q/k-norm (Qwen3 / Llama), a plain and a scaled rotary table (rope_type linear/llama3/yarn only
# change the table; the layout is always HF's rotate_half)
QKV_FUSED_CASES = [
    (5, 4, 2, 64, 4, True, 1.0),  # Qwen3-like GQA 2
    (3, 8, 1, 128, 16, False, 1.0),  # Llama-like MQA, no norm
    (7, 6, 2, 64, 8, True, 1.25),  # GQA 3, scaled table
    (1, 2, 2, 128, 4, True, 1.0),  # decode of one token, MHA
    (4, 4, 2, 128, 16, False, 0.9),  # no norm, scaled table
]


def check_qkv_fused(t, hq, hkv, d, bs, qk_norm, scaling, device="cpu", dtype=torch.float32, seed=0):
    """The fused q/k-norm + rotary + KV store kernel vs TorchBackend's torch ops. Returns the max |error| of q.

    The batch ends in a padding row (slot -1) that must leave the cache alone; the caches start random, so a
    write to a wrong slot or head shows."""
    from splitserve.kernels.fused import qk_norm_rope_store

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    max_pos, eps = 64, 1e-6
    nblocks = -(-(t + 1) // bs) + 2
    k_cache, v_cache = rand(nblocks, bs, hkv, d), rand(nblocks, bs, hkv, d)
    slots = torch.randperm(nblocks * bs, generator=g)[:t].tolist() + [-1]
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    positions = torch.randint(0, max_pos, (t + 1,), generator=g).to(device)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((emb, emb), -1)
    cos_sin = (torch.stack((emb.cos(), emb.sin()), 1) * scaling).to(device)
    wq, wk = (1 + 0.5 * rand(d), 1 + 0.5 * rand(d)) if qk_norm else (None, None)
    # x 3: q/k norm must not hide a wrong scale; the ref and the kernel see the same bits
    qkv = rand(t + 1, (hq + 2 * hkv) * d) * 3
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    q_ref = TorchBackend().qk_norm_rope_store(qkv.clone(), positions, cos_sin, wq, wk, eps, kc_ref, vc_ref,
                                              slot_mapping)
    q_in = qkv[:, : hq * d].view(t + 1, hq, d).clone()
    assert not torch.allclose(q_ref, q_in), "the reference changed nothing: the test would prove nothing"
    q = qk_norm_rope_store(qkv, positions, cos_sin, wq, wk, eps, k_cache, v_cache, slot_mapping)
    assert torch.equal(v_cache, vc_ref), "v cache differs (a plain copy: must be bit-equal)"
    if dtype == torch.float32:  # one rounding per op in both: equal up to the last bit of a sum or rsqrt
        tol = dict(rtol=2e-6, atol=2e-6)
    else:  # 16-bit: the same roundings in the same places; allow one ulp where exp/rsqrt round differently
        tol = dict(rtol=1e-2, atol=1e-2)
    assert torch.allclose(k_cache, kc_ref, **tol), ("k cache", (k_cache - kc_ref).abs().max().item())
    assert torch.allclose(q, q_ref, **tol), ("q", (q.float() - q_ref.float()).abs().max().item())
    return (q.float() - q_ref.float()).abs().max().item()


def check_count_penalties(device="cpu", seed=0):
    """The one-pass repetition + frequency + presence kernel vs the sampler's torch reference (fp32), with
    rows that use none, one or both; the input logits must be left as they are."""
    from splitserve.kernels.penalties import apply_count_penalties_
    from splitserve.layers.sampler import SamplingTensors, apply_penalties

    g = torch.Generator().manual_seed(seed)
    for b, v in ((3, 50), (5, 4099), (2, 2048)):
        logits = (torch.randn(b, v, generator=g) * 4).to(device)
        seen = (torch.rand(b, v, generator=g) < 0.3).to(device)
        counts = torch.randint(0, 4, (b, v), generator=g).float().to(device)
        rep = (torch.rand(b, generator=g) * 1.5 + 0.5).to(device)
        rep[0] = 1.0
        freq, pres = (torch.rand(b, generator=g) * 4 - 2).to(device), (torch.rand(b, generator=g) * 4 - 2).to(device)
        for s_, c_ in ((seen, counts), (seen, None), (None, counts)):
            st = SamplingTensors(None, None, None, None, [], True, 0, False, False, None, any_penalty=True,
                                 seen=s_, repetition=rep if s_ is not None else None, counts=c_,
                                 frequency=freq if c_ is not None else None, presence=pres if c_ is not None else None)
            ref = apply_penalties(logits.cpu(), SamplingTensors(**{k: (x.cpu() if torch.is_tensor(x) else x)
                                                                   for k, x in vars(st).items()}))
            before = logits.clone()
            got = apply_count_penalties_(logits.clone(), s_, st.repetition, c_, st.frequency, st.presence)
            assert torch.equal(logits, before), "the input logits changed"
            assert not torch.equal(ref, logits.cpu()), "the reference changed nothing: the test would prove nothing"
            # one rounding per op in both (an FMA on the GPU may round f * c once less: 1 ulp)
            assert torch.allclose(got.cpu(), ref, rtol=1e-6, atol=1e-5), (b, v, (got.cpu() - ref).abs().max().item())
    return "ok"


def check_top_p_floor(device="cpu", seed=0, vocab_sizes=(50, 4099, 9000), tol=1e-4):
    """Each row's top-p floor (kernels/top_p.py on `device`; the sampler's sort reference on the CPU) against a
    float64 oracle: the fewest most likely tokens whose mass reaches the target. Flat, peaked and top-k-cut rows,
    targets from 0.05 to past the row's mass. fp32 sums in another order may move the boundary by the tokens whose
    float64 mass before them lies within `tol` of the target, no further; most rows have no such token."""
    from splitserve.kernels.top_p import top_p_floor as kernel
    from splitserve.layers.sampler import top_p_floor as reference

    g = torch.Generator().manual_seed(seed)
    checked = exact = 0
    for v in vocab_sizes:
        for scale in (0.05, 1.0, 4.0, 12.0):
            probs = (torch.randn(8, v, generator=g) * scale).softmax(-1)
            probs[6, torch.randperm(v, generator=g)[: v - 7]] = 0.0  # top-k cut: 7 left, not renormalised
            target = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.5, 1.5]) * probs.sum(-1)
            before = probs.double().sort(-1, descending=True).values.cumsum(-1)
            before = before - probs.double().sort(-1, descending=True).values
            t = target.double()[:, None]
            lo, hi = (before < t - tol).sum(-1).clamp(min=1), (before < t + tol).sum(-1).clamp(min=1)
            for name, floor in (("kernel", kernel(probs.to(device), target.to(device)).cpu()),
                                ("reference", reference(probs, target))):
                kept = (probs >= floor[:, None]).sum(-1)  # a floor keeps the most likely tokens, a prefix
                for r in range(8):
                    assert lo[r] <= kept[r] <= hi[r], (name, v, scale, r, int(kept[r]), int(lo[r]), int(hi[r]))
                    checked += 1
                    exact += int(lo[r] == hi[r])
    assert exact >= checked // 2, (checked, exact)  # most rows were checked to the token
    return "ok"


# (M rows, N, K, bias, silu_mul, logits): odd N and K leave partial tiles; M = 16 fills the tile's rows
GEMV_CASES = [(1, 100, 200, False, False, False), (3, 70, 130, True, False, False), (16, 100, 200, True, True, False),
              (5, 33, 256, False, True, False), (2, 300, 64, False, False, True)]


def check_gemv(m, n, k, bias, silu_mul, logits, device="cpu", dtype=torch.float16, seed=0):
    """The decode GEMV vs a float64 oracle on the same 16-bit inputs: its error may not exceed the torch path's
    (a GEMM rounded to `dtype`, then SiLU-and-mul in `dtype` where asked) by more than half again. With `logits`
    it returns fp32 holding the `dtype`-rounded product, as the torch path's `.float()` does, written into a given
    buffer. Returns the error."""
    from splitserve.kernels.gemv import gemv
    from splitserve.layers.activation import silu_and_mul_torch

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    rows = 2 * n if silu_mul else n
    x, w, b = rand(m, k), rand(rows, k) / k**0.5, (rand(rows) if bias else None)
    out = torch.full((m, n), float("nan"), device=device) if logits else None  # the sampler's buffer
    got = gemv(x, w, b, silu_mul=silu_mul, out_dtype=torch.float32 if logits else None, out=out)
    assert out is None or got.data_ptr() == out.data_ptr()
    oracle = x.double() @ w.double().t() + (b.double() if bias else 0)
    torch_path = torch.nn.functional.linear(x.float(), w.float(), b.float() if bias else None).to(dtype)
    if silu_mul:
        oracle = torch.nn.functional.silu(oracle[:, :n]) * oracle[:, n:]
        torch_path = silu_and_mul_torch(torch_path)
    err = lambda y: ((y.double() - oracle).norm() / oracle.norm()).item()
    assert got.shape == (m, n) and got.dtype == (torch.float32 if logits else dtype) and not got.isnan().any()
    if logits:
        assert torch.equal(got, got.to(dtype).float()), "logits not rounded to the input's dtype"
    assert err(got) <= 1.5 * err(torch_path) + 1e-4, (m, n, k, bias, silu_mul, err(got), err(torch_path))
    return err(got)
