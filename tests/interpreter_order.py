"""Triton's interpreter with a grid's programs run in a seeded random order.

The interpreter runs a launch's programs one after another, ``z`` innermost: the K parts of a split linear's tile
(or the partitions of a decode sequence) always run back to back, so a counter shared between two tiles, or a
"last part combines" rule that relies on the order, passes there and fails on a GPU, where programs run at once
and finish in any order. Shuffling the order at program granularity interleaves the tiles as a GPU may.
"""

from __future__ import annotations

import contextlib
import itertools
import random


@contextlib.contextmanager
def programs_in_random_order(seed: int):
    """Within the block, every interpreted launch runs its programs in an order drawn from ``seed``."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    rng = random.Random(seed)
    state: dict = {}
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def shuffled_dim(nx, ny, nz):
        order = list(itertools.product(range(nx), range(ny), range(nz)))
        rng.shuffle(order)
        state["order"] = iter(order)
        set_dim(nx, ny, nz)

    def shuffled_idx(x, y, z):  # the interpreter's own (x, y, z) counts the programs; the order says which runs
        set_idx(*next(state["order"]))

    builder.set_grid_dim, builder.set_grid_idx = shuffled_dim, shuffled_idx
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_idx
