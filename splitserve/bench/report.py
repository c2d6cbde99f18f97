"""Write a benchmark result as JSON, a PNG plot and a markdown table."""

from __future__ import annotations

import json
import os


def write(result: dict, out_dir: str, name: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(result))
    try:
        plot(result, paths[2])
    except ImportError:
        paths.pop()
    return paths


def markdown(r: dict) -> str:
    head = f"# {r['workload']} — {r.get('model')} on {r.get('device')} (torch {r.get('torch')}, {r.get('date')})\n\n"
    if r["workload"] == "latency":
        bw = r.get("copy_bandwidth_GBps")
        lines = [head, f"Device copy bandwidth measured in this run: {bw:.0f} GB/s.\n\n" if bw else "",
                 "| batch | ctx | ms/step | tok/s | roofline ms | step ÷ roofline | graph |\n",
                 "|---|---|---|---|---|---|---|\n"]
        for p in r["points"]:
            if "skipped" in p:
                lines.append(f"| {p['batch']} | {p['ctx']} | {p['skipped']} | | | | |\n")
            else:
                roof = f"{p['roofline_ms']:.3f} | {p['step_over_roofline']:.2f}" if "roofline_ms" in p else "- | -"
                lines.append(f"| {p['batch']} | {p['ctx']} | {p['ms_per_step']:.3f} | {p['tok_s']:.0f} | {roof} "
                             f"| {p['graph']} |\n")
        return "".join(lines)
    key = "output_tok_s" if r["workload"] == "throughput" else "decode_tok_s"
    lines = [head, "| engine | tok/s |\n|---|---|\n", f"| splitserve | {r[key]:.0f} |\n"]
    hf = r.get("hf")
    if hf and key in hf:
        lines.append(f"| {hf['impl']} | {hf[key]:.0f} |\n")
        lines.append(f"\nsplitserve ÷ HF = **{r[key] / hf[key]:.1f}×** (same run, same device)\n")
    elif hf:
        lines.append(f"| HF | failed: {hf.get('error')} |\n")
    return "".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if r["workload"] == "latency":
        pts = [p for p in r["points"] if "ms_per_step" in p]
        for batch in sorted({p["batch"] for p in pts}):
            row = [p for p in pts if p["batch"] == batch]
            line, = ax.plot([p["ctx"] for p in row], [p["ms_per_step"] for p in row], "o-", label=f"batch {batch}")
            if all("roofline_ms" in p for p in row):
                ax.plot([p["ctx"] for p in row], [p["roofline_ms"] for p in row], "--", color=line.get_color(),
                        alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel("ms per decode step (dashed: HBM roofline)")
        ax.legend(fontsize=8)
    else:
        key = "output_tok_s" if r["workload"] == "throughput" else "decode_tok_s"
        names, values = ["splitserve"], [r[key]]
        if r.get("hf") and key in r["hf"]:
            names.append("HF transformers")
            values.append(r["hf"][key])
        ax.bar(names, values, color=["tab:blue", "tab:gray"][: len(names)])
        ax.set_ylabel("tok/s")
    ax.set_title(f"{r['workload']}: {r.get('model')} on {r.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
