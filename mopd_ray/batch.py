"""What roles exchange through the Ray object store: numpy arrays in small frozen dataclasses.

numpy arrays come back from the object store zero-copy (read-only views); torch tensors would be
copied. Shapes: B rows (one sampled response each), L = padded prompt + response length, K top-k,
H teacher hidden size. Position l of ``*_logprobs_BL`` holds log pi(tokens[l] | tokens[<l]); only
response positions (``response_mask_BL``) carry meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class RolloutBatch:
    tokens_BL: np.ndarray  # int32, prompt + response, right-padded with pad_id
    prompt_lens_B: np.ndarray  # int32
    response_lens_B: np.ndarray  # int32
    rollout_logprobs_BL: np.ndarray  # float32, rollout engine's log-probs at response positions
    group_ids_B: np.ndarray  # int64, rows sampled from the same prompt share a group
    # int32 [B, S]: the row's teachers (indices into the run's sorted teacher names), one per slot, -1 where
    # the row's route has fewer than S teachers; a 1-D [B] array is taken as one slot
    teacher_index_BS: np.ndarray
    rewards_B: np.ndarray  # float32, NaN where the domain has no verifiable reward
    finished_B: np.ndarray  # bool, the response ended with an end-of-turn token (not truncated)
    domains: tuple[str, ...]
    weight_version: int = 0  # learner step whose weights generated this batch
    meta: dict = field(default_factory=dict)  # small numbers: generation time, token counts
    route_weight_BS: Optional[np.ndarray] = None  # float32 [B, S], the route's weight per slot (None: 1, 0 if empty)
    truncated_B: Optional[np.ndarray] = None  # bool, cut at max_new_tokens (None: none known)
    mask_truncated: bool = False  # rollout.overlong=mask: truncated rows carry no loss
    # bool [B, L]: the student's own sampled tokens (multi-turn episodes: environment and tool turns inside the
    # response are False: context for the student and its teachers, never loss, KL, advantage or denominator;
    # a row whose episode failed is all False). None: every response token is the student's
    action_mask_BL: Optional[np.ndarray] = None

    def __post_init__(self):
        tidx = np.asarray(self.teacher_index_BS, dtype=np.int32)
        if tidx.ndim == 1:
            tidx = tidx[:, None]
        object.__setattr__(self, "teacher_index_BS", tidx)
        w = (tidx >= 0).astype(np.float32) if self.route_weight_BS is None else self.route_weight_BS
        object.__setattr__(self, "route_weight_BS", np.asarray(w, dtype=np.float32).reshape(tidx.shape))

    @property
    def num_rows(self) -> int:
        return int(self.tokens_BL.shape[0])

    def response_mask_BL(self) -> np.ndarray:
        pos = np.arange(self.tokens_BL.shape[1])[None, :]
        start = self.prompt_lens_B[:, None]
        return (pos >= start) & (pos < start + self.response_lens_B[:, None])

    def loss_mask_BL(self) -> np.ndarray:
        """The response positions the learner trains on: the student's own tokens (``action_mask_BL``), none of
        a truncated row's when ``mask_truncated`` (rollout.overlong=mask)."""
        mask = self.response_mask_BL()
        if self.mask_truncated and self.truncated_B is not None:
            mask &= ~np.asarray(self.truncated_B, bool)[:, None]
        if self.action_mask_BL is not None:
            mask &= self.action_mask_BL[:, :mask.shape[1]]
        return mask

    def sequence(self, row: int) -> np.ndarray:
        """Prompt + response token ids of one row (no padding)."""
        return self.tokens_BL[row, : int(self.prompt_lens_B[row] + self.response_lens_B[row])]

    @property
    def has_reward_B(self) -> np.ndarray:
        return ~np.isnan(self.rewards_B)

    def take(self, rows: np.ndarray) -> "RolloutBatch":
        """The batch of rows ``rows`` only (e.g. one learner rank's part), trimmed to its longest row."""
        rows = np.asarray(rows, dtype=np.int64)
        L = int((self.prompt_lens_B[rows] + self.response_lens_B[rows]).max()) if len(rows) else 0
        return RolloutBatch(self.tokens_BL[rows, :L], self.prompt_lens_B[rows], self.response_lens_B[rows],
                            self.rollout_logprobs_BL[rows, :L], self.group_ids_B[rows], self.teacher_index_BS[rows],
                            self.rewards_B[rows], self.finished_B[rows], tuple(self.domains[i] for i in rows),
                            self.weight_version, dict(self.meta), self.route_weight_BS[rows],
                            None if self.truncated_B is None else np.asarray(self.truncated_B)[rows], self.mask_truncated,
                            None if self.action_mask_BL is None else self.action_mask_BL[rows, :L])


@dataclass(frozen=True)
class TeacherScores:
    """One teacher's scores for some rows of one rollout shard, at response positions only (a row with
    several teachers gets one TeacherScores from each).

    Column t of a ``*_RT*`` array is token position ``start_R[r] + t`` of row ``rows_R[r]`` (start is
    the row's prompt length); T is the longest response among the rows, shorter rows are zero-padded.
    Prompt positions carry no signal and are not shipped (prompts are often most of a sequence).
    """

    teacher: str
    rows_R: np.ndarray  # int32 indices into the shard's rows
    start_R: np.ndarray  # int32 token position of column 0 (the row's prompt length)
    teacher_logprobs_RT: np.ndarray  # float32, log pi_T(tokens[l] | tokens[<l]) at l = start + t
    topk_ids_RTK: Optional[np.ndarray] = None  # int32, teacher's top-k ids per position (signal topk)
    topk_logprobs_RTK: Optional[np.ndarray] = None  # float32
    hidden_RTH: Optional[np.ndarray] = None  # last-layer hidden state predicting token l (full_vocab), compact dtype
    hidden_dtype: Optional[str] = None  # "bfloat16" hidden states travel as uint16 bit patterns
    latency_s: float = 0.0

    def take(self, rows: np.ndarray) -> "TeacherScores":
        """Scores of the batch rows ``rows`` (must all be scored here), renumbered 0..len(rows)-1."""
        where = {int(r): i for i, r in enumerate(self.rows_R)}
        sel = np.asarray([where[int(r)] for r in rows], dtype=np.int64)
        pick = (lambda a: None if a is None else a[sel])
        return TeacherScores(self.teacher, np.arange(len(sel), dtype=np.int32), self.start_R[sel],
                             self.teacher_logprobs_RT[sel], pick(self.topk_ids_RTK), pick(self.topk_logprobs_RTK),
                             pick(self.hidden_RTH), self.hidden_dtype, self.latency_s)

    def restrict(self, rows: np.ndarray) -> "Optional[TeacherScores]":
        """The scores of those of the batch rows ``rows`` (sorted) this scored, renumbered as the rows of
        ``batch.take(rows)``; None when it scored none of them."""
        from dataclasses import replace

        mine = rows[np.isin(rows, self.rows_R)]
        if not len(mine):
            return None
        return replace(self.take(mine), rows_R=np.searchsorted(rows, mine).astype(np.int32))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.rows_R, self.start_R, self.teacher_logprobs_RT, self.topk_ids_RTK,
                                      self.topk_logprobs_RTK, self.hidden_RTH) if a is not None)

    def positions(self, L: int) -> tuple:
        """(row, pos, valid): [R, T] token positions of every column and whether they fall inside L."""
        T = self.teacher_logprobs_RT.shape[1]
        pos = self.start_R[:, None].astype(np.int64) + np.arange(T)[None, :]
        return np.broadcast_to(np.arange(len(self.rows_R))[:, None], pos.shape), pos, pos < L

    def to_positions(self, arr_RT: np.ndarray, L: int, fill=0) -> np.ndarray:
        """A ``*_RT*`` array placed back at token positions: [R, L, ...], ``fill`` elsewhere."""
        out = np.full((arr_RT.shape[0], L, *arr_RT.shape[2:]), fill, dtype=arr_RT.dtype)
        r, pos, ok = self.positions(L)
        out[r[ok], pos[ok]] = arr_RT[ok]
        return out


def batch_nbytes(batch: RolloutBatch) -> int:
    """Bytes of a RolloutBatch's arrays (what a consumer pulls through the object store)."""
    return sum(a.nbytes for a in (batch.tokens_BL, batch.prompt_lens_B, batch.response_lens_B,
                                  batch.rollout_logprobs_BL, batch.group_ids_B, batch.teacher_index_BS,
                                  batch.route_weight_BS, batch.rewards_B, batch.finished_B, batch.action_mask_BL)
               if a is not None)


def response_windows(dense_RL: np.ndarray, start_R: np.ndarray, T: int) -> np.ndarray:
    """Cut [R, T, ...] windows starting at ``start_R`` out of [R, L, ...] (zeros past L)."""
    R, L = dense_RL.shape[:2]
    pos = start_R[:, None].astype(np.int64) + np.arange(T)[None, :]
    ok = pos < L
    out = np.zeros((R, T, *dense_RL.shape[2:]), dtype=dense_RL.dtype)
    rr = np.broadcast_to(np.arange(R)[:, None], pos.shape)
    out[ok] = dense_RL[rr[ok], pos[ok]]
    return out


def pad_sequences(seqs: list, pad_id: int, length: Optional[int] = None, dtype=np.int32) -> np.ndarray:
    length = length or max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), length), pad_id, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
