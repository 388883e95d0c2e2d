r"""EUNN (Jing et al., ICML 2017): an orthogonal/unitary matrix as a mesh of 2 x 2 rotations, a baseline.

Note [EUNN construction]
------------------------
EUNN ("Tunable Efficient Unitary Neural Networks", Jing et al. 2017) writes
an N x N unitary matrix as a product of L layers of 2 x 2 rotations on
neighbouring coordinates, then a diagonal of phases:

.. math::
    W = D \, M_{L-1} \cdots M_1 M_0, \qquad D = \operatorname{diag}(e^{i\omega_0}, \ldots, e^{i\omega_{N-1}}).

Layer l pairs the coordinates (a, a+1) for a = l mod 2, l mod 2 + 2, ...
while a + 1 < N: the pairs (0,1), (2,3), ... in even layers and (1,2),
(3,4), ... in odd ones (an unpaired coordinate passes unchanged). On each of
its pairs M_l acts as

.. math::
    T(\theta, \varphi) = \begin{pmatrix} \cos\theta & -\sin\theta \\ \sin\theta & \cos\theta \end{pmatrix}
    \begin{pmatrix} e^{i\varphi} & 0 \\ 0 & 1 \end{pmatrix}
    = \begin{pmatrix} e^{i\varphi}\cos\theta & -\sin\theta \\ e^{i\varphi}\sin\theta & \cos\theta \end{pmatrix}.

Layer 0 acts first on a vector. The real (orthogonal) version has Givens
rotations only (no phase, T = R(theta)) and, instead of D, a fixed diagonal
of signs S = diag(s_0, ..., s_{N-1}), s_j = +-1.

*Capacity.* Layer l holds (N - l mod 2) // 2 rotations; L = N layers hold
N (N - 1) / 2 of them, which with D is N^2 real parameters, the dimension of
U(N) (real: N (N - 1) / 2, the dimension of SO(N)); that mesh is the
rectangular decomposition of Clements et al. (2016) and reaches every
unitary matrix (Note [EUNN decomposition]). L < N layers hold O(N L)
parameters and reach a subset: "tunable space".

*The phase goes before the rotation.* EUNN's paper writes the element as
[[e^{i phi} cos, -e^{i phi} sin], [sin, cos]], the phase after the rotation
(its reference code too, on the second coordinate). Followed by the
diagonal D, that form leaves the first layer's inputs without phases and
repeats D's phases on the outputs of the last rotations: its mesh of N
layers has rank N^2 - N + 1 (measured, N = 3..8) and so does not span U(N).
Clements et al.'s element, used here, puts the phase on the input, and the
N-layer mesh has the full rank N^2 (tests/test_eunn.py).

*Determinant -1 (real).* SO(N) has no rotation of determinant -1, and no
continuous parametrisation moves a weight between the two components of
O(N) (det is +-1 and continuous), so a real mesh needs one fixed
reflection to reach the other component. S is that: a buffer, not trained,
set by :meth:`EUNN.right_inverse` from the weight it starts from (all +1
until then). With L = N, S times the mesh covers exactly the component of
O(N) that holds the starting weight.

*Cost.* Building the dense matrix costs O(L N^2) (each layer mixes pairs of
rows, vectorised over the pairs, one step per layer), once per forward pass
of the module that holds it (once per optimiser step under
``torch.nn.utils.parametrize.cached()``), and its backward the same; a
matrix product with a batch of B states then costs O(B N^2) as for any dense
weight. EUNN's own recurrent cell instead applies the L layers to the state
at each time step, O(B N L) per step, which pays off only for L << N.

Note [EUNN parameter layout]
----------------------------
The free tensor has the dtype of the matrix it builds, so that it can serve
as the ``original`` of a ``torch.nn.utils.parametrize`` parametrisation
(which keeps the dtype of the tensor it replaces):

- real (orthogonal W): shape (..., L, N // 2); ``params[..., l, k]`` is the
  angle theta of layer l's k-th rotation, on the coordinates
  (2k + l mod 2, 2k + l mod 2 + 1);
- complex (unitary W): shape (..., L + 1, (N + 1) // 2); for l < L,
  ``params[..., l, k] = theta + i phi`` of layer l's k-th rotation, and the
  last row holds D's phases in pairs:
  ``params[..., L, k] = omega_{2k} + i omega_{2k+1}``.

Entries with no rotation behind them (the last one of odd layers when N is
even, the imaginary part of the last phase pair when N is odd) are unused:
the matrix does not depend on them, and their gradient is zero. A complex
entry is two real parameters, and torch's optimisers update the real and
imaginary parts as two reals, so Adam on ``theta + i phi`` is Adam on
(theta, phi). Zeros are the identity. Being a matrix (per weight), the free
tensor is also accepted in the unitary group that
:func:`projunn.optim.param_groups` makes of parametrised weights
(``include_parametrized=True``, ``method="none"``) under
:class:`projunn.optim.ProjUNN`.

Note [EUNN decomposition]
-------------------------
:meth:`EUNN.right_inverse` returns parameters whose matrix is the given
one, so a parametrisation registered on an initialised weight starts from
that weight:

- L = N (full capacity; one layer for N = 2): the elimination of Clements et al. (2016),
  re-derived for this element. For i = 1, ..., N - 1 it zeroes the i-th
  sub-diagonal stripe of the lower triangle: for odd i from the right, a
  rotation of columns (p, p+1) (layer j, p = i - 1 - j, j = 0..i-1); for
  even i from the left, a rotation of rows (r, r+1) (layer N - j,
  r = N + j - i - 2, j = 1..i). Each step chooses theta (and phi) to zero
  one entry, so each mesh position is used once. What is left is a diagonal
  Lambda; moving it left through the row rotations, T^{-1} diag(e^{ix},
  e^{iy}) = diag(e^{i(y - phi)}, e^{iy}) T(-theta, x - y) (real:
  R(-theta) diag(s, t) = diag(s, t) R(-s t theta)), turns them into mesh
  elements and leaves D (real: S). Only unitary steps: the round trip is
  exact to rounding (~1e-15 at small N in double precision). The
  elimination has N (N - 1) / 2 sequential steps of O(N) work, run once, in
  double precision on the CPU (about a second at N = 170).
- L < N: a weight that is block diagonal in layer 0's pairs (2 x 2 blocks
  on (0,1), (2,3), ..., and a 1 x 1 block last when N is odd) is one layer
  and a diagonal: the same elimination on each block, the other layers
  zero. That covers projunn's ``"identity"``, ``"henaff"`` and
  ``"cayley"`` initialisations (:func:`projunn.functional.unitary_init`).
  Any other weight is not in general within reach of L < N layers, and is
  refused (ValueError) rather than replaced silently: use ``capacity=None``
  (N layers) to start from it.

A weight that is not orthogonal/unitary (``||W^H W - I||_F`` above
10 N eps of its dtype) is first replaced by its closest one, the polar
factor (:func:`projunn.functional.closest_unitary`), as torch's
``parametrizations.orthogonal`` and :func:`projunn.nn.unitary_` do.

Note [EUNN capacity default]
----------------------------
The default capacity is L = 2, that of EUNN's reference implementation
(github.com/jingli9111/EUNN-tensorflow: ``EUNNCell(num_units, capacity=2)``,
and its copying-task script's ``--capacity`` "default value is 2"; its
permuted-MNIST script uses 4). The paper's case for the tunable space is
that the capacity trades expressiveness (a subspace of the group up to all
of it at L = N) against cost, O(N L) parameters and work; two layers are
the smallest mesh in which every coordinate meets both of its neighbours.
L = 2 keeps the baseline what EUNN is run as by default; ``capacity=None``
gives the full group (N layers, N^2 parameters, O(N^3) to build the
matrix).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from .._validation import SUPPORTED_DTYPES, check_dtype, check_int, layer_dtype
from ..functional import closest_unitary, unitarity_error

__all__ = ["EUNN", "eunn", "eunn_matrix"]

#: The capacity (number of rotation layers) EUNN layers get by default: Note [EUNN capacity default].
DEFAULT_CAPACITY = 2


def _pairs(n: int, layer: int) -> tuple[int, int]:
    """(first coordinate, number of rotations) of ``layer``: pairs (a, a+1) for a = first, first + 2, ..."""
    first = layer % 2
    return first, (n - first) // 2


def _width(n: int, is_complex: bool) -> int:
    return (n + 1) // 2 if is_complex else n // 2


def _parameter_shape(n: int, capacity: int, is_complex: bool) -> tuple[int, int]:
    return (capacity + 1 if is_complex else capacity, _width(n, is_complex))


def _check_params(params: object, n: int) -> int:
    """Validate the free tensor of an n x n mesh (Note [EUNN parameter layout]); return its capacity."""
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    check_dtype("params.dtype", params.dtype)
    complex_ = params.is_complex()
    rows = params.shape[-2] if params.dim() >= 2 else 0
    if params.dim() < 2 or params.shape[-1] != _width(n, complex_) or (complex_ and rows < 1):
        expected = f"(..., L + 1, {_width(n, True)})" if complex_ else f"(..., L, {_width(n, False)})"
        raise ValueError(
            f"params of a {'unitary' if complex_ else 'orthogonal'} {n} x {n} EUNN must have shape {expected} "
            f"(Note [EUNN parameter layout]); got {tuple(params.shape)}"
        )
    return rows - 1 if complex_ else rows


def eunn_matrix(params: torch.Tensor, n: int, *, signs: torch.Tensor | None = None) -> torch.Tensor:
    r"""The N x N orthogonal (real ``params``) or unitary (complex ``params``) matrix of an EUNN mesh.

    .. math:: W = D \, M_{L-1} \cdots M_0 \quad (\text{real: } W = S \, M_{L-1} \cdots M_0)

    with L layers of 2 x 2 rotations on alternating neighbour pairs
    (Note [EUNN construction]). Batched over leading dimensions, differentiable,
    on ``params``' device, in its dtype; O(L N^2) work, one vectorised step
    per layer.

    Args:
        params: the angles (and phases), Note [EUNN parameter layout]:
            real (..., L, N // 2) for an orthogonal W, complex
            (..., L + 1, (N + 1) // 2) for a unitary W; L >= 0 is the
            capacity.
        n: N, the size of W, >= 1.
        signs: optional real (..., N) diagonal applied last (the fixed
            reflection S of the real case); None means all +1.

    Returns:
        (..., N, N), ``params.dtype``.

    Raises:
        TypeError: ``params`` not a tensor of float32/float64/complex64/complex128, ``n`` not an int.
        ValueError: ``n`` < 1, ``params`` of the wrong shape, ``signs`` not (..., N).

    Example:
        >>> params = torch.randn(3, 2, dtype=torch.float64)  # L = 3 layers, N = 5: 2 rotations per layer
        >>> W = eunn_matrix(params, 5)
        >>> torch.allclose(W.T @ W, torch.eye(5, dtype=torch.float64))
        True
        >>> U = eunn_matrix(torch.randn(4, 3, dtype=torch.complex128), 5)  # complex: L = 3, unitary
        >>> torch.allclose(U.mH @ U, torch.eye(5, dtype=torch.complex128))
        True
    """
    check_int("n", n)
    capacity = _check_params(params, n)
    if signs is not None and (not isinstance(signs, torch.Tensor) or signs.dim() < 1 or signs.shape[-1] != n):
        got = tuple(signs.shape) if isinstance(signs, torch.Tensor) else type(signs).__name__
        raise ValueError(f"signs must be a (..., {n}) tensor of +-1, got {got}")
    batch = params.shape[:-2]
    W = torch.eye(n, dtype=params.dtype, device=params.device).expand(*batch, n, n)
    for layer in range(capacity):
        first, count = _pairs(n, layer)
        if count == 0:
            continue
        angles = params[..., layer, :count]
        theta = angles.real if params.is_complex() else angles
        cos, sin = torch.cos(theta).unsqueeze(-1), torch.sin(theta).unsqueeze(-1)
        rows = W[..., first : first + 2 * count, :].unflatten(-2, (count, 2))
        top, bottom = rows[..., 0, :], rows[..., 1, :]
        if params.is_complex():  # the phase acts first, on the top coordinate
            top = torch.polar(torch.ones_like(angles.imag), angles.imag).unsqueeze(-1) * top
        mixed = torch.stack([cos * top - sin * bottom, sin * top + cos * bottom], dim=-2).flatten(-3, -2)
        W = torch.cat([W[..., :first, :], mixed, W[..., first + 2 * count :, :]], dim=-2)
    if params.is_complex():
        omega = torch.view_as_real(params[..., capacity, :]).flatten(-2)[..., :n]
        W = torch.polar(torch.ones_like(omega), omega).unsqueeze(-1) * W
    if signs is not None:
        W = signs.to(W.dtype).unsqueeze(-1) * W
    return W


# -- the decomposition (Note [EUNN decomposition]) ------------------------------------------------


def _elimination_steps(n: int) -> list[tuple[str, int, int, int, int]]:
    """The elimination's steps in order: (side, layer, k, row, column) (Note [EUNN decomposition]).

    ``side="column"``: rotate columns (p, p+1), p = 2k + layer mod 2, to zero entry (row, p).
    ``side="row"``: rotate rows (r, r+1), r = 2k + layer mod 2 = ``row``, to zero entry (r + 1, column).
    """
    steps = []
    for i in range(1, n):  # the i-th stripe of the lower triangle, entries (n - 1 - j, i - 1 - j) and alike
        if i % 2:
            for j in range(i):
                p = i - 1 - j
                steps.append(("column", j, (p - j % 2) // 2, n - 1 - j, p))
        else:
            for j in range(1, i + 1):
                r, layer = n + j - i - 2, n - j
                steps.append(("row", layer, (r - layer % 2) // 2, r, j - 1))
    return steps


def _full_capacity(n: int) -> int:
    """The layers the elimination of an n x n matrix uses: n, or 1 for n = 2 (0 for n = 1)."""
    return max((layer + 1 for _, layer, *_ in _elimination_steps(n)), default=0)


def _eliminate(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decompose (..., n, n) unitary U (float64 or complex128) into the full mesh.

    Returns (theta, phi, diagonal): theta and phi (..., n, n // 2) per (layer, k) position (phi zero
    for real U), and the final diagonal: the phases omega (complex) or the signs (real), (..., n).
    """
    n = U.shape[-1]
    complex_ = U.is_complex()
    U = U.clone()
    theta = torch.zeros(*U.shape[:-2], n, n // 2, dtype=U.real.dtype, device=U.device)
    phi = torch.zeros_like(theta)
    row_steps = []
    for side, layer, k, i, j in _elimination_steps(n):
        if side == "column":  # U <- U T^{-1}: T is a first-layers mesh element as it is
            a, b = U[..., i, j], U[..., i, j + 1]
            if complex_:  # zero c e^{-i phi} a - s b: tan(theta) = |a| / |b|, e^{-i phi} a / b > 0
                t = torch.atan2(a.abs(), b.abs())
                f = torch.where(a.abs() > 0, a.angle() - b.angle(), torch.zeros_like(t))
                first = torch.polar(torch.ones_like(f), -f).unsqueeze(-1) * U[..., :, j]
                phi[..., layer, k] = f
            else:  # zero c a - s b
                t = torch.atan2(a, b)
                first = U[..., :, j]
            c, s = torch.cos(t).unsqueeze(-1), torch.sin(t).unsqueeze(-1)
            second = U[..., :, j + 1]
            U[..., :, j], U[..., :, j + 1] = c * first - s * second, s * first + c * second
            theta[..., layer, k] = t
        else:  # U <- T U: T^{-1} is a last-layers element once the diagonal has moved through it
            a, b = U[..., i, j], U[..., i + 1, j]
            if complex_:  # zero s e^{i phi} a + c b: tan(theta) = |b| / |a|, e^{i phi} a / (-b) > 0
                t = torch.atan2(b.abs(), a.abs())
                f = torch.where(b.abs() > 0, (-b).angle() - a.angle(), torch.zeros_like(t))
                first = torch.polar(torch.ones_like(f), f).unsqueeze(-1) * U[..., i, :]
            else:  # zero s a + c b
                t, f = torch.atan2(-b, a), None
                first = U[..., i, :]
            c, s = torch.cos(t).unsqueeze(-1), torch.sin(t).unsqueeze(-1)
            second = U[..., i + 1, :]
            U[..., i, :], U[..., i + 1, :] = c * first - s * second, s * first + c * second
            row_steps.append((layer, k, i, t, f))
    # Now U_given = T_1^{-1} ... T_p^{-1} Lambda (column elements): move Lambda left, through T_p^{-1} first.
    diagonal = torch.diagonal(U, dim1=-2, dim2=-1)
    if complex_:
        omega = diagonal.angle()
        for layer, k, r, t, f in reversed(row_steps):
            x, y = omega[..., r].clone(), omega[..., r + 1]
            theta[..., layer, k], phi[..., layer, k] = -t, x - y
            omega[..., r] = y - f
        return theta, phi, omega
    signs = torch.where(diagonal >= 0, 1.0, -1.0).to(U.dtype)
    for layer, k, r, t, _ in reversed(row_steps):
        theta[..., layer, k] = -signs[..., r] * signs[..., r + 1] * t
    return theta, phi, signs


def _pack(theta: torch.Tensor, phi: torch.Tensor, diagonal: torch.Tensor, capacity: int, dtype: torch.dtype):
    """Free tensor (Note [EUNN parameter layout]) from per-position theta/phi (..., >= capacity, n // 2)."""
    n = diagonal.shape[-1]
    width = _width(n, dtype.is_complex)
    shape = (*theta.shape[:-2], capacity, width)
    angles = torch.zeros(shape, dtype=theta.dtype, device=theta.device)
    used = min(capacity, theta.shape[-2])
    angles[..., :used, : n // 2] = theta[..., :used, :]
    if not dtype.is_complex:
        return angles.to(dtype)
    phases = torch.zeros_like(angles)
    phases[..., :used, : n // 2] = phi[..., :used, :]
    omega = torch.zeros(*diagonal.shape[:-1], 2 * width, dtype=theta.dtype, device=theta.device)
    omega[..., :n] = diagonal
    rotations = torch.complex(angles, phases)
    last = torch.view_as_complex(omega.unflatten(-1, (width, 2)).contiguous()).unsqueeze(-2)
    return torch.cat([rotations, last], dim=-2).to(dtype)


def _block_diagonal(U: torch.Tensor, tolerance: float) -> bool:
    """Whether every matrix of U is block diagonal in layer 0's pairs (2 x 2 blocks, a 1 x 1 last if n is odd)."""
    n = U.shape[-1]
    block = torch.arange(n, device=U.device) // 2
    outside = block.unsqueeze(-1) != block.unsqueeze(-2)
    if n < 2 or U.numel() == 0:  # nothing off the blocks (an empty batch included)
        return True
    return bool((U.abs() * outside).amax() <= tolerance)


def _decompose_blocks(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """theta/phi of layer 0 (..., 1, n // 2) and the diagonal of a block-diagonal U (Note [EUNN decomposition])."""
    n = U.shape[-1]
    pairs = n // 2
    index = torch.arange(2 * pairs, device=U.device).view(pairs, 2)
    blocks = U[..., index.unsqueeze(-1), index.unsqueeze(-2)]  # (..., pairs, 2, 2)
    theta, phi, diagonal = _eliminate(blocks)  # each block: one rotation in layer 0, and its diagonal
    if n % 2:
        last = U[..., n - 1, n - 1]
        tail = last.angle() if U.is_complex() else torch.where(last >= 0, 1.0, -1.0).to(last.dtype)
        diagonal = torch.cat([diagonal.flatten(-2), tail.unsqueeze(-1)], dim=-1)
    else:
        diagonal = diagonal.flatten(-2)
    return theta[..., 0, 0].unsqueeze(-2), phi[..., 0, 0].unsqueeze(-2), diagonal


class EUNN(torch.nn.Module):
    r"""EUNN's tunable mesh as a ``torch.nn.utils.parametrize`` parametrisation of an N x N weight.

    ``forward(params)`` is :func:`eunn_matrix`: a mesh of ``capacity``
    layers of 2 x 2 rotations, then a diagonal of phases (complex) or the
    fixed signs S (real), Note [EUNN construction]. :meth:`right_inverse`
    decomposes a given orthogonal/unitary matrix into the mesh
    (Note [EUNN decomposition]), so that registering the parametrisation on
    an initialised weight keeps its value. :func:`eunn` does the registration
    in one call, as ``torch.nn.utils.parametrizations.orthogonal`` does for
    torch's maps.

    Args:
        n: N, the size of the matrix, >= 1.
        capacity: L, the number of rotation layers, 1..N; None means N (the
            full group). Default 2 (Note [EUNN capacity default]).
        dtype: of the matrix (and of the free tensor): float32/float64
            (orthogonal) or complex64/complex128 (unitary); default
            ``torch.get_default_dtype()``.
        device: of the sign buffer (real case).

    Shape:
        params :attr:`parameter_shape` (with leading batch dimensions), the
        output (..., N, N). Real: S is the buffer ``signs``, (N,) or, once
        :meth:`right_inverse` has seen a batch of matrices, (..., N).

    Raises:
        TypeError: ``n`` or ``capacity`` not an int, an unsupported dtype.
        ValueError: ``n`` < 1, ``capacity`` outside 1..N.

    Example:
        >>> layer = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
        >>> _ = projunn.nn.unitary_init_(layer.weight)  # a Haar-random orthogonal start
        >>> start = layer.weight.detach().clone()
        >>> _ = torch.nn.utils.parametrize.register_parametrization(
        ...     layer, "weight", EUNN(6, capacity=None, dtype=torch.float64))
        >>> layer.parametrizations.weight.original.shape  # 6 layers of up to 3 angles
        torch.Size([6, 3])
        >>> torch.allclose(layer.weight, start)  # the decomposition keeps the start
        True
    """

    signs: torch.Tensor | None

    def __init__(
        self,
        n: int,
        *,
        capacity: int | None = DEFAULT_CAPACITY,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.n = check_int("n", n)
        self.capacity = n if capacity is None else check_int("capacity", capacity)
        if self.capacity > n:
            raise ValueError(
                f"capacity must be <= n = {n} (more layers are redundant), or None for the full group; got {capacity}"
            )
        self.dtype = layer_dtype(dtype)
        real = None if self.dtype.is_complex else torch.ones(n, dtype=self.dtype, device=device)
        self.register_buffer("signs", real)

    @property
    def parameter_shape(self) -> tuple[int, int]:
        """The shape of one matrix's free tensor: (L, N // 2) real, (L + 1, (N + 1) // 2) complex."""
        return _parameter_shape(self.n, self.capacity, self.dtype.is_complex)

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        if params.dtype != self.dtype or params.shape[-2:] != self.parameter_shape:
            raise ValueError(
                f"this EUNN takes {self.dtype} params of shape (..., {', '.join(map(str, self.parameter_shape))}), "
                f"got {params.dtype} {tuple(params.shape)}"
            )
        return eunn_matrix(params, self.n, signs=self.signs)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Free parameters whose matrix is ``weight`` (Note [EUNN decomposition]).

        Args:
            weight: (..., N, N) orthogonal/unitary, this EUNN's dtype. Not
                unitary to 10 N eps: replaced by its polar factor first.

        Returns:
            (..., *parameter_shape), ``weight``'s dtype and device. Real: sets
            the buffer ``signs`` to the weight's fixed diagonal of signs.

        Raises:
            TypeError: ``weight`` not a tensor of this EUNN's dtype.
            ValueError: ``weight`` not (..., N, N); with ``capacity`` < N, a
                weight that is not block diagonal in layer 0's pairs.
        """
        n = self.n
        if not isinstance(weight, torch.Tensor) or weight.dtype != self.dtype:
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"this EUNN builds {self.dtype} matrices; got a weight of {got}")
        if weight.dim() < 2 or weight.shape[-2:] != (n, n):
            raise ValueError(f"this EUNN builds ({n}, {n}) matrices; got a weight of shape {tuple(weight.shape)}")
        # On the CPU in double precision: N (N - 1) / 2 sequential steps on single rows and columns are
        # launch-bound on an accelerator, and some have no float64.
        U = weight.detach().to(device="cpu", dtype=torch.complex128 if weight.is_complex() else torch.float64)
        tolerance = 10 * n * torch.finfo(weight.dtype).eps
        if weight.numel() and float(unitarity_error(U).max()) > tolerance:
            U = closest_unitary(U)
        if self.capacity >= _full_capacity(n):
            theta, phi, diagonal = _eliminate(U)
        elif _block_diagonal(U, tolerance):
            theta, phi, diagonal = _decompose_blocks(U)
        else:
            raise ValueError(
                f"an EUNN of capacity {self.capacity} < N = {n} reaches only part of the group, and this weight is "
                "not of the form it can start from exactly (block diagonal in the pairs (0,1), (2,3), ...: the "
                "identity, 'henaff' and 'cayley' initialisations); use capacity=None (N layers) to start from any "
                "orthogonal/unitary weight, or set the weight to such a matrix first"
            )
        if not weight.is_complex():
            self.signs = diagonal.to(weight.device, self.dtype)
        return _pack(theta, phi, diagonal, self.capacity, self.dtype).to(weight.device)

    def extra_repr(self) -> str:
        kind = "unitary" if self.dtype.is_complex else "orthogonal"
        return f"{self.n}, capacity={self.capacity}, {kind}, dtype={self.dtype}"


def eunn(module: torch.nn.Module, name: str = "weight", *, capacity: int | None = DEFAULT_CAPACITY) -> torch.nn.Module:
    r"""Compute ``module``'s square weight ``name`` with an :class:`EUNN` mesh, from its value; return ``module``.

    The EUNN counterpart of ``torch.nn.utils.parametrizations.orthogonal``:
    registers ``EUNN(N, capacity=capacity, dtype=W.dtype)`` on the
    (..., N, N) weight W with ``torch.nn.utils.parametrize``. The free tensor
    ``module.parametrizations.<name>.original`` then holds the angles (and
    phases, Note [EUNN parameter layout]) and is what an optimiser trains;
    the weight is recomputed from it on every access (once per step inside
    ``parametrize.cached()``) and is orthogonal/unitary to rounding whatever
    the step. Its value at registration is W's (Note [EUNN decomposition]):
    any orthogonal/unitary W with ``capacity=None``, the block-diagonal
    initialisations with fewer layers.

    Args:
        module: any ``nn.Module``.
        name: the square (..., N, N) float32/float64/complex64/complex128
            tensor to parametrise.
        capacity: the number of rotation layers, 1..N, or None for N
            (Note [EUNN capacity default]).

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` not a module; the tensor's dtype unsupported.
        ValueError: no such tensor, or not square; ``capacity`` outside
            1..N; with ``capacity`` < N, a weight an EUNN of that capacity
            cannot start from. Nothing is registered when the call fails.

    Example:
        >>> cell = projunn.nn.UnitaryRNNCell(2, 6, dtype=torch.complex128)  # 'henaff' start: diagonal phases
        >>> start = cell.recurrent_weight.detach().clone()
        >>> _ = eunn(cell, "recurrent_weight")  # default capacity 2: one layer and the diagonal suffice
        >>> torch.allclose(cell.recurrent_weight, start)
        True
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"eunn needs an nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {name!r}")
    check_dtype(f"the dtype of {name!r}", weight.dtype, SUPPORTED_DTYPES)
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"an EUNN builds square (..., N, N) matrices; {name!r} has shape {tuple(weight.shape)}")
    mesh = EUNN(weight.shape[-1], capacity=capacity, dtype=weight.dtype, device=weight.device)
    parametrize.register_parametrization(module, name, mesh)
    return module
