"""Linear layers whose weight is orthogonal/unitary (square) or semi-orthogonal/semi-unitary (rectangular).

Note [Complex layers]
---------------------
Every layer of ``projunn.nn`` and every model of ``projunn.models`` takes
``dtype`` and ``device``, as ``torch.nn`` layers do. A complex ``dtype``
(complex64, complex128) asks for a unitary layer with complex weights and
states; a real one (float32, float64) for an orthogonal layer. The real
parameters a complex layer also holds (modReLU biases, the readout of
:class:`projunn.models.SequenceModel`) take the matching real dtype,
``dtype.to_real()``. ``dtype=None`` means torch's default dtype, as for
``torch.nn.Linear``.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F

from .._constraints import declare_unitary
from .._validation import check_choice, check_int, check_tensor, layer_dtype
from ..functional import Init, unitary_init

__all__ = ["OrthogonalLinear", "StiefelLinear", "UnitaryLinear", "unitary_init_"]


def unitary_init_(
    tensor: torch.Tensor, init: Init = "haar", *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill a (..., N, M) tensor in place with (semi-)orthogonal/unitary matrices; return it.

    The in-place counterpart of :func:`projunn.functional.unitary_init` (the
    trailing underscore, as in ``torch.nn.init``). Real tensors get orthogonal
    matrices, complex ones unitary matrices. A rectangular tensor gets
    semi-unitary matrices: orthonormal columns if N > M, orthonormal rows if
    N < M.

    Args:
        tensor: (..., N, M), float32, float64, complex64 or complex128.
        init: one of :data:`projunn.functional.Init` for square matrices;
            ``"haar"`` or ``"identity"`` for rectangular ones.
        generator: source of randomness.

    Returns:
        ``tensor``.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: fewer than 2 dimensions, an empty matrix, an unknown
            ``init``, or one with no rectangular form for N != M.

    Example:
        >>> weight = torch.empty(5, 3, dtype=torch.float64)
        >>> unitary_init_(weight) is weight
        True
        >>> torch.allclose(weight.mT @ weight, torch.eye(3, dtype=torch.float64))
        True
    """
    check_tensor("tensor", tensor)
    rows, cols = tensor.shape[-2:]
    if rows == 0 or cols == 0:
        raise ValueError(f"tensor must hold non-empty (..., N, M) matrices, got shape {tuple(tensor.shape)}")
    value = unitary_init(
        rows,
        init,
        m=cols,
        batch_shape=tuple(tensor.shape[:-2]),
        dtype=tensor.dtype,
        device=tensor.device,
        generator=generator,
    )
    with torch.no_grad():
        return tensor.copy_(value)


class StiefelLinear(torch.nn.Module):
    r"""y = x W^T (+ bias) with a semi-orthogonal (real) or semi-unitary (complex) out x in weight W.

    With ``out_features >= in_features`` W has orthonormal columns
    (W^H W = I): the map is an isometric embedding, ``||y|| = ||x||``. With
    ``out_features < in_features`` W has orthonormal rows (W W^H = I): a
    projection onto a subspace, 1-Lipschitz. :class:`projunn.optim.ProjUNN`
    keeps W on the Stiefel manifold with low-rank steps in
    O(k * in * out); see :func:`projunn.functional.projunn_d` and
    :func:`projunn.functional.projunn_t` for rectangular matrices.

    Args:
        in_features, out_features: sizes, >= 1.
        bias: add a learned bias (off by default).
        init: ``"haar"`` (a Haar-random point of the Stiefel manifold) or
            ``"identity"`` (the leading part of the identity).
        dtype: float32/float64 (real) or complex64/complex128 (complex);
            default ``torch.get_default_dtype()`` (Note [Complex layers]).
        device: where to allocate the weight.
        generator: source of randomness for the initialisation.

    Shape:
        input (..., in_features), output (..., out_features).

    Raises:
        TypeError: a size that is not an int, an unsupported dtype.
        ValueError: a size < 1, an unknown ``init``.

    Example:
        >>> layer = StiefelLinear(3, 5, dtype=torch.float64)
        >>> x = torch.randn(2, 3, dtype=torch.float64)
        >>> torch.allclose(layer(x).norm(dim=-1), x.norm(dim=-1))
        True
    """

    #: Initialisations a weight of this layer may take.
    inits: tuple[str, ...] = ("haar", "identity")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        init: str = "haar",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        dtype = layer_dtype(dtype)
        self.init = check_choice("init", init, self.inits)
        weight = unitary_init(out_features, init, m=in_features, dtype=dtype, device=device, generator=generator)
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        declare_unitary(self, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input of shape (..., {self.in_features}), got {tuple(x.shape)}")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "isometry" if self.out_features >= self.in_features else "co-isometry"
        return (
            f"{self.in_features} -> {self.out_features}, {kind}, bias={self.bias is not None}, "
            f"init={self.init!r}, dtype={self.weight.dtype}"
        )


class UnitaryLinear(StiefelLinear):
    r"""y = x W^T (+ bias) with W an N x N orthogonal (real dtype) or unitary (complex dtype) matrix.

    The weight is a plain parameter kept on the group by the optimiser
    (:class:`projunn.optim.ProjUNN`): the forward pass costs exactly what
    ``nn.Linear`` costs. The layer records ``weight`` as unitary (as
    :func:`projunn.nn.unitary_` does for other modules), which is how
    :func:`projunn.optim.param_groups` and ProjUNN find it. Without a bias the map preserves the norm of every input.
    The square case of :class:`StiefelLinear`, with the square-only
    initialisations too.

    Args:
        features: N, the input and output size.
        bias: add a learned bias (off by default: it breaks norm preservation).
        init: one of :data:`projunn.functional.Init`.
        dtype, device, generator: as for :class:`StiefelLinear`.

    Shape:
        input (..., N), output (..., N).

    Example:
        >>> layer = UnitaryLinear(4, dtype=torch.float64)
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> torch.allclose(layer(x).norm(dim=-1), x.norm(dim=-1))
        True
    """

    inits = get_args(Init)

    def __init__(
        self,
        features: int,
        *,
        bias: bool = False,
        init: str = "haar",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_int("features", features)
        super().__init__(features, features, bias=bias, init=init, dtype=dtype, device=device, generator=generator)
        self.features = features

    def extra_repr(self) -> str:
        kind = "unitary" if self.weight.is_complex() else "orthogonal"
        return f"{self.features}, {kind}, bias={self.bias is not None}, init={self.init!r}, dtype={self.weight.dtype}"


#: The same layer; the name reads better for real weights.
OrthogonalLinear = UnitaryLinear
