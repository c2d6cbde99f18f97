"""`splitserve doctor`: what this machine offers splitserve, and why a feature would be off."""

from __future__ import annotations

import platform
import sys


def _driver_version() -> str:
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
        if int(err) == 0:
            return f"{version // 1000}.{version % 1000 // 10} (CUDA driver API, via cuda-bindings)"
    except ImportError:
        pass
    try:
        import torch

        version = torch._C._cuda_getDriverVersion()
        return f"{version // 1000}.{version % 1000 // 10}"
    except Exception as e:  # no driver at all
        return f"unavailable ({type(e).__name__})"


def _topology() -> dict[tuple[int, int], str]:
    """Link type between GPU pairs from `nvidia-smi topo -m` (NV# = NVLink, PIX/PXB/PHB/NODE/SYS = PCIe paths)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = [ln.split() for ln in text.splitlines()]
    rows = [r for r in rows if len(r) > 1 and r[0].startswith("GPU") and r[0][3:].isdigit()
            and not r[1].startswith("GPU")]  # not the header line
    links = {}
    for row in rows:  # the first len(rows) columns are the GPUs (NICs, affinities follow)
        for j, cell in enumerate(row[1:1 + len(rows)]):
            links[(int(row[0][3:]), j)] = cell
    return links


def pd_report(prefill_id: int, decode_id: int) -> tuple[str, str]:
    """Whether two-GPU PD can run on the chosen pair, and how KV would travel."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return ("two-GPU PD", f"GPU mode unavailable: needs two GPUs, found {count} "
                              "(enable_two_gpu_pd with device='cpu' runs two CPU workers over gloo)")
    if max(prefill_id, decode_id) >= count or prefill_id == decode_id:
        return ("two-GPU PD", f"invalid pair {prefill_id}->{decode_id} (GPUs 0..{count - 1}, ids must differ)")
    p2p = torch.cuda.can_device_access_peer(prefill_id, decode_id)
    link = _topology().get((prefill_id, decode_id), "unknown")
    nvlink = link.startswith("NV")
    how = "NVLink" if nvlink else ("PCIe P2P" if p2p else "host memory (no P2P)")
    return ("two-GPU PD", f"GPU {prefill_id} -> GPU {decode_id}: p2p {'yes' if p2p else 'no'}, link {link}; "
                          f"NCCL moves KV over {how}")


def report(prefill_id: int = 0, decode_id: int = 1) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("python", f"{sys.version.split()[0]} ({platform.machine()})")]
    import torch

    rows.append(("torch", torch.__version__))
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed (CUDA path needs it; CPU path does not)"))
    try:
        import transformers

        rows.append(("transformers", transformers.__version__))
    except ImportError:
        rows.append(("transformers", "not installed"))
    if not torch.cuda.is_available():
        rows.append(("cuda", f"not available: CPU path only (torch built with CUDA {torch.version.cuda})"))
        rows.append(pd_report(prefill_id, decode_id))
        rows.append(("decode pipeline", "unavailable: CPU device: green contexts need a CUDA GPU"))
        return rows
    rows.append(("cuda runtime (torch)", str(torch.version.cuda)))
    rows.append(("cuda driver", _driver_version()))
    count = torch.cuda.device_count()
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        rows.append((f"gpu {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                 f"{p.total_memory / 2**30:.1f} GiB"))
    for i in range(count):
        for j in range(count):
            if i != j:
                ok = torch.cuda.can_device_access_peer(i, j)
                rows.append((f"p2p {i}->{j}", "yes" if ok else "no"))
    rows.append(pd_report(prefill_id, decode_id))
    from splitserve.pipeline.green import capability

    ok, reason = capability(torch.device("cuda", decode_id if decode_id < count else 0))
    rows.append(("decode pipeline", ("available: " if ok else "unavailable: ") + reason))
    return rows


def main(prefill_id: int | None = None, decode_id: int | None = None) -> None:
    rows = report(0 if prefill_id is None else prefill_id, 1 if decode_id is None else decode_id)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
