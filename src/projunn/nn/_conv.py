"""Full-width circular 2-D convolutions that are exactly orthogonal or unitary, held in the Fourier domain.

A circular convolution whose filter covers the whole n x m image is
diagonalised by the 2-D DFT: at frequency f it multiplies the vector of C
input channels by a C x C matrix W(f). The convolution is unitary exactly
when every W(f) is, so the layer stores the W(f) themselves, a batch of
unitary matrices that :class:`projunn.optim.ProjUNN` updates like any other
unitary parameter (batched over frequencies).

Note [Hermitian pairing]
------------------------
A real kernel has a spectrum with W(-f) = conj(W(f)), f and -f taken modulo
(n, m). The real layer therefore keeps only independent frequencies of the
half spectrum that ``rfft2`` returns (columns 0 .. m // 2):

- *self-mirrored* frequencies, f = -f: rows {0, n/2} x columns {0, m/2}
  (the halves only when even). There W(f) must be real, so it is stored as a
  real orthogonal matrix (``weight_self``, up to 4 of them);
- *free* frequencies, one of each mirrored pair inside the half spectrum,
  stored as complex unitary matrices (``weight_free``);
- the remaining half-spectrum frequencies (the lower halves of columns 0 and
  m/2) are mirrors of free ones and are built as their conjugates on the fly.

Every stored matrix is unitary (or real orthogonal) before and after each
update, and the mirrors are conjugates by construction, so the layer is real
and norm preserving at every step, with no projection needed afterwards.
The complex layer stores all n x m frequencies as independent unitary
matrices (``weight_free``) and no ``weight_self``.
"""

from __future__ import annotations

import torch

from .._constraints import declare_unitary
from .._validation import check_choice, check_int, check_ints, layer_dtype
from ..functional import closest_unitary, unitary_init

__all__ = ["UnitaryConv2d"]


def frequency_layout(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index bookkeeping of Note [Hermitian pairing] for an n x m real input.

    Frequencies of the half spectrum are numbered k1 * (m // 2 + 1) + k2.

    Returns:
        free: flat indices of the free frequencies, (F_free,).
        self_mirrored: flat indices with f = -f, (F_self,).
        mirrored: flat indices built as conjugates, (F_mirror,).
        source: for each mirrored index, its partner's position in ``free``.
    """
    m2 = m // 2 + 1
    mirror_columns = {0} | ({m // 2} if m % 2 == 0 else set())
    free, self_mirrored, mirrored, partners = [], [], [], []
    for k1 in range(n):
        for k2 in range(m2):
            flat = k1 * m2 + k2
            if k2 not in mirror_columns:
                free.append(flat)
                continue
            partner = (-k1) % n
            if partner == k1:
                self_mirrored.append(flat)
            elif k1 < partner:
                free.append(flat)
            else:
                mirrored.append(flat)
                partners.append(partner * m2 + k2)
    position = {flat: i for i, flat in enumerate(free)}
    source = [position[p] for p in partners]
    as_index = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    return as_index(free), as_index(self_mirrored), as_index(mirrored), as_index(source)


class UnitaryConv2d(torch.nn.Module):
    r"""Full-width circular convolution C -> C channels, orthogonal (real) or unitary (complex).

    .. math::
        \hat y(f) = W(f)\, \hat x(f),\qquad W(f) \in U(C)\ \text{for every frequency } f,

    with the orthonormal 2-D DFT, so ``||layer(x)|| = ||x||`` for every input.
    The input size (n, m) is fixed at construction. Storage: one C x C matrix
    per independent frequency (see Note [Hermitian pairing]); updates with
    projUNN cost O(k n m C^2) per step, FFTs O(n m C log(n m)).

    Args:
        channels: C.
        size: (n, m), the spatial size of every input.
        init: ``"identity"`` (the identity map) or ``"haar"`` (an independent
            Haar-random matrix per frequency).
        bias: add a learned bias per output channel (off by default); it shifts
            outputs, so norms are then preserved only up to it, and it leaves
            the Lipschitz constant unchanged (1).
        dtype: float32 or float64 for an orthogonal convolution of real
            images; complex64 or complex128 for a unitary convolution of
            complex images (all n x m frequencies independent). Frequencies
            are stored in the complex dtype of the same precision. Default:
            torch's default dtype (Note [Complex layers]).
        device: where to allocate the weights.
        generator: randomness for ``"haar"``.

    Shape:
        input (B, C, n, m), output (B, C, n, m), in the layer's dtype.

    Example:
        >>> conv = UnitaryConv2d(3, (8, 6), init="haar", dtype=torch.float64)
        >>> x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
        >>> torch.allclose(conv(x).norm(), x.norm())
        True
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        *,
        init: str = "identity",
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        dtype = layer_dtype(dtype)
        self.channels = check_int("channels", channels)
        self.size = check_ints("size", size, 2)
        self.init = check_choice("init", init, ("identity", "haar"))
        real, cdtype = dtype.to_real(), dtype.to_complex()
        n, m = self.size

        def matrices(count: int, dtype: torch.dtype) -> torch.nn.Parameter:
            value = unitary_init(channels, init, batch_shape=(count,), dtype=dtype, device=device, generator=generator)
            return torch.nn.Parameter(value)

        if dtype.is_complex:
            self.weight_free = matrices(n * m, cdtype)
            self.weight_self = None
        else:
            free, self_mirrored, mirrored, source = frequency_layout(n, m)
            self.weight_free = matrices(len(free), cdtype)
            self.weight_self = matrices(len(self_mirrored), real)
            # Position of every half-spectrum frequency in cat([free, self, mirrored]).
            order = torch.cat([free, self_mirrored, mirrored])
            self.register_buffer("_gather", torch.argsort(order).to(device), persistent=False)
            self.register_buffer("_source", source.to(device), persistent=False)
        self.bias = torch.nn.Parameter(torch.zeros(channels, dtype=dtype, device=device)) if bias else None
        declare_unitary(self, "weight_free", "weight_self")

    @property
    def complex(self) -> bool:
        """Whether this is a unitary convolution of complex images (a complex ``dtype``)."""
        return self.weight_self is None

    def frequency_weights(self) -> torch.Tensor:
        """W(f) for the frequencies the forward pass uses.

        Returns:
            complex layer: (n, m, C, C); real layer: (n, m // 2 + 1, C, C), the
            half spectrum of ``rfft2`` with mirrored entries conjugated.
        """
        n, m = self.size
        c = self.channels
        if self.complex:
            return self.weight_free.reshape(n, m, c, c)
        parts = [self.weight_free, self.weight_self.to(self.weight_free.dtype), self.weight_free[self._source].conj()]
        return torch.cat(parts)[self._gather].reshape(n, m // 2 + 1, c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, m = self.size
        if x.dim() != 4 or x.shape[1] != self.channels or tuple(x.shape[-2:]) != self.size:
            raise ValueError(
                f"expected input of shape (batch, {self.channels}, {n}, {m}) fixed at construction, "
                f"got {tuple(x.shape)}"
            )
        if x.is_complex() != self.complex:
            kind = "complex" if self.complex else "real"
            raise TypeError(f"this {kind} layer expects {kind} input, got dtype {x.dtype}")
        expected = self.weight_free.dtype if self.complex else self.weight_self.dtype
        if x.dtype != expected:
            raise TypeError(f"input has dtype {x.dtype} but the layer holds {expected}; build it with dtype=")
        W = self.frequency_weights()
        if self.complex:
            X = torch.fft.fft2(x, norm="ortho")
            y = torch.fft.ifft2(torch.einsum("uvoi,biuv->bouv", W, X), norm="ortho")
            return y if self.bias is None else y + self.bias[:, None, None]
        X = torch.fft.rfft2(x, norm="ortho")
        y = torch.fft.irfft2(torch.einsum("uvoi,biuv->bouv", W, X), s=(n, m), norm="ortho")
        return y if self.bias is None else y + self.bias[:, None, None]

    def spatial_kernel(self) -> torch.Tensor:
        """The equivalent circular-convolution kernel k with y = sum_q k(q) x(. - q), shape (C, C, n, m).

        Real for the real layer (its imaginary part is rounding and is dropped).
        """
        n, m = self.size
        with torch.no_grad():
            W = self.frequency_weights().permute(2, 3, 0, 1)  # (C_out, C_in, n, freq)
            if self.complex:
                return torch.fft.ifft2(W)
            return torch.fft.irfft2(W, s=(n, m))

    def to_conv2d(self) -> torch.nn.Conv2d:
        """The same map as a plain ``torch.nn.Conv2d`` (circular padding, the whole image as its kernel).

        For shipping a trained model without projunn. ``Conv2d`` computes a
        cross-correlation over the input padded by ``left = (k - 1) // 2`` on the
        leading side ("same" padding), y(p) = sum_j w(j) x(p + j - left), so its
        weight is the spatial kernel reversed and rolled: w(j) = k((left - j) mod n).
        Outputs equal the layer's to rounding (its FFT against a direct sum).

        Returns:
            ``Conv2d(C, C, (n, m), padding="same", padding_mode="circular")`` in the layer's dtype
            and device (complex for a unitary layer), with the layer's bias if it has one.
        """
        n, m = self.size
        kernel = self.spatial_kernel()
        shift = ((n - 1) // 2 + 1, (m - 1) // 2 + 1)
        weight = torch.roll(torch.flip(kernel, dims=(-2, -1)), shifts=shift, dims=(-2, -1))
        conv = torch.nn.Conv2d(
            self.channels,
            self.channels,
            (n, m),
            padding="same",
            padding_mode="circular",
            bias=self.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @classmethod
    def from_spatial_kernel(cls, kernel: torch.Tensor, *, dtype: torch.dtype | None = None, atol: float | None = None):
        """The layer of a given (C, C, n, m) circular kernel, if that convolution is orthogonal/unitary.

        Args:
            kernel: (C, C, n, m), real or complex.
            dtype: the layer's dtype (default: the kernel's): a complex dtype
                gives a unitary convolution of complex images, a real one an
                orthogonal convolution of real images (the kernel must then be real).
            atol: largest accepted max |W(f)^H W(f) - I| (default 1e3 * eps of
                the kernel's dtype).

        Raises:
            ValueError: the kernel's frequency matrices are not unitary within ``atol``,
                it is not square in channels, or a complex kernel for a real dtype.
        """
        if kernel.dim() != 4 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"kernel must have shape (C, C, n, m), got {tuple(kernel.shape)}")
        c, _, n, m = kernel.shape
        dtype = kernel.dtype if dtype is None else dtype
        if kernel.is_complex() and not dtype.is_complex:
            raise ValueError(f"a real layer (dtype={dtype}) needs a real kernel, got dtype {kernel.dtype}")
        real = kernel.real.dtype
        layer = cls(c, (n, m), dtype=dtype, device=kernel.device)
        spectrum = torch.fft.fft2(kernel).permute(2, 3, 0, 1)  # (n, m, C, C)
        eye = torch.eye(c, dtype=spectrum.dtype, device=kernel.device)
        tolerance = 1e3 * torch.finfo(real).eps if atol is None else atol
        defect = (spectrum.mH @ spectrum - eye).abs().amax().item()
        if defect > tolerance:
            raise ValueError(f"the kernel's convolution is not unitary: max |W^H W - I| = {defect:.2e}")
        with torch.no_grad():
            # Snapped to the group: the check above allows rounding-level defects.
            if layer.complex:
                layer.weight_free.copy_(closest_unitary(spectrum.reshape(n * m, c, c)))
            else:
                half = spectrum[:, : m // 2 + 1].reshape(-1, c, c)
                free, self_mirrored, _, _ = frequency_layout(n, m)
                layer.weight_free.copy_(closest_unitary(half[free]))
                layer.weight_self.copy_(closest_unitary(half[self_mirrored].real))
        return layer

    def extra_repr(self) -> str:
        kind = "unitary" if self.complex else "orthogonal"
        return f"{self.channels}, size={self.size}, {kind}, init={self.init!r}, bias={self.bias is not None}"
