"""Certified robustness of Lipschitz networks: radii, a bound composed layer by layer, and the checks.

Note [Certified radius]
-----------------------
If f: R^d -> R^K is L-Lipschitz in the L2 norm, every difference of two
logits f_i - f_j is sqrt(2) L-Lipschitz (the map x -> (f_i, f_j) is
L-Lipschitz and (u, v) -> u - v has norm sqrt(2)). So while the margin
M(x) = f_y(x) - max_{j != y} f_j(x) is positive, no perturbation of norm
below M(x) / (sqrt(2) L) can make another class win (Tsuzuku, Sato &
Sugiyama, "Lipschitz-margin training", NeurIPS 2018). A network built only
from orthogonal maps, isometric reshapes and norm-preserving activations has
L <= 1; :func:`lipschitz_bound` computes the bound of a given network from its
weights as they are, so a weight that left the group shows in the bound
instead of silently voiding the certificate.

The two checks that the certificate is sound where it can fail are
:func:`jacobian_norm` (a lower bound of L at given inputs, which must not
exceed the upper bound) and :func:`pgd_l2` (an attack, which must find no
adversarial example inside a certified radius).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .nn import ChannelPad, MaxMin, OrthogonalLinear, SpaceToDepth, StiefelLinear, UnitaryConv2d, UnitaryLinear

__all__ = [
    "certified_accuracy",
    "certified_radius",
    "conv_singular_values",
    "jacobian_norm",
    "lipschitz_bound",
    "offset_cross_entropy",
    "pgd_l2",
]

#: Maps that are 1-Lipschitz whatever their parameters: norm-preserving reshapes and activations.
_ONE_LIPSCHITZ = (ChannelPad, SpaceToDepth, MaxMin, torch.nn.Flatten, torch.nn.Identity, torch.nn.ReLU)


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, K) with K >= 2 classes, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype != torch.int64:
        got = f"{labels.dtype} {tuple(labels.shape)}"
        raise ValueError(f"labels must be int64 of shape ({logits.shape[0]},), got {got}")


def _check_lipschitz(lipschitz: float) -> float:
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float)):
        raise TypeError(f"lipschitz must be a number, got {type(lipschitz).__name__} {lipschitz!r}")
    if not 0 < lipschitz < math.inf:
        raise ValueError(f"lipschitz must be a positive finite number, got {lipschitz!r}")
    return float(lipschitz)


def certified_radius(logits: torch.Tensor, labels: torch.Tensor, lipschitz: float = 1.0) -> torch.Tensor:
    """L2 radius around each input within which the prediction provably stays ``labels``.

    ``margin / (sqrt(2) * lipschitz)`` (Note [Certified radius]); negative where
    the input is misclassified and 0 where it is tied, so ``radius > eps`` is certified at eps.

    Args:
        logits: (B, K) outputs of a network that is ``lipschitz``-Lipschitz in L2.
        labels: (B,) int64 true classes.
        lipschitz: an upper bound of the network's Lipschitz constant (:func:`lipschitz_bound`).

    Returns:
        (B,) radii, in the units of the network's input.

    Example:
        >>> logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
        >>> certified_radius(logits, torch.tensor([0, 0]))  # margins 2 and -2, over sqrt(2)
        tensor([ 1.4142, -1.4142])
    """
    _check_logits(logits, labels)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -math.inf).amax(dim=1)
    return (true - others) / (math.sqrt(2) * _check_lipschitz(lipschitz))


def certified_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, radii: Iterable[float], lipschitz: float = 1.0
) -> dict[float, float]:
    """The fraction of inputs certified correct at each radius (at radius 0: strictly correct, the clean accuracy).

    Returns:
        {radius: fraction in [0, 1]}.
    """
    if logits.shape[0] == 0:
        raise ValueError("certified_accuracy needs at least one input, got an empty batch")
    radius = certified_radius(logits, labels, lipschitz)
    return {float(eps): (radius > eps).double().mean().item() for eps in radii}


def offset_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, offset: float, temperature: float = 1.0
) -> torch.Tensor:
    """Cross-entropy with the true logit lowered by ``offset``, at a temperature: a margin-seeking loss.

    ``temperature * cross_entropy((logits - offset * onehot(labels)) / temperature, labels)``, the loss
    Prach & Lampert train their Lipschitz networks with ("Almost-orthogonal layers for efficient
    general-purpose Lipschitz networks", ECCV 2022). The loss keeps pushing until the true logit
    leads by about ``offset``, i.e. a certified radius of ``offset / (sqrt(2) L)``; the temperature
    sets how sharply (a low one approaches a hinge). Scaled by the temperature so its gradients
    stay O(1) whatever it is.

    Returns:
        the mean loss, a scalar.
    """
    _check_logits(logits, labels)
    if not 0 <= offset < math.inf or not 0 < temperature < math.inf:
        raise ValueError(
            f"need a finite offset >= 0 and a positive finite temperature, got {offset!r}, {temperature!r}"
        )
    shifted = logits - offset * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return temperature * F.cross_entropy(shifted / temperature, labels)


def _layer_bound(module: torch.nn.Module) -> float:
    """An upper bound of one layer's L2 Lipschitz constant, from its weights as they are."""
    if isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward:
        return math.prod(_layer_bound(child) for child in module)  # a chain: the product bounds it
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0
    if isinstance(module, UnitaryConv2d):  # block diagonal in the orthonormal Fourier basis
        weights = [module.weight_free] + ([] if module.weight_self is None else [module.weight_self])
        return max(torch.linalg.matrix_norm(w.detach(), ord=2).max().item() for w in weights)
    if isinstance(module, (OrthogonalLinear, UnitaryLinear, StiefelLinear, torch.nn.Linear)):
        return torch.linalg.matrix_norm(module.weight.detach(), ord=2).item()
    raise TypeError(
        f"no Lipschitz bound is known for {type(module).__name__}; build the network from orthogonal layers, "
        "ChannelPad, SpaceToDepth, MaxMin and biases (BatchNorm and pooling change norms)"
    )


def lipschitz_bound(model: torch.nn.Module) -> float:
    """An upper bound of the L2 Lipschitz constant of a chain of layers: the product of each layer's.

    Orthogonal convolutions and linear maps contribute their largest singular
    value (1 to rounding while they stay on the group), norm-preserving
    reshapes and activations 1. The product is what :func:`certified_radius` needs.

    Args:
        model: a ``torch.nn.Sequential`` (nested ones allowed) of layers with known bounds.

    Raises:
        TypeError: a layer whose bound is unknown (BatchNorm, pooling, an arbitrary module, a
            ``Sequential`` subclass with its own ``forward``, e.g. a residual block); the message names it.
    """
    return _layer_bound(model)


def conv_singular_values(
    layer: torch.nn.Module, shape: tuple[int, int, int], *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Every singular value of a circular convolution, whatever builds its kernel, exactly.

    A linear map that commutes with circular shifts of (C, n, m) images (a stride-1
    convolution with circular padding, any kernel size or parametrisation: orthogonium's,
    deel-torchlip's, a plain ``Conv2d``) is block diagonal in the orthonormal 2-D Fourier
    basis: one C_out x C_in matrix per frequency, the 2-D DFT of its responses to a unit
    impulse in each input channel. Its singular values are those of these n * m small
    matrices, computed here in double precision from one forward pass of C_in impulses.
    So the largest is the layer's exact L2 Lipschitz constant at this image size, and
    max |sigma - 1| its exact distance from orthogonality, where random inputs only see
    the mean square of the singular values. A bias is removed as ``layer(x) - layer(0)``.

    The layer is measured in evaluation mode (as it certifies) and checked first: impulses
    moved by half the image must give the moved responses (to 100 eps of the largest), and
    the responses must reproduce its output on a probe image of small integers (to the
    square root of the dtype's eps, relative).

    Args:
        layer: a module mapping (B, C_in, n, m) to (B, C_out, n, m), real or complex.
        shape: (C_in, n, m), the size of the images it is applied to.
        dtype: the images' dtype (default: the real dtype of the layer's first parameter;
            pass a complex one for a layer of complex images).

    Returns:
        (n, m, min(C_out, C_in)) float64 singular values, descending per frequency.

    Raises:
        ValueError: the layer changes the image size (a stride), does not commute with circular
            shifts (zero padding), or is not linear (a nonlinearity); the message says which.
    """
    channels, n, m = shape
    tensor = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    if dtype is None:
        dtype = tensor.dtype.to_real() if tensor is not None else torch.get_default_dtype()
    device = tensor.device if tensor is not None else None
    # One impulse per input channel at pixel (0, 0), the same at (n // 2, m // 2), a probe of small
    # integers (exact in any float format, so reduced-precision kernels round only the weights), zero.
    impulses = torch.zeros(2, channels, channels, n, m, dtype=dtype, device=device)
    impulses[0, range(channels), range(channels), 0, 0] = 1
    impulses[1, range(channels), range(channels), n // 2, m // 2] = 1
    draw = torch.Generator().manual_seed(0)
    probe = torch.randint(-4, 5, (2 if dtype.is_complex else 1, channels, n, m), generator=draw).to(dtype)
    probe = (probe[0] + 1j * probe[1] if dtype.is_complex else probe[0]).to(device)
    was_training = layer.training
    layer.eval()  # measured as it certifies: a BatchNorm or a dropout in training mode would change the answer
    try:
        with torch.no_grad():
            batch = torch.cat([impulses.flatten(0, 1), probe[None], torch.zeros_like(probe[None])])
            responses = layer(batch)
    finally:
        layer.train(was_training)
    if responses.shape[-2:] != (n, m):
        raise ValueError(f"{type(layer).__name__} maps {n} x {m} images to {tuple(responses.shape[-2:])}")
    responses = (responses[:-1] - responses[-1:]).to(torch.complex128)
    at_origin, at_centre, expected = responses[:channels], responses[channels:-1], responses[-1]
    eps, name = torch.finfo(dtype).eps, type(layer).__name__
    # Shift equivariance, to rounding: an impulse moved moves its response (zero padding cuts taps at the border).
    shifted = torch.roll(at_origin, (n // 2, m // 2), dims=(-2, -1))
    if not (at_centre - shifted).abs().max() <= 100 * eps * at_origin.abs().max().clamp_min(1e-300):
        raise ValueError(f"{name} does not commute with circular shifts of {tuple(shape)} images (zero padding?)")
    # transfer[f1, f2] = the C_out x C_in matrix by which frequency (f1, f2) of the input is multiplied.
    transfer = torch.fft.fft2(at_origin).permute(2, 3, 1, 0)
    spectrum = torch.fft.fft2(probe.to(torch.complex128)).permute(1, 2, 0)[..., None]
    rebuilt = torch.fft.ifft2((transfer @ spectrum)[..., 0].permute(2, 0, 1))
    # Linearity: the impulse responses must reproduce the output on the probe.
    error = torch.linalg.vector_norm(rebuilt - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-300)
    if not error <= eps**0.5:
        raise ValueError(
            f"{name} is not a linear map of {tuple(shape)} images: its impulse responses reproduce its output to "
            f"a relative {error.item():.1e} only (a nonlinearity?)"
        )
    return torch.linalg.svdvals(transfer)


def jacobian_norm(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The spectral norm of the model's input-output Jacobian at each input, exactly.

    Each value is a lower bound of the model's Lipschitz constant (a network
    that is L-Lipschitz has ||J(x)||_2 <= L everywhere), so it checks an upper
    bound such as :func:`lipschitz_bound` from below. The K rows of each
    Jacobian come from K backward passes over the batch, then one small SVD.

    Args:
        model: maps (B, ...) to (B, K) treating inputs independently (no batch statistics).
        x: (B, ...) inputs.

    Returns:
        (B,) values of ||J(x_b)||_2.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        rows = [
            torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < logits.shape[1])[0].flatten(1)
            for k in range(logits.shape[1])
        ]
    return torch.linalg.matrix_norm(torch.stack(rows, dim=1), ord=2).detach()


def pgd_l2(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    radius: float | torch.Tensor,
    *,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    bounds: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent on the margin within an L2 ball: an attack, to test certificates.

    Maximises the best wrong logit minus the true one (the margin's negative,
    the quantity a certificate bounds) over ||delta|| <= radius, from the
    input itself and then ``restarts`` random starts at half the radius; the
    restarts stop once every input is fooled. With ``bounds``, every perturbed
    input also stays in the box (clamped, then scaled back into the ball, which
    keeps it in the box as the box is convex and holds ``x``).

    Args:
        x: (B, ...) inputs; labels: (B,) int64 classes.
        radius: the ball's radius, a number or (B,) per input.
        steps: gradient steps per start (>= 1); restarts: random starts besides x (>= 0);
        step_size: default 2.5 * radius / steps.
        bounds: keep the perturbed inputs in this box (e.g. the pixel range; x must lie in it), or None.

    Returns:
        (adversarial inputs (B, ...), fooled (B,) bool: misclassified at the returned input).

    Raises:
        ValueError: a negative or non-finite radius, ``steps`` < 1, ``restarts`` < 0, or x outside ``bounds``.
    """
    radius = torch.as_tensor(radius, dtype=x.dtype, device=x.device).expand(x.shape[0])
    if not bool(torch.isfinite(radius).all() and (radius >= 0).all()):
        raise ValueError("radius must be finite and >= 0 for every input")
    if steps < 1 or restarts < 0:
        raise ValueError(f"need steps >= 1 and restarts >= 0, got steps={steps}, restarts={restarts}")
    if bounds is not None and not bool(((x >= bounds[0]) & (x <= bounds[1])).all()):
        raise ValueError(f"x lies outside bounds {bounds}: the box must hold the unperturbed inputs")
    if x.shape[0] == 0:
        return x.clone(), torch.zeros(0, dtype=torch.bool, device=x.device)
    shape = (-1, *[1] * (x.dim() - 1))
    radius = radius.reshape(shape)
    step = 2.5 * radius / steps if step_size is None else torch.full_like(radius, step_size)
    best, fooled = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def project(delta: torch.Tensor) -> torch.Tensor:
        if bounds is not None:
            delta = (x + delta).clamp(*bounds) - x
        return delta * (radius / delta.flatten(1).norm(dim=1).view(shape).clamp_min(1e-12)).clamp(max=1.0)

    for start in range(restarts + 1):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        unit = noise / noise.flatten(1).norm(dim=1).view(shape)
        delta = project(unit * radius * 0.5) if start else torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            margin = -certified_radius(logits, labels)  # positive when fooled
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                now = margin.detach() > 0
                best[now & ~fooled] = (x + delta)[now & ~fooled]
                fooled |= now
                g = grad / grad.flatten(1).norm(dim=1).view(shape).clamp_min(1e-12)
                delta = project(delta + step * g)
        with torch.no_grad():
            now = certified_radius(model(x + delta), labels) < 0
            best[now & ~fooled] = (x + delta)[now & ~fooled]
            fooled |= now
        if fooled.all():
            break
    return best.detach(), fooled
