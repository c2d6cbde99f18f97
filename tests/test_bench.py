"""The benchmark harness runs end to end on a tiny shape and writes valid JSON (no timing asserts)."""

import json
import subprocess
import sys


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


def test_throughput_harness_with_hf(tmp_path):
    data, _ = run_bench(tmp_path, "throughput", "--num-requests", "6", "--input-range", "5", "30",
                        "--output-range", "3", "12", "--compare", "hf", "--hf-requests", "3")
    assert data["output_tokens"] == sum(data["requests"]["output_lens"])
    assert data["hf"]["output_tokens"] > 0, data["hf"]


def test_smallbatch_harness_with_hf(tmp_path):
    data, _ = run_bench(tmp_path, "smallbatch", "--compare", "hf")
    assert data["decode_tok_s"] > 0 and data["hf"]["decode_tok_s"] > 0, data["hf"]


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
