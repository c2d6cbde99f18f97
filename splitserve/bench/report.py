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
    if r["workload"] == "pipeline":
        from splitserve.bench.pipeline import markdown as pipeline_markdown

        return pipeline_markdown(r)
    if r["workload"] == "pdmux":
        from splitserve.bench.pdmux import markdown as pdmux_markdown

        return pdmux_markdown(r)
    head = f"# {r['workload']} — {r.get('model')} on {r.get('device')} (torch {r.get('torch')}, {r.get('date')})\n\n"
    if "runs" in r or "setups" in r:
        return head + serving_table(r) + pd_notes(r)
    if r["workload"] == "latency":
        bw = r.get("copy_bandwidth_GBps")
        lines = [head, f"Device copy bandwidth measured in this run: {bw:.0f} GB/s.\n\n" if bw else "",
                 "| batch | ctx | ms/step | tok/s | roofline ms | step ÷ roofline | graph | graph GPU ms |\n",
                 "|---|---|---|---|---|---|---|---|\n"]
        for p in r["points"]:
            if "skipped" in p:
                lines.append(f"| {p['batch']} | {p['ctx']} | {p['skipped']} | | | | | |\n")
            else:
                roof = f"{p['roofline_ms']:.3f} | {p['step_over_roofline']:.2f}" if "roofline_ms" in p else "- | -"
                gpu = f"{p['graph_gpu_ms']:.3f}" if "graph_gpu_ms" in p else "-"
                lines.append(f"| {p['batch']} | {p['ctx']} | {p['ms_per_step']:.3f} | {p['tok_s']:.0f} | {roof} "
                             f"| {p['graph']} | {gpu} |\n")
        return "".join(lines) + latency_peers(r)
    if r["workload"] == "sampling":
        return head + sampling_table(r)
    key = "output_tok_s" if r["workload"] == "throughput" else "decode_tok_s"
    lines = [head, "| engine | tok/s | compile s |\n|---|---|---|\n", f"| splitserve | {r[key]:.0f} | |\n"]
    ratios = []
    for peer in PEERS:
        hf = r.get(peer)
        if hf and key in hf:
            comp = f"{hf['compile_s']:.1f}" if "compile_s" in hf else ""
            lines.append(f"| {peer}: {hf['impl']} | {hf[key]:.0f} | {comp} |\n")
            ratios.append(f"splitserve ÷ {peer} = **{r[key] / hf[key]:.2f}×**")
        elif hf:
            lines.append(f"| {peer} | failed: {hf.get('error')} | |\n")
    if ratios:
        lines.append(f"\n{'; '.join(ratios)} (tok/s, same run, same device)\n")
    return "".join(lines)


PEERS = ("hf", "hf-compiled")


def latency_peers(r: dict) -> str:
    peer = r.get("hf-compiled")
    if not peer:
        return ""
    if "points" not in peer:
        return f"\nhf-compiled failed: {peer.get('error')}\n"
    ours = {(p["batch"], p["ctx"]): p for p in r["points"] if "ms_per_step" in p}
    lines = [f"\nPeer in the same run: {peer['impl']}.\n\n",
             "| batch | ctx | splitserve ms | hf-compiled ms | ours ÷ peer (time) | speedup | peer compile s |\n",
             "|---|---|---|---|---|---|---|\n"]
    for q in peer["points"]:
        mine = ours.get((q["batch"], q["ctx"]), {}).get("ms_per_step")
        if "error" in q:
            lines.append(f"| {q['batch']} | {q['ctx']} | {mine:.3f} | failed: {q['error'][:80]} | | | |\n")
        else:
            lines.append(f"| {q['batch']} | {q['ctx']} | {mine:.3f} | {q['ms_per_step']:.3f} | "
                         f"{q['ours_over_peer']:.2f} | **{q['speedup']:.2f}×** | {q['compile_s']:.1f} |\n")
    return "".join(lines)


def sampling_table(r: dict) -> str:
    lines = [f"Batch {r['batch']}, prompts of {r['prompt_len']} tokens, {r['new_tokens']} new tokens each "
             f"(ignore_eos); decode tok/s per mode (the median of {r.get('repeats', 1)} rounds, each running every "
             "mode once), ratio to plain sampling of the same run.\n\n",
             "| mode | decode tok/s | ÷ plain | goal |\n|---|---|---|---|\n"]
    for mode, m in r["modes"].items():
        g = r["goals"].get(mode)
        goal = "" if g is None else f"≥ {g['goal']}: {'met' if g['met'] else 'missed'}"
        lines.append(f"| {mode} | {m['decode_tok_s']:.0f} | {m['ratio_to_plain']:.3f} | {goal} |\n")
    if r.get("pending_modes"):
        lines.append(f"\nNot measured (not available in this build): {', '.join(r['pending_modes'])}.\n")
    return "".join(lines)


def _setups(r: dict) -> dict:
    """Serving results: {setup name: [run per request rate]} (bench serve has one setup)."""
    return r["setups"] if "setups" in r else {r.get("setup", "server"): r["runs"]}


def serving_table(r: dict) -> str:
    run0 = next(iter(_setups(r).values()))[0]
    slo = run0["slo"]
    lines = [f"SLO for goodput: TTFT ≤ {slo['ttft_s']} s and TPOT ≤ {slo['tpot_s'] * 1e3:.0f} ms.\n\n",
             "| setup | rate (req/s) | done req/s | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
             "| goodput (req/s) | errors |\n", "|---|---|---|---|---|---|---|---|\n"]

    def f(x, scale=1.0, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x * scale)

    for name, runs in _setups(r).items():
        for run in runs:
            t, p = run["ttft_s"], run["tpot_s"]
            lines.append(f"| {name} | {run['request_rate']} | {run['request_s']:.2f} | {run['output_tok_s']:.0f} | "
                         f"{f(t['p50'])} / {f(t['p99'])} | {f(p['p50'], 1e3, '{:.1f}')} / "
                         f"{f(p['p99'], 1e3, '{:.1f}')} | {run['goodput_request_s']:.2f} | {run['num_errors']} |\n")
    return "".join(lines)


def pd_notes(r: dict) -> str:
    lines = []
    for key, label in (("colocated_single_prompt", "colocated"), ("pd_single_prompt", "PD")):
        if key in r:
            p = r[key]
            lines.append(f"- one {p['prompt_len']}-token prompt on an idle engine, {label}: TTFT "
                         f"{p['ttft_s'] * 1e3:.1f} ms, second token at {p['second_token_s'] * 1e3:.1f} ms\n")
    if "kv_transfer" in r:
        t = r["kv_transfer"]
        lines.append(f"- KV transfer of {t['tokens']} tokens ({t['bytes'] / 1e6:.0f} MB, gather + NCCL + scatter): "
                     f"{t['seconds'] * 1e3:.2f} ms = {t['GBps']:.0f} GB/s; device-to-device copy "
                     f"{r['copy_GBps']:.0f} GB/s; ratio {t['fraction_of_copy']:.2f}\n")
    for goal, g in r.get("goals", {}).items():
        lines.append(f"- **{goal}** {'met' if g.get('met') else 'missed'}: "
                     + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                 for k, v in g.items() if k != "met") + "\n")
    return ("\n" + "".join(lines)) if lines else ""


def _plot_serving(r: dict, path: str, plt) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for name, runs in _setups(r).items():
        rates = [float(run["request_rate"]) for run in runs]  # "inf" (all at once) is drawn at 2x the top rate
        top = max([x for x in rates if x != float("inf")] or [1.0])
        finite = [x if x != float("inf") else 2 * top for x in rates]
        axes[0].plot(finite, [run["output_tok_s"] for run in runs], "o-", label=name)
        axes[1].plot(finite, [run["ttft_s"]["p99"] or float("nan") for run in runs], "o-", label=name)
        axes[2].plot(finite, [(run["tpot_s"]["p99"] or float("nan")) * 1e3 for run in runs], "o-", label=name)
    for ax, label in zip(axes, ("output tok/s", "TTFT p99 (s)", "TPOT p99 (ms)")):
        ax.set_xlabel("request rate (req/s; rightmost = all at once if inf)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{r['workload']}: {r.get('model')} on {r.get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if r["workload"] == "pdmux":
        from splitserve.bench.pdmux import plot as plot_pdmux

        return plot_pdmux(r, path, plt)
    if "runs" in r or "setups" in r:
        return _plot_serving(r, path, plt)
    if r["workload"] == "pipeline":
        from splitserve.bench.pipeline import plot as plot_pipeline

        return plot_pipeline(r, path, plt)
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
        if r["workload"] == "sampling":
            names, values = list(r["modes"]), [m["decode_tok_s"] for m in r["modes"].values()]
        else:
            names, values = ["splitserve"], [r[key]]
            for peer in PEERS:
                if r.get(peer) and key in r[peer]:
                    names.append(peer)
                    values.append(r[peer][key])
        ax.bar(names, values, color=["tab:blue", "tab:gray", "tab:olive", "tab:orange"][: len(names)])
        ax.set_ylabel("tok/s")
    ax.set_title(f"{r['workload']}: {r.get('model')} on {r.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
