"""A probe kernel: each program writes the id of the SM it ran on (%smid). Used to check SM partitions."""

import torch
import triton
import triton.language as tl


@triton.jit
def _record_smid_kernel(out_ptr, spin: tl.constexpr):
    pid = tl.program_id(0)
    smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    # Stay on the SM a little, so that the launch spreads over every SM the stream may use.
    acc = smid
    for _ in range(spin):
        acc = tl.inline_asm_elementwise("add.u32 $0, $1, 0;", "=r,r", [acc], dtype=tl.int32, is_pure=False,
                                        pack=1)
    tl.store(out_ptr + pid, acc)


def record_smid(out: torch.Tensor, spin: int = 2000) -> None:
    _record_smid_kernel[(out.numel(),)](out, spin)
