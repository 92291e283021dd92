"""Paged KV memory: a device block pool, a CPU swap pool, per-sequence block tables, prefix caching.

Invariants (checked by ``check_invariants`` in tests):
  * every block's ``ref_count`` equals the number of block-table entries (over live sequences) that name it;
  * a block is in its pool's free list iff its ``ref_count`` is 0; ``num_free + num_used == num_blocks``;
  * the prefix cache maps ``hash -> block`` only for device blocks whose ``hash`` field is that hash; such a block
    holds exactly the tokens it was registered with, after the parent hash it was registered with (both verified
    again on every hit);
  * block tables only change at the end: blocks are appended, or the last one is swapped for its CoW copy.
All operations are O(1) per block: free lists are ordered dicts, cache lookups are dict lookups; a pool creates
its blocks on first use, so its size costs nothing up front.

A cached block is identified by a SHA-256 chain: the hash of (its parent's hash, its tokens), rooted in a random
per-process value. A crafted prompt therefore cannot be made to collide with another tenant's cached prefix
(Python's ``hash()``, used before, collides on purpose cheaply), and a hit also checks the parent hash, so equal
tokens after a different prefix never share a block. Each full block of a sequence is hashed once
(``Sequence.token_block_hashes``). A request's ``cache_salt`` roots its chain elsewhere (:func:`salted_root`): its
blocks are found only by requests with the same salt, so tenants given different salts learn nothing of each
other's prompts from a hit (``cached_prompt_tokens``, or a faster first token).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable

from pagedserve.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.parent_hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockPool:
    """Fixed-size blocks with an LRU free list and (optionally) a hash -> block prefix cache.

    Freed blocks that hold a cached prefix go to the back of the free list and stay findable until reused,
    so the least recently freed is evicted first; freed blocks with no cached content go to the front.

    Blocks come into being on first use: ids ``0 .. len(blocks) - 1`` exist, the rest are free and untouched. A
    pool of millions of blocks (a CPU swap space of gigabytes) then costs nothing until it is used. Allocation
    order is that of a free list holding every block from the start: uncached freed blocks first, then untouched
    ones in id order, then cached freed ones, least recently freed first.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.blocks: list[Block] = []
        self.free: OrderedDict[int, None] = OrderedDict()  # freed blocks that exist (untouched ones are not listed)
        self.enable_caching = enable_caching
        self.cached: dict[bytes, Block] = {}

    @property
    def num_untouched(self) -> int:
        return self.num_blocks - len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free) + self.num_untouched

    def allocate(self) -> Block:
        front = next(iter(self.free), None)
        if self.num_untouched and (front is None or self.blocks[front].hash is not None):
            block = Block(len(self.blocks))
            self.blocks.append(block)
            block.ref_count = 1
            return block
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content
            if self.cached.get(block.hash) is block:
                del self.cached[block.hash]
            block.hash = block.parent_hash = block.token_ids = None
        block.ref_count = 1
        return block

    def acquire(self, block: Block) -> None:
        """Add a reference (a prefix-cache hit or a fork); a free cached block leaves the free list."""
        if block.ref_count == 0:
            del self.free[block.block_id]
        block.ref_count += 1

    def release(self, block: Block) -> None:
        assert block.ref_count > 0, f"double free of block {block.block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block.block_id] = None
            if block.hash is None:
                self.free.move_to_end(block.block_id, last=False)

    def lookup(self, block_hash: bytes, parent_hash: bytes | None, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is not None and block.token_ids == token_ids and block.parent_hash == parent_hash:
            return block
        return None

    def register(self, block: Block, block_hash: bytes, parent_hash: bytes | None, token_ids: tuple[int, ...]) -> None:
        if not self.enable_caching or block.hash is not None or block_hash in self.cached:
            return
        block.hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self.cached[block_hash] = block


_ROOT = os.urandom(32)  # the parent of a first block: per process, so no digest can be precomputed


def salted_root(cache_salt: str | None) -> bytes | None:
    """The parent of a first block for requests of ``cache_salt`` (None: the unsalted root)."""
    if cache_salt is None:
        return None
    return hashlib.sha256(_ROOT + b"cache_salt\0" + cache_salt.encode("utf-8")).digest()


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """A block's identity in the prefix cache: SHA-256 of its parent's hash and its tokens (as uint32: token ids
    are below the vocabulary size)."""
    return hashlib.sha256((parent or _ROOT) + array("I", token_ids).tobytes()).digest()


class BlockManager:
    """Maps sequences to KV blocks. Says which copies the model runner must do, never does them itself.

    Pending device work is collected in ``copies`` (CoW, device -> device), ``swap_out_map`` (device -> CPU) and
    ``swap_in_map`` (CPU -> device); ``take_pending()`` hands it to the runner once per step.
    """

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int, enable_prefix_caching: bool,
                 share_blocks: bool = True) -> None:
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks, enable_prefix_caching)
        self.cpu = BlockPool(num_cpu_blocks, False)
        self.enable_prefix_caching = enable_prefix_caching
        self.share_blocks = share_blocks  # False: forks copy every block (the no-sharing baseline)
        self.copies: list[tuple[int, int]] = []
        self.swap_out_map: list[tuple[int, int]] = []
        self.swap_in_map: list[tuple[int, int]] = []
        self.peak_used = 0
        self.num_swapped_out_blocks = 0

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_gpu_blocks(self) -> int:
        return self.gpu.num_free

    @property
    def num_used_gpu_blocks(self) -> int:
        return self.gpu.num_blocks - self.gpu.num_free

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _note_peak(self) -> None:
        self.peak_used = max(self.peak_used, self.num_used_gpu_blocks)

    # ------------------------------------------------------------------ prefix cache
    def _chunk(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _token_block_hash(self, seq: Sequence, i: int) -> bytes:
        """The chain hash of ``seq``'s full block ``i``, computed once per sequence (a block's tokens and those
        before it never change)."""
        hashes = seq.token_block_hashes
        while len(hashes) <= i:
            hashes.append(chain_hash(hashes[-1] if hashes else seq.cache_root, self._chunk(seq, len(hashes))))
        return hashes[i]

    def find_cached_prefix(self, seq: Sequence) -> list[Block]:
        """Cached blocks that hold a prefix of ``seq`` (full blocks only, never its last token)."""
        if not self.enable_prefix_caching or seq.num_computed_tokens > 0:
            return []
        hits: list[Block] = []
        parent = seq.cache_root
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = self._token_block_hash(seq, i)
            block = self.gpu.lookup(h, parent, self._chunk(seq, i))
            if block is None:
                break
            hits.append(block)
            parent = h
        return hits

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish ``seq``'s newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching or seq.num_computed_tokens // self.block_size <= seq.num_registered_blocks:
            return  # nothing new can be full: called for every running sequence every step, most often this
        # Computed and known: a token still pending on the device (Sequence.num_pending) has KV but no value yet.
        num_full = min(min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size, len(seq.block_table))
        while seq.num_registered_blocks < num_full:
            i = seq.num_registered_blocks
            h = self._token_block_hash(seq, i)
            parent = seq.token_block_hashes[i - 1] if i else seq.cache_root
            self.gpu.register(self.gpu.blocks[seq.block_table[i]], h, parent, self._chunk(seq, i))
            seq.num_registered_blocks += 1

    # ------------------------------------------------------------------ allocation
    def _needs_cow(self, seq: Sequence) -> bool:
        """Whether the next write lands in a partially filled last block that others still reference."""
        if seq.num_computed_tokens % self.block_size == 0 or not seq.block_table:
            return False
        last = seq.num_computed_tokens // self.block_size
        return last < len(seq.block_table) and self.gpu.blocks[seq.block_table[last]].ref_count > 1

    def blocks_for_forks(self, num_tokens: int, width: int) -> int:
        """Device blocks ``width`` sequences forked from one of ``num_tokens`` tokens hold once each has one token
        more: the full blocks they share, and a block of its own each (the partial last one is copied on write)."""
        return num_tokens // self.block_size + width

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: list[Block] = ()) -> int:
        """Free device blocks that ``allocate(seq, num_new_tokens, cached)`` would consume."""
        total = self._blocks_for(seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens)
        fresh = max(0, total - len(seq.block_table) - len(cached))
        revived = sum(1 for b in cached if b.ref_count == 0) if cached else 0  # hits sitting in the free list
        if seq.private_copy_pending:
            return fresh + revived + sum(1 for b in seq.block_table if self.gpu.blocks[b].ref_count > 1)
        return fresh + revived + int(self._needs_cow(seq))

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens. All or nothing: False changes nothing."""
        if num_new_tokens == 1 and not cached and not seq.private_copy_pending:
            # A decode, every running sequence every step: nothing to do while its last block has room and is
            # its own (what blocks_needed would count as 0 and the rest below leave as is).
            pos, table, bs = seq.num_computed_tokens, seq.block_table, self.block_size
            if pos < len(table) * bs and (pos % bs == 0 or self.gpu.blocks[table[pos // bs]].ref_count == 1):
                return True
        if self.blocks_needed(seq, num_new_tokens, cached) > self.gpu.num_free:
            return False
        if cached:
            for block in cached:
                self.gpu.acquire(block)
                seq.block_table.append(block.block_id)
            num_hit = len(cached) * self.block_size
            seq.num_computed_tokens = num_hit
            seq.num_registered_blocks = len(cached)
        if seq.private_copy_pending:
            table = list(seq.block_table)  # a new list, never a changed one (Sequence's invariant)
            for i, block_id in enumerate(table):
                old = self.gpu.blocks[block_id]
                if old.ref_count > 1:
                    new = self.gpu.allocate()
                    self.copies.append((old.block_id, new.block_id))
                    self.gpu.release(old)
                    table[i] = new.block_id
            seq.block_table = table
            seq.private_copy_pending = False
            seq.num_registered_blocks = 0
        if self._needs_cow(seq):
            last = seq.num_computed_tokens // self.block_size
            old = self.gpu.blocks[seq.block_table[last]]
            new = self.gpu.allocate()
            self.copies.append((old.block_id, new.block_id))
            self.gpu.release(old)
            seq.block_table = [*seq.block_table[:last], new.block_id, *seq.block_table[last + 1:]]
        total = self._blocks_for(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < total:
            seq.block_table.append(self.gpu.allocate().block_id)
        self._note_peak()
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` the parent's blocks by reference; the shared partial last block is copied on write.

        With sharing off (the baseline the sharing benchmark compares against), the child is marked to copy
        every block it still shares at its next ``allocate``, which the scheduler accounts for like any other
        allocation, so memory pressure preempts instead of failing here. Never fails: no block is allocated.
        """
        for block_id in parent.block_table:
            self.gpu.acquire(self.gpu.blocks[block_id])
        child.block_table = list(parent.block_table)
        child.private_copy_pending = not self.share_blocks

    def share_prefix(self, seq: Sequence, sibling: Sequence) -> int:
        """Point an empty ``seq`` at the full blocks it has in common with a computed ``sibling`` (the fork it
        was before a recompute preemption), so a recomputed group shares its prompt again. Returns the tokens
        now covered; the last token of ``seq`` is always left to compute."""
        if seq.block_table or seq.num_computed_tokens:
            return 0
        limit = min(seq.num_tokens - 1, sibling.num_computed_tokens)
        common = 0
        while common < limit and seq.token_ids[common] == sibling.token_ids[common]:
            common += 1
        num_blocks = min(common // self.block_size, len(sibling.block_table))
        for block_id in sibling.block_table[:num_blocks]:
            self.gpu.acquire(self.gpu.blocks[block_id])
            seq.block_table.append(block_id)
        seq.num_computed_tokens = num_blocks * self.block_size
        seq.num_registered_blocks = min(num_blocks, sibling.num_registered_blocks)
        return seq.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references, tail first, so a shared prefix is the last thing evicted."""
        pool = self.gpu
        for block_id in reversed(seq.block_table):
            pool.release(pool.blocks[block_id])
        seq.block_table = []
        seq.num_registered_blocks = 0
        # A fork that was to copy its shared blocks has none left: restarted, it starts (prefix hits included) as
        # any sequence does. Left set, allocate() would copy hits that blocks_needed never counted.
        seq.private_copy_pending = False

    def free_cpu(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.cpu.release(self.cpu.blocks[block_id])
        seq.block_table = []

    # ------------------------------------------------------------------ swapping
    @staticmethod
    def _distinct(seqs: Iterable[Sequence]) -> list[int]:
        return list(dict.fromkeys(b for s in seqs for b in s.block_table))

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return len(self._distinct(seqs)) <= self.cpu.num_free

    def swap_out(self, seqs: list[Sequence]) -> None:
        """Move the sequences' blocks to the CPU pool; blocks shared inside the group move once."""
        mapping = self._move(seqs, self.gpu, self.cpu)
        self.swap_out_map.extend(mapping.items())
        self.num_swapped_out_blocks += len(mapping)
        for seq in seqs:
            seq.num_registered_blocks = 0

    def swap_in_cost(self, seqs: list[Sequence]) -> int:
        """Device blocks that swapping ``seqs`` in and then running them to their last token can take at most:
        the blocks themselves, growth to ``num_tokens``, and the copies. An upper bound, so the allocation
        right after a swap-in cannot fail.

        A copy (copy-on-write, or a no-sharing fork's private copy) only ever replaces a reference to a block
        held more than once, so a block held ``r`` times inside the group is copied at most ``r - 1`` times
        (the last holder keeps it). Sequences that share blocks copy at most their partial last block each.
        The smaller of those two bounds holds."""
        held = Counter(b for s in seqs for b in s.block_table)
        growth = sum(max(0, self._blocks_for(s.num_tokens) - len(s.block_table)) for s in seqs)
        per_seq = sum(len(s.block_table) if s.private_copy_pending else 1 for s in seqs)
        return len(held) + growth + min(sum(held.values()) - len(held), per_seq)

    def can_swap_in(self, seqs: list[Sequence]) -> bool:
        return self.swap_in_cost(seqs) <= self.gpu.num_free

    def swap_in(self, seqs: list[Sequence]) -> None:
        mapping = self._move(seqs, self.cpu, self.gpu)
        self.swap_in_map.extend(mapping.items())
        self._note_peak()

    @staticmethod
    def _move(seqs: list[Sequence], src: BlockPool, dst: BlockPool) -> dict[int, int]:
        """Each sequence's blocks to ``dst``; the ``src`` references are dropped tail first, as :meth:`free` drops
        them, so a cached prefix left behind is evicted from its end (a lookup walks it from its start)."""
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = []
            for block_id in seq.block_table:
                if block_id not in mapping:
                    mapping[block_id] = dst.allocate().block_id
                else:
                    dst.acquire(dst.blocks[mapping[block_id]])
                table.append(mapping[block_id])
            for block_id in reversed(seq.block_table):
                src.release(src.blocks[block_id])
            seq.block_table = table
        return mapping

    def take_pending(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
        """(swap_out, swap_in, copies) accumulated since the last call; the runner does them in that order."""
        out, inn, copies = self.swap_out_map, self.swap_in_map, self.copies
        self.swap_out_map, self.swap_in_map, self.copies = [], [], []
        return out, inn, copies

    # ------------------------------------------------------------------ checking
    def check_invariants(self, live_gpu: Iterable[Sequence], live_cpu: Iterable[Sequence] = ()) -> None:
        for pool, seqs in ((self.gpu, list(live_gpu)), (self.cpu, list(live_cpu))):
            refs = [0] * len(pool.blocks)  # only created blocks: the check costs what is in use, not the pool size
            for seq in seqs:
                for block_id in seq.block_table:
                    assert 0 <= block_id < len(pool.blocks), f"block table names block {block_id}, never allocated"
                    refs[block_id] += 1
            for block in pool.blocks:
                assert block.ref_count == refs[block.block_id], (
                    f"block {block.block_id}: ref_count {block.ref_count} != {refs[block.block_id]} references")
                assert (block.block_id in pool.free) == (block.ref_count == 0), f"free list wrong at {block.block_id}"
            for h, block in pool.cached.items():
                assert block.hash == h, f"cache entry {h} points at block {block.block_id} with hash {block.hash}"
