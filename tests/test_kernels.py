"""Triton kernels vs the torch reference backend, run by Triton's interpreter on CPU (tiny shapes)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
import triton.runtime.interpreter as interp

# Triton 3.6's interpreter turns a loaded scalar (a 1-element numpy array) into a loop bound with
# int(array), which numpy >= 2.4 rejects; index through .item() instead. Interpreter-only shim.
_orig_patch = interp._patch_lang_tensor
def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))
interp._patch_lang_tensor = _patch

from splitserve.kernels.kv_store import store_kv
from splitserve.kernels.paged_attention import paged_attention
from splitserve.layers.attention import TorchBackend

torch.manual_seed(0)
ref = TorchBackend()
# (num_heads, num_kv_heads, head_dim, block_size, query lens, context lens before this step)
cases = [
    (4, 2, 16, 4, [1, 1, 1], [0, 5, 9]),           # decode, GQA 2, lengths cross block boundaries
    (6, 2, 16, 8, [7, 1, 12], [0, 13, 3]),         # mixed prefill (with cached prefix) + decode, GQA 3
    (4, 4, 32, 16, [20, 3], [17, 0]),              # MHA, chunked prefill over a prefix
    (8, 1, 16, 4, [1, 2], [30, 6]),                # MQA
]
for hq, hkv, d, bs, qlens, ctx in cases:
    seq_lens = [c + q for c, q in zip(ctx, qlens)]
    nblocks = sum(-(-s // bs) for s in seq_lens) + 3
    k_cache = torch.randn(nblocks, bs, hkv, d)
    v_cache = torch.randn(nblocks, bs, hkv, d)
    perm = torch.randperm(nblocks).tolist()
    tables, slots = [], []
    width = max(-(-s // bs) for s in seq_lens)
    for c, q, s in zip(ctx, qlens, seq_lens):
        blocks = [perm.pop() for _ in range(-(-s // bs))]
        tables.append(blocks + [0] * (width - len(blocks)))
        slots += [blocks[p // bs] * bs + p % bs for p in range(c, s)]
    T = sum(qlens)
    qkv = torch.randn(T, hq + 2 * hkv, d)  # k, v as strided views, like the model's fused QKV output
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    slot_mapping = torch.tensor(slots + [-1], dtype=torch.int64)  # one padding row, must be skipped
    k_pad = torch.cat([k, torch.randn(1, hkv, d)]); v_pad = torch.cat([v, torch.randn(1, hkv, d)])
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref.store_kv(k, v, kc_ref, vc_ref, slot_mapping[:-1])
    store_kv(k_pad, v_pad, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), "store_kv differs"
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    bt = torch.tensor(tables, dtype=torch.int32)
    from splitserve.layers.attention import AttentionMetadata
    meta = AttentionMetadata(slot_mapping, cu, lens, bt, max(qlens), max(seq_lens))
    scale = d ** -0.5
    expect = ref.attend(q.contiguous(), kc_ref, vc_ref, meta, scale)
    got = paged_attention(q.contiguous(), k_cache, v_cache, bt, cu, lens, max(qlens), max(seq_lens), scale)
    err = ((got - expect).norm() / expect.norm()).item()
    assert err < 1e-5, (hq, hkv, d, bs, qlens, ctx, err)
    print("ok", hq, hkv, d, bs, qlens, ctx, f"{err:.2e}")
"""


def test_triton_kernels_match_torch_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok") == 4
