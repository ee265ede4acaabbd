"""A teacher served elsewhere: a real vLLM OpenAI server of a tiny teacher on a loopback port (the CPU build's
``python -m vllm.entrypoints.openai.api_server``), scored through mopd_ray/workers/endpoint.py."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mopd_ray.batch import RolloutBatch, pad_sequences

pytestmark = pytest.mark.slow

SEQS = [[1, 298, 201, 67, 70, 70, 19, 20, 2, 201, 1, 275, 307, 201, 21, 22, 2],
        [1, 298, 201, 80, 33, 34, 35, 36, 2, 201, 1, 275, 307, 201, 36, 35, 34, 33, 2],
        [1, 298, 201, 80, 33, 34, 2]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, port: int, name: str = "tiny-teacher") -> subprocess.Popen:
    from mopd_ray.workers.vllm_engine import cpu_engine_env

    env = {**os.environ, **cpu_engine_env("0")}
    return subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", name,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
         "--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20), "--max-logprobs", "20"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its engine core is a child process: stop_server kills the whole group


def stop_server(proc: subprocess.Popen) -> None:
    """Kill the server and its engine-core process (killing the server alone left the engine core running); fails
    if any process the server started outlives it."""
    import signal

    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"processes of the vLLM server still running after it was killed: {alive}"


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = 240.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the vLLM server did not come up")


@pytest.fixture(scope="module")
def server(artifacts):
    """The add expert of the tests' artifacts, served on a loopback port."""
    model_dir = str(artifacts / "tiny" / "teacher_add")
    port = _free_port()
    state = {"url": f"http://127.0.0.1:{port}/v1", "model": "tiny-teacher", "dir": model_dir,
             "proc": start_server(model_dir, port)}
    try:
        wait_ready(state["proc"], port)
        yield state
    finally:
        # the server running now: the kill-and-restart test replaces the first (stopping only that one left the
        # second running after every suite, 0.6 GB each)
        stop_server(state["proc"])


def _batch(seqs, plens):
    lens = np.array([len(s) for s in seqs], np.int32)
    n = len(seqs)
    return RolloutBatch(pad_sequences(seqs, 0), np.array(plens, np.int32), lens - np.array(plens, np.int32),
                        np.zeros((n, int(lens.max())), np.float32), np.arange(n), np.zeros(n, np.int32),
                        np.full(n, np.nan, np.float32), np.ones(n, bool), ("add",) * n)


def test_a_served_teacher_scores_what_the_same_model_scores_in_the_job(server):
    """Sampled and top-k signals through the endpoint equal the in-job vLLM teacher's on the same rows (the
    same model folder); the endpoint's tokenizer agrees with the folder's."""
    from mopd_ray.workers.teacher import TeacherWorker

    base = {"dtype": "float32", "max_model_len": 256, "max_logprobs": 20, "tensor_parallel_size": 1,
            "kv_cache_memory_bytes": 128 << 20, "hidden_dtype": "float32"}
    served = TeacherWorker("add_expert", server["dir"], {**base, "backend": "endpoint", "endpoint": server["url"],
                                                         "model": server["model"], "rows_per_request": 2})
    local = TeacherWorker("add_expert", server["dir"], {**base, "backend": "vllm"})
    try:
        batch = _batch(SEQS, [9, 9, 3])
        rows = np.arange(3, dtype=np.int32)
        for topk in (0, 5):
            a, meta = served.score(batch, rows, topk=topk)
            b, _ = local.score(batch, rows, topk=topk)
            np.testing.assert_allclose(a.teacher_logprobs_RT, b.teacher_logprobs_RT, atol=1e-5)
            if topk:
                np.testing.assert_array_equal(a.topk_ids_RTK, b.topk_ids_RTK)
                np.testing.assert_allclose(a.topk_logprobs_RTK, b.topk_logprobs_RTK, atol=1e-5)
        assert meta["endpoint_requests"] == 2 and meta["endpoint_tokens"] == sum(len(s) - 1 for s in SEQS)
        assert meta["endpoint_bytes"] > 100 * meta["endpoint_tokens"]  # the answers' JSON: an entry per position
        assert served.fingerprint() == local.fingerprint()
        assert served.check_endpoint_tokenizer() is None
    finally:
        local.close()


def test_a_wrong_model_name_or_a_dead_endpoint_is_refused_naming_the_endpoint(server):
    from mopd_ray.workers.endpoint import EndpointClient, EndpointError

    with pytest.raises(EndpointError, match=r"refused the request \(HTTP 404\).*teachers.models.NAME.model"):
        EndpointClient(server["url"], "no-such-model").score([SEQS[0]], 0)
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    client = EndpointClient(dead, "tiny-teacher", max_retries=2, backoff_s=0.05)
    with pytest.raises(EndpointError, match=rf"{dead}/completions did not answer after 3 tries"):
        client.score([SEQS[0]], 0)
    assert client.stats.retries == 2


class _Tamper:
    """An HTTP proxy in front of the real server that forwards every request and edits /completions answers
    (``edit(answer) -> answer``): a server that answers with wrong token counts or other tokens."""

    def __init__(self, upstream: str, edit):
        import http.server
        import json
        import threading

        import httpx

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                r = httpx.request(method, upstream + self.path[len("/v1"):], content=body,
                                  headers={"Content-Type": "application/json"}, timeout=60)
                out = r.content
                if self.path.endswith("/completions") and r.status_code == 200:
                    out = json.dumps(edit(r.json())).encode()
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_POST(self):
                self._forward("POST")

            def do_GET(self):
                self._forward("GET")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_answering_wrong_token_counts_or_other_tokens_is_refused(server):
    """A real server's answers, edited on the way: one prompt log-prob short (a server that re-tokenised), or the
    log-probs of another token than was sent: refused at once (no retry), naming the endpoint."""
    from mopd_ray.workers.endpoint import EndpointClient, EndpointError

    def drop_last(ans):
        for c in ans["choices"]:
            c["prompt_logprobs"] = c["prompt_logprobs"][:-1]
        return ans

    def other_token(ans):
        for c in ans["choices"]:
            last = c["prompt_logprobs"][-1]
            c["prompt_logprobs"][-1] = {str(int(k) + 1): v for k, v in last.items()}
        return ans

    for edit, match in [(drop_last, r"answered 16 prompt log-probs for a 17-token sequence: it does not score the "
                                     r"token ids it was sent"),
                        (other_token, r"position 16 of a 17-token sequence has no log-prob for its token 2")]:
        proxy = _Tamper(server["url"], edit)
        try:
            client = EndpointClient(proxy.url, server["model"], max_retries=3, backoff_s=0.05)
            with pytest.raises(EndpointError, match=rf"endpoint {proxy.url}.*{match}"):
                client.score([SEQS[0]], 0)
            assert client.stats.retries == 0  # a wrong answer is not a transient failure
        finally:
            proxy.close()


def test_mopd_against_a_served_teacher_killed_and_restarted_in_the_middle_of_the_run(server, artifacts, local_ray,
                                                                                    tmp_path, caplog):
    """The add expert given as an endpoint (its folder stays the tokenizer and the pre-flight's reference): the
    pre-flight checks it against its folder and it scores every add row, with its request metrics. The server
    dies after step 0 and comes back ~15 s later on the same port: the teacher's requests fail, back off and
    retry until it answers; the run goes on and trains every row once."""
    import logging
    import threading

    from mopd_ray.metrics import read_metrics
    from mopd_ray.orchestrator import Orchestrator

    from ..helpers import compose_cfg

    port = int(server["url"].rsplit(":", 1)[1].split("/")[0])
    cfg = compose_cfg("experiment=local_smoke", f"run.artifacts_dir={artifacts}", "run.total_steps=4",
                      f"run.checkpoint_dir={tmp_path}/ck", "logging.wandb_mode=disabled", "logging.progress_bar=false",
                      f"teachers.models.add_expert.endpoint={server['url']}",
                      f"teachers.models.add_expert.model={server['model']}",
                      # backoff capped at 10 s: ~165 s for the restart (~15 s alone; a minute and more on a loaded machine)
                      "teachers.models.add_expert.max_retries=20")
    done = {}

    def chaos():
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_server(server["proc"])  # the server and its engine core die
        server["proc"] = start_server(server["dir"], port)  # the fixture stops this one at the end
        wait_ready(server["proc"], port)
        done["back"] = True

    th = threading.Thread(target=chaos, daemon=True)
    th.start()
    with caplog.at_level(logging.INFO, logger="mopd_ray"):
        last = Orchestrator(cfg, str(tmp_path)).run()
    th.join(timeout=300)
    assert done.get("back")
    assert "probe log-probs agree" in caplog.text
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert 0 < r["teacher/add_expert/tokens"] <= r["teacher/add_expert/endpoint_tokens"]
        assert r["teacher/add_expert/endpoint_requests"] >= 1 and r["teacher/add_expert/endpoint_bytes"] > 0
    assert sum(r.get("teacher/add_expert/endpoint_retries", 0) for r in rows) > 0  # it was down for a while
    assert last["rows_trained"] == 4 * cfg.data.prompts_per_step * cfg.rollout.n_samples_per_prompt
