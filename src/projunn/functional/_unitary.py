"""Unitarity checks, the exact projection to the group, and initialisers."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from .._validation import check_choice, check_dtype, check_int, check_tensor
from ._kernels import double

__all__ = ["Init", "closest_unitary", "unitarity_error", "unitary_init"]

#: The initialisations :func:`unitary_init` makes (and the layers' ``init`` option names).
Init = Literal["identity", "haar", "henaff", "cayley"]
INITS: tuple[str, ...] = get_args(Init)  # the same names at run time, for validation
#: Those with a rectangular (semi-unitary) form.
RECTANGULAR_INITS = ("identity", "haar")


def unitarity_error(U: torch.Tensor) -> torch.Tensor:
    r"""Frobenius distance of U's Gram matrix from the identity, one value per matrix.

    .. math:: \| U^H U - I \|_F

    For a rectangular (..., n, m) matrix the smaller Gram matrix is used
    (U^H U when n >= m, U U^H otherwise), so a semi-orthogonal matrix scores 0.
    Costs O(n m min(n, m)): a check, not something to call every step at large N.

    Args:
        U: (..., n, m) real or complex.

    Returns:
        (...) real tensor (float32 for float32/complex64 input), computed in
        double precision so the check does not measure its own rounding.
    """
    check_tensor("U", U)
    n, m = U.shape[-2:]
    # In double precision: a float32 Gram matrix carries rounding of ~N * eps
    # (5e-6 at N = 128), more than the defect of a well-kept float32 weight.
    precise = U.to(double(U.dtype))
    gram = precise.mH @ precise if n >= m else precise @ precise.mH
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye).to(U.real.dtype)


def closest_unitary(A: torch.Tensor) -> torch.Tensor:
    r"""The closest (semi-)unitary matrix to A in Frobenius norm: its polar factor.

    .. math:: A = X \Sigma Y^H \;\Rightarrow\; \operatorname{polar}(A) = X Y^H

    Exact but O(N^3); used to snap weights back to the group now and then
    (``reorthogonalize_every``), not at every step. For singular A it returns
    one of the (then non-unique) minimisers.

    Args:
        A: (..., n, m) real or complex.

    Returns:
        (..., n, m), same dtype and device.
    """
    check_tensor("A", A)
    # In double precision, then rounded once: a float32 SVD's factors are
    # orthonormal only to ~N * eps, which would undo the snap's purpose.
    X, _, Yh = torch.linalg.svd(A.to(double(A.dtype)), full_matrices=False)
    return (X @ Yh).to(A.dtype)


def unitary_init(
    n: int,
    init: Init = "haar",
    *,
    m: int | None = None,
    batch_shape: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A (batch of) n x n orthogonal (real dtype) or unitary (complex dtype) matrices.

    Initialisations (``init``; the same argument name as the layers' ``init=``):

    - ``"identity"``: I.
    - ``"haar"``: distributed by Haar measure on O(n) or U(n) (QR of a Gaussian
      matrix with the phases of R's diagonal moved into Q).
    - ``"henaff"`` (Henaff, Szlam & LeCun 2016, used for the copy task):
      real: block diagonal with 2 x 2 rotations by angles uniform in
      [-pi, pi] (a trailing 1 when n is odd); complex: diagonal of phases
      exp(i theta), theta uniform in [-pi, pi] -- the same spectrum.
    - ``"cayley"`` (Helfrich et al. 2018, scoRNN): the Cayley transform of the
      skew-symmetric scoRNN initialisation, i.e. 2 x 2 rotations by angles
      uniform in [0, pi/2]; complex: phases exp(i theta), theta in [0, pi/2].

    With ``m`` != n the result is an n x m semi-unitary matrix (orthonormal
    columns if n > m, rows if n < m): ``"identity"`` gives the leading part of
    the identity, ``"haar"`` a Haar-distributed point of the Stiefel manifold.

    :func:`projunn.nn.unitary_init_` (trailing underscore, as in
    ``torch.nn.init``) fills an existing tensor with the same matrices in place.

    Args:
        n: matrix size (rows), >= 1.
        init: one of :data:`Init` (``"identity"`` or ``"haar"`` when m != n).
        m: columns, >= 1; default n.
        batch_shape: leading dimensions of the result.
        dtype: float32, float64, complex64 or complex128.
        device: device of the result.
        generator: source of randomness (on ``device``); None uses the global one.

    Returns:
        (*batch_shape, n, m) tensor.

    Raises:
        TypeError: n or m not an int, init not a str, an unsupported dtype.
        ValueError: n or m < 1, an unknown init, or one that has no
            rectangular form when m != n.

    Example:
        >>> W = unitary_init(8, "henaff", dtype=torch.float64)
        >>> bool(unitarity_error(W) < 1e-12)
        True
    """
    check_int("n", n)
    check_choice("init", init, INITS)
    check_dtype("dtype", dtype)
    m = n if m is None else check_int("m", m)
    if m != n:
        check_choice(f"init of a rectangular ({n} x {m}) matrix", init, RECTANGULAR_INITS)
    shape = (*tuple(batch_shape), n, m)
    if init == "identity":
        return torch.eye(n, m, dtype=dtype, device=device).expand(shape).clone()
    # Built in double precision and rounded once: a float32 QR would leave a
    # Haar matrix ~10x further from orthogonal than that single rounding.
    precise = double(dtype)
    if init == "haar":
        if m > n:  # a wide Haar matrix is the conjugate transpose of a tall one
            return _haar((*shape[:-2], m, n), precise, device, generator).mH.to(dtype).contiguous()
        return _haar(shape, precise, device, generator).to(dtype)
    low, high = (-math.pi, math.pi) if init == "henaff" else (0.0, math.pi / 2)
    return _rotations(shape, low, high, precise, device, generator).to(dtype)


def _haar(shape, dtype, device, generator) -> torch.Tensor:
    Z = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    Q, R = torch.linalg.qr(Z)
    # QR is unique only up to the phases of R's diagonal; fixing them makes
    # the distribution of Q exactly Haar (Mezzadri 2007).
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    phase = torch.where(d == 0, torch.ones_like(d), torch.sgn(d))
    return (Q * phase.unsqueeze(-2)).contiguous()


def _rotations(shape, low, high, dtype, device, generator) -> torch.Tensor:
    """Block-diagonal 2 x 2 rotations (real) or diagonal phases (complex), angles ~ U[low, high]."""
    n = shape[-1]
    real_dtype = torch.empty((), dtype=dtype).real.dtype
    if dtype.is_complex:
        theta = torch.empty(shape[:-1], dtype=real_dtype, device=device).uniform_(low, high, generator=generator)
        return torch.diag_embed(torch.polar(torch.ones_like(theta), theta)).to(dtype)
    pairs = n // 2
    theta = torch.empty((*shape[:-2], pairs), dtype=real_dtype, device=device).uniform_(low, high, generator=generator)
    W = torch.zeros(shape, dtype=dtype, device=device)
    even = torch.arange(0, 2 * pairs, 2, device=device)
    cos, sin = torch.cos(theta), torch.sin(theta)
    W[..., even, even] = cos
    W[..., even + 1, even + 1] = cos
    W[..., even, even + 1] = -sin
    W[..., even + 1, even] = sin
    if n % 2:
        W[..., n - 1, n - 1] = 1
    return W
