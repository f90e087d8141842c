"""Issue 11: batch statistics are exact under DDP (two processes, gloo, on the CPU).

The same holds token by token (``TokenDistillationLoss`` over a top-k batch): AE-KD's mean gradient is then taken
over every position of every rank, support slots aligned by token id.

AE-KD's teacher weights come from a statistic of the whole batch (the mean gradient of each teacher's kd loss).
Two processes that each hold half of a global batch of B samples must find the same weights, and after DDP's
gradient averaging the same gradient, as one process holding all B samples. The halves are chosen so that one
rank has no sample of a stream: kdkit must still call the hooks of that stream there (with an empty view), or the
other rank's reduction would wait forever (here: until the process group's 60 s timeout fails the test).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit.plugin.collectives import data_parallel_size
import kdkit
from kdkit.testing import make_loss, make_token_loss
from kdkit_plugins.aekd import AEKDPlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
GLOBAL_BATCH = 8
TOLERANCE = 1e-6

#: label layouts of the global batch (-100 = unlabeled); rank r holds rows [4r, 4r + 4)
LAYOUTS = {
    # rank 0 holds both streams, rank 1 only labeled samples
    "rank-1-lacks-unlabeled": [0, -100, 2, -100, 1, 0, 2, 1],
    # rank 0 holds only unlabeled samples, rank 1 both
    "rank-0-lacks-labeled": [-100, -100, -100, -100, 1, -100, 0, 2],
}
PLUGINS = {
    "aekd-batch-mean": {AEKDPlugin: {"C": 0.6}},
    "aekd-per-sample": {AEKDPlugin: {"C": 0.6, "gradient": "per-sample"}, DisagreementPlugin: {}},
    "aekd-with-correctness": {AEKDPlugin: {"C": 0.7}, CorrectnessPlugin: {"ensembling": False}},
}


def _problem(layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x [B, 5], student weights W [5, 3], teacher logits [B, 4, 3], labels [B]: the same in every process."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    teacher = 2.0 * torch.randn(GLOBAL_BATCH, 4, 3, generator=gen, dtype=torch.float64)
    return x, w, teacher, torch.tensor(LAYOUTS[layout])


def _step(rows: slice, layout: str, plugins: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher weights of ``rows`` and the gradient of the loss on them with respect to the student weights."""
    x, w, teacher, labels = _problem(layout)
    w = w.clone().requires_grad_(True)
    out = make_loss(PLUGINS[plugins], temperature=2.0)(x[rows] @ w, teacher[rows], labels[rows])
    out.loss.backward()
    return out.teacher_weights, w.grad


#: token batches: 4 sequences of 6 positions, 3 teachers, V = 12, k = 3; rank r holds sequences 2r and 2r + 1.
#: Every rank holds 6 positions in play (DDP averages per-rank means); rank 1 has no generated position.
TOKEN_LAYOUTS = {
    # labeled positions (first list) and generated ones (second), sequence by sequence: 4 + 2 and 3 + 3 in play
    "rank-1-lacks-unlabeled": ([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
                               [[0, 0, 1, 1, 0, 0], [0] * 6, [0] * 6, [0] * 6]),
}
TOKEN_PLUGINS = {
    "aekd-tokens": {AEKDPlugin: {"C": 0.6}},
    "aekd-tokens-per-sample": {AEKDPlugin: {"C": 0.8, "gradient": "per-sample"}},
}


def _token_step(rows: slice, layout: str, plugins: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher = 2.0 * torch.randn(4, 6, 3, 12, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 12, (4, 6), generator=gen)
    labeled, generated = (torch.tensor(m, dtype=torch.bool) for m in TOKEN_LAYOUTS[layout])
    labels = torch.where(labeled, labels, -100)
    teachers = kdkit.TopKTeachers.from_logits(teacher[rows], labels[rows], k=3, temperature=2.0)
    out = make_token_loss(TOKEN_PLUGINS[plugins], temperature=2.0)(x[rows] @ w, teachers, labels[rows], generated[rows])
    out.loss.backward()
    return out.teacher_weights, w.grad


CASES = [(layout, plugins) for layout in LAYOUTS for plugins in PLUGINS]
TOKEN_CASES = [(layout, plugins) for layout in TOKEN_LAYOUTS for plugins in TOKEN_PLUGINS]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        assert data_parallel_size() == WORLD
        half = GLOBAL_BATCH // WORLD
        results = {}
        for case in CASES + TOKEN_CASES:
            if case in CASES:
                weights, grad = _step(slice(rank * half, (rank + 1) * half), *case)
            else:  # 2 of the 4 sequences
                weights, grad = _token_step(slice(2 * rank, 2 * rank + 2), *case)
            dist.all_reduce(grad)  # what DDP does with the gradients of the two processes: their mean
            results[case] = {"weights": weights, "grad": grad / WORLD}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case, run once by two processes together (one spawn: starting them is most of the cost)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize(("layout", "plugins"), CASES)
def test_two_processes_find_the_weights_and_gradient_of_one_process(two_processes, layout: str, plugins: str):
    ranks = [r[(layout, plugins)] for r in two_processes]
    one_weights, one_grad = _step(slice(0, GLOBAL_BATCH), layout, plugins)
    two_weights = torch.cat([r["weights"] for r in ranks])
    torch.testing.assert_close(two_weights, one_weights, atol=TOLERANCE, rtol=0)
    for r in ranks:
        torch.testing.assert_close(r["grad"], one_grad, atol=TOLERANCE, rtol=0)

    # and the statistic really is global: one rank alone, on its half, finds other weights
    half_weights, _ = _step(slice(0, GLOBAL_BATCH // WORLD), layout, plugins)
    assert (half_weights - one_weights[: GLOBAL_BATCH // WORLD]).abs().max() > 1e-3


@pytest.mark.parametrize(("layout", "plugins"), TOKEN_CASES)
def test_two_processes_distill_tokens_as_one(two_processes, layout: str, plugins: str):
    ranks = [r[(layout, plugins)] for r in two_processes]
    one_weights, one_grad = _token_step(slice(0, 4), layout, plugins)
    torch.testing.assert_close(torch.cat([r["weights"] for r in ranks]), one_weights, atol=TOLERANCE, rtol=0)
    for r in ranks:
        torch.testing.assert_close(r["grad"], one_grad, atol=TOLERANCE, rtol=0)
    half_weights, _ = _token_step(slice(0, 2), layout, plugins)
    assert (half_weights - one_weights[: len(half_weights)]).abs().max() > 1e-3
