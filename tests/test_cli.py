import subprocess
import sys


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "splitserve", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


def test_generate_streams_text_from_default_model(default_model_dir):
    res = run("generate", "The capital of France is", "--max-tokens", "8", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_generate_rejects_unknown_flag_and_bad_values(default_model_dir):
    res = run("generate", "hi", "--max-num-seq", "3")
    assert res.returncode == 2 and "--max-num-seq" in res.stderr
    res = run("generate", "hi", "--temperature", "-1")
    assert res.returncode == 2 and "temperature must be >= 0" in res.stderr


def test_chat_uses_template(default_model_dir):
    res = run("chat", "--max-tokens", "16", stdin="What is the capital of France?\n\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_doctor_reports():
    res = run("doctor")
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "python" in res.stdout
    assert "two-GPU PD" in res.stdout


def test_doctor_reads_nvlink_topology(monkeypatch):
    import shutil

    from splitserve import doctor

    sample = ("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\n"
              "GPU0\t X \tNV18\t0-63\t0\nGPU1\tNV18\t X \t0-63\t0\n\nLegend:\n  X    = Self\n")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=sample))
    assert doctor._topology() == {(0, 0): "X", (0, 1): "NV18", (1, 0): "NV18", (1, 1): "X"}
