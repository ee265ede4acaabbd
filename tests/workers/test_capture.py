"""Hidden-state capture for full-vocab teachers (workers/vllm_ext.py): a prefill split over engine steps, a
request computed again after preemption, and a gap; the coverage a teacher checks before it ships a row."""

import torch

from mopd_ray.workers.teacher import _covers
from mopd_ray.workers.vllm_ext import assemble_capture


def _h(pos, n):  # rows whose values are their positions
    return torch.arange(pos, pos + n, dtype=torch.float32)[:, None].expand(n, 3).clone()


def test_split_and_recomputed_prefills_assemble_into_one_run():
    first, h = assemble_capture([(4, _h(4, 3)), (7, _h(7, 2))])  # from the response on, in two steps
    assert first == 4 and h[:, 0].tolist() == [4, 5, 6, 7, 8]
    # preempted after the first step, computed again from the start: the later chunks overwrite
    first, h = assemble_capture([(4, _h(4, 3) * 0), (4, _h(4, 3)), (7, _h(7, 2))])
    assert first == 4 and h[:, 0].tolist() == [4, 5, 6, 7, 8]
    first, h = assemble_capture([(4, _h(4, 2)), (8, _h(8, 1))])  # a gap: cut there
    assert first == 4 and h[:, 0].tolist() == [4, 5]


def test_a_capture_must_cover_the_states_that_predict_the_response():
    n, start = 10, 6  # states 5 .. 8 predict tokens 6 .. 9
    assert _covers((5, 4, 3, b""), start, n) and _covers((0, 9, 3, b""), start, n)
    assert not _covers((5, 3, 3, b""), start, n)  # cut short (a preempted prefill)
    assert not _covers((6, 3, 3, b""), start, n) and not _covers(None, start, n)
    assert _covers((0, 9, 3, b""), 0, n)  # a probe scored from its first token
