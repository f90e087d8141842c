"""AE-KD (Du et al., NeurIPS 2020, "Agree to Disagree: Adaptive Ensemble Knowledge Distillation in Gradient
Space"): teacher weights from a min-norm problem over the teachers' distillation gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import mul
from typing import Literal

import torch
from pydantic import Field

import kdkit

#: ``C * N`` within this relative distance of 1 counts as exactly 1 (``C = 1/N``: only the average is feasible).
_FEASIBILITY_TOL = 1e-9


class AEKDOptions(kdkit.Options):
    """Options of ``aekd``."""

    C: float = Field(
        0.6,
        gt=0,
        allow_inf_nan=False,
        description="Upper bound on each teacher's weight (the paper's tolerance C). C = 1/N forces the plain "
        "average, C >= 1 gives the unconstrained min-norm weights; C * N < 1 is infeasible and an error.",
    )
    gradient: Literal["batch-mean", "per-sample"] = Field(
        "batch-mean",
        description="What g_i is. 'batch-mean': the batch mean of each teacher's kd gradient with respect to the "
        "student logits, p_s - P_i (DESIGN.md); 'per-sample': the whole [B, C] gradient, so G sums the per-sample "
        "inner products and opposite errors on different samples do not cancel.",
    )
    tol: float = Field(
        1e-12,
        gt=0,
        lt=1,
        description="Solver stopping tolerance on the Frank-Wolfe duality gap, relative to max_i |g_i|^2.",
    )
    max_iter: int = Field(1000, ge=1, description="Solver iteration cap (it normally stops after a few).")


class AEKDPlugin(kdkit.Plugin):
    """Adaptive ensemble weights in gradient space (AE-KD).

    For the samples of one stream, teacher ``i`` pulls the student logits along the gradient of its kd loss,
    ``g_i`` (``option gradient``; by default the batch mean of ``p_s - P_i``, the gradient up to the constant
    factor ``T / B``). AE-KD picks the convex combination of the teachers whose combined gradient is shortest,

        min_a  a^T G a    subject to  sum_i a_i = 1,  0 <= a_i <= C,       G = [g_i . g_j],

    i.e. the direction the teachers agree on, with the cap ``C`` stopping a single teacher from taking over.
    Every sample of the stream gets the same weights ``a``; they are constants (no gradient flows through them).
    ``C = 1/N`` leaves only the plain average; ``C >= 1`` is the plain min-norm point.

    Differences from the authors' code, on purpose: the default ``g_i`` is the batch mean (DESIGN.md section 1)
    where the authors' code takes the full per-sample logit gradient (``gradient = "per-sample"``), and the
    problem is solved exactly (Wolfe's min-norm-point algorithm, below) instead of by an SVM solver.

    ``G`` is positive semi-definite and usually singular (its rank is at most ``C - 1`` for ``C`` classes, 1 for
    binary tasks), so the minimiser is often not unique; every minimiser has the same objective value.

    Cost: the solver works on ``G`` only, in float64 plain Python. Measured on a shared 2-core CPU for a batch
    of 32 and ``C = 0.6``: about 10-60 microseconds for up to 16 teachers on 2-3 classes, 0.1-0.3 ms on 10
    classes, about 1 ms on 100 classes with 16 teachers.
    """

    name = "aekd"
    version = kdkit.__version__
    Options = AEKDOptions
    ensembles = ("labeled", "unlabeled")

    options: AEKDOptions

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch: kdkit.KDBatch) -> torch.Tensor:
        n = batch.num_teachers
        cap = self.options.C
        if cap * n < 1.0 - _FEASIBILITY_TOL:
            raise kdkit.PluginError(
                f"aekd: C = {cap} is infeasible with N = {n} teachers: weights of at most C cannot sum to 1 "
                f"unless C >= 1/N = {1.0 / n:.6g}; raise plugins.aekd.C"
            )
        if cap * n <= 1.0 + _FEASIBILITY_TOL:
            weights = [1.0 / n] * n  # the only feasible point
        else:
            # G is a statistic of the whole batch: reduced over data-parallel ranks (an empty view takes part
            # too, so that every rank joins the reduction), each sample's classes aligned (token batches)
            gram = gradient_gram(
                batch.student_probs, batch.teacher_probs, self.options.gradient, batch.mean_over_ranks
            )
            weights = min_norm_capped_simplex(
                gram.tolist(), cap, tol=self.options.tol, max_iter=self.options.max_iter
            )
        row = torch.tensor(weights, dtype=torch.float32, device=batch.device)
        return row.unsqueeze(0).expand(batch.size, n).contiguous()


def _plain_mean(values: torch.Tensor, *, by_class: bool = False) -> torch.Tensor:
    """The mean over the first axis (0 for no rows): :func:`gradient_gram`'s default, one batch, one process."""
    return values.mean(dim=0) if values.shape[0] else values.sum(dim=0)


def gradient_gram(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    gradient: str = "batch-mean",
    mean: Callable[..., torch.Tensor] = _plain_mean,
) -> torch.Tensor:
    """``G`` ``[N, N]`` float64 from student probabilities ``[B, C]`` and teacher probabilities ``[B, N, C]``.

    ``batch-mean``: ``G_ij = g_i . g_j`` with ``g_i = mean_b (p_s[b] - P_i[b])``.
    ``per-sample``: ``G_ij = mean_b (p_s[b] - P_i[b]) . (p_s[b] - P_j[b])``.

    :param mean: the mean over samples, called as ``mean(values)`` or ``mean(values, by_class=True)``:
        :meth:`kdkit.KDBatch.mean_over_ranks` in a run (over every data-parallel rank, with classes aligned
        where samples have classes of their own, as the positions of a token batch do); by default a plain mean
        over this batch.
    """
    diff = student_probs.double().unsqueeze(1) - teacher_probs.double()  # [B, N, C]
    if gradient == "batch-mean":
        g = mean(diff, by_class=True)  # [N, classes]
        return g @ g.T
    if gradient == "per-sample":
        return mean(torch.einsum("bic,bjc->bij", diff, diff))
    raise kdkit.PluginError(f"aekd: unknown gradient {gradient!r}")


# --------------------------------------------------------------------------------------------- the solver
#
# min_a a^T G a over the capped simplex S = {a : sum a = 1, 0 <= a <= C} is the search for the point of least
# norm in the polytope M(S), where M = g^T maps weights to combined gradients (G = M^T M). Wolfe's min-norm-point
# algorithm (P. Wolfe, "Finding the nearest point in a polytope", Math. Programming 11, 1976) solves it exactly
# in finitely many steps. It keeps a small "corral" of vertices of S and the current point as a convex
# combination of them; each major step adds the vertex that a linear minimisation over S returns (for the capped
# simplex: sort the scores, fill the smallest with C until the weights sum to 1) and each minor step moves to the
# least-norm point of the corral's affine hull, dropping vertices until the point lies inside their convex hull.
# Everything is expressed with G only (v . G w is the inner product of the images of v and w), so the cost does
# not grow with the number of classes, and the answer is always feasible: a convex combination of vertices.

_Vertex = tuple[tuple[int, float], ...]  # sparse: (teacher index, weight) pairs


def capped_simplex_vertex(scores: list[float], cap: float) -> _Vertex:
    """A vertex of ``{sum a = 1, 0 <= a <= cap}`` minimising ``scores . a`` (ties broken by index)."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    full = min(n, int(math.floor(1.0 / cap + _FEASIBILITY_TOL)))
    rest = 1.0 - full * cap
    pairs = [(order[k], cap) for k in range(full)]
    if rest > 1e-12 and full < n:
        pairs.append((order[full], rest))
    return tuple(pairs)


class _Corral:
    """The corral: vertices of the capped simplex, their Gram matrix under ``G`` and the inverse of the KKT
    matrix ``K = [[0, 1^T], [1, H]]`` of the affine least-norm problem, kept up to date by bordering (adding a
    vertex) and by the block-inverse identity (dropping one), so that each step costs ``O(m^2)``, not ``O(m^3)``.
    """

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.vertices: list[_Vertex] = []
        self.images: list[list[float]] = []  # G v (dense) per vertex
        self.gram: list[list[float]] = []  # v_k . G v_l
        self.inv: list[list[float]] = [[0.0]]  # placeholder until the first vertex arrives

    def __len__(self) -> int:
        return len(self.vertices)

    def add(self, vertex: _Vertex, image: list[float]) -> bool:
        """Add ``vertex``; ``False`` (nothing added) when it lies numerically in the corral's affine hull."""
        row = [_sparse_dot(v, image) for v in self.vertices]
        own = _sparse_dot(vertex, image)
        if not self.vertices:
            self.inv = [[-own, 1.0], [1.0, 0.0]]
        else:
            border = [1.0, *row]
            inv = self.inv
            u = [sum(map(mul, r, border)) for r in inv]
            schur = own - sum(map(mul, border, u))  # squared distance to the affine hull
            if not schur > 1e-12 * self.scale:
                return False
            new = [[inv[i][j] + u[i] * u[j] / schur for j in range(len(u))] + [-u[i] / schur] for i in range(len(u))]
            new.append([-x / schur for x in u] + [1.0 / schur])
            self.inv = new
        for k, r in enumerate(self.gram):
            r.append(row[k])
        self.gram.append([*row, own])
        self.vertices.append(vertex)
        self.images.append(image)
        return True

    def drop(self, k: int) -> None:
        """Remove vertex ``k``."""
        j = k + 1
        inv = self.inv
        pivot = inv[j][j]
        col = [inv[i][j] for i in range(len(inv)) if i != j]
        rest = [[x for c, x in enumerate(r) if c != j] for i, r in enumerate(inv) if i != j]
        self.inv = [[rest[i][l] - col[i] * col[l] / pivot for l in range(len(col))] for i in range(len(col))]
        del self.vertices[k], self.images[k], self.gram[k]
        for r in self.gram:
            del r[k]

    def rebuild(self) -> None:
        """Recompute the inverse from scratch (after rounding has built up), dropping dependent vertices."""
        vertices, images = self.vertices, self.images
        self.vertices, self.images, self.gram, self.inv = [], [], [], [[0.0]]
        for vertex, image in zip(vertices, images):
            self.add(vertex, image)

    def affine_min_norm(self) -> list[float] | None:
        """Coefficients (summing to 1) of the least-norm point of the corral's affine hull, or ``None`` when the
        maintained inverse no longer solves the KKT system accurately."""
        alpha = [r[0] for r in self.inv[1:]]
        mu = self.inv[0][0]
        tol = 1e-9 * max(1.0, max(abs(a) for a in alpha))
        if abs(sum(alpha) - 1.0) > tol:
            return None
        for r in self.gram:
            if abs(sum(map(mul, r, alpha)) + mu) > tol * self.scale:
                return None
        return alpha


def _combine(coefficients: list[float], vectors: list[list[float]]) -> list[float]:
    """``sum_k coefficients[k] * vectors[k]`` (dense lists)."""
    out = [coefficients[0] * x for x in vectors[0]]
    for c, vector in zip(coefficients[1:], vectors[1:]):
        out = [o + c * x for o, x in zip(out, vector)]
    return out


def _sparse_dot(v: _Vertex, dense: list[float]) -> float:
    return sum(w * dense[i] for i, w in v)


def min_norm_capped_simplex(
    gram: list[list[float]], cap: float, *, tol: float = 1e-12, max_iter: int = 1000
) -> list[float]:
    """``argmin a^T G a`` over ``{sum a = 1, 0 <= a <= cap}`` (``gram``: ``G``, symmetric PSD, ``N x N``).

    Requires ``cap * N >= 1``. Stops when the Frank-Wolfe duality gap, which bounds the distance of the
    objective from its minimum, is below ``tol * max_i G_ii``, or after ``max_iter`` major steps. The result
    is feasible up to rounding whatever happens.
    """
    n = len(gram)
    scale = max(gram[i][i] for i in range(n))
    if not scale > 0.0:  # every g_i is 0 (or G is not finite): nothing to prefer
        return [1.0 / n] * n
    gap_tol = tol * scale

    def image(v: _Vertex) -> list[float]:  # G v (dense)
        return _combine([w for _, w in v], [gram[i] for i, _ in v])

    corral = _Corral(scale)
    start = capped_simplex_vertex([sum(row) for row in gram], cap)
    corral.add(start, image(start))
    lam = [1.0]
    previous = math.inf
    for _ in range(max_iter):
        m = len(corral)
        gx = _combine(lam, corral.images)  # G x
        xx = sum(lam[k] * _sparse_dot(corral.vertices[k], gx) for k in range(m))  # x . G x
        if not xx < previous:  # no progress left in floating point
            break
        previous = xx
        vertex = capped_simplex_vertex(gx, cap)
        if xx - _sparse_dot(vertex, gx) <= gap_tol or vertex in corral.vertices:
            break
        if not corral.add(vertex, image(vertex)):
            # the inverse kept up to date through drops can drift enough to hide a small distance to the hull
            # (a singular G); only a freshly built one may say that x is optimal
            corral.rebuild()
            lam = lam[: len(corral)]  # rebuild only ever drops trailing, dependent vertices
            total = sum(lam)
            lam = [x / total for x in lam]
            if not corral.add(vertex, image(vertex)):
                break  # the new vertex is (numerically) in the corral's affine hull: x is optimal
        lam.append(0.0)
        for _minor in range(len(corral) + 1):
            alpha = corral.affine_min_norm()
            if alpha is None:
                corral.rebuild()
                lam = lam[: len(corral)]  # rebuild only ever drops trailing, dependent vertices
                alpha = corral.affine_min_norm() or lam
            if min(alpha) > 1e-14:
                lam = alpha
                break
            # move from lam towards alpha until a coefficient reaches 0, then drop those vertices
            theta = 1.0
            for k in range(len(lam)):
                if alpha[k] <= 1e-14 and lam[k] > alpha[k]:
                    theta = min(theta, lam[k] / (lam[k] - alpha[k]))
            lam = [(1.0 - theta) * lam[k] + theta * alpha[k] for k in range(len(lam))]
            for k in reversed(range(len(lam))):
                if lam[k] <= 1e-14:
                    corral.drop(k)
                    del lam[k]
            total = sum(lam)
            lam = [x / total for x in lam]
    weights = [0.0] * n
    for k, v in enumerate(corral.vertices):
        for i, w in v:
            weights[i] += lam[k] * w
    return [min(max(w, 0.0), cap) for w in weights]
