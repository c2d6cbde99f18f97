"""`splitserve bench pdmux`: issue 13's one-GPU serving simulation. Colocated engines with chunked prefill at
several chunk sizes (`max_num_batched_tokens`) against PD multiplexing (prefill ‖ decode on two SM partitions
of the same GPU; each setup's `pd_multiplex` in the result says how the mode actually ran), in one process,
one setup at a time on the same device.

Every setup gets the same requests at the same Poisson arrival times (seeded). One engine per setup serves
every rate in turn (start-up is the expensive part), warmed up once. Each rate is a time box of duration_s:

    [0, warmup_s)                        arrivals that fill the engine: not measured
    [warmup_s, duration_s - drain_s)     measured arrivals
    [duration_s - drain_s, duration_s)   arrivals that keep the load on while the measured ones finish

At duration_s the run stops and aborts what is left (pd.drive's stop_at), so a rate beyond capacity costs no
more device time than one below it. A measured request still running then has lived longer than drain_s. With
the default drain_s (slo_ttft + longest output × slo_itl) it could still meet the SLO only if a few of its gaps
were far above slo_itl while their p99 stayed below, so it counts as a miss, and as a TTFT of (stop - arrival)
if it had no token yet (a lower bound). `left_out` counts both.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from splitserve.bench.pd import UNFINISHED, drive, make_requests, serving_kwargs, single_prompt_ttft, warm_up
from splitserve.bench.serving import RequestRecord, poisson_arrivals
from splitserve.engine.gc_heap import freeze_startup_heap, thaw_startup_heap

MUX = "pdmux"
COLOCATED = "colocated-"  # + chunk size: colocated-512, ...


@dataclass(frozen=True)
class Box:
    """One rate's time box, in seconds after its start (see the module docstring)."""
    duration_s: float
    warmup_s: float
    drain_s: float

    @property
    def measured(self) -> tuple[float, float]:
        return self.warmup_s, self.duration_s - self.drain_s


def default_drain_s(slo_ttft: float, slo_itl: float, max_output: int) -> float:
    """Time a request meeting the SLO may take at most (TTFT + every gap at the ITL bound), rounded up."""
    return float(math.ceil(slo_ttft + max_output * slo_itl))


ITL_TARGET = MUX + "-itl"  # + a decode step target in ms: pdmux-itl12, ...


def setup_names(chunks: list[int], mux_chunks: list[int] = (), itl_targets: list[float] = ()) -> list[str]:
    """pdmux (its chunk: --max-num-batched-tokens), pdmux-N for other prefill chunks, pdmux-itlT for decode
    step targets of T ms (pd_itl_target_ms), colocated-N."""
    return ([MUX] + [f"{MUX}-{c}" for c in mux_chunks] + [f"{ITL_TARGET}{t:g}" for t in itl_targets]
            + [f"{COLOCATED}{c}" for c in chunks])


def is_mux(name: str) -> bool:
    return name == MUX or name.startswith(MUX + "-")


def arrivals_in_box(rate: float, duration_s: float, seed: int) -> list[float]:
    """Poisson offsets below duration_s. The same seed gives every rate the same gaps, scaled."""
    n = int(rate * duration_s + 6 * math.sqrt(rate * duration_s) + 10)
    while True:
        offsets = poisson_arrivals(n, rate, seed)
        if offsets[-1] >= duration_s:
            return [t for t in offsets if t < duration_s]
        n *= 2


def _pct(values, qs=(50, 99, 99.9)) -> dict:
    if len(values) == 0:
        return {**{f"p{q:g}": None for q in qs}, "mean": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {**{f"p{q:g}": float(np.percentile(a, q)) for q in qs}, "mean": float(a.mean()),
            "max": float(a.max()), "n": int(a.size)}


def measure(records: list[RequestRecord], box: Box, stop_s: float, slo_ttft: float, slo_itl: float) -> dict:
    """One (setup, rate): records from pd.drive(timeline=True); stop_s: when the run actually stopped."""
    lo, hi = box.measured
    measured = [r for r in records if lo <= r.arrival_s < hi]
    gaps, per_request, rows, good = [], [], [], 0
    for r in measured:
        g = np.diff(r.token_s)
        gaps.append(g)
        p99 = float(np.percentile(g, 99)) if g.size else None
        if p99 is not None:
            per_request.append(p99)
        ttft = r.ttft_s if r.ttft_s is not None else stop_s - r.arrival_s  # no token by the stop: a lower bound
        finished = r.error is None
        good += finished and ttft <= slo_ttft and (p99 is None or p99 <= slo_itl)
        rows.append({"arrival_s": r.arrival_s, "prompt_len": r.prompt_len, "output_len": r.output_len,
                     "ttft_s": ttft, "itl_p99_s": p99, "finished": finished})
    gaps = np.concatenate(gaps) if gaps else np.empty(0)
    # throughput: every request's tokens (measured or not) seen while arrivals still came in, after warm-up
    window = box.duration_s - box.warmup_s
    tokens = sum(sum(box.warmup_s <= t < box.duration_s for t in r.token_s) for r in records)
    unfinished = [r for r in measured if r.error == UNFINISHED]
    return {
        "arrivals": len(records), "measured_requests": len(measured),
        "output_tok_s": tokens / window, "throughput_window_s": [box.warmup_s, box.duration_s],
        "goodput_request_s": good / (hi - lo), "slo_attainment": good / len(measured) if measured else None,
        "ttft_s": _pct([row["ttft_s"] for row in rows], (50, 90, 99)),
        "itl_s": _pct(gaps),  # every gap between consecutive tokens of the measured requests
        "request_itl_p99_s": _pct(per_request, (50, 90, 99)),  # per request: the p99 of its own gaps
        "tpot_s": _pct([r.tpot_s for r in measured if r.tpot_s is not None], (50, 99)),  # per-request mean gap
        "left_out": {"warmup_arrivals": sum(r.arrival_s < lo for r in records),
                     "drain_arrivals": sum(r.arrival_s >= hi for r in records),
                     "unfinished_measured": len(unfinished),
                     "ttft_censored": sum(r.ttft_s is None for r in unfinished),
                     "unfinished_total": sum(r.error == UNFINISHED for r in records)},
        "stop_s": stop_s, "requests": rows,
    }


def _log(t0: float, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:5.0f}s] {msg}", flush=True)


def _setup_kwargs(name: str, kwargs: dict, mux_chunk: int) -> dict:
    colocated = {k: v for k, v in kwargs.items() if k not in ("enable_pd_multiplex", "pd_decode_sm",
                                                               "pd_itl_target_ms")}
    if name.startswith(ITL_TARGET):
        return {**kwargs, "enable_pd_multiplex": True, "max_num_batched_tokens": mux_chunk,
                "pd_itl_target_ms": float(name.removeprefix(ITL_TARGET))}
    if is_mux(name):
        chunk = mux_chunk if name == MUX else int(name.removeprefix(MUX + "-"))
        return {**kwargs, "enable_pd_multiplex": True, "max_num_batched_tokens": chunk}
    return {**colocated, "max_num_batched_tokens": int(name.removeprefix(COLOCATED))}


def run_setup(name: str, kwargs: dict, requests, rates: list[float], arrivals: list[list[float]], box: Box,
              slo: tuple[float, float], t0: float) -> dict:
    """One engine: warm up, then every rate in turn (the engine is idle between rates), then freed. A failure
    after start-up keeps the rates already measured, with the error beside them."""
    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine

    started = time.time()
    engine = LLMEngine(EngineConfig.from_kwargs(**kwargs))
    out = {"max_num_batched_tokens": kwargs["max_num_batched_tokens"], "runs": []}
    try:
        _log(t0, f"{name}: engine up in {time.time() - started:.1f} s; warming up")
        warm_up(engine, engine.vocab_size)
        freeze_startup_heap()  # as `serve` does: no full collection walks the engine while it serves
        _log(t0, f"{name}: warm")
        for rate, offsets in zip(rates, arrivals):
            start = time.time()
            records = drive(engine, requests[:len(offsets)], offsets, start, stop_at=box.duration_s, timeline=True)
            run = {"request_rate": rate, **measure(records, box, time.time() - start, *slo)}
            out["runs"].append(run)
            itl = run["itl_s"]
            _log(t0, f"{name} @ {rate:g} req/s: {run['measured_requests']} measured of {run['arrivals']}, "
                     f"{run['output_tok_s']:.0f} tok/s, TTFT p99 {_fmt(run['ttft_s']['p99'])} s, ITL p99 "
                     f"{_fmt(itl['p99'], 1e3)} ms, goodput {run['goodput_request_s']:.2f} req/s")
        out["single_prompt"] = single_prompt_ttft(engine, engine.vocab_size, repeats=3)
    except Exception as e:  # keep what this engine measured; the next setup gets a fresh engine
        out["error"] = f"{type(e).__name__}: {e}"
        _log(t0, f"{name}: failed: {out['error']}")
    try:
        out["stats"] = engine.stats()
        out["pd_multiplex"] = out["stats"]["pd_multiplex"]
    except Exception as e:  # a broken engine still leaves its measured rates
        out.setdefault("error", f"stats: {type(e).__name__}: {e}")
    finally:
        out["setup_s"] = time.time() - started
        thaw_startup_heap()  # first (a failing shutdown must not leave this engine's reference cycles frozen)
        out["gc_frozen_after_free"] = gc.get_freeze_count()
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            # what the next setup's memory sizing starts from: anything left here shrinks its KV cache
            out["cuda_allocated_after_free_bytes"] = torch.cuda.memory_allocated()
            _log(t0, f"{name}: freed; {out['cuda_allocated_after_free_bytes'] / 2**30:.2f} GiB still allocated")
    return out


def pdmux_bench(args, save: Callable[[dict], None] | None = None) -> dict:
    """The whole run; `save(result)` after each setup, so a run cut short still leaves what it measured."""
    import datetime

    from splitserve.config import EngineConfig
    from splitserve.models.loader import load_hf_config, resolve_model

    t0 = time.time()
    kwargs = serving_kwargs(args)
    mux_chunk = kwargs.pop("max_num_batched_tokens", 8192)  # the prefill lane's chunk budget
    vocab = load_hf_config(resolve_model(EngineConfig.from_kwargs(**kwargs).model)).vocab_size
    seed = args.seed or 0
    rates = [float(r) for r in args.request_rates]
    box = Box(args.duration_s, args.warmup_s, args.drain_s)
    arrivals = [arrivals_in_box(r, box.duration_s, seed + 1) for r in rates]
    requests = make_requests(max(map(len, arrivals)), args.input_range, args.output_range, vocab, seed=seed)
    result = {
        "workload": "pdmux", "model": args.shape or args.model or "default", "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "device": None,  # named from the first engine that starts
        "input_range": list(args.input_range), "output_range": list(args.output_range), "request_rates": rates,
        "seed": seed,
        "box": {**asdict(box), "measured_arrivals_s": list(box.measured),
                "drain_default": "ceil(slo_ttft + output max × slo_itl) s: the longest a request meeting the SLO "
                                 "takes (unless a few gaps far exceed slo_itl under its p99), so one unfinished "
                                 "at the stop counts as a miss"},
        "slo": {"ttft_s": args.slo_ttft, "request_itl_p99_s": args.slo_itl},
        "definitions": {
            "measured": "requests arriving in [warmup_s, duration_s - drain_s); the rest only add load",
            "itl_s": "every gap between consecutive output tokens of the measured requests, as seen by the caller",
            "request_itl_p99_s": "per measured request, the p99 of its own gaps",
            "output_tok_s": "output tokens of all requests visible in [warmup_s, duration_s), ÷ that window",
            "goodput_request_s": "measured requests that finished with TTFT ≤ slo.ttft_s and their own p99 gap "
                                 "≤ slo.request_itl_p99_s, ÷ the measured arrival window",
            "left_out": "warm-up and drain arrivals (not measured), measured requests unfinished at the stop "
                        "(SLO misses; TTFT censored to stop - arrival when they had no token)"},
        "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"}, "pdmux_max_num_batched_tokens": mux_chunk,
        "setups": {},
    }
    _log(t0, f"pdmux bench: {len(rates)} rate(s) × {len(args.setups)} setup(s), {box.duration_s:g} s per rate "
             f"(measured arrivals {box.measured[0]:g}-{box.measured[1]:g} s), {len(requests)} requests generated")
    for name in args.setups:
        try:
            result["setups"][name] = run_setup(name, _setup_kwargs(name, kwargs, mux_chunk), requests, rates,
                                               arrivals, box, (args.slo_ttft, args.slo_itl), t0)
        except Exception as e:  # an engine that cannot start (out of memory, a mode not ready): the others run
            result["setups"][name] = {"error": f"{type(e).__name__}: {e}", "runs": []}
            _log(t0, f"{name}: failed to start: {type(e).__name__}: {e}")
        result["device"] = result["device"] or _device_name(result["setups"][name].get("stats", {}).get("device"))
        result["goals"] = goals(result)
        result["wall_s"] = time.time() - t0
        if save is not None:
            save(result)
    return result


def _device_name(device: str | None) -> str | None:
    """The GPU's name for 'cuda:N' (the engine's device), 'cpu' for the CPU; None before any engine ran."""
    if device is None or not device.startswith("cuda"):
        return device
    return torch.cuda.get_device_name(torch.device(device))


def _fmt(x, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.3g}"


def _runs(r: dict, name: str) -> dict[float, dict]:
    return {run["request_rate"]: run for run in r["setups"].get(name, {}).get("runs", [])}


def goals(r: dict) -> dict:
    """P9 and P10 of issue 13: the best pdmux setup against the best colocated one (both: highest goodput at any
    rate; the definitions are in the result)."""
    colocated = {name: _runs(r, name) for name in r["setups"] if name.startswith(COLOCATED)}
    colocated = {name: runs for name, runs in colocated.items() if runs}
    muxes = {name: _runs(r, name) for name in r["setups"] if is_mux(name)}
    muxes = {name: runs for name, runs in muxes.items() if runs}
    if not colocated or not muxes:
        missing = "pdmux setup" if not muxes else "colocated setup"
        return {goal: {"met": None, "status": f"not measured: no {missing} with results"} for goal in ("P9", "P10")}

    def peak(runs: dict, key: str) -> float:
        return max(run[key] for run in runs.values())

    def best_of(setups: dict) -> str:
        return max(setups, key=lambda n: (peak(setups[n], "goodput_request_s"), peak(setups[n], "output_tok_s")))

    best, best_mux = best_of(colocated), best_of(muxes)
    mux = muxes[best_mux]
    runs = colocated[best]
    top = peak(runs, "output_tok_s")
    at = min(rate for rate, run in runs.items() if run["output_tok_s"] >= 0.8 * top)
    definition = {
        "best_colocated": "the colocated setup with the highest goodput at any rate (ties: output tok/s); "
                          "best_pdmux: the same among the pdmux setups (prefill chunks, decode step targets)",
        "P9_rate": "the lowest measured rate at which the best colocated setup's output tok/s ≥ 0.8 × its "
                   "maximum over the measured rates",
        "P10": "pdmux's highest goodput over the rates ÷ the best colocated setup's highest (per-rate ratios "
               "against the best colocated setup at that rate alongside)"}

    def ratio(a, b):
        return a / b if a is not None and b else None

    def compare(other: dict) -> dict:
        m = mux[at]
        return {"itl_p99_ratio": ratio(m["itl_s"]["p99"], other["itl_s"]["p99"]),
                "ttft_p99_ratio": ratio(m["ttft_s"]["p99"], other["ttft_s"]["p99"]),
                "output_tok_s_ratio": ratio(m["output_tok_s"], other["output_tok_s"])}

    if at in mux:
        p9 = {"rate": at, "best_pdmux": best_mux, "best_colocated": best, "best_colocated_peak_output_tok_s": top,
              **compare(runs[at]),
              "vs_each_colocated": {n: compare(c[at]) for n, c in colocated.items() if at in c}}
        p9["met"] = bool(p9["itl_p99_ratio"] is not None and p9["itl_p99_ratio"] <= 0.4
                         and p9["ttft_p99_ratio"] is not None and p9["ttft_p99_ratio"] <= 1.25
                         and p9["output_tok_s_ratio"] is not None and p9["output_tok_s_ratio"] >= 0.9)
    else:
        p9 = {"rate": at, "best_colocated": best, "met": None, "status": f"not measured: pdmux has no run at {at}"}
    mux_peak, best_peak = peak(mux, "goodput_request_s"), peak(runs, "goodput_request_s")
    per_rate = {}
    for rate, m in mux.items():
        others = [c[rate]["goodput_request_s"] for c in colocated.values() if rate in c]
        per_rate[str(rate)] = ratio(m["goodput_request_s"], max(others)) if others else None
    p10 = {"best_pdmux": best_mux, "pdmux_goodput_request_s": mux_peak, "best_colocated": best,
           "best_colocated_goodput_request_s": best_peak,
           "goodput_ratio": ratio(mux_peak, best_peak), "per_rate_ratio": per_rate,
           # no colocated setup met the SLO at any rate: any pdmux goodput is an unbounded ratio
           "met": bool(mux_peak >= 1.5 * best_peak and mux_peak > 0)}
    return {"P9": p9, "P10": p10, "definitions": definition}


def markdown(r: dict) -> str:
    box, slo = r["box"], r["slo"]
    lines = [f"# pdmux — {r.get('model')} on {r.get('device')} (torch {r.get('torch')}, {r.get('date')})\n\n",
             f"Prompts {r['input_range'][0]}–{r['input_range'][1]} tokens, outputs {r['output_range'][0]}–"
             f"{r['output_range'][1]}, Poisson arrivals; {box['duration_s']:g} s per rate, measured arrivals "
             f"{box['measured_arrivals_s'][0]:g}–{box['measured_arrivals_s'][1]:g} s (warm-up and drain left out). "
             f"ITL: every gap. Goodput SLO: TTFT ≤ {slo['ttft_s']:g} s and per-request p99 ITL ≤ "
             f"{slo['request_itl_p99_s'] * 1e3:g} ms.\n\n",
             "| setup | rate (req/s) | measured | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 / p99.9 (ms) "
             "| request p99 ITL p50 / p99 (ms) | goodput (req/s) | SLO met | unfinished |\n",
             "|---|---|---|---|---|---|---|---|---|---|\n"]
    notes = []
    for name, s in r["setups"].items():
        for run in s["runs"]:
            t, g, q = run["ttft_s"], run["itl_s"], run["request_itl_p99_s"]
            att = "-" if run["slo_attainment"] is None else f"{run['slo_attainment']:.0%}"
            lines.append(f"| {name} | {run['request_rate']:g} | {run['measured_requests']} | {run['output_tok_s']:.0f} "
                         f"| {_fmt(t['p50'])} / {_fmt(t['p99'])} | {_fmt(g['p50'], 1e3)} / {_fmt(g['p99'], 1e3)} / "
                         f"{_fmt(g['p99.9'], 1e3)} | {_fmt(q['p50'], 1e3)} / {_fmt(q['p99'], 1e3)} | "
                         f"{run['goodput_request_s']:.2f} | {att} | {run['left_out']['unfinished_measured']} |\n")
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error'][:100]} | | | | | | | | |\n")
        mode = s.get("pd_multiplex", {})
        if mode.get("requested"):
            notes.append(f"- {name}: mode {mode.get('mode')}, concurrent = {mode.get('concurrent')} "
                         f"({mode.get('reason')}); prefill chunk {s['max_num_batched_tokens']}\n")
        if "single_prompt" in s:
            p = s["single_prompt"]
            notes.append(f"- {name}: one {p['prompt_len']}-token prompt on the idle engine: TTFT "
                         f"{p['ttft_s'] * 1e3:.1f} ms\n")
    for goal in ("P9", "P10"):
        g = r.get("goals", {}).get(goal)
        if g:
            verdict = {True: "met", False: "missed", None: g.get("status", "not measured")}[g["met"]]
            notes.append(f"- **{goal}** {verdict}: " + ", ".join(
                f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in g.items()
                if k not in ("met", "status", "vs_each_colocated", "per_rate_ratio")) + "\n")
    return "".join(lines) + ("\n" + "".join(notes) if notes else "")


def plot(r: dict, path: str, plt) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [(axes[0][0], "output tok/s", lambda run: run["output_tok_s"]),
              (axes[0][1], "goodput (req/s within the SLO)", lambda run: run["goodput_request_s"]),
              (axes[1][0], "TTFT p99 (s)", lambda run: run["ttft_s"]["p99"]),
              (axes[1][1], "ITL p99 (ms; dashed: p99.9)", lambda run: _ms(run["itl_s"]["p99"]))]
    for name, s in r["setups"].items():
        runs = s.get("runs", [])
        if not runs:
            continue
        rates = [run["request_rate"] for run in runs]
        for ax, _, value in panels:
            line, = ax.plot(rates, [_nan(value(run)) for run in runs], "o-", label=name)
        axes[1][1].plot(rates, [_nan(_ms(run["itl_s"]["p99.9"])) for run in runs], "--", color=line.get_color())
    slo = r["slo"]
    axes[1][0].axhline(slo["ttft_s"], color="gray", lw=0.8, ls=":")
    axes[1][1].axhline(slo["request_itl_p99_s"] * 1e3, color="gray", lw=0.8, ls=":")
    for ax, label, _ in panels:
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"pdmux: {r.get('model')} on {r.get('device', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(x):
    return None if x is None else x * 1e3


def _nan(x):
    return float("nan") if x is None else x
