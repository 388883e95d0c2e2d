"""One way to ask a layer for complex weights: a complex ``dtype``.

Note [Complex layers]
---------------------
Every layer and model of ``projunn.nn`` takes ``dtype`` and ``device``, as
``torch.nn`` layers do. A complex ``dtype`` (complex64, complex128) asks for a
unitary layer with complex weights and states; a real one (float32, float64)
for an orthogonal layer. The real parameters a complex layer also holds
(modReLU biases, the readout of :class:`SequenceModel`) take the matching real
dtype, ``dtype.to_real()``. ``dtype=None`` means torch's default dtype, as
for ``torch.nn.Linear``.

The recurrent layers, the convolution and ``SequenceModel`` used to take a
real ``dtype`` plus ``complex=True`` (an argument that shadowed the builtin).
That spelling still works for one release, with a DeprecationWarning that says
to pass a complex dtype.
"""

from __future__ import annotations

import torch

from .._validation import SUPPORTED_DTYPES, check_dtype, warn_deprecated

__all__ = ["dtype_from_complex_flag", "layer_dtype"]


def layer_dtype(dtype: torch.dtype | None, choices: tuple[torch.dtype, ...] = SUPPORTED_DTYPES) -> torch.dtype:
    """``dtype``, or torch's default dtype for None; TypeError unless it is one of ``choices``."""
    return check_dtype("dtype", torch.get_default_dtype() if dtype is None else dtype, choices)


def dtype_from_complex_flag(
    owner: str, dtype: torch.dtype | None, complex_flag: bool | None, *, stacklevel: int = 2
) -> torch.dtype | None:
    """The dtype meant by ``dtype`` and the deprecated ``complex=`` flag of ``owner``.

    Returns ``dtype`` unchanged when the flag was not given (None); otherwise
    warns (DeprecationWarning) and returns the complex counterpart of
    ``dtype`` (of the default dtype for None) for ``True``, the dtype itself
    for ``False``. ``stacklevel`` as for :func:`warnings.warn`, counted from
    the caller of this function. See Note [Complex layers].

    Raises:
        TypeError: an unsupported dtype.
        ValueError: ``complex=False`` with a complex dtype.
    """
    if complex_flag is None:
        return dtype
    resolved = layer_dtype(dtype)
    if not complex_flag and resolved.is_complex:
        raise ValueError(f"{owner}: complex=False contradicts dtype={resolved}; pass the dtype alone")
    replacement = "pass a complex dtype instead (dtype=torch.complex64 or dtype=torch.complex128)"
    warn_deprecated(f"{owner}(complex=...)", replacement, stacklevel=stacklevel + 1)
    return resolved.to_complex() if complex_flag else resolved
