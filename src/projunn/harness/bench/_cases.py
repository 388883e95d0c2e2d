"""What ``projunn bench`` times: the update step alone and a whole training step of a linear layer.

Every case is a zero-argument callable on inputs built once, so that only the
step itself is timed. Results and outputs are written into reused buffers
where the API allows: a fresh N x N allocation is page-faulted on every call
at large N, which would time the allocator rather than the method.

Each benchmark has two builders: the cases of one (N, k), the baseline among
them (the floor, unconstrained Adam), which are timed together in rounds
(:func:`projunn.harness.bench._measure.measure_interleaved`) so that their
ratios do not depend on when each was timed; and the cases that do not depend
on k (plain SGD, the dense steps, the peers), measured once per N, each alone.
A case that cannot run here has no callable and says why.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrizations

from ...functional import lowrank, projunn_d, projunn_t, unitary_init
from ...nn import OrthogonalLinear
from ...optim import ProjUNN, param_groups

__all__ = ["BASELINE", "BUILDERS", "PROJUNN_REFERENCE", "Case", "peak_bytes"]

#: Reference case of each benchmark, the one ratios "x projunn" are taken to.
PROJUNN_REFERENCE = {"update": "projunn-t lsi", "layer": "projunn-t + adam"}
#: Baseline of each benchmark: the least work (update) or the unconstrained layer (layer).
BASELINE = {"update": "floor", "layer": "adam"}
_INSTALL_HINT = "pip install 'projunn[bench]'"
#: Largest N at which the exact sketch (a full SVD per step, for reference only) is timed.
EXACT_SKETCH_MAX = 1024
_STEP_SCALE = 1e-3  # size of the random step matrix relative to its entries' unit variance
#: Suffix of the cases that force ProjUNN's generic copy-and-subtract step (``step_from_zero=False``;
#: Note [Steps from zero] in ``projunn.optim._projunn``), beside the default step from zero.
GENERIC = "generic step"

#: N x N float32 matrices a benchmark holds at its peak at one size: the inputs, outputs, weights,
#: gradients and optimiser state of every case built for the size, the float64 Haar initialisation's
#: temporaries and the timed step's own; without and with the O(N^3) cases (N up to ``dense_max``
#: for update, ``peer_max`` for layer). Peak resident memory of ``run_bench`` at N = 2048, k = 1 on a
#: CPU, above the process's before: 17 and 54 (update), 33 and 125 (layer). Rounded down, so that
#: only sizes that plainly cannot fit are refused.
_PEAK_MATRICES = {"update": (16, 48), "layer": (30, 110)}


def peak_bytes(bench: str, n: int, config) -> int:
    """Rough peak memory of one benchmark at size ``n`` under ``config``'s O(N^3) caps, in bytes (an underestimate)."""
    cap = config.dense_max if bench == "update" else config.peer_max
    return _PEAK_MATRICES[bench][n <= cap] * n * n * 4


@dataclass(frozen=True)
class Case:
    """A named step to time; without ``fn``, a case that cannot run here, and ``reason`` says why."""

    name: str
    fn: Callable[[], object] | None
    reason: str = ""


def _peer(module: str):
    """The installed peer library, or None (it is an optional extra)."""
    try:
        with warnings.catch_warnings():  # a peer's deprecation warnings at import are its own business
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module)
    except ImportError:
        return None


def _weights(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A Haar-random orthogonal U and a small random step D, both (n, n) float32, and a generator."""
    generator = torch.Generator(device=device).manual_seed(0)
    U = unitary_init(n, "haar", generator=torch.Generator().manual_seed(0)).to(device)
    D = _STEP_SCALE * torch.randn(n, n, device=device, generator=generator)
    return U, D, generator


# -- the update step alone ------------------------------------------------------------------------


def _floor_update(W: torch.Tensor, k: int, generator: torch.Generator) -> Callable[[], None]:
    """The least work of any rank-k update of W: one N x N by N x 2k product and one rank-2k in-place update.

    The thin factor is column-major, the layout of projUNN's own basis Q (a
    QR result) and the faster one for MKL here: with a row-major N x 2 factor
    the product took 1.3-1.8x as long (N = 1024-4096, float32, 2-core EPYC), a
    floor projUNN would then beat.
    """
    n = W.shape[-1]
    X = torch.randn(2 * k, n, device=W.device, generator=generator).mT
    Y = 1e-9 * torch.randn(n, 2 * k, device=W.device, generator=generator)
    return lambda: W.addmm_(W @ X, Y.mT)


def update_cases(n: int, k: int, config, device: torch.device) -> Iterator[Case]:
    """Cases of one N x N update at rank k: the floor, projunn with each sketch, the whole optimiser step.

    The optimiser step is timed twice: from zero (the default for SGD) and by the generic path.
    """
    U, D, generator = _weights(n, device)
    out = torch.empty_like(U)
    yield Case("floor", _floor_update(U.clone(), k, generator))
    for sketch in ("lsi", "column", "rsvd", "exact"):
        for method, update in (("t", projunn_t), ("d", projunn_d)):
            if sketch == "exact" and n > min(config.dense_max, EXACT_SKETCH_MAX):
                reason = f"the exact sketch is a full SVD, O(N^3); timed up to N = {EXACT_SKETCH_MAX}"
                yield Case(f"projunn-{method} {sketch}", None, reason)
                continue

            def step(update=update, sketch=sketch):
                update(U, *lowrank(D, k, sketch, generator=generator), out=out)

            yield Case(f"projunn-{method} {sketch}", step)
    for name, from_zero in (("ProjUNN(SGD) step", True), (f"ProjUNN(SGD) step, {GENERIC}", False)):
        weight = torch.nn.Parameter(U.clone())
        weight.grad = D.clone()
        groups = [{"params": [weight], "unitary": True}]
        yield Case(name, ProjUNN(torch.optim.SGD(groups, lr=1.0), rank=k, seed=0, step_from_zero=from_zero).step)


def update_cases_full_rank(n: int, config, device: torch.device) -> Iterator[Case]:
    """Rank-free steps: plain SGD, the dense exact O(N^3) steps, and geoopt's Riemannian optimisers."""
    U, D, _ = _weights(n, device)
    out = torch.empty_like(U)
    plain = torch.nn.Parameter(U.clone())
    plain.grad = D.clone()
    yield Case("plain SGD step", torch.optim.SGD([plain], lr=1.0).step)
    dense = ("expm step", "cayley step", "polar (SVD) step", "geoopt RiemannianSGD", "geoopt RiemannianAdam")
    if n > config.dense_max:
        yield from (Case(name, None, f"O(N^3) step; N > --dense-max {config.dense_max}") for name in dense)
        return
    eye = torch.eye(n, device=device)

    def skew_direction() -> torch.Tensor:  # K = skew(U^H D): the tangent direction every dense step needs
        G = U.mT @ D
        return (G - G.mT) / 2

    def cayley():
        K = skew_direction()
        torch.matmul(U, torch.linalg.solve(eye - K / 2, eye + K / 2), out=out)

    def polar():
        left, _, right = torch.linalg.svd(U + D)
        torch.matmul(left, right, out=out)

    yield Case("expm step", lambda: torch.matmul(U, torch.linalg.matrix_exp(skew_direction()), out=out))
    yield Case("cayley step", cayley)
    yield Case("polar (SVD) step", polar)
    geoopt = _peer("geoopt")
    for optimizer in ("RiemannianSGD", "RiemannianAdam"):
        if geoopt is None:
            yield Case(f"geoopt {optimizer}", None, f"geoopt is not installed ({_INSTALL_HINT})")
            continue
        weight = geoopt.ManifoldParameter(U.clone(), manifold=geoopt.Stiefel())
        weight.grad = -D.clone()  # any gradient of the same size; the step is the same work
        yield Case(f"geoopt {optimizer}", getattr(geoopt.optim, optimizer)([weight], lr=1.0).step)


# -- a whole training step of a square linear layer -------------------------------------------------


def _training_step(layer: torch.nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(layer(x), y).backward()
        optimizer.step()

    return step


def _adam_step(n: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
    """An unconstrained bias-free N -> N layer's weight and its training step with Adam."""
    layer = torch.nn.Linear(n, n, bias=False, device=x.device)
    return layer.weight, _training_step(layer, torch.optim.Adam(layer.parameters(), lr=1e-3), x, y)


def _layer_data(n: int, config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(1)
    return tuple(torch.randn(config.batch_size, n, device=device, generator=generator) for _ in range(2))


def layer_cases(n: int, k: int, config, device: torch.device) -> Iterator[Case]:
    """Forward + backward + update of an N -> N linear layer: unconstrained Adam and projunn + Adam, at rank k.

    projunn-t is also timed with the generic step (``step_from_zero=False``), the step before the
    memory-floor path, so one run gives both against unconstrained Adam. ``adam + update floor`` is
    the unconstrained step followed by the update floor (:func:`_floor_update`): the least any
    rank-k update after Adam can cost, which no projUNN step can beat.
    """
    x, y = _layer_data(n, config, device)
    yield Case("adam", _adam_step(n, x, y)[1])
    weight, adam_step = _adam_step(n, x, y)
    floor = _floor_update(weight.data, k, torch.Generator(device=device).manual_seed(2))
    yield Case("adam + update floor", lambda: (adam_step(), floor()))
    for method, from_zero in (("t", True), ("d", True), ("t", False)):
        layer = OrthogonalLinear(n, init="haar", bias=False).to(device)
        groups = param_groups(layer, unitary_lr=1e-3, method=method, rank=k)
        optimizer = ProjUNN(torch.optim.Adam(groups, lr=1e-3), seed=0, step_from_zero=from_zero)
        name = f"projunn-{method} + adam" + ("" if from_zero else f", {GENERIC}")
        yield Case(name, _training_step(layer, optimizer, x, y))


def layer_cases_full_rank(n: int, config, device: torch.device) -> Iterator[Case]:
    """The same layer step with torch's and geotorch's orthogonal parametrisations (O(N^3), rank-free)."""
    x, y = _layer_data(n, config, device)
    geotorch = _peer("geotorch")
    peers = [("torch orthogonal", m) for m in ("matrix_exp", "cayley")] + [("geotorch", m) for m in ("expm", "cayley")]
    for library, orthogonal_map in peers:
        name = f"{library} {orthogonal_map}"
        if n > config.peer_max:
            yield Case(name, None, f"O(N^3) per step; N > --peer-max {config.peer_max}")
        elif library == "geotorch" and geotorch is None:
            yield Case(name, None, f"geotorch is not installed ({_INSTALL_HINT})")
        else:
            layer = torch.nn.Linear(n, n, bias=False, device=device)
            if library == "geotorch":
                geotorch.orthogonal(layer, "weight", triv=orthogonal_map)
            else:
                parametrizations.orthogonal(layer, "weight", orthogonal_map=orthogonal_map)
            yield Case(name, _training_step(layer, torch.optim.Adam(layer.parameters(), lr=1e-3), x, y))


#: Each benchmark's builders: the cases of one (N, k), timed together, and the rank-free ones.
BUILDERS = {"update": (update_cases, update_cases_full_rank), "layer": (layer_cases, layer_cases_full_rank)}
