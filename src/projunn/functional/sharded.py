"""projUNN on weights whose rows are split over processes (FSDP2, DTensor ``Shard(0)``).

The building blocks :class:`projunn.optim.ProjUNN` uses for such weights:
each rank passes its own rows and gets its own rows of the result, with thin
collectives and the same numbers as the unsharded functions to rounding
(Note [Row-sharded projUNN], Note [TSQR]). Code that trains with ProjUNN never
calls them; they are public for optimisers and tools built on them.
"""

from ._sharded import (
    SHARDED_SKETCHES,
    RowShards,
    local_part,
    row_shards,
    sharded_closest_unitary,
    sharded_drift_residual,
    sharded_gram,
    sharded_lowrank,
    sharded_newton_schulz_,
    sharded_update,
)

__all__ = [
    "SHARDED_SKETCHES",
    "RowShards",
    "local_part",
    "row_shards",
    "sharded_closest_unitary",
    "sharded_drift_residual",
    "sharded_gram",
    "sharded_lowrank",
    "sharded_newton_schulz_",
    "sharded_update",
]
