"""A step's block tables as one int32 array, kept row by row across steps.

Converting every sequence's block table (a Python list) into the step's array costs a conversion per entry per
step: at long contexts most of the runner's host work for a decode step. A decode step adds a block to a sequence
only once every ``block_size`` tokens, so each sequence keeps a row of a persistent array, brought up to date by
copying what was appended since its last step, and the step's array is one gather of those rows.

Relies on the ``Sequence`` invariant that a block table list is only ever appended to: every other change
(copy-on-write, swap, free, fork) assigns a new list, which a row notices by identity and rewrites itself from.
"""

from __future__ import annotations

import numpy as np

from pagedserve.engine.sequence import Sequence


class BlockTableRows:
    """Rows of ``max_blocks`` block ids for up to ``capacity`` sequences at a time.

    Invariants: a sequence with a row holds ``(table, copied, row)`` where ``rows[row, :copied]`` equals
    ``table[:copied]`` whenever ``table`` is still the sequence's list; every entry of a row past what its
    occupant copied is 0 (so a gathered row is its table zero-padded, as a fresh build would be). Rows of
    sequences that no longer run are taken back when rows run short, keeping those of the step being built.
    """

    def __init__(self, max_blocks: int, capacity: int) -> None:
        self.rows = np.zeros((capacity, max_blocks), dtype=np.int32)
        self._entries: dict[int, tuple[list[int], int, int]] = {}  # seq_id -> (table, copied, row)
        self._filled = [0] * capacity  # entries of each row that may be non-zero
        self._free = list(range(capacity - 1, -1, -1))

    def gather(self, seqs: list[Sequence]) -> np.ndarray:
        """``[len(seqs), longest table]`` int32: each sequence's block table, zero-padded."""
        if len(seqs) > len(self.rows) or any(len(s.block_table) > self.rows.shape[1] for s in seqs):
            return fresh_block_tables([s.block_table for s in seqs])
        if len(self._free) < len(seqs):
            self._reclaim({s.seq_id for s in seqs})
        rows, entries, filled, width = self.rows, self._entries, self._filled, 0
        picked = []
        for seq in seqs:
            table = seq.block_table
            n = len(table)
            entry = entries.get(seq.seq_id)
            if entry is None:
                row = self._free.pop()
                rows[row, :n] = table
                filled[row] = n
                entries[seq.seq_id] = (table, n, row)
            elif entry[0] is not table or n < entry[1]:  # a new list: rewrite the row from it
                row = entry[2]
                rows[row, :n] = table
                if filled[row] > n:
                    rows[row, n:filled[row]] = 0
                filled[row] = n
                entries[seq.seq_id] = (table, n, row)
            else:
                row = entry[2]
                if n > entry[1]:
                    rows[row, entry[1]:n] = table[entry[1]:]
                    filled[row] = n
                    entries[seq.seq_id] = (table, n, row)
            picked.append(row)
            if n > width:
                width = n
        return rows[picked, :width]

    def _reclaim(self, keep: set[int]) -> None:
        """Take back the rows of every sequence not in ``keep`` (zeroed, free again)."""
        for seq_id in [s for s in self._entries if s not in keep]:
            _, _, row = self._entries.pop(seq_id)
            self.rows[row, :self._filled[row]] = 0
            self._filled[row] = 0
            self._free.append(row)


def fresh_block_tables(tables: list[list[int]]) -> np.ndarray:
    """``[len(tables), longest]`` int32, zero-padded, built from the lists alone."""
    block_tables = np.zeros((len(tables), max(map(len, tables), default=0)), dtype=np.int32)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = table
    return block_tables
