"""Analysis of trajectories: singular values, representational similarity, errors on trained and
untrained pairs, loss-drop times and theory-vs-simulation comparisons (MATH.md sections 4-5).

Functions take weights as ``{edge: array}`` whose arrays may carry leading axes (time, runs):
an edge of shape (out, in) may be given as (..., out, in) and results keep the leading axes.
Everything here is plain numpy and cheap; nothing is compiled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .errors import ConfigError, DataError

__all__ = [
    "crossing_times",
    "domain_alignment",
    "generalisation_errors",
    "hidden_representations",
    "loss_drop_times",
    "pathway_map",
    "pathway_modes",
    "project_on_bases",
    "relative_discrepancy",
    "routing_bases",
    "routing_drop_epochs",
    "routing_plateaus",
    "similarity_matrix",
    "singular_values",
]


# ----------------------------------------------------------------------------- edges


def singular_values(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Singular values of every edge, largest first: {edge: (..., min(out, in))}.

    A matrix with a non-finite entry (a diverged run) gives NaNs, as ``simulate`` records them.
    """
    out = {}
    for edge, w in weights.items():
        arr = np.asarray(w, dtype=np.float64)
        if arr.ndim < 2:
            raise DataError(f"singular_values: weights of {edge!r} must be (..., out, in), "
                            f"got shape {arr.shape}")
        finite = np.isfinite(arr).all(axis=(-2, -1))
        if finite.all():
            out[edge] = np.linalg.svd(arr, compute_uv=False)
        else:
            sv = np.full(arr.shape[:-2] + (min(arr.shape[-2:]),), np.nan)
            sv[finite] = np.linalg.svd(arr[finite], compute_uv=False)
            out[edge] = sv
    return out


def project_on_bases(weight: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Strength of each mode of a weight in fixed bases: ``diag(leftᵀ W right)``, (..., k).

    weight (..., out, in); left (out, k) and right (in, k) with orthonormal columns (for
    instance the reduction's ``R_t(e)`` and ``R_s(e)``). Under the aligned initialisation
    these are the reduced weights ``b_e`` of every mode, exactly.
    """
    w = np.asarray(weight, dtype=np.float64)
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    if w.ndim < 2 or left.ndim != 2 or right.ndim != 2 or left.shape[0] != w.shape[-2] \
            or right.shape[0] != w.shape[-1] or left.shape[1] != right.shape[1]:
        raise DataError(f"project_on_bases: need weight (..., out, in), left (out, k), right "
                        f"(in, k); got {w.shape}, {left.shape}, {right.shape}")
    return np.einsum("ok,...oi,ik->...k", left, w, right)


# ----------------------------------------------------------------------------- routing network


def pathway_map(task, weights: Mapping[str, np.ndarray], i: int, j: int) -> np.ndarray:
    """The linear map of pathway (input domain i -> output domain j): (..., n_out, n_in)."""
    _check_pair(task, i, j)
    return (np.asarray(weights[f"h2->out_{j}"]) @ np.asarray(weights["h1->h2"])
            @ np.asarray(weights[f"in_{i}->h1"]))


def routing_bases(task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed bases and singular values of the routing data: (U (n_out, r), s (r,), V (n_in, r)).

    ``targets @ itemsᵀ = U diag(s) Vᵀ`` (the input-output correlation of every pair, up to the
    sample weight); r counts the nonzero singular values.
    """
    U, s, Vt = np.linalg.svd(task.targets @ task.items.T, full_matrices=False)
    r = int(np.sum(s > 1e-12 * max(s[0], 1e-300)))
    return U[:, :r], s[:r], Vt[:r].T


def pathway_modes(task, weights: Mapping[str, np.ndarray], i: int, j: int,
                  U: np.ndarray | None = None, V: np.ndarray | None = None) -> np.ndarray:
    """Mode strengths ``pi`` of pathway (i, j): ``diag(Uᵀ W_out[j] W_h W_in[i] V)``, (..., r).

    U, V default to :func:`routing_bases`. The theory's ``pi = a1 a2 a3`` per mode.
    """
    if U is None or V is None:
        U, _, V = routing_bases(task)
    return project_on_bases(pathway_map(task, weights, i, j), U, V)


def hidden_representations(task, weights: Mapping[str, np.ndarray],
                           layer: str = "h1") -> np.ndarray:
    """Hidden activity of every item in every input domain: (..., M, n_items, hidden).

    ``layer="h1"``: ``W_in[i] x`` (the input of the shared pathway); ``"h2"``: ``W_h W_in[i] x``.
    """
    if layer not in ("h1", "h2"):
        raise ConfigError(f"layer must be 'h1' or 'h2', got {layer!r}")
    reps = []
    for i in range(task.M):
        h = np.asarray(weights[f"in_{i}->h1"]) @ task.items
        if layer == "h2":
            h = np.asarray(weights["h1->h2"]) @ h
        reps.append(np.swapaxes(h, -1, -2))
    return np.stack(reps, axis=-3)


def similarity_matrix(reps: np.ndarray) -> np.ndarray:
    """Representational similarity (cosine) of every (domain, item) pair.

    reps (..., n_domains, n_items, dim) -> (..., n_domains·n_items, n_domains·n_items), rows
    ordered domain-major (all items of domain 0, then of domain 1, ...). A zero vector has
    similarity 0 with everything.
    """
    r = np.asarray(reps, dtype=np.float64)
    if r.ndim < 3:
        raise DataError(f"similarity_matrix: reps must be (..., n_domains, n_items, dim), "
                        f"got shape {r.shape}")
    flat = r.reshape(r.shape[:-3] + (r.shape[-3] * r.shape[-2], r.shape[-1]))
    norm = np.linalg.norm(flat, axis=-1, keepdims=True)
    unit = np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 0)
    return unit @ np.swapaxes(unit, -1, -2)


def domain_alignment(reps: np.ndarray) -> np.ndarray:
    """How alike the input domains represent the same item: (...,).

    The mean, over items and over pairs of different domains, of the cosine similarity of an
    item's representations in the two domains: 1 when every domain maps each item to the
    same hidden vector (a shared, abstract representation), about 0 for unrelated random maps.
    """
    r = np.asarray(reps, dtype=np.float64)
    if r.ndim < 3:
        raise DataError(f"domain_alignment: reps must be (..., n_domains, n_items, dim), "
                        f"got shape {r.shape}")
    n_dom, n_items = r.shape[-3], r.shape[-2]
    if n_dom < 2:
        raise DataError("domain_alignment needs at least two domains")
    sim = similarity_matrix(r).reshape(r.shape[:-3] + (n_dom, n_items, n_dom, n_items))
    same_item = np.einsum("...ikjk->...ijk", sim)  # (..., dom, dom, item)
    off = ~np.eye(n_dom, dtype=bool)
    return same_item[..., off, :].mean(axis=(-2, -1))


def generalisation_errors(task, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean per-pair error ``½|Y − Ŷ_ij|²_F`` on trained and on untrained pairs (MATH.md §5).

    Returns {"trained": (...), "untrained": (...) (NaN when K = M), "baseline": float}, where
    ``baseline`` is the error of the zero network, ``½|Y|²_F``, the natural scale of both.
    """
    errors = task.pair_errors(weights)
    trained = errors[..., task.trained].mean(axis=-1)
    held = errors[..., ~task.trained]
    untrained = held.mean(axis=-1) if held.shape[-1] else np.full(trained.shape, np.nan)
    return {"trained": trained, "untrained": untrained,
            "baseline": 0.5 * float(np.sum(task.targets ** 2))}


def _check_pair(task, i: int, j: int) -> None:
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in (i, j)):
        raise ConfigError(f"pair ({i!r}, {j!r}): domain indices must be integers")
    if not (0 <= i < task.M and 0 <= j < task.M):
        raise ConfigError(f"pair ({i}, {j}) is outside the {task.M} x {task.M} domains")


# ----------------------------------------------------------------------------- times


def crossing_times(x: np.ndarray, level, t: np.ndarray | None = None,
                   direction: str = "up") -> np.ndarray:
    """First time each series crosses ``level``, linearly interpolated between save points.

    x (n_saved, ...) time-first; level broadcasts against x[0]; t (n_saved,) (default the
    save index, i.e. the epoch when every epoch is saved). direction "up" (x rises to the
    level) or "down". NaN where the level is never reached; t[0] where x starts beyond it.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"crossing_times: x must be (n_saved, ...) with n_saved >= 1, "
                        f"got shape {x.shape}")
    if direction not in ("up", "down"):
        raise ConfigError(f"direction must be 'up' or 'down', got {direction!r}")
    level = np.broadcast_to(np.asarray(level, dtype=np.float64), x.shape[1:])
    t = np.arange(x.shape[0], dtype=np.float64) if t is None else np.asarray(t, np.float64)
    if t.shape != (x.shape[0],):
        raise DataError(f"t must have shape ({x.shape[0]},), got {t.shape}")
    if not np.all(np.isfinite(t)):
        raise DataError("crossing_times: t holds NaN or inf values")
    if np.any(np.diff(t) <= 0):
        raise DataError("crossing_times: t must be strictly increasing")
    gap = x - level if direction == "up" else level - x
    with np.errstate(invalid="ignore"):
        reached = gap >= 0
    first = np.argmax(reached, axis=0)
    ever = np.any(reached, axis=0)
    out = np.full(x.shape[1:], np.nan)
    for idx in np.ndindex(out.shape):
        if not ever[idx]:
            continue
        k = int(first[idx])
        if k == 0:
            out[idx] = t[0]
            continue
        g0, g1 = gap[(k - 1,) + idx], gap[(k,) + idx]
        frac = -g0 / (g1 - g0) if g1 != g0 else 1.0
        out[idx] = t[k - 1] + frac * (t[k] - t[k - 1])
    return out


def loss_drop_times(loss: np.ndarray, levels, t: np.ndarray | None = None) -> np.ndarray:
    """Time at which the loss first falls below each level (e.g. midpoints between plateaus).

    loss (n_saved,) or (n_saved, n_runs); levels (n_drops,) -> (n_drops,) or (n_drops, n_runs).
    """
    loss = np.asarray(loss, dtype=np.float64)
    levels = np.atleast_1d(np.asarray(levels, dtype=np.float64))
    shaped = loss.reshape(loss.shape[0], 1, -1)
    out = crossing_times(np.broadcast_to(shaped, (loss.shape[0], levels.size, shaped.shape[2])),
                         levels[:, None], t, direction="down")
    return out.reshape((levels.size,) + loss.shape[1:])


def routing_plateaus(s: np.ndarray, M: int, K: int, n_items: int, n_out: int,
                     constant: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Loss plateaus of the routing network learnt from small weights, and the drop levels.

    Modes are learnt one distinct singular value at a time (largest first), and the loss in
    mode units is ``(M K / (n_items n_out)) Σ_α (s_α − π_α)²`` (MATH.md §5) plus ``constant``.
    Returns (plateaus (n_distinct + 1,), levels (n_distinct,)): the loss before any mode and
    after each distinct value is learnt, and the midpoints between consecutive plateaus.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s) & (s >= 0)):
        raise DataError(f"routing_plateaus: s must be a 1-d array of finite non-negative "
                        f"singular values, got {s!r}")
    s = np.sort(s)[::-1]
    scale = M * K / (n_items * n_out)
    distinct = _distinct(s[s > 0])  # a zero singular value is no mode: no plateau, no drop
    remaining = [float(np.sum(s[s < v * (1 - 1e-9)] ** 2)) for v in distinct]
    plateaus = constant + scale * np.array([float(np.sum(s ** 2))] + remaining)
    return plateaus, 0.5 * (plateaus[:-1] + plateaus[1:])


def _distinct(s: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """Distinct values of a descending array (values within rtol merge)."""
    out: list[float] = []
    for v in s:
        if not out or abs(v - out[-1]) > rtol * abs(out[-1]):
            out.append(float(v))
    return np.array(out)


def routing_drop_epochs(s, M: int, K: int, b0: float, lr: float, n_items: int, n_out: int,
                        fraction: float = 0.5, discrete: bool = True) -> np.ndarray:
    """Epoch at which the shared edge of each routing mode reaches ``fraction`` of its fixed
    point, from the learning-time integral (``exact.routing_drop_time``).

    With ``discrete=False`` this is the gradient-flow time divided by the time of one step
    (``exact.routing_time_per_step``). Gradient descent with a finite step lags the flow by a
    number of steps that does not shrink with the learning rate: for a one-variable flow
    ``a' = F(a)`` the Euler map needs ``n(a) = t(a)/h + ½ ln(F(a)/F(a0)) + O(h)`` steps
    (Euler-Maclaurin on the step recursion), which near a plateau escape (F ∝ a²) is
    ``ln(a/a0)``, a few epochs. ``discrete=True`` (default) adds this correction, with
    ``F(a2) ∝ (a2² + c0)(s − a2 (a2² + c0)/M)``; then the prediction matches a gradient-descent
    run of the aligned initialisation to a fraction of an epoch.
    """
    from . import exact

    s = np.atleast_1d(np.asarray(s, dtype=np.float64))
    step = float(exact.routing_time_per_step(lr, M, n_items, n_out))
    epochs = np.asarray(exact.routing_drop_time(s, M, K, b0, fraction)) / step
    if discrete:
        c0 = (M - 1) * b0 * b0
        a_star = np.asarray(exact.routing_fixed_point(s, M, b0))
        target = fraction * a_star

        def field(a):
            return (a * a + c0) * (s - a * (a * a + c0) / M)

        epochs = epochs + 0.5 * np.log(field(target) / field(np.full_like(s, b0)))
    return epochs


# ----------------------------------------------------------------------------- comparisons


def relative_discrepancy(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """``max |a − b| / max(|b|, floor)`` over all entries (b is the reference).

    ``floor`` keeps entries where the reference is at round-off level (a loss converged to
    zero) from dominating: use a small multiple of the reference's scale.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise DataError(f"relative_discrepancy: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.abs(b), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a == b, 0.0, np.abs(a - b) / scale)
    worst = float(np.max(ratio))
    return worst if math.isfinite(worst) else math.inf
