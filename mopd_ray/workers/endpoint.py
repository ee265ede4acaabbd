"""A teacher served elsewhere: an OpenAI-compatible completions endpoint (vLLM's OpenAI server; SGLang's does not
offer vLLM's ``prompt_logprobs``, so it is not supported yet) that scores the student's tokens with its prompt log-probs.

The exact token ids go to the server (the completions API's token-id prompt form: no re-tokenisation, no chat
template on the server), ``max_tokens=1`` and vLLM's ``prompt_logprobs`` (0: the token's own log-prob; k: the
top-k as well). Requests carry ``rows_per_request`` sequences each, at most ``max_concurrency`` in flight (httpx,
asyncio). Connection errors, timeouts and 5xx answers are retried with exponential backoff (a server that
restarts comes back into the run); after ``max_retries`` the call fails naming the endpoint, and the teacher
takes the path of a dead replica. A 4xx answer, or an answer that does not cover the tokens it was sent, is
refused at once: retrying a wrong server does not make it right. The API key is read from the environment
variable the config names, in this process, and is never logged or stored.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class EndpointError(RuntimeError):
    """A served teacher's endpoint failed (unreachable after retries, refused the request, or answered wrongly)."""


@dataclass
class EndpointStats:
    requests: int = 0
    retries: int = 0
    tokens: int = 0
    bytes: int = 0  # of the answers received
    latencies: list = field(default_factory=list)

    def take(self) -> dict:
        """The counters since the last call (the per-teacher metrics of one scoring call)."""
        lat = np.array(self.latencies or [np.nan])
        out = {"endpoint_requests": self.requests, "endpoint_retries": self.retries, "endpoint_tokens": self.tokens,
               "endpoint_bytes": self.bytes, "endpoint_latency_p50_s": float(np.nanpercentile(lat, 50)),
               "endpoint_latency_p95_s": float(np.nanpercentile(lat, 95))}
        self.requests = self.retries = self.tokens = self.bytes = 0
        self.latencies = []
        return out


class EndpointClient:
    """Prompt log-probs of token-id sequences from ``url`` (``.../v1``), serving model ``model``."""

    def __init__(self, url: str, model: str, api_key_env: Optional[str] = None, max_concurrency: int = 8,
                 rows_per_request: int = 8, timeout_s: float = 120.0, max_retries: int = 6, backoff_s: float = 0.5):
        self.url, self.model = url.rstrip("/"), model
        self.api_key_env = api_key_env
        self.max_concurrency, self.rows_per_request = max(1, int(max_concurrency)), max(1, int(rows_per_request))
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.stats = EndpointStats()

    def _headers(self) -> dict:
        if not self.api_key_env:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EndpointError(f"endpoint {self.url}: the API key variable {self.api_key_env} is not set in this "
                                "process's environment (set it on every node, e.g. in the job's runtime_env env_vars)")
        return {"Authorization": f"Bearer {key}"}

    # ------------------------------------------------------------------ requests
    async def _post(self, client, path: str, body: dict) -> dict:
        import httpx

        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{self.url}{path}", json=body, headers=self._headers())
            except (httpx.TransportError, httpx.TimeoutException) as e:  # down, restarting, or too slow
                last = f"{type(e).__name__}: {e}"
                continue
            self.stats.requests += 1
            self.stats.bytes += len(r.content)
            self.stats.latencies.append(time.perf_counter() - t0)
            if r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                continue
            if r.status_code >= 400:
                raise EndpointError(f"endpoint {self.url}{path} refused the request (HTTP {r.status_code}): "
                                    f"{r.text[:500]}. Check teachers.models.NAME.model (the served model's name) "
                                    "and that the server accepts token-id prompts with prompt_logprobs (vLLM does)")
            return r.json()
        raise EndpointError(f"endpoint {self.url}{path} did not answer after {self.max_retries + 1} tries "
                            f"(last: {last}); is the server up and reachable from this node?")

    async def _score_all(self, seqs: list, topk: int) -> list:
        import httpx

        sem = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            async def one(chunk: list):
                async with sem:
                    body = {"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 1.0,
                            "prompt_logprobs": topk}
                    return await self._post(client, "/completions", body)

            chunks = [seqs[i: i + self.rows_per_request] for i in range(0, len(seqs), self.rows_per_request)]
            answers = await asyncio.gather(*(one(c) for c in chunks))
        out = []
        for chunk, ans in zip(chunks, answers):
            choices = sorted(ans.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise EndpointError(f"endpoint {self.url}: {len(chunk)} sequences sent, {len(choices)} answers came back")
            out.extend(choices)
        return out

    def score(self, seqs: list, topk: int) -> list:
        """Per sequence of n tokens: (lp [n - 1], top-k ids [n - 1, k], top-k log-probs [n - 1, k]); row j is token
        j + 1 given tokens 0..j (the teacher at temperature 1). Raises EndpointError naming the endpoint."""
        choices = asyncio.run(self._score_all([list(map(int, s)) for s in seqs], topk))
        out = []
        for s, c in zip(seqs, choices):
            pl = c.get("prompt_logprobs")
            n = len(s)
            if pl is None or len(pl) != n:
                raise EndpointError(
                    f"endpoint {self.url} answered {'no' if pl is None else len(pl)} prompt log-probs for a "
                    f"{n}-token sequence: it does not score the token ids it was sent (a server that re-tokenises, "
                    "or one without vLLM's prompt_logprobs); serve the teacher with vLLM's OpenAI server")
            lp = np.zeros(n - 1, np.float32)
            ids = np.zeros((n - 1, topk), np.int32)
            tk = np.full((n - 1, topk), -np.inf, np.float32)
            for j in range(1, n):
                entry = pl[j] or {}
                own = entry.get(str(int(s[j])))
                if own is None:
                    raise EndpointError(f"endpoint {self.url}: position {j} of a {n}-token sequence has no log-prob "
                                        f"for its token {int(s[j])}: the server scored other tokens than it was sent")
                lp[j - 1] = own["logprob"]
                if topk:
                    ranked = sorted(((v.get("rank") or 10**9, int(k), v["logprob"]) for k, v in entry.items()))[:topk]
                    for q, (_, tid, v) in enumerate(ranked):
                        ids[j - 1, q], tk[j - 1, q] = tid, v
            self.stats.tokens += n - 1
            out.append((lp, ids, tk))
        return out

    def tokenize(self, text: str) -> list:
        """The server's token ids of ``text`` (vLLM's ``/tokenize``, beside ``/v1``), without special tokens."""
        base = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

        async def go():
            import httpx

            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                url, self.url = self.url, base
                try:
                    return await self._post(client, "/tokenize", {"model": self.model, "prompt": text,
                                                                  "add_special_tokens": False})
                finally:
                    self.url = url
        return list(asyncio.run(go()).get("tokens", []))
