"""Triton kernels vs the torch reference backend, run by Triton's interpreter on CPU (tiny shapes)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SHIM = r"""
import triton.runtime.interpreter as interp

# Triton 3.6's interpreter turns a loaded scalar (a 1-element numpy array) into a loop bound with
# int(array), which numpy >= 2.4 rejects; index through .item() instead. Interpreter-only shim.
_orig_patch = interp._patch_lang_tensor
def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))
interp._patch_lang_tensor = _patch
"""

SCRIPT = SHIM + r"""
import torch
import splitserve.kernels.paged_attention as pa
from kernel_cases import CPU_CASES, SPLIT_CASES, check_case, check_fused

class NoMerge:  # one split: the attention kernel writes the output itself, no merge kernel is launched
    def __getitem__(self, grid):
        raise AssertionError("merge kernel launched for a single split")
merge, pa._merge_splits_kernel = pa._merge_splits_kernel, NoMerge()
for case in CPU_CASES:
    print("ok", case, check_case(*case))
print("ok", check_case(*SPLIT_CASES[0][0], num_splits=1))
pa._merge_splits_kernel = merge
for case, splits in SPLIT_CASES:
    print("ok split", splits, check_case(*case, num_splits=splits))
check_fused(dtype=torch.float32)
check_fused(dtype=torch.float16)
print("ok fused")
"""


QKV_FUSED_SCRIPT = SHIM + r"""
import torch
from kernel_cases import QKV_FUSED_CASES, check_qkv_fused
for case in QKV_FUSED_CASES:
    print("ok", case, check_qkv_fused(*case))
print("ok fp16", check_qkv_fused(*QKV_FUSED_CASES[2], dtype=torch.float16))
"""


PENALTIES_SCRIPT = SHIM + r"""
from kernel_cases import check_count_penalties
print(check_count_penalties(), "count penalties")
"""


GEMV_SCRIPT = SHIM + r"""
from kernel_cases import GEMV_CASES, check_gemv
for case in GEMV_CASES:
    print("ok", case, check_gemv(*case))
"""


TOP_P_SCRIPT = SHIM + r"""
from kernel_cases import check_top_p_floor
print(check_top_p_floor(), "top-p floor")
"""


def _interpret(script: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_triton_kernels_match_torch_reference_in_interpreter():
    assert _interpret(SCRIPT).count("ok") == 12


def test_fused_qk_norm_rope_store_matches_torch_reference_in_interpreter():
    out = _interpret(QKV_FUSED_SCRIPT)
    assert out.count("ok") == 6, out


def test_count_penalties_kernel_matches_torch_reference_in_interpreter():
    assert "ok count penalties" in _interpret(PENALTIES_SCRIPT)


def test_top_p_floor_kernel_matches_a_float64_oracle_in_interpreter():
    assert "ok top-p floor" in _interpret(TOP_P_SCRIPT)


def test_decode_gemv_matches_a_float64_oracle_in_interpreter():
    from kernel_cases import GEMV_CASES

    out = _interpret(GEMV_SCRIPT)
    assert out.count("ok") == len(GEMV_CASES), out


def test_decode_split_count_and_tiles_follow_the_context_bound_and_the_grid():
    """decode_splits: one split up to SPLIT_FROM_KEYS, then chunks of at least SPLIT_MIN_KEYS, up to two programs per
    SM (132 here) and 64 splits; decode_launch: the large-batch tiles from LARGE_DECODE_PROGRAMS programs."""
    import torch

    from splitserve.kernels import paged_attention as pa

    gpu = torch.device("cuda", 0)  # never touched: the SM count is set, as on an H200
    pa._SM_COUNT[gpu] = 132
    try:
        assert pa.decode_splits(torch.device("cpu"), 8, 40960) == 1
        assert pa.decode_splits(gpu, 8, 256) == 1  # never split up to 256 keys
        assert pa.decode_splits(gpu, 8, 257) == 5  # then 64-key chunks: ceil(257 / 64)
        assert pa.decode_splits(gpu, 8, 1025) == 17
        assert pa.decode_splits(gpu, 8, 40960) == 33  # two programs per SM: ceil(264 / 8)
        assert pa.decode_splits(gpu, 2048, 40960) == 1  # the grid is full without splitting
        assert pa.decode_splits(gpu, 1, 40960) == 64  # the cap
    finally:
        del pa._SM_COUNT[gpu]
    assert pa.decode_launch(1023, 16) == pa.DECODE_LAUNCH
    assert pa.decode_launch(1024, 16) == pa.LARGE_DECODE_LAUNCH
    assert pa.decode_launch(8, 8) == pa.WIDE_LAUNCH  # 16-key tiles need blocks they fit in
