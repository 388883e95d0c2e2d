"""Argument checks shared by the functional API.

Every public function validates where a value enters and raises an error that
names the argument, its shape and its dtype, so a mistake is found at the call
that made it rather than deep inside a QR factorisation.
"""

from __future__ import annotations

import torch

#: dtypes the unitary updates support. Half precisions are excluded because
#: the small QR/SVD/matrix_exp problems have no half-precision kernels on CPU,
#: and a unitary weight kept in half precision drifts off the group at once;
#: keep a float32 master copy instead.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError naming them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is an int >= 1 (bools excluded), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_tensor(name: str, x: object) -> torch.Tensor:
    """Raise TypeError unless ``x`` is a tensor of a supported dtype with >= 2 dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes are {names}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., rows, cols), got shape {tuple(x.shape)}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    return x


def check_square(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise ValueError unless the last two dimensions of ``x`` are equal."""
    check_tensor(name, x)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dimensions (..., N, N), got shape {tuple(x.shape)}")
    return x


def check_same_kind(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise unless ``x`` has the dtype and device of ``ref``."""
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
