"""The benchmark harness runs end to end on a tiny shape and writes valid JSON (no timing asserts)."""

import json
import subprocess
import sys

import pytest


def run_bench(tmp_path, *args):
    res = subprocess.run([sys.executable, "-m", "splitserve", "bench", *args, "--shape", "tiny", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    return data, files


def test_latency_harness(tmp_path):
    data, files = run_bench(tmp_path, "latency", "--batch-sizes", "1", "3", "--context-lens", "8", "40")
    assert data["workload"] == "latency" and len(data["points"]) == 4
    assert all(p["ms_per_step"] > 0 for p in data["points"])
    assert any(f.endswith(".md") for f in files)


@pytest.mark.slow
def test_throughput_harness_with_hf(tmp_path):
    data, _ = run_bench(tmp_path, "throughput", "--num-requests", "6", "--input-range", "5", "30",
                        "--output-range", "3", "12", "--compare", "hf", "--hf-requests", "3")
    assert data["output_tokens"] == sum(data["requests"]["output_lens"])
    assert data["hf"]["output_tokens"] > 0, data["hf"]


@pytest.mark.slow
def test_smallbatch_harness_with_hf(tmp_path):
    data, _ = run_bench(tmp_path, "smallbatch", "--compare", "hf")
    assert data["decode_tok_s"] > 0 and data["hf"]["decode_tok_s"] > 0, data["hf"]


@pytest.mark.slow  # five engine processes (colocated, data-parallel, PD)
def test_pd_serving_simulation_harness(tmp_path):
    """Three setups (colocated, data-parallel, PD) on CPU processes; every request completes in each."""
    data, files = run_bench(tmp_path, "pd", "--num-requests", "6", "--input-range", "8", "40", "--output-range",
                            "3", "9", "--request-rates", "40", "inf")
    assert set(data["setups"]) == {"colocated", "data_parallel", "pd"}
    for runs in data["setups"].values():
        assert [r["request_rate"] for r in runs] == [40.0, "inf"]
        for r in runs:
            assert r["num_requests"] == 6 and r["num_errors"] == 0
            assert r["ttft_s"]["p50"] > 0 and r["output_tok_s"] > 0
    assert "P7" in data["goals"] and any(f.endswith(".png") for f in files)


def test_pipeline_bench_needs_green_contexts_and_says_so(tmp_path):
    res = subprocess.run([sys.executable, "-m", "splitserve", "bench", "pipeline", "--shapes", "tiny", "--device",
                          "cpu", "--batch-sizes", "16", "--context-lens", "64", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "green contexts" in res.stderr and "CPU" in res.stderr


def test_pipeline_report_goals_table_and_heatmap(tmp_path):
    """The pipeline report from a result (made up, as the GPU would write it): goals judged from the
    measured grid, a table row per point, and a heatmap."""
    from splitserve.bench import report
    from splitserve.bench.pipeline import goals

    def point(batch, ctx, plain, split, planner):
        ms = {"plain": plain, "pipeline:64": split}
        best = min(ms, key=ms.get)
        return {"batch": batch, "ctx": ctx, "ms": ms, "best": best, "planner": planner,
                "speedup_best_vs_plain": plain / ms[best], "planner_over_best": ms[planner] / ms[best],
                "roofline_serial_ms": 1.0, "roofline_overlap_ms": 0.8}

    shape = {"batches": [16, 1024], "ctxs": [256, 512], "splits": {"pipeline:64": [64, 68]},
             "graph_grid": {"count": 2, "capture_s": 1.0, "memory_bytes": 2**30}, "plan": {"calibration_s": 2.0},
             "plan_table": "batch | ...", "copy_bandwidth_GBps": 4000, "gemm_TFLOPs": 700,
             "points": [point(16, 256, 1.0, 1.5, "plain"), point(16, 512, 1.1, 1.6, "plain"),
                        point(1024, 256, 30.0, 24.0, "pipeline:64"), point(1024, 512, 36.0, 26.0, "plain")],
             "m3": {"batch": 1024, "ctx_from": 256, "ctx_to": 512, "step": 256, "adaptive_ms": 50.0,
                    "fixed_ms": {"plain": 66.0, "pipeline:64": 50.0}, "best_fixed": "pipeline:64",
                    "best_fixed_over_adaptive": 1.0, "switches": 0}}
    r = {"workload": "pipeline", "shapes": {"qwen3-8b": shape}, "device": "test", "torch": "x", "date": "d"}
    r["goals"] = goals(r)
    assert r["goals"]["P5"]["value"] == 36.0 / 26.0 and r["goals"]["P5"]["met"]
    assert r["goals"]["P6"]["value"] == 36.0 / 26.0 and not r["goals"]["P6"]["met"]  # the planner missed one
    assert r["goals"]["M3"]["met"]
    paths = report.write(r, str(tmp_path), "pipeline")
    assert [p.rsplit(".", 1)[1] for p in paths] == ["json", "md", "png"]
    md = (tmp_path / "pipeline.md").read_text()
    assert md.count("| 1024 |") == 2 and "P6" in md and "missed" in md
