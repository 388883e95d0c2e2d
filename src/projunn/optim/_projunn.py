"""Make any torch.optim optimiser keep chosen parameters exactly unitary.

Note [Composition with the base optimiser]
------------------------------------------
The base optimiser (SGD, RMSprop, Adam, ...) runs unchanged: its momentum and
second-moment statistics are kept on the raw Euclidean gradients, as in the
paper. ProjUNN attaches two step hooks to it:

1. before the step, each unitary weight U is copied into a buffer that is
   allocated once and reused (a fresh N x N allocation per step is page-faulted
   on every call at large N);
2. after the step the weight holds U + D, where D is the step the optimiser
   proposed. D is recovered in place, sketched as a b^H of rank k, and the
   weight is overwritten with projunn_t(U, a, b) or projunn_d(U, a, b).

The per-group settings live in the base optimiser's own ``param_groups``
(keys ``unitary``, ``method``, ``rank``, ``sketch``), so learning rates,
LR schedulers and ``state_dict`` work exactly as for the base optimiser, and
which weights are unitary is said by explicit groups, never by attributes on
Parameter objects. ProjUNN's own state (step counter, skipped-step counter,
sketch RNG state) is stored inside the base optimiser's ``state_dict`` under
the key ``"projunn"`` by state-dict hooks, so one ``state_dict`` round trip
restores everything.

Note [Constrained weights in any group]
---------------------------------------
A weight constrained by :func:`projunn.nn.unitary_` or kept unitary by its
layer (:class:`projunn.nn.UnitaryLinear`, ...) is kept unitary wherever it
sits in the base optimiser's groups: in a unitary group from
:func:`projunn.optim.param_groups`, or in an ordinary group of an optimiser
built from ``model.parameters()``, the usual way. Its constraint says how to
read it as matrices (gate blocks, convolution kernels: Note [Matrix views]
in ``projunn.nn._constrain``); ProjUNN's defaults give the method, rank and
sketch, and its group everything else (learning rate, weight decay). Which
parameters are constrained is looked up (Note [Finding constrained weights]
in ``projunn.nn._constrain``) when a group is first seen or changes, and
after any constraint was added, removed or copied: not per weight per step.
Without that, a constrained weight in an ordinary group would silently take
plain optimiser steps and leave the group. ``param_groups`` remains the way
to give unitary weights their own learning rate (the paper: lr/32 for RNNs).

Note [Sketches under data parallelism]
--------------------------------------
Under DistributedDataParallel every replica holds the same weights and, after
the gradient all-reduce, the same gradients, and the base optimiser's step is
deterministic. The replicas therefore stay bit-identical if, and only if, the
randomised sketches (LSI, column sampling, randomised SVD) draw the same
numbers on every rank. ProjUNN draws them from its own generator, never from
the global stream (which data-parallel scripts often seed per rank), seeded
once: with ``seed=None`` under an initialised process group, rank 0's
``torch.initial_seed()`` is broadcast to all ranks at construction; an
explicit ``seed`` must be the same on every rank. The generators then advance
identically, since every rank sketches the same parameters in the same order,
and their states travel in ``state_dict``. This costs one broadcast in total,
where sending the factors (a, b) from rank 0 would cost a collective per
parameter per step.

Note [Non-finite steps]
-----------------------
If any unitary weight's gradient is NaN/Inf, its gradient is hidden (set to
None) for the duration of the step so the base optimiser skips it entirely:
neither the weight nor its optimiser state is touched. If the proposed step D
of any unitary weight is non-finite (overflow, a poisoned state, or NaN
gradients made inside a closure), every unitary weight is restored to its
value before the step; the base optimiser has then already updated its own
state, which cannot be undone generically. Either way the step
counts in ``skipped_steps`` and a RuntimeWarning is issued (or
FloatingPointError raised with ``on_nonfinite="raise"``, after restoring).
Non-unitary parameters are left to the base optimiser, as in plain torch.

Note [Steps from zero]
----------------------
The hooks of Note [Composition with the base optimiser] work for any base
optimiser, at the price of passes over every N x N weight beyond the base
step and the update: copying U aside, subtracting it from U + D, and (the
update being written from the copy) copying it into the weight again.
Many optimisers compute their step from the gradient and their own state
only, writing p <- p + D with D independent of p's value. For those, p.data
is swapped with a zeroed buffer before the base step: the base optimiser
writes 0 + D = D into the buffer (its state is keyed by the Parameter
object, which does not change), p gets its weight back after the step
untouched, and the update runs in place on it. What remains is one pass to
zero the buffer. D is then also exact: the generic path recovers
fl(fl(U + D) - U), which differs from D by up to eps |U| per entry, so the
two paths agree to that rounding, not bit for bit.

Which optimisers qualify is an explicit allow-list (:data:`VALUE_FREE_STEPS`),
checked per group at every step, since it depends on settings:

- SGD (momentum, dampening, nesterov, maximize: all act on the gradient and
  the momentum buffer), Adam and AdamW (amsgrad, maximize, fused, foreach,
  capturable), RMSprop (centered, momentum), each with ``weight_decay = 0``:
  the L2 decay of SGD, Adam and RMSprop adds ``wd * p`` to the gradient, and
  AdamW's decoupled decay multiplies p by ``1 - lr * wd``; applied to the
  zeros, either would be lost. (:func:`projunn.optim.param_groups` sets
  ``weight_decay = 0`` on unitary groups.)
- ``differentiable=False``: a differentiable step records p in the graph.
- the exact class, not a subclass, which may change ``step``.
- no closure: a closure's forward pass during the step would see the zeros.
- a plain tensor, not a DTensor (whose local shard cannot be swapped).

Anything else takes the generic path. ``step_from_zero=False`` forces it.
A step pre-hook registered on the base optimiser after ProjUNN's, or
anything else reading the weight during the base step, sees the zeros.

Note [ProjUNN is the optimiser]
-------------------------------
:class:`ProjUNN` is a ``torch.optim.Optimizer`` that wraps the base one, as
Hugging Face accelerate's ``AcceleratedOptimizer`` does: its
``param_groups``, ``state`` and ``defaults`` are the base optimiser's own
objects (shared, not copied), ``step`` runs the base step with the projUNN
updates, and ``state_dict`` is the base's with ProjUNN's state added. So the
ProjUNN object is the one to hand to every tool (LR schedulers, GradScaler,
Lightning's ``configure_optimizers``, ``accelerator.prepare``), and the
training loop calls its ``step``. (``torch.distributed.checkpoint``'s
``get_state_dict`` would drop ProjUNN's own entry: save and load with
``distributed_state_dict`` and ``load_distributed_state_dict``.)
The work itself happens in step hooks registered on the base optimiser
(Note [Composition with the base optimiser]), so a tool that holds the base
optimiser and steps it gets the same update; hooks registered on ProjUNN are
registered on the base. The base optimiser takes one ProjUNN at a time
(attaching a second would update each weight twice): ProjUNN keeps a weak
set of the optimisers it is attached to, rather than marking them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
import weakref
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from .._constraints import constrained_weights, constraint_generation
from .._validation import SUPPORTED_DTYPES, check_choice, check_int
from ..functional import Sketch
from ._drift import CHECK_EVERY as DRIFT_CHECK_EVERY
from ._drift import DriftControl
from ._groups import MATRIX_SHAPE, matrix_view
from ._weights import all_finite_everywhere, any_rank, check_weight, local_part, project, sketch_step, update

__all__ = ["Method", "ProjUNN", "steps_from_zero"]

#: Update rules a unitary parameter group may ask for. ``"none"`` leaves the
#: group unconstrained (the plain base optimiser step), for comparisons.
Method = Literal["t", "d", "none"]
METHODS: tuple[str, ...] = get_args(Method)  # the same names at run time, for validation
SKETCHES: tuple[str, ...] = get_args(Sketch)

_STATE_KEY = "projunn"
#: Note [ProjUNN is the optimiser]: the base optimisers a ProjUNN is attached to.
_ATTACHED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_NONFINITE_POLICIES = ("skip", "raise")
#: Sketches whose factors are non-finite whenever D is: LSI multiplies D by a Gaussian matrix (no
#: exact zeros, so an Inf or NaN entry reaches the product, Inf - Inf giving NaN) and QR and the
#: product D V carry it on. Checking the N x k factors then replaces a pass over the N x N step.
#: The others can skip entries (column sampling) or raise inside an SVD, so D is checked first.
_SKETCHES_THAT_PROPAGATE = frozenset({"lsi"})

#: Note [Steps from zero]: optimiser classes whose step does not depend on the weight's value when
#: each listed group setting has the listed value (checked on the exact class, not subclasses).
VALUE_FREE_STEPS: dict[type[torch.optim.Optimizer], dict[str, Any]] = {
    torch.optim.SGD: {"weight_decay": 0, "differentiable": False},
    torch.optim.Adam: {"weight_decay": 0, "differentiable": False},
    torch.optim.AdamW: {"weight_decay": 0, "differentiable": False},
    torch.optim.RMSprop: {"weight_decay": 0, "differentiable": False},
}


def steps_from_zero(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], param: torch.Tensor) -> bool:
    """Whether the base optimiser's step of ``param`` in ``group`` may act on zeros (Note [Steps from zero]).

    True only for a class of :data:`VALUE_FREE_STEPS` (exactly), a group with
    the listed settings, and a plain (not DTensor) parameter; unknown
    optimisers and settings give False, the generic path.
    """
    required = VALUE_FREE_STEPS.get(type(optimizer))
    if required is None or local_part(param) is not param:
        return False
    return all(bool(group.get(key, value) == value) for key, value in required.items())


def _target_settings(p: torch.Tensor, group: dict[str, Any], constraint: tuple | None) -> Mapping[str, Any] | None:
    """The settings ProjUNN keeps ``p`` unitary with, or None if it leaves ``p`` to the base optimiser.

    ``constraint``: ``p``'s entry of :func:`projunn._constraints.constrained_weights`, None if it
    has none. See Note [Constrained weights in any group].
    """
    if constraint is None:
        return group if group.get("unitary", False) else None
    _, rule, where = constraint
    shape = rule.matrix_shape(p.shape)
    stated = group.get(MATRIX_SHAPE)
    if stated is not None and tuple(stated) != shape:
        raise ValueError(
            f"{where} is constrained as matrices of shape {shape}, but its parameter group says "
            f"matrix_shape {tuple(stated)}; build the groups with projunn.optim.param_groups"
        )
    if group.get("unitary", False) and (stated is not None or shape == tuple(p.shape)):
        return group
    view = {} if shape == tuple(p.shape) else {MATRIX_SHAPE: shape}
    return ChainMap({"unitary": True, **view}, group)  # the group's lr, decay, ... still read through


@dataclass(eq=False)
class _Work:
    """One weight in an after-step hook: where its step D and its weight U are, then its sketch."""

    param: torch.Tensor  # written by the update
    group: Mapping[str, Any]  # its settings (Note [Constrained weights in any group])
    step: torch.Tensor  # holds D: the parameter itself (generic path) or its zeroed buffer
    weight: torch.Tensor  # holds U: the saved copy (generic path) or the parameter itself
    rank: int = 0
    factors: tuple[torch.Tensor, ...] = ()


# Note [Eager steps under torch.compile]
# The step is data-dependent Python (NaN/Inf checks that decide whether to skip, QR, eigh and
# SVD of small matrices, complex arithmetic for real weights), so Dynamo would split it into
# dozens of graphs, log a warning for each break and hand Inductor complex operators it cannot
# generate code for, for no speed-up: the work is a few BLAS calls per weight. The step and
# its hooks therefore always run eagerly, also inside a compiled function (as torch.optim
# keeps its own bookkeeping eager); compile the model and call ``step`` as usual.
_compiled_eagerly = torch.compiler.disable(
    reason="projUNN's optimiser step runs eagerly (Note [Eager steps under torch.compile])"
)

#: Device types whose autocast state a step may find enabled.
_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps")


def _eager(fn):
    """Run ``fn`` eagerly (Note [Eager steps under torch.compile]) and in the weights' own precision.

    A step called inside ``torch.autocast`` (a common loop shape) would otherwise compute the
    sketch and the update in float16/bfloat16: the unitary weights are float32/float64 and the
    update keeps them on the group only at their precision. So autocast is switched off for the
    step, on every device type where it is on. Likewise TF32 (``torch.set_float32_matmul_precision``
    "high" or "medium", a common global setting on GPUs), whose ~1e-3 relative products would push
    every update off the group by far more than float32 rounding: the step runs at "highest".
    """

    @functools.wraps(fn)
    def full_precision(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for kind in _AUTOCAST_TYPES:
                if torch.is_autocast_enabled(kind):
                    stack.enter_context(torch.autocast(kind, enabled=False))
            precision = torch.get_float32_matmul_precision()
            if precision != "highest":
                torch.set_float32_matmul_precision("highest")
                stack.callback(torch.set_float32_matmul_precision, precision)
            return fn(*args, **kwargs)

    return _compiled_eagerly(full_precision)


class ProjUNN(torch.optim.Optimizer):
    r"""Wrap a torch optimiser so that parameters in groups marked ``unitary`` stay unitary.

    For every parameter U in a group with ``"unitary": True`` the base
    optimiser's proposed step D (for SGD, D = -lr * grad) is replaced by

    .. math::
        D \approx a b^H \ (\text{rank-}k\ \text{sketch}),\qquad
        U \leftarrow \begin{cases}
            U \exp\big(\tfrac12 (U^H a b^H - b a^H U)\big) & \text{method "t"} \\
            \operatorname{polar}(U + a b^H) & \text{method "d"}
        \end{cases}

    in O(k N^2). See Note [Composition with the base optimiser]. Rectangular
    (..., N, M) parameters are kept semi-unitary (orthonormal columns if
    N > M, rows if N < M) by the Stiefel forms of the same updates, in
    O(k N M) (see :func:`projunn.functional.projunn_d`).

    Group keys (each optional, defaulting to the constructor's arguments):
    ``unitary`` (bool), ``method`` ("t", "d" or "none"), ``rank`` (int >= 1,
    capped at N), ``sketch`` (one of :data:`projunn.functional.Sketch`),
    ``matrix_shape`` (update ``p.view(matrix_shape)`` instead of ``p``: gate
    blocks, convolution kernels; Note [Matrix views] in ``projunn.nn._constrain``), and
    the base optimiser's own ``lr`` (the paper uses lr/32 for unitary RNN
    weights and lr/10 for convolutions). :func:`projunn.optim.param_groups`
    builds such groups from a model.

    Args:
        optimizer: any ``torch.optim.Optimizer``, the base. ProjUNN shares its
            groups and state and registers hooks on it: hand the ProjUNN to
            schedulers and trainers (Note [ProjUNN is the optimiser]).
        method, rank, sketch: defaults for unitary groups that do not set them.
        seed: seed of the sketch's random generator; None uses
            ``torch.initial_seed()``, so ``torch.manual_seed`` fixes it
            without the global random stream being consumed. Under
            torch.distributed, None takes rank 0's value on every rank
            (Note [Sketches under data parallelism]).
        reorthogonalize_every: every this many steps, snap unitary weights
            back to the group with an exact O(N^3) polar decomposition,
            removing accumulated rounding drift; 0 (default) never does.
        drift_tolerance: keep the rounding drift ||U^H U - I||_F of each
            unitary weight below this, checked every few steps at O(N^2) and
            corrected by a Newton-Schulz step when exceeded
            (Note [Drift control] in ``projunn.optim._drift``). ``"auto"``
            (default): max(0.3 eps N, 4 eps sqrt(N)) for the weight's dtype,
            rounding level per entry of U^H U - I; None: no control.
        on_nonfinite: ``"skip"`` (default: leave unitary weights untouched,
            count the step in ``skipped_steps``, warn) or ``"raise"``
            (same, then raise FloatingPointError). See Note [Non-finite steps].
        step_from_zero: let an optimiser whose step does not depend on the
            weight's value (SGD, Adam, AdamW, RMSprop without weight decay)
            write its step into a zeroed buffer, saving two passes over each
            weight (default); False always copies the weight aside and
            subtracts it (Note [Steps from zero]). Other optimisers always
            take that generic path.

    Raises:
        TypeError: ``optimizer`` is not a torch optimiser; a unitary
            parameter has an unsupported dtype; ``step_from_zero`` is not
            a bool.
        ValueError: unknown method/sketch/policy, rank < 1, a unitary
            parameter that is not a matrix (..., N, M), or an optimiser that
            already has a ProjUNN attached.

    Example:
        >>> model = torch.nn.Sequential(projunn.nn.UnitaryLinear(16), torch.nn.Linear(16, 1))
        >>> base = torch.optim.Adam(projunn.optim.param_groups(model, unitary_lr=1e-4), lr=1e-3)
        >>> opt = ProjUNN(base, method="t", rank=1, sketch="lsi", seed=0)
        >>> model(torch.randn(8, 16)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        method: str = "t",
        rank: int = 1,
        sketch: str = "lsi",
        seed: int | None = None,
        reorthogonalize_every: int = 0,
        drift_tolerance: float | str | None = "auto",
        on_nonfinite: str = "skip",
        step_from_zero: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ProjUNN):  # its hooks would go to the same base: every weight updated twice
            raise ValueError("optimizer is already a ProjUNN; wrap the base optimizer once")
        if optimizer in _ATTACHED:
            raise ValueError("this optimizer already has a ProjUNN attached; attach it once")
        # No Optimizer.__init__: the groups, state and defaults are the base's (Note [ProjUNN is the optimiser]).
        self.optimizer = optimizer
        self.unitary_defaults = {
            "method": check_choice("method", method, METHODS),
            "rank": check_int("rank", rank),
            "sketch": check_choice("sketch", sketch, SKETCHES),
        }
        self.reorthogonalize_every = check_int("reorthogonalize_every", reorthogonalize_every, minimum=0)
        self.drift_control = None if drift_tolerance is None else DriftControl(drift_tolerance)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, _NONFINITE_POLICIES)
        if not isinstance(step_from_zero, bool):
            raise TypeError(f"step_from_zero must be a bool, got {type(step_from_zero).__name__}")
        self.step_from_zero = step_from_zero
        self.seed = _replica_seed(seed, _weights_device(optimizer))
        self.steps = 0
        self.skipped_steps = 0
        self._generators: dict[str, torch.Generator] = {}
        self._saved: dict[torch.Tensor, torch.Tensor] = {}  # generic path: U while the base step runs
        self._zeros: dict[torch.Tensor, torch.Tensor] = {}  # Note [Steps from zero]: the buffers that take D
        self._swapped: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its weight, during the base step
        self._hidden_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._pending_state: dict[str, Any] | None = None
        self._in_step: list[torch.Tensor] = []
        self._checked: dict[int, tuple] = {}  # id(group) -> signature it was validated with
        self._targets: dict[int, list[tuple[torch.Tensor, Mapping[str, Any]]]] = {}  # id(group) -> what it keeps
        self._generation = constraint_generation()
        for group in self.optimizer.param_groups:
            self._check_group(group)
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
            optimizer.register_state_dict_post_hook(self._add_state),
            optimizer.register_load_state_dict_pre_hook(self._take_state),
            optimizer.register_load_state_dict_post_hook(self._restore_state),
        ]
        _ATTACHED.add(optimizer)

    # -- the Optimizer surface: the base's groups, state and defaults ---------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimiser's parameter groups (shared, not copied)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> dict:
        """The base optimiser's per-parameter state (shared, not copied)."""
        return self.optimizer.state

    @state.setter
    def state(self, state: dict) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimiser's defaults. ProjUNN's own, for unitary groups: :attr:`unitary_defaults`."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    @_compiled_eagerly  # not _eager: a closure computes the loss under the caller's autocast
    def step(self, closure=None):
        """Run the base optimiser's step; the hooks apply the projUNN updates.

        If the base step raises, unitary weights are restored to their values
        before the step and hidden gradients are handed back. If a projUNN
        update itself fails (an error in a small solve, an interrupt), the
        weights not yet updated are restored and those already updated keep
        their new value: each weight is either stepped or not, and unitary.
        """
        try:
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        except BaseException:
            self._abort()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict, including ProjUNN's state under ``"projunn"``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group to the base optimiser, validating its unitary settings first."""
        self._check_group(group)
        self.optimizer.add_param_group(group)

    def load_projunn_state(self, entry: dict[str, Any]) -> None:
        """Restore ProjUNN's own state (``state_dict()["projunn"]``: step counters, sketch generators).

        For a base state loaded some other way, e.g. by ``torch.distributed.checkpoint``.

        Raises:
            ValueError: ``entry`` was not written by ProjUNN, or holds a generator for a device
                this process lacks.
        """
        self._pending_state = _parsed_state(entry, self._devices())
        self._restore_state(self.optimizer)

    def __getstate__(self):
        # The hooks tie this object to its base optimiser; a copy would have to re-attach to a copy
        # of the base. What a checkpoint needs is the state dict, which holds ProjUNN's state too.
        raise TypeError("a ProjUNN optimizer cannot be copied or pickled; save and load its state_dict() instead")

    # Hooks registered on ProjUNN run when the base optimiser's do: the step happens there.
    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def remove(self) -> None:
        """Detach from the base optimiser, which then behaves as plain torch again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for buffers in (self._saved, self._zeros):
            buffers.clear()
        _ATTACHED.discard(self.optimizer)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.unitary_defaults.items())
        return (
            f"ProjUNN({type(self.optimizer).__name__}, {settings}, "
            f"reorthogonalize_every={self.reorthogonalize_every}, steps={self.steps}, "
            f"skipped_steps={self.skipped_steps})"
        )

    # -- which parameters, with which settings ----------------------------------------

    def _setting(self, group: Mapping[str, Any], key: str) -> Any:
        return group.get(key, self.unitary_defaults[key])

    def _group_signature(self, group: dict[str, Any]) -> tuple:
        """What a group's check depends on; the check is repeated only when this changes."""
        keys = ("unitary", "method", "rank", "sketch", MATRIX_SHAPE)
        return (*(group.get(key) for key in keys), id(group["params"]), len(group["params"]))

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate ``group`` and record the weights it keeps unitary, each with its settings."""
        params = group["params"]
        if isinstance(params, set):  # as torch: a set's order, hence the sketches' order, varies between runs
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of "
                "tensors in sets will change between runs; please use a list instead"
            )
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params  # a generator would be exhausted by this check
        if group.get("unitary", False):
            check_choice("method", self._setting(group, "method"), METHODS)
            check_int("rank", self._setting(group, "rank"))
            check_choice("sketch", self._setting(group, "sketch"), SKETCHES)
        constrained = constrained_weights()
        targets = []
        for p in params:
            settings = _target_settings(p, group, constrained.get(id(p)))
            if settings is not None:
                self._check_target(p, settings)
                targets.append((p, settings))
        self._targets[id(group)] = targets
        self._checked[id(group)] = self._group_signature(group)

    def _check_target(self, p: torch.Tensor, settings: Mapping[str, Any]) -> None:
        """Refuse a weight ProjUNN cannot keep unitary: not a matrix, an unsupported dtype or layout."""
        if MATRIX_SHAPE in settings:  # Note [Matrix views] in projunn.nn._constrain
            if local_part(p) is not p:
                raise ValueError(f"a matrix_shape view of a DTensor weight of shape {tuple(p.shape)} is not supported")
            try:
                p = matrix_view(p, settings)
            except RuntimeError as error:
                raise ValueError(f"unitary parameter of shape {tuple(p.shape)}: {error}") from None
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"unitary parameter of shape {tuple(p.shape)} has unsupported dtype {p.dtype}; keep unitary "
                "weights in float32/float64 (or complex64/128) and use torch.autocast for half-precision compute"
            )
        if p.dim() < 2:
            raise ValueError(
                f"unitary parameters must be matrices (..., N, N), or (..., N, M) semi-unitary; "
                f"got shape {tuple(p.shape)}"
            )
        check_weight(p, self._setting(settings, "sketch"))  # DTensor placements: Note [Row-sharded projUNN]

    def _targets_of(self, group: dict[str, Any]) -> list[tuple[torch.Tensor, Mapping[str, Any]]]:
        """The weights ``group`` keeps unitary with their settings, checked again if the group changed."""
        if self._checked.get(id(group)) != self._group_signature(group):
            self._check_group(group)
        return self._targets[id(group)]

    def _unitary_params(self) -> Iterator[tuple[torch.Tensor, Mapping[str, Any]]]:
        """Every weight to keep unitary, once, with its settings (its group's, for a constrained weight
        in an ordinary group with the constraint's view: Note [Constrained weights in any group])."""
        seen: set[int] = set()  # torch only warns about a parameter listed twice
        for group in self.optimizer.param_groups:
            for p, settings in self._targets_of(group):
                if self._setting(settings, "method") != "none" and id(p) not in seen:
                    seen.add(id(p))
                    yield p, settings

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    # -- the hooks -----------------------------------------------------------------

    @torch.no_grad()
    def _abort(self) -> None:
        """Undo an interrupted step: restore saved unitary weights and hidden gradients."""
        self._swap_back()  # those weights were never written: the base step wrote into zeroed buffers
        for p in self._in_step:
            local_part(p).copy_(self._saved[p])
        self._in_step = []
        for p, grad in self._hidden_grads.items():
            p.grad = grad
        self._hidden_grads.clear()

    @_eager
    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        # A previous base step that raised without going through ProjUNN.step
        # may have left grads hidden or weights swapped out; hand them back first.
        self._swap_back()
        for p, grad in self._hidden_grads.items():
            p.grad = grad
        self._hidden_grads.clear()
        self._in_step = []
        if self._generation != constraint_generation():  # a weight was constrained, or a model copied, since
            self._generation = constraint_generation()
            self._checked.clear()
        # With a closure (e.g. LBFGS) gradients appear during the step, so
        # every unitary weight is saved and only the proposed step is checked
        # for NaN/Inf; otherwise only weights with a gradient take part.
        has_closure = bool(args[1:]) or kwargs.get("closure") is not None
        unitary = list(self._unitary_params())  # checks groups added to, or changed in, the base directly
        # Agreed over every unitary weight, the same on every rank, so a rank without gradients (an
        # empty shard) still joins the other ranks' collective instead of leaving them waiting.
        everyone = [p for p, _ in unitary]
        stepped = any_rank([has_closure or p.grad is not None for p in everyone], everyone)
        work = [(p, group) for (p, group), take in zip(unitary, stepped) if take]
        params = [p for p, _ in work]
        grads = [p.grad for p in params if p.grad is not None]
        if not has_closure and not all_finite_everywhere(_all_finite, grads, everyone):
            # Note [Non-finite steps]: the base optimiser skips parameters whose grad is None.
            for p in params:
                if p.grad is not None:
                    self._hidden_grads[p] = p.grad
                    p.grad = None
            return
        copied = []
        for p, group in work:
            if self.step_from_zero and not has_closure and steps_from_zero(optimizer, group, p):
                self._swap_in_zeros(p)  # Note [Steps from zero]
                continue
            local = local_part(p)  # a DTensor's part on this rank
            buffer = self._saved.get(p)
            if buffer is None or buffer.shape != local.shape or buffer.dtype != p.dtype or buffer.device != p.device:
                buffer = self._saved[p] = torch.empty_like(local, memory_format=torch.contiguous_format)
            buffer.copy_(local)
            copied.append(p)
        self._in_step = copied

    def _swap_in_zeros(self, p: torch.Tensor) -> None:
        """Let ``p`` hold zeros for the base step; its weight is kept aside until :meth:`_swap_back`."""
        zeros = self._zeros.get(p)
        if zeros is None or zeros.shape != p.shape or zeros.dtype != p.dtype or zeros.device != p.device:
            zeros = self._zeros[p] = torch.empty_like(p)  # p's strides, so p.data may take it
        zeros.zero_()
        self._swapped[p] = p.data
        p.data = zeros

    def _swap_back(self) -> dict[torch.Tensor, torch.Tensor]:
        """Give every swapped parameter its weight back; returns parameter -> the step its buffer now holds."""
        steps = {}
        for p, weight in self._swapped.items():
            steps[p] = p.data
            p.data = weight
        self._swapped = {}
        return steps

    @_eager
    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        steps = self._swap_back()  # Note [Steps from zero]: these weights still hold U, their buffers D
        if self._hidden_grads:
            for p, grad in self._hidden_grads.items():
                p.grad = grad
            self._hidden_grads.clear()
            self._report_skip("a unitary parameter's gradient is NaN or Inf")
            return
        unitary = list(self._unitary_params())
        everyone = [p for p, _ in unitary]  # the same on every rank: see _before_step
        try:
            # Each copied weight now holds U + D; recover D in place (the buffer holds U).
            for p in self._in_step:
                local_part(p).sub_(self._saved[p])
            copied = {id(p) for p in self._in_step}
            work = [
                _Work(p, group, step=steps[p], weight=p) if p in steps else _Work(p, group, p, self._saved[p])
                for p, group in unitary
                if p in steps or id(p) in copied
            ]
            # Note [Non-finite steps]: an LSI sketch of a non-finite D is itself non-finite (see
            # _SKETCHES_THAT_PROPAGATE), so only the other sketches need a separate pass over D.
            unchecked = [w.step for w in work if self._setting(w.group, "sketch") not in _SKETCHES_THAT_PROPAGATE]
            other_sketches = any(self._setting(group, "sketch") not in _SKETCHES_THAT_PROPAGATE for _, group in unitary)
            if other_sketches and not all_finite_everywhere(_all_finite, unchecked, everyone):
                self._skip_nonfinite_step()
                return
            # One sketch per weight, in parameter order: the order of the sketches' random numbers.
            for w in work:
                D = matrix_view(w.step, w.group)
                w.rank = min(self._setting(w.group, "rank"), *D.shape[-2:])
                w.factors = sketch_step(D, w.rank, self._setting(w.group, "sketch"), self._generator(D.device))
            factors = [t for w in work for t in w.factors]
            if not all_finite_everywhere(_all_finite, factors, everyone):
                self._skip_nonfinite_step()
                return
            for w in work:
                method = self._setting(w.group, "method")
                update(method, matrix_view(w.param, w.group), matrix_view(w.weight, w.group), *w.factors)
        except BaseException:
            self._abort()
            raise
        self._in_step = []
        self.steps += 1
        if self.reorthogonalize_every and self.steps % self.reorthogonalize_every == 0:
            for p, group in unitary:
                project(matrix_view(p, group))
        elif self.drift_control is not None and self.steps % DRIFT_CHECK_EVERY == 0:
            self.drift_control(*(matrix_view(p, group) for p, group in unitary))

    def _skip_nonfinite_step(self) -> None:
        self._abort()
        self._report_skip("the optimiser's proposed step for a unitary parameter is NaN or Inf")

    def _report_skip(self, reason: str) -> None:
        self.skipped_steps += 1
        message = f"projUNN step skipped: {reason}; unitary weights left unchanged (skipped_steps={self.skipped_steps})"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        _warn_at_caller(message, RuntimeWarning)

    # -- state dict hooks --------------------------------------------------------------

    def _add_state(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[_STATE_KEY] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "seed": self.seed,
            "generators": {dev: g.get_state() for dev, g in self._generators.items()},
        }
        return state_dict

    def _take_state(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        entry = state_dict.pop(_STATE_KEY, None)
        if entry is None:
            _warn_at_caller(
                "loading an optimizer state dict without projUNN state: step counters and the sketch "
                "generator start afresh",
                RuntimeWarning,
            )
        else:
            # Built now, so a bad entry fails before the base optimiser loads
            # anything; applied only after it has loaded successfully.
            entry = _parsed_state(entry, self._devices())
        self._pending_state = entry
        return state_dict

    def _devices(self) -> set[str]:
        """The devices this process steps unitary weights on."""
        return {str(p.device) for p, _ in self._unitary_params()}

    def _restore_state(self, optimizer) -> None:
        entry, self._pending_state = self._pending_state, None
        for buffers in (self._saved, self._zeros):
            buffers.clear()
        if entry is None:
            return
        self.steps = int(entry["steps"])
        self.skipped_steps = int(entry["skipped_steps"])
        self.seed = int(entry["seed"])
        self._generators = entry["generators"]


# Where the hooks run: torch.optim's step and state-dict wrappers, and this package.
_MACHINERY = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _warn_at_caller(message: str, category: type[Warning]) -> None:
    """Warn with the location of the code that called ``step`` / ``load_state_dict``.

    The hooks run a varying number of frames below that call (ProjUNN.step or
    the base optimiser's own, torch's profiling and no_grad wrappers,
    torch.compile), so no fixed ``stacklevel`` is right: the frames inside
    torch and ``projunn.optim`` are counted and skipped.
    """
    frame, level = sys._getframe(1), 1  # level 1: the function that called warnings.warn (here, our caller)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_MACHINERY):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def _parsed_state(entry: Any, devices: set[str]) -> dict[str, Any]:
    """A state dict's ``"projunn"`` entry, its generator states made generators for ``devices``."""
    if not isinstance(entry, dict) or not {"steps", "skipped_steps", "seed", "generators"} <= set(entry):
        raise ValueError("the state dict's 'projunn' entry is malformed; it was not written by ProjUNN")
    return {**entry, "generators": _restore_generators(_states_for_devices(entry["generators"], devices))}


def _states_for_devices(saved: dict[str, Any], local: set[str]) -> dict[str, Any]:
    """Saved sketch-generator states, keyed for the devices this process steps weights on.

    A data-parallel checkpoint is written by rank 0 and holds its device's generator (``cuda:0``);
    the replica on ``cuda:3`` continues from that state, since every replica draws the same numbers
    (Note [Sketches under data parallelism]). A state moves to another device of its type only when
    that is unambiguous: one saved state of the type that no local weight uses, and one local device
    of the type without a state.
    """
    states = dict(saved)
    for kind in {torch.device(key).type for key in saved}:
        unused = [key for key in states if torch.device(key).type == kind and key not in local]
        lacking = [key for key in local if torch.device(key).type == kind and key not in states]
        if len(unused) == 1 and len(lacking) == 1:
            states[lacking[0]] = states.pop(unused[0])
    return states


def _restore_generators(states: dict[str, torch.Tensor]) -> dict[str, torch.Generator]:
    """Generators from saved states; a state for a device this process lacks is refused."""
    generators = {}
    for dev, state in states.items():
        try:
            generator = torch.Generator(device=torch.device(dev))
            generator.set_state(state.cpu() if isinstance(state, torch.Tensor) else torch.as_tensor(state))
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(
                f"cannot restore the projUNN sketch generator for device {dev!r} ({error}); "
                "load the checkpoint on a machine with that device"
            ) from error
        generators[dev] = generator
    return generators


def _weights_device(optimizer: torch.optim.Optimizer) -> torch.device | None:
    """The device of the optimiser's first parameter (None without parameters)."""
    return next((p.device for group in optimizer.param_groups for p in group["params"]), None)


def _replica_seed(seed: int | None, device: torch.device | None = None) -> int:
    """The sketch seed, the same on every rank of a process group. See Note [Sketches under data parallelism].

    The broadcast goes through ``device``, this rank's (nccl sends from a GPU; without it each rank
    would use the current CUDA device, cuda:0 unless the script called ``set_device``).
    """
    if seed is not None:
        return int(seed)
    # Follows torch.manual_seed without drawing from (and so shifting) the global stream.
    seed = torch.initial_seed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [seed]
        on_gpu = device is not None and device.type != "cpu"
        torch.distributed.broadcast_object_list(shared, src=0, device=device if on_gpu else None)
        seed = shared[0]
    return int(seed)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True if no tensor holds NaN or Inf, with one device sync and no N x N temporary.

    A sum is NaN/Inf if any term is (Inf - Inf gives NaN); it can also
    overflow for finite entries above ~1e38 in float32, a step no training
    run survives either, so treating it as non-finite is the safe reading.
    """
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t.sum())
    if not by_kind:
        return True
    # One verdict per dtype and device, gathered on one device: a single wait for all of them.
    verdicts = [torch.isfinite(torch.stack(sums)).all() for sums in by_kind.values()]
    return bool(torch.stack([v.to(verdicts[0].device) for v in verdicts]).all())
