"""CUDA graphs (GPU only): the captured steps give the eager steps' greedy tokens, for requests of
different lengths joining, prefilling in chunks and leaving while others decode."""

from __future__ import annotations

import copy

import pytest
import torch

from ds_models import generate
from ds_serve.scheduler import Request, Scheduler, SchedulerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA"),
]

PROMPTS = [[5, 6, 7, 8, 9], [17, 3], list(range(40, 77)), [3], [100, 200, 300], list(range(60, 90)), [8] * 12]
LENGTHS = [20, 5, 12, 30, 8, 25, 3]


@pytest.mark.parametrize("prefill", ["mixed", "separate"])
def test_graph_tokens_equal_eager(tiny, run_requests, prefill):
    model = copy.deepcopy(tiny[0]).cuda()  # float32: equal tokens need no luck with bf16 rounding
    tokens = {}
    for graphs in (True, False):
        config = SchedulerConfig(max_batch=5, step_tokens=16, prefill=prefill, cuda_graph=graphs)
        scheduler = Scheduler(model, config)
        try:
            reqs = run_requests(
                scheduler, [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, LENGTHS)]
            )
        finally:
            scheduler.shutdown()
        tokens[graphs] = [r.tokens for r in reqs]
        # the graph run really replayed graphs: decode-only and prompt-token shapes, several row buckets
        shapes = set(scheduler.engine.graphs)
        assert (
            (len({b for b, _, _ in shapes}) >= 3 and {c for _, c, _ in shapes} > {0})
            if graphs
            else not shapes
        )
    assert tokens[True] == tokens[False]
    assert tokens[True] == [generate(model, [p], n, mode="eager")[0] for p, n in zip(PROMPTS, LENGTHS)]
