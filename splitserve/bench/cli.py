"""`splitserve bench latency|throughput|smallbatch` argument handling and the run itself."""

from __future__ import annotations

import argparse
import datetime
import gc

import torch


def add_parser(sub, add_engine_args) -> None:
    bench = sub.add_parser("bench", allow_abbrev=False,
                           help="benchmarks: latency | throughput | smallbatch | serve (load on a running server) | "
                                "pd (M1 serving simulation: colocated vs data-parallel vs prefill/decode split) | "
                                "pdmux (issue 13, one GPU: colocated with chunked prefill vs PD multiplexing) | "
                                "pipeline (M2/M3: plain decode graph vs pipelined splits vs the planner) | "
                                "sampling (decode tok/s with penalties etc. against plain sampling)")
    bench.add_argument("workload", choices=["latency", "throughput", "smallbatch", "serve", "pd", "pdmux",
                                            "pipeline", "sampling"])
    bench.add_argument("--shape", default=None, help="random weights of a named shape: qwen3-0.6b | qwen3-8b | "
                                                     "llama3-8b (instead of --model)")
    bench.add_argument("--compare", nargs="+", choices=["hf", "hf-compiled"], default=[],
                       help="peers run in the same process after our run: hf (transformers' static-cache "
                            "generate as it comes), hf-compiled (StaticCache + torch.compile reduce-overhead, "
                            "the gpt-fast recipe; latency and smallbatch)")
    bench.add_argument("--hf-compile-mode", default="reduce-overhead",
                       choices=["reduce-overhead", "default", "max-autotune", "none"],
                       help="torch.compile mode of the hf-compiled peer; none: eager on the same StaticCache path")
    bench.add_argument("--out", default="docs/benchmarks", help="folder for JSON, PNG and markdown")
    bench.add_argument("--name", default=None, help="file name stem (default: workload-model-device)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                       help="latency: 1 16 64 256 1024; pipeline: 16 64 256 512 1024")
    bench.add_argument("--context-lens", type=int, nargs="+", default=None,
                       help="latency: 256 1024 2048 8192; pipeline: 256 512 1024 2048 4096")
    bench.add_argument("--num-requests", type=int, default=256)
    bench.add_argument("--input-range", type=int, nargs=2, default=None, help="default: 100 1024; pdmux: 512 4096")
    bench.add_argument("--output-range", type=int, nargs=2, default=None, help="default: 100 1024; pdmux: 64 512")
    bench.add_argument("--hf-requests", type=int, default=256, help="requests HF runs in the throughput compare")
    serve = bench.add_argument_group("serve (online load against a running `splitserve serve`)")
    serve.add_argument("--url", default="http://127.0.0.1:8000")
    serve.add_argument("--request-rates", type=float, nargs="+", default=None,
                       help="requests/s (Poisson arrivals); inf sends all at once (default: 1 4 16 inf; "
                            "pdmux: 2 4, finite only)")
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--served-model-name", default=None, help="default: the server's first model")
    serve.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on time to first token (s)")
    serve.add_argument("--slo-tpot", type=float, default=0.05, help="goodput SLO on time per output token (s)")
    serve.add_argument("--prompt-vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    serve.add_argument("--setups", nargs="+", default=None,
                       help="which setups to run; pd: colocated data_parallel pd (default: all); pdmux: pdmux "
                            "pdmux-N for N in --pdmux-chunks, pdmux-itlT for T in --pdmux-itl-targets, "
                            "colocated-N for N in --colocated-chunks; 'pdmux' and 'colocated' stand for all of "
                            "theirs (default: all)")
    mux = bench.add_argument_group("pdmux (one GPU: time-boxed runs per rate, every inter-token gap)")
    mux.add_argument("--colocated-chunks", type=int, nargs="+", default=[512, 2048, 8192],
                     help="max_num_batched_tokens of the colocated setups; the pdmux setup takes "
                          "--max-num-batched-tokens (default 8192) as its prefill chunk budget")
    mux.add_argument("--pdmux-chunks", type=int, nargs="+", default=[],
                     help="more pdmux setups (pdmux-N), each with prefill chunk N: smaller chunks admit new "
                          "prompts sooner (TTFT), larger ones prefill more efficiently")
    mux.add_argument("--pdmux-itl-targets", type=float, nargs="+", default=[],
                     help="more pdmux setups (pdmux-itlT), each with pd_itl_target_ms T: a lower target gives "
                          "decode more SMs beside a prefill (ITL) and prefill fewer (TTFT)")
    mux.add_argument("--duration-s", type=float, default=40.0, help="time box per rate: arrivals come until then, "
                                                                    "then what is left is aborted")
    mux.add_argument("--warmup-s", type=float, default=8.0, help="arrivals before this are load, not measured")
    mux.add_argument("--drain-s", type=float, default=None,
                     help="arrivals in the last DRAIN_S seconds are load, not measured (default: slo-ttft + output "
                          "max × slo-itl, the longest a request within the SLO takes)")
    mux.add_argument("--slo-itl", type=float, default=0.030,
                     help="goodput SLO on each request's own p99 inter-token gap (s)")
    pipe = bench.add_argument_group("pipeline (decode pipeline on green-context SM splits)")
    pipe.add_argument("--shapes", nargs="+", default=None, help="default: qwen3-8b qwen3-0.6b")
    pipe.add_argument("--splits", type=int, nargs="+", default=None,
                      help="memory-partition SM counts (default: the planner's candidates)")
    pipe.add_argument("--microbatch-fractions", type=float, nargs="+", default=[0.5],
                      help="the first micro-batch's share of the batch, one pipelined variant per value and split "
                           "(0.5: two equal halves; e.g. 0.5 0.6 0.7)")
    pipe.add_argument("--iters", type=int, default=10, help="graph replays timed per path and point")
    pipe.add_argument("--m3-batch", type=int, default=1024, help="batch of the growing-context (M3) run; 0: skip")
    pipe.add_argument("--m3-step", type=int, default=128, help="context growth per step of the M3 run")
    samp = bench.add_argument_group("sampling (decode tok/s per sampling mode, ratio to plain, one run)")
    samp.add_argument("--modes", nargs="+", default=["plain", "penalties"],
                      help="plain (temperature 1, top_p 0.95), penalties (+ presence/frequency 0.5, repetition "
                           "1.1, a small logit_bias), json (+ a JSON schema; needs a tokenizer)")
    samp.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="with --shape: a tokenizer folder to put beside the random weights (json mode)")
    samp.add_argument("--sampling-batch", type=int, default=64)
    samp.add_argument("--prompt-len", type=int, default=256)
    samp.add_argument("--new-tokens", type=int, default=256)
    samp.add_argument("--sampling-repeats", type=int, default=3,
                      help="rounds that run every mode once; each mode reports its median round")
    add_engine_args(bench)
    bench.set_defaults(func=run)


_DEFAULT_RANGES = {"pdmux": ([512, 4096], [64, 512])}
_DEFAULT_RATES = {"pdmux": [2.0, 4.0]}
_DEFAULT_GRID = {"latency": ([1, 16, 64, 256, 1024], [256, 1024, 2048, 8192]),
                 "pipeline": ([16, 64, 256, 512, 1024], [256, 512, 1024, 2048, 4096])}


def run(args: argparse.Namespace) -> None:
    from splitserve import LLM
    from splitserve.bench import report, workloads
    from splitserve.bench.shapes import shape_folder
    from splitserve.cli import engine_kwargs

    batches, ctxs = _DEFAULT_GRID.get(args.workload, _DEFAULT_GRID["latency"])
    args.batch_sizes = args.batch_sizes or batches
    args.context_lens = args.context_lens or ctxs
    ins, outs = _DEFAULT_RANGES.get(args.workload, ([100, 1024], [100, 1024]))
    args.input_range, args.output_range = args.input_range or ins, args.output_range or outs
    args.request_rates = args.request_rates or _DEFAULT_RATES.get(args.workload, [1, 4, 16, float("inf")])
    if args.workload == "serve":
        return _run_serve(args)
    if args.workload == "pipeline":
        return _run_pipeline(args)
    if args.workload == "pd":
        return _run_pd(args)
    if args.workload == "pdmux":
        return _run_pdmux(args)
    if args.workload == "sampling":
        try:
            workloads.check_sampling_modes(args.modes)
            if "json" in args.modes and args.shape and not args.tokenizer:
                raise ValueError("mode 'json' needs a tokenizer: give --tokenizer DIR with --shape")
            if args.sampling_repeats < 1:
                raise ValueError(f"--sampling-repeats must be >= 1, got {args.sampling_repeats}")
        except ValueError as e:
            raise SystemExit(f"splitserve bench sampling: {e}") from None
    if "hf-compiled" in args.compare and args.workload not in ("latency", "smallbatch"):
        raise SystemExit("--compare hf-compiled: only for the latency and smallbatch workloads")
    kwargs = engine_kwargs(args)
    model = args.model
    if args.shape:
        model = shape_folder(args.shape, args.tokenizer)
        kwargs.setdefault("load_format", "dummy")
    if args.workload == "sampling":
        kwargs.setdefault("max_num_seqs", args.sampling_batch)
    if args.workload == "latency":
        kwargs.setdefault("max_num_seqs", max(args.batch_sizes))
        kwargs.setdefault("max_model_len", max(args.context_lens) + 1)
    if args.workload == "latency" and kwargs.get("engine_core_process"):
        raise SystemExit("splitserve bench latency: times the model runner of an in-process core; "
                         "leave out --engine-core-process")
    llm = LLM(model, **kwargs)
    engine_stats = llm.stats()  # the core may run in another process (engine_core_process, PD)
    core = engine_stats.get("decode", engine_stats)  # PD: the decode worker's
    meta = {"model": args.shape or model or "SmolLM2-135M-Instruct", "device": core["device_name"],
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "dtype": f"torch.{core['dtype']}", "engine": engine_stats}
    if args.workload == "latency":
        result = workloads.latency(llm, args.batch_sizes, args.context_lens)
    elif args.workload == "throughput":
        result = workloads.throughput(llm, args.num_requests, tuple(args.input_range), tuple(args.output_range))
    elif args.workload == "sampling":
        result = workloads.sampling(llm, args.modes, args.sampling_batch, args.prompt_len, args.new_tokens,
                                    repeats=args.sampling_repeats)
    else:
        result = workloads.smallbatch(llm)
    result.update(meta)
    name = args.name or f"{args.workload}-{meta['model']}-{meta['device']}".replace(" ", "_").replace("/", "_")
    if args.compare:
        report.write(result, args.out, name)  # our numbers are on disk even if a peer hangs and gets killed
        spec = (llm.engine.model.path, llm.config.load_format == "dummy", torch.device(core["device"]),
                getattr(torch, core["dtype"]))
        llm.shutdown()
        del llm  # free the device for the HF model (the engine's memory goes with it)
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        _hf_compare(args, spec, result)
    for path in report.write(result, args.out, name):
        print(path)
    print(report.markdown(result))


def _run_serve(args: argparse.Namespace) -> None:
    from splitserve.bench import report
    from splitserve.bench.serving import serve_sweep

    args.seed = args.seed or 0
    result = serve_sweep(args)
    result.update({"date": datetime.date.today().isoformat(), "model": args.served_model_name or "server"})
    name = args.name or "serve"
    for path in report.write(result, args.out, name):
        print(path)
    print(report.markdown(result))


def _run_pd(args: argparse.Namespace) -> None:
    from splitserve.bench import report
    from splitserve.bench.pd import pd_bench

    args.enable_prefix_caching = False if args.enable_prefix_caching is None else args.enable_prefix_caching
    args.setups = _check_setups("pd", args.setups, ["colocated", "data_parallel", "pd"])
    result = pd_bench(args)
    devices = result["devices"]
    result.update({"date": datetime.date.today().isoformat(), "model": args.shape or args.model or "default",
                   "torch": torch.__version__,
                   "device": " + ".join(torch.cuda.get_device_name(d) if d.startswith("cuda") else d
                                        for d in devices)})
    name = args.name or f"pd-{result['model']}"
    for path in report.write(result, args.out, name):
        print(path)
    print(report.markdown(result))


def _check_setups(workload: str, asked: list[str] | None, known: list[str], groups: dict | None = None) -> list[str]:
    """The setups to run, in the order asked (default: all known); a group name stands for its members."""
    out = []
    for name in asked or known:
        for member in (groups or {}).get(name, [name]):
            if member not in known:
                raise SystemExit(f"splitserve bench {workload}: unknown setup {member!r}; known: {', '.join(known)}")
            out += [member] if member not in out else []
    return out


def _run_pdmux(args: argparse.Namespace) -> None:
    from splitserve.bench import report
    from splitserve.bench.pdmux import COLOCATED, default_drain_s, is_mux, pdmux_bench, setup_names

    known = setup_names(args.colocated_chunks, args.pdmux_chunks, args.pdmux_itl_targets)
    args.setups = _check_setups("pdmux", args.setups, known, {
        "colocated": [n for n in known if n.startswith(COLOCATED)], "pdmux": [n for n in known if is_mux(n)]})
    problems = [f"{flag} must be token counts >= 1, got {chunk}" for flag, chunks in
                (("--colocated-chunks", args.colocated_chunks), ("--pdmux-chunks", args.pdmux_chunks))
                for chunk in chunks if chunk < 1]
    problems += [f"--pdmux-itl-targets must be milliseconds > 0, got {t:g}" for t in args.pdmux_itl_targets
                 if not 0 < t < float("inf")]
    if any(not (0 < r < float("inf")) for r in args.request_rates):
        problems.append("--request-rates must be finite and > 0 (each rate is a time-boxed Poisson run)")
    if args.drain_s is None:
        args.drain_s = default_drain_s(args.slo_ttft, args.slo_itl, args.output_range[1])
    if not 0 <= args.warmup_s < args.duration_s - args.drain_s or args.drain_s < 0:
        problems.append(f"no measured window: --warmup-s {args.warmup_s:g} must be below --duration-s "
                        f"{args.duration_s:g} minus --drain-s {args.drain_s:g}")
    if problems:
        raise SystemExit("splitserve bench pdmux: " + "; ".join(problems))
    # the same prompts come back at every rate: prefix hits would make the later rates cheap
    args.enable_prefix_caching = False if args.enable_prefix_caching is None else args.enable_prefix_caching
    name = args.name or f"pdmux-{args.shape or args.model or 'default'}".replace("/", "_")

    def save(result: dict) -> None:
        report.write(result, args.out, name)

    result = pdmux_bench(args, save)
    for path in report.write(result, args.out, name):
        print(path)
    print(report.markdown(result))


def _run_pipeline(args: argparse.Namespace) -> None:
    from splitserve.bench import report
    from splitserve.bench.pipeline import pipeline_bench
    from splitserve.cli import engine_kwargs

    bad = [f for f in args.microbatch_fractions if not 0 < f < 1]
    if bad:
        raise SystemExit(f"splitserve bench pipeline: --microbatch-fractions must be in (0, 1), got {bad}")
    result = pipeline_bench(args, engine_kwargs(args))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result.update({"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": device})
    name = args.name or f"pipeline-{device}".replace(" ", "_")
    for path in report.write(result, args.out, name):
        print(path)
    print(report.markdown(result))


def _hf_compare(args, spec, result) -> None:
    """Each peer of `--compare` into result[peer], with its ratios to our numbers of this run; a peer failing
    records its error and keeps our numbers."""
    from splitserve.bench import hf

    folder, random_weights, device, dtype = spec
    try:
        model = hf.hf_model(folder, device, dtype, random_weights)
    except Exception as e:
        for peer in args.compare:
            result[peer] = {"error": f"{type(e).__name__}: {e}"}
        return
    for peer in args.compare:
        try:
            result[peer] = _one_peer(args, peer, model, result)
        except Exception as e:  # the baseline failing must not lose our own numbers
            result[peer] = {"error": f"{type(e).__name__}: {e}"}


def _one_peer(args, peer, model, result) -> dict:
    import numpy as np

    from splitserve.bench import hf, workloads

    mode = args.hf_compile_mode if peer == "hf-compiled" else None
    if args.workload == "smallbatch":
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, model.config.vocab_size, result["prompt_len"]).tolist()
                   for _ in range(result["num_prompts"])]
        r = hf.hf_smallbatch(model, prompts, result["new_tokens"], mode)
        r["ours_over_peer"] = result["decode_tok_s"] / r["decode_tok_s"]  # tok/s: > 1 = splitserve faster
        return r
    if args.workload == "throughput" and peer == "hf":
        n = min(args.hf_requests, result["num_requests"])
        prompts, _ = workloads.random_requests(result["num_requests"], tuple(args.input_range),
                                               tuple(args.output_range), model.config.vocab_size)
        mean_out = int(round(np.mean(result["requests"]["output_lens"])))
        return hf.hf_throughput(model, prompts[:n], mean_out)
    if args.workload == "latency" and peer == "hf-compiled":
        points = []
        for p in result["points"]:
            if "ms_per_step" not in p:
                continue
            try:
                q = hf.hf_decode_latency(model, p["batch"], p["ctx"], mode)
            except Exception as e:  # e.g. out of memory at one point: keep the others
                points.append({"batch": p["batch"], "ctx": p["ctx"], "error": f"{type(e).__name__}: {e}"})
                continue
            q["ours_over_peer"] = p["ms_per_step"] / q["ms_per_step"]  # step time: < 1 = splitserve faster
            q["speedup"] = q["ms_per_step"] / p["ms_per_step"]
            points.append(q)
        return {"impl": f"hf StaticCache decode step + compile ({mode}, fullgraph)", "compile_mode": mode,
                "points": points}
    return {"error": f"no {peer} baseline for the {args.workload} workload"}
