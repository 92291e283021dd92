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
    ``table[:copied]`` whenever ``table`` is still the sequence's list, and every entry of the row past ``copied``
    is 0 (so a gathered row is its table zero-padded, as a fresh build would be); a free row is all 0. Rows of
    sequences that no longer run are taken back when rows run short, keeping those of the step being built.
    """

    def __init__(self, max_blocks: int, capacity: int) -> None:
        self.rows = np.zeros((capacity, max_blocks), dtype=np.int32)
        self._entries: dict[int, tuple[list[int], int, int]] = {}  # seq_id -> (table, copied, row)
        self._free = list(range(capacity - 1, -1, -1))

    def gather(self, seqs: list[Sequence]) -> np.ndarray:
        """``[len(seqs), longest table]`` int32: each sequence's block table, zero-padded."""
        if len(seqs) > len(self.rows):
            return fresh_block_tables([s.block_table for s in seqs])
        if len(self._free) < len(seqs):
            self._reclaim({s.seq_id for s in seqs})
        rows, entries, max_blocks = self.rows, self._entries, self.rows.shape[1]
        picked, width = [], 0
        for seq in seqs:
            table = seq.block_table
            n = len(table)
            if n > max_blocks:  # longer than any row: this step is built from the lists
                return fresh_block_tables([s.block_table for s in seqs])
            entry = entries.get(seq.seq_id)
            if entry is not None and entry[0] is table:  # the same list: copy what was appended since
                _, copied, row = entry
                if n > copied:
                    rows[row, copied:n] = table[copied:]
                    entries[seq.seq_id] = (table, n, row)
            else:  # a new sequence, or a new list (copy-on-write, swap, free, fork): (re)write the row from it
                _, copied, row = entry if entry is not None else (None, 0, self._free.pop())
                rows[row, :n] = table
                if copied > n:
                    rows[row, n:copied] = 0
                entries[seq.seq_id] = (table, n, row)
            picked.append(row)
            if n > width:
                width = n
        return rows[picked, :width]

    def _reclaim(self, keep: set[int]) -> None:
        """Take back the rows of every sequence not in ``keep`` (zeroed, free again)."""
        for seq_id in [s for s in self._entries if s not in keep]:
            _, copied, row = self._entries.pop(seq_id)
            self.rows[row, :copied] = 0
            self._free.append(row)


def fresh_block_tables(tables: list[list[int]]) -> np.ndarray:
    """``[len(tables), longest]`` int32, zero-padded, built from the lists alone."""
    block_tables = np.zeros((len(tables), max(map(len, tables), default=0)), dtype=np.int32)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = table
    return block_tables
