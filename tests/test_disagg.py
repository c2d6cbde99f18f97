"""M1 on CPU: prefill and decode workers in two processes, KV over gloo (the same code as NCCL on GPUs)."""

import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.multiprocessing as tmp
from conftest import process_alive, random_prompts, seconds_to_raise_after_kill, sigint_as_in_a_terminal

from splitserve import LLM, SamplingParams
from splitserve.config import EngineConfig
from splitserve.disagg import kv_transfer
from splitserve.disagg.coordinator import WorkerDiedError, listen_address, pd_devices

# ---- KV transfer on its own ----
SENT_BLOCKS, RECV_BLOCKS = [3, 7, 1], [0, 5, 2]


def _transfer_rank(rank: int, out_dir: str) -> None:
    kv_transfer.init_process_group(rank, torch.device("cpu"), f"file://{out_dir}/store")
    if rank == kv_transfer.PREFILL_RANK:
        kv = torch.randn(2, 3, 8, 4, 2, 5, generator=torch.Generator().manual_seed(0))
        t = kv_transfer.send_blocks(kv, SENT_BLOCKS, "r")
    else:
        kv = torch.zeros(2, 3, 6, 4, 2, 5)
        t = kv_transfer.recv_blocks(kv, RECV_BLOCKS, "r")
    deadline = time.time() + 30
    while not t.done():
        assert time.time() < deadline
        time.sleep(0.005)
    if rank == kv_transfer.DECODE_RANK:
        kv_transfer.finish_recv(kv, t)
    torch.save(kv, os.path.join(out_dir, f"kv{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_kv_blocks_received_equal_blocks_sent(tmp_path):
    tmp.spawn(_transfer_rank, args=(str(tmp_path),), nprocs=2)
    sent, received = torch.load(tmp_path / "kv0.pt"), torch.load(tmp_path / "kv1.pt")
    for s, r in zip(SENT_BLOCKS, RECV_BLOCKS):
        assert torch.equal(received[:, :, r], sent[:, :, s])
    untouched = [b for b in range(received.shape[2]) if b not in RECV_BLOCKS]
    assert torch.count_nonzero(received[:, :, untouched]) == 0
    # the digest used by pd_verify_kv notices a single flipped value
    assert kv_transfer.digest(received[:, :, RECV_BLOCKS]) == kv_transfer.digest(sent[:, :, SENT_BLOCKS])
    received[1, 2, RECV_BLOCKS[1], 3, 1, 4] += 1e-6
    assert kv_transfer.digest(received[:, :, RECV_BLOCKS]) != kv_transfer.digest(sent[:, :, SENT_BLOCKS])


# ---- the engine ----
@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model):
    return make_tiny_model("qwen3", seed=7)


def _mixed_prompts() -> list[list[int]]:
    shared = random_prompts(1, 40, 40, seed=99)[0]  # 2.5 blocks shared by several prompts: prefix-cache hits
    prompts = random_prompts(10, 3, 70, seed=4)
    return prompts[:5] + [shared + p[:9] for p in prompts[5:]] + [shared + [11, 12]]


def test_pd_matches_colocated_with_prefix_hits_backpressure_and_preemption(tiny_dir):
    prompts = _mixed_prompts()
    # outputs long enough that two admitted sequences outgrow the decode cache together: preemption is certain
    params = [SamplingParams(temperature=0, max_tokens=40 + 8 * i, ignore_eos=True) for i in range(len(prompts))]
    colocated = LLM(tiny_dir, device="cpu").generate(prompts, params, use_tqdm=False)
    # A 64-token budget spreads prefill (chunked) over steps, so later prompts hit the shared prefix's blocks.
    # 12 decode blocks of 16 tokens cannot hold all sequences: admission waits and running ones get preempted.
    llm = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True, max_num_batched_tokens=64, pd_decode_num_kv_blocks=12,
              pd_max_pending=2, max_model_len=192, pd_verify_kv=True)
    try:
        pd = llm.generate(prompts, params, use_tqdm=False)
        deadline = time.time() + 10  # each worker's counters arrive once it goes idle

        def transfers():
            return [llm.stats()[role].get("kv_transfers", 0) for role in ("prefill", "decode")]

        while transfers() != [len(prompts)] * 2 and time.time() < deadline:
            llm.engine.step()
        stats = llm.stats()
    finally:
        llm.shutdown()
    for i, (a, b) in enumerate(zip(pd, colocated)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"prompt {i}"
        assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].finish_reason == "length"
    prefill, decode = stats["prefill"], stats["decode"]
    assert prefill["prefix_cache_hit_tokens"] >= 2 * 32, prefill  # shared 40-token prefix = 2 full blocks
    assert decode["num_preemptions"] > 0, decode
    assert decode["deferred_admissions"] > 0 and prefill["backpressure_steps"] > 0
    assert (prefill["kv_transfers"], decode["kv_transfers"], decode["kv_verified_transfers"]) == (len(prompts),) * 3
    assert prefill["kv_used_blocks"] == 0 and decode["kv_used_blocks"] == 0


def test_pd_sampling_seeded_matches_colocated_and_stop_strings(tiny_dir):
    prompts = random_prompts(4, 5, 20, seed=8)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=16, ignore_eos=True,
                             logprobs=2) for i in range(4)]
    colocated = LLM(tiny_dir, device="cpu").generate(prompts, params, use_tqdm=False)
    llm = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True)
    try:
        pd = llm.generate(prompts, params, use_tqdm=False)
        text = colocated[0].outputs[0].text
        stop = text[len(text) // 2: len(text) // 2 + 2]
        stopped = llm.generate(prompts[:1], SamplingParams(temperature=0.8, top_p=0.9, seed=100, max_tokens=16,
                                                           ignore_eos=True, stop=stop), use_tqdm=False)
        # n > 1 across the pair: completions fork on the prefill worker and move one by one
        forked = llm.generate(prompts[:1], SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=100, max_tokens=16,
                                                          ignore_eos=True, logprobs=2, prompt_logprobs=1),
                              use_tqdm=False)[0]
        pd_stats = llm.stats()
    finally:
        llm.shutdown()
    singles = LLM(tiny_dir, device="cpu").generate(
        prompts[:1] * 3, [dataclasses.replace(params[0], seed=100 + i) for i in range(3)], use_tqdm=False)
    assert [o.token_ids for o in forked.outputs] == [single.outputs[0].token_ids for single in singles]
    assert len(forked.prompt_logprobs) == len(prompts[0])
    assert pd_stats["prefill"]["kv_used_blocks"] == 0 and pd_stats["decode"]["kv_used_blocks"] == 0
    for a, b in zip(pd, colocated):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for mine, ref in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert sorted(mine) == sorted(ref)
            assert [mine[k].logprob for k in ref] == pytest.approx([v.logprob for v in ref.values()])
    assert stopped[0].outputs[0].text == text[: text.index(stop)]
    assert stopped[0].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("victim", ["decode", "prefill"])
def test_killed_worker_raises_quickly_and_leaves_no_process(tiny_dir, victim):
    llm = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True, max_model_len=2048)
    pids = llm.engine.core.worker_pids()
    # long requests keep both workers busy (new prompts keep arriving at prefill as earlier ones decode)
    prompts = random_prompts(16, 200, 600, seed=1)
    params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    delay = seconds_to_raise_after_kill(lambda: llm.generate(prompts, params, use_tqdm=False), pids[victim], 3.0,
                                        WorkerDiedError, f"the {victim} worker")
    # a product promise: a dead worker is seen at once (its process sentinel), the other one is stopped
    assert delay < 2.0, delay
    for pid in pids.values():
        assert not process_alive(pid), pid
    with pytest.raises(WorkerDiedError):  # the engine stays dead and says so
        llm.generate(prompts[:1], params, use_tqdm=False)


def test_ctrl_c_stops_everything(tiny_dir, tmp_path):
    # No `if __name__ == "__main__"` guard, as in vLLM's examples: the workers never re-import the script.
    script = textwrap.dedent(f"""
        import sys
        from splitserve import LLM, SamplingParams
        llm = LLM({tiny_dir!r}, device="cpu", enable_two_gpu_pd=True)
        print(*llm.engine.core.worker_pids().values(), flush=True)
        out = llm.generate([[5] * 20], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        print(len(out[0].outputs[0].token_ids), flush=True)
        try:
            llm.generate([[5] * 50] * 4, SamplingParams(max_tokens=100000, ignore_eos=True), use_tqdm=False)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """)
    path = tmp_path / "run.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stderr.read()
    assert proc.stdout.readline().strip() == "3"
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in out, err
    assert "Traceback" not in err, err
    for pid in pids:
        assert not process_alive(pid)


def test_pd_flags_are_validated(monkeypatch, caplog):
    with pytest.raises(ValueError, match="must differ"):
        EngineConfig(enable_two_gpu_pd=True, prefill_device_id=1, decode_device_id=1)
    with pytest.raises(ValueError, match="device='cpu' cannot be combined with CUDA ids"):
        pd_devices(EngineConfig(enable_two_gpu_pd=True, device="cpu", decode_device_id=1))
    with pytest.raises(ValueError, match="prefill_device_id and decode_device_id"):
        pd_devices(EngineConfig(enable_two_gpu_pd=True, device="cuda:0"))
    with pytest.raises(ValueError, match="prefill_device_id must be a non-negative integer"):
        EngineConfig(enable_two_gpu_pd=True, prefill_device_id=-1)
    assert pd_devices(EngineConfig(enable_two_gpu_pd=True, device="cpu")) == ("cpu", "cpu")
    # GPU machines, simulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs two GPUs, found 1"):
        pd_devices(EngineConfig(enable_two_gpu_pd=True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="decode_device_id=3 does not exist"):
        pd_devices(EngineConfig(enable_two_gpu_pd=True, decode_device_id=3))
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: False)
    with caplog.at_level(logging.WARNING, logger="splitserve"):
        assert pd_devices(EngineConfig(enable_two_gpu_pd=True, prefill_device_id=1, decode_device_id=0)) == \
            ("cuda:1", "cuda:0")
    assert "no P2P access between GPU 1 and GPU 0" in caplog.text


def test_cli_generate_in_pd_mode(tiny_dir):
    res = subprocess.run([sys.executable, "-m", "splitserve", "generate", "The capital of France is",
                          "--no-chat-template", "--enable-two-gpu-pd", "--device", "cpu", "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    res = subprocess.run([sys.executable, "-m", "splitserve", "generate", "hi", "--enable-two-gpu-pd", "--device",
                          "cpu", "--decode-device-id", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "cannot be combined with CUDA ids" in res.stderr


def test_server_in_pd_mode(tiny_dir):
    from test_server import _free_port, http

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "splitserve", "serve", "--model", tiny_dir, "--device", "cpu",
                             "--enable-two-gpu-pd", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if http("GET", url + "/health", key=None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline
            time.sleep(0.5)
        prompt = random_prompts(1, 10, 10, seed=3)[0]
        status, body = http("POST", url + "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                              "ignore_eos": True}, key=None)
        assert status == 200, body
        expected = LLM(tiny_dir, device="cpu").generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                                                 ignore_eos=True), use_tqdm=False)
        assert body["choices"][0]["text"] == expected[0].outputs[0].text
        stats = http("GET", url + "/stats", key=None)[1]
        assert stats["mode"] == "two_device_pd"
        pids = [stats["prefill"]["pid"], stats["decode"]["pid"]]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    for pid in pids:
        assert not process_alive(pid)


def test_two_host_launch_with_a_decode_worker_started_by_hand(tiny_dir, monkeypatch):
    """The two-host recipe on one host: the decode worker is started separately (`splitserve pd-worker`),
    connects to the coordinator's address with the shared secret, and gets its config from it."""
    from test_server import _free_port

    port, master_port = _free_port(), _free_port()
    env = {**os.environ, "SPLITSERVE_PD_AUTHKEY": "s3cret"}
    worker = subprocess.Popen([sys.executable, "-m", "splitserve", "pd-worker", "--coordinator",
                               f"127.0.0.1:{port}", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    monkeypatch.setenv("SPLITSERVE_PD_AUTHKEY", "s3cret")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master_port))
    prompts = random_prompts(3, 5, 30, seed=12)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    try:
        llm = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True, pd_remote_decode=f"127.0.0.1:{port}")
        try:
            out = llm.generate(prompts, params, use_tqdm=False)
            assert llm.stats()["devices"] == {"prefill": "cpu", "decode": "remote"}
        finally:
            llm.shutdown()
        assert worker.wait(timeout=30) == 0, worker.stdout.read()  # it stops when told to
    finally:
        if worker.poll() is None:
            worker.kill()
    expected = LLM(tiny_dir, device="cpu").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [e.outputs[0].token_ids for e in expected]


def test_two_host_launch_needs_the_secret_and_rendezvous(tiny_dir, monkeypatch):
    monkeypatch.delenv("SPLITSERVE_PD_AUTHKEY", raising=False)
    with pytest.raises(ValueError, match="SPLITSERVE_PD_AUTHKEY"):
        LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True, pd_remote_decode="127.0.0.1:1")
    res = subprocess.run([sys.executable, "-m", "splitserve", "pd-worker", "--coordinator", "127.0.0.1:1"],
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k != "SPLITSERVE_PD_AUTHKEY"}, timeout=120)
    assert res.returncode != 0 and "SPLITSERVE_PD_AUTHKEY" in res.stderr


def test_pd_workers_resolve_max_model_len_from_their_own_cache(tiny_dir):
    """Regression: the front end once wrote its resolved max_model_len into the shared config, so a decode
    worker with a small cache took it for the user's and failed ("does not fit the KV cache")."""
    colocated = LLM(tiny_dir, device="cpu", num_kv_blocks=64)
    assert colocated.engine.max_model_len == 64 * 16 < 2048  # lowered to fit, as the user gave no value
    llm = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True, pd_decode_num_kv_blocks=64)
    try:
        assert llm.engine.max_model_len == 64 * 16
        assert llm.stats()["decode"]["max_model_len"] == 64 * 16 and llm.stats()["prefill"]["max_model_len"] == 2048
        out = llm.generate([[5] * 10], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()
    with pytest.raises(dataclasses.FrozenInstanceError):
        llm.config.max_model_len = 10  # resolved values never go back into the user's config


def test_control_channel_rejects_tampered_replayed_and_unsigned_messages():
    from splitserve.disagg.channel import ChannelError, handshake
    from splitserve.disagg.messages import Abort

    def pair(key_a=b"k", key_b=b"k"):
        a, b = socket.socketpair()
        out = {}
        def worker_side():
            try:
                out["w"] = handshake(b, key_b, is_coordinator=False)
            except (ConnectionError, EOFError, OSError):
                pass

        t = threading.Thread(target=worker_side)
        t.start()
        coord = handshake(a, key_a, is_coordinator=True)
        t.join()
        return coord, out["w"]

    coord, worker = pair()
    coord.send(Abort(["r1"]))
    assert worker.recv() == Abort(["r1"])
    coord.conn.send_bytes(b"\0" * 32 + pickle.dumps(Abort(["evil"])))  # unsigned: never unpickled
    with pytest.raises(ChannelError):
        worker.recv()
    coord, worker = pair()
    coord.send(Abort(["r1"]))
    raw = worker.conn.recv_bytes()  # taken off the wire
    coord.conn.send_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # altered in flight
    with pytest.raises(ChannelError):
        worker.recv()
    coord, worker = pair()
    coord.send(Abort(["r1"]))
    raw = worker.conn.recv_bytes()
    coord.conn.send_bytes(raw)
    coord.conn.send_bytes(raw)
    assert worker.recv() == Abort(["r1"])
    with pytest.raises(ChannelError):  # the replay
        worker.recv()
    coord, worker = pair()
    worker.send(Abort(["x"]))
    coord.conn.send_bytes(coord.conn.recv_bytes())  # a worker's own message reflected back at it
    with pytest.raises(ChannelError):
        worker.recv()
    with pytest.raises((ChannelError, EOFError, OSError)):
        pair(b"right", b"wrong")


def test_coordinator_survives_silent_and_wrong_key_peers(tiny_dir, monkeypatch):
    """A peer that connects and says nothing, and one with a wrong key, cannot stop the real decode worker
    from connecting (each handshake runs on its own, with a timeout)."""
    from multiprocessing.connection import Client

    from test_server import _free_port

    port, master_port = _free_port(), _free_port()
    stop = threading.Event()
    held = []

    def silent():
        while not stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", port)))
                return
            except OSError:
                time.sleep(0.05)

    def wrong_key():
        while not stop.is_set():
            try:
                Client(("127.0.0.1", port), authkey=b"wrong")
            except ConnectionRefusedError:
                time.sleep(0.05)
                continue
            except Exception:  # AuthenticationError or a closed connection: refused, as it should be
                return

    threads = [threading.Thread(target=f, daemon=True) for f in (silent, silent, wrong_key)]
    for t in threads:
        t.start()
    env = {**os.environ, "SPLITSERVE_PD_AUTHKEY": "s3cret"}
    monkeypatch.setenv("SPLITSERVE_PD_AUTHKEY", "s3cret")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master_port))
    time.sleep(0.5)
    worker = subprocess.Popen([sys.executable, "-m", "splitserve", "pd-worker", "--coordinator",
                               f"127.0.0.1:{port}", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(tiny_dir, device="cpu", enable_two_gpu_pd=True, pd_remote_decode=f"127.0.0.1:{port}")
        try:
            out = llm.generate([[7] * 9], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                               use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == 5
        finally:
            llm.shutdown()
        assert worker.wait(timeout=30) == 0, worker.stdout.read()
    finally:
        stop.set()
        for sock in held:
            sock.close()
        if worker.poll() is None:
            worker.kill()


def test_remote_decode_listens_on_loopback_unless_given_an_address():
    assert listen_address(":7000") == ("127.0.0.1", 7000)
    assert listen_address("0.0.0.0:7000") == ("0.0.0.0", 7000)
    assert listen_address("10.1.2.3:7001") == ("10.1.2.3", 7001)
    for bad in ("7000", "host:", "host:http", ":0", ":70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            listen_address(bad)
