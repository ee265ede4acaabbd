"""Where a served teacher's time goes: the client's request sizes, and one request's server + transfer time, JSON size and
parse time (64 rows x 34 tokens, top-5; the tiny add expert on vLLM's OpenAI server on a loopback port).

    .venv/bin/python benchmarks/bench_served_split.py
"""
import sys, time, json, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, httpx
from mopd_ray.config import TinyModelConfig
from mopd_ray.models.tiny import build_tiny_model
from mopd_ray.workers.endpoint import EndpointClient
from tests.runtime.test_served_teacher import _free_port, start_server, stop_server, wait_ready
d = str(build_tiny_model(Path(tempfile.mkdtemp()) / "t", TinyModelConfig(seed=1)))
port = _free_port(); proc = start_server(d, port)
try:
    wait_ready(proc, port)
    url = f"http://127.0.0.1:{port}/v1"
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, 34).tolist() for _ in range(64)]
    for rpr, conc in ((8, 8), (64, 1), (16, 4)):
        c = EndpointClient(url, "tiny-teacher", rows_per_request=rpr, max_concurrency=conc)
        c.score(seqs, 5)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter(); c.score(seqs, 5); ts.append(time.perf_counter() - t0)
        print(f"rows_per_request={rpr} conc={conc}: {np.median(ts)*1000:.0f} ms for 64x34 top-5")
    body = {"model": "tiny-teacher", "prompt": seqs, "max_tokens": 1, "prompt_logprobs": 5, "temperature": 1.0}
    for _ in range(2):
        t0 = time.perf_counter(); r = httpx.post(url + "/completions", json=body, timeout=60); t1 = time.perf_counter()
        raw = r.content; t2 = time.perf_counter(); ans = json.loads(raw); t3 = time.perf_counter()
    print(f"one request of 64 rows: server+transfer {1000*(t1-t0):.0f} ms, {len(raw)/1e6:.2f} MB JSON, parse {1000*(t3-t2):.0f} ms")
finally:
    stop_server(proc)
