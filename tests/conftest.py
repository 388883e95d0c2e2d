"""Shared helpers: exact dense references and dtype-scaled tolerances."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`-n auto`), each worker process takes its share of the cores: torch's default
# of one thread per core in every worker would oversubscribe them and slow every worker down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

REAL_AND_COMPLEX = [torch.float64, torch.complex128]
#: Where the device-generic tests run: the CPU, and a CUDA GPU when torch sees one.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
ALL_DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


def haar(n: int, *, batch=(), dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Haar-random unitary built in double precision, independent of the code under test."""
    g = torch.Generator().manual_seed(seed)
    precise = torch.complex128 if dtype.is_complex else torch.float64
    Q, R = torch.linalg.qr(torch.randn((*batch, n, n), dtype=precise, generator=g))
    return (Q * torch.sgn(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)).to(dtype)


def randn(*shape, dtype=torch.float64, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, dtype=dtype, generator=g)


def polar_reference(A: torch.Tensor) -> torch.Tensor:
    """Polar factor of A (square, or rectangular: the semi-unitary one) from an SVD."""
    X, _, Yh = torch.linalg.svd(A, full_matrices=False)
    return X @ Yh


def tangent_reference(U: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """U @ matrix_exp(K), K = (U^H a b^H - b a^H U) / 2, with dense N x N matrices."""
    K = (U.mH @ a @ b.mH - b @ a.mH @ U) / 2
    return U @ torch.linalg.matrix_exp(K)


def gram_defect(U: torch.Tensor) -> torch.Tensor:
    """Max-entry distance of U^H U from I, computed in double precision."""
    precise = U.to(torch.complex128 if U.is_complex() else torch.float64)
    eye = torch.eye(U.shape[-1], dtype=precise.dtype)
    return (precise.mH @ precise - eye).abs().amax()


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn; a test that takes it is marked ``device`` (``pytest -m device``)."""
    return torch.device(request.param)


def pytest_collection_modifyitems(items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
