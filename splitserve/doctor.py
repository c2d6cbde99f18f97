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


def report() -> list[tuple[str, str]]:
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
    return rows


def main() -> None:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
