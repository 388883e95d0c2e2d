"""Pure tensor functions: projUNN updates, low-rank sketches, unitarity tools.

Every function is batched over leading dimensions, works for real
(orthogonal) and complex (unitary) float32/float64 tensors, returns results in
the input's dtype and device, and never modifies its arguments.

The same kernels update weights whose rows are split over processes (FSDP2):
:class:`projunn.optim.ProjUNN` runs them on DTensor weights (Note [Row-sharded projUNN]).
"""

from ._sketch import Sketch, lowrank
from ._unitary import Init, closest_unitary, unitarity_error, unitary_init
from ._update import projunn_d, projunn_t

__all__ = [
    "Init",
    "Sketch",
    "closest_unitary",
    "lowrank",
    "projunn_d",
    "projunn_t",
    "unitarity_error",
    "unitary_init",
]
