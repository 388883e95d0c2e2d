"""Argument checks for the whole library: one convention, one place.

A value of the wrong type raises TypeError; a value of the right type that is
not accepted (out of range, not one of the choices, a wrong shape) raises
ValueError. An unsupported dtype counts as a wrong type, as it does for
tensors in torch. Every message names the argument, what it accepts and what
it got, so a mistake is found at the call that made it rather than deep
inside a QR factorisation.

``functional``, ``optim`` and ``nn`` all check their arguments with these
functions; the module lives at the package root so that no subpackage
imports another subpackage's private module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: dtypes the unitary updates support. Half precisions are excluded because
#: the small QR/SVD/matrix_exp problems have no half-precision kernels on CPU,
#: and a unitary weight kept in half precision drifts off the group at once;
#: keep a float32 master copy instead.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
#: The real ones among them.
REAL_DTYPES = (torch.float32, torch.float64)


def _listed(choices: Sequence[object]) -> str:
    return ", ".join(str(c).removeprefix("torch.") if isinstance(c, torch.dtype) else repr(c) for c in choices)


def _got(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings ``choices``.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: ``value`` is not one of ``choices``; the message lists them.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {_listed(choices)}; got {_got(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {_listed(choices)}; got {value!r}")
    return value


def check_int(name: str, value: int, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int (bools excluded) >= ``minimum``.

    Raises:
        TypeError: ``value`` is not an int, or is a bool.
        ValueError: ``value`` < ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_ints(name: str, value: Sequence[int], length: int, *, minimum: int = 1) -> tuple[int, ...]:
    """Return ``value`` as a tuple if it holds ``length`` ints, each >= ``minimum``.

    Raises:
        TypeError: ``value`` is not a sequence, or an entry is not an int.
        ValueError: it has another length, or an entry is below ``minimum``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a tuple of {length} ints >= {minimum}, got {_got(value)}")
    if len(value) != length:
        raise ValueError(f"{name} must be {length} ints >= {minimum}, got {len(value)} values {tuple(value)!r}")
    return tuple(check_int(f"{name}[{i}]", entry, minimum=minimum) for i, entry in enumerate(value))


def check_dtype(name: str, dtype: torch.dtype, choices: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> torch.dtype:
    """Return ``dtype`` if it is one of ``choices``; otherwise TypeError listing them."""
    if not isinstance(dtype, torch.dtype) or dtype not in choices:
        raise TypeError(f"{name} must be one of {_listed(choices)}; got {dtype!r}")
    return dtype


def layer_dtype(dtype: torch.dtype | None, choices: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> torch.dtype:
    """A layer's ``dtype`` argument: torch's default dtype for None; TypeError unless it is one of ``choices``."""
    return check_dtype("dtype", torch.get_default_dtype() if dtype is None else dtype, choices)


def check_tensor(name: str, x: object) -> torch.Tensor:
    """Return ``x`` if it is a dense tensor of a supported dtype with >= 2 dimensions.

    Raises:
        TypeError: not a tensor, an unsupported dtype, or a sparse layout.
        ValueError: fewer than 2 dimensions.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes are {_listed(SUPPORTED_DTYPES)}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got shape {tuple(x.shape)}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    return x


def check_same_kind(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise TypeError unless ``x`` has the dtype of ``ref``, ValueError unless it is on its device."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"{name} is on device {x.device} but {ref_name} is on {ref.device}; they must match")


def check_update_args(U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Validate the (U, a, b) triple of a projUNN update.

    U: (..., N, M); a: (..., N, k), b: (..., M, k) with k >= 1, same dtype and device as U.
    """
    check_tensor("U", U)
    check_tensor("a", a)
    check_tensor("b", b)
    check_same_kind("a", a, "U", U)
    check_same_kind("b", b, "U", U)
    n, m = U.shape[-2:]
    expected_a, expected_b = (*U.shape[:-2], n), (*U.shape[:-2], m)
    if a.shape[:-1] != expected_a or b.shape[:-1] != expected_b or a.shape[-1] != b.shape[-1]:
        with_k = lambda shape: "(" + ", ".join([*map(str, shape), "k"]) + ")"  # noqa: E731
        raise ValueError(
            f"for U of shape {tuple(U.shape)}, a must have shape {with_k(expected_a)} and b {with_k(expected_b)} "
            f"with the same k; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.shape[-1] < 1:
        raise ValueError(f"the rank k (last dimension of a and b) must be >= 1, got shape {tuple(a.shape)}")


def check_out(out: torch.Tensor, U: torch.Tensor) -> None:
    """Validate an ``out=`` tensor for a result shaped like ``U``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_same_kind("out", out, "U", U)
    if out.shape != U.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but the result has shape {tuple(U.shape)}")
