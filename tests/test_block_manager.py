"""Property tests: random allocate / append / fork / CoW / free / swap sequences keep the block manager's
invariants, and every block is free once every sequence is gone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import Sequence

BS = 4


def _live(seqs, where):
    return [s for s, w in zip(seqs, where) if w == "gpu"], [s for s, w in zip(seqs, where) if w == "cpu"]


ops = st.lists(
    st.tuples(st.sampled_from(["new", "append", "fork", "free", "swap_out", "swap_in"]),
              st.integers(0, 50), st.integers(1, 40)),
    min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_gpu=st.integers(4, 24), num_cpu=st.integers(0, 24), caching=st.booleans(), share=st.booleans())
def test_random_operations_keep_invariants(ops, num_gpu, num_cpu, caching, share):
    bm = BlockManager(num_gpu, num_cpu, BS, caching, share_blocks=share)
    seqs: list[Sequence] = []
    where: list[str] = []
    for op, pick, n in ops:
        gpu_idx = [i for i, w in enumerate(where) if w == "gpu"]
        cpu_idx = [i for i, w in enumerate(where) if w == "cpu"]
        if op == "new":
            seq = Sequence([pick % 7] * n, n)  # repeated contents make prefix-cache hits likely
            cached = bm.find_cached_prefix(seq)
            todo = seq.num_tokens - len(cached) * BS
            if bm.allocate(seq, todo, cached):
                seq.num_computed_tokens += todo
                bm.register_full_blocks(seq)
                seqs.append(seq)
                where.append("gpu")
            else:
                assert seq.block_table == [] and seq.num_computed_tokens == 0
        elif op == "append" and gpu_idx:
            seq = seqs[gpu_idx[pick % len(gpu_idx)]]
            k = 1 + n % 5
            before = (list(seq.block_table), bm.num_free_gpu_blocks)
            seq.token_ids.extend([pick % 3] * k)
            if bm.allocate(seq, k):
                seq.num_computed_tokens += k
                bm.register_full_blocks(seq)
            else:
                del seq.token_ids[-k:]
                assert (seq.block_table, bm.num_free_gpu_blocks) == before
        elif op == "fork" and gpu_idx:
            parent = seqs[gpu_idx[pick % len(gpu_idx)]]
            child = parent.fork(1)
            bm.fork(parent, child)
            seqs.append(child)
            where.append("gpu")
        elif op == "free" and seqs:
            i = pick % len(seqs)
            (bm.free if where[i] == "gpu" else bm.free_cpu)(seqs[i])
            del seqs[i], where[i]
        elif op == "swap_out" and gpu_idx:
            i = gpu_idx[pick % len(gpu_idx)]
            if bm.can_swap_out([seqs[i]]):
                bm.swap_out([seqs[i]])
                where[i] = "cpu"
        elif op == "swap_in" and cpu_idx:
            i = cpu_idx[pick % len(cpu_idx)]
            if bm.can_swap_in([seqs[i]]):
                bm.swap_in([seqs[i]])
                where[i] = "gpu"
        bm.check_invariants(*_live(seqs, where))
        for seq, w in zip(seqs, where):
            if w == "gpu":
                assert len(seq.block_table) * BS >= seq.num_computed_tokens
        bm.take_pending()
    for seq, w in zip(seqs, where):
        (bm.free if w == "gpu" else bm.free_cpu)(seq)
    bm.check_invariants([], [])
    assert bm.num_free_gpu_blocks == num_gpu and bm.cpu.num_free == num_cpu


def test_copy_on_write_of_shared_last_block():
    bm = BlockManager(8, 0, BS, enable_prefix_caching=False)
    parent = Sequence([1, 2, 3, 4, 5, 6], 6)
    assert bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert bm.gpu.blocks[parent.block_table[1]].ref_count == 2
    child.token_ids.append(9)
    assert bm.allocate(child, 1)
    # The full first block stays shared; the partial last block was copied for the writer.
    assert child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != parent.block_table[1]
    assert bm.take_pending()[2] == [(parent.block_table[1], child.block_table[1])]
    bm.check_invariants([parent, child])


def test_prefix_cache_hit_verifies_tokens_and_survives_free_until_evicted():
    bm = BlockManager(4, 0, BS, enable_prefix_caching=True)
    a = Sequence(list(range(9)), 9)
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.register_full_blocks(a)
    full_blocks = a.block_table[:2]
    bm.free(a)
    b = Sequence(list(range(8)) + [42, 43], 10)
    hits = bm.find_cached_prefix(b)
    assert [h.block_id for h in hits] == full_blocks
    assert bm.allocate(b, 2, hits) and b.num_computed_tokens == 8
    # Filling the pool evicts the least recently freed cached block first, and hits are then gone.
    bm.free(b)
    c = Sequence([7] * 16, 16)
    assert bm.allocate(c, 16)
    assert bm.find_cached_prefix(Sequence(list(range(8)) + [1], 9)) == []




def test_a_swapped_out_prefix_is_evicted_tail_first_as_a_freed_one_is():
    """Swapping out released the device blocks head first, so the next allocation reused the prefix's first block
    and every later cached block was unreachable (a lookup walks the chain from the start): a request sharing the
    preempted one's prompt found nothing cached under swap, 64 tokens under recompute (held-out tester)."""
    for preempt in ("swap", "recompute"):
        bm = BlockManager(5, 5, BS, enable_prefix_caching=True)
        a = Sequence(list(range(4 * BS)) + [99], 4 * BS + 1)  # the whole pool: four full blocks and a partial
        assert bm.allocate(a, a.num_tokens)
        a.num_computed_tokens = a.num_tokens
        bm.register_full_blocks(a)
        bm.swap_out([a]) if preempt == "swap" else bm.free(a)
        other = Sequence([7] * 2 * BS, 2 * BS)  # a newcomer takes two of the five freed: the partial, the last
        assert bm.allocate(other, 2 * BS)
        hits = bm.find_cached_prefix(Sequence(list(range(4 * BS)) + [1, 2, 3], 4 * BS + 3))
        assert len(hits) == 3, (preempt, [h.block_id for h in hits])  # the head three of the four


def test_swap_in_bound_lets_an_unshared_group_back_into_a_pool_that_holds_it():
    """A no-sharing fork swapped out before its private copies were made needs its blocks plus one copy of
    each block per extra holder (the last holder keeps the original). Counting a full copy for the fork *and*
    a CoW copy for the parent overstated it, and a group that fits the pool stayed swapped out forever (the
    engine spun with nothing running)."""
    bm = BlockManager(10, 10, BS, enable_prefix_caching=False, share_blocks=False)
    parent = Sequence(list(range(4 * BS)), 4 * BS)
    assert bm.allocate(parent, 4 * BS)
    parent.num_computed_tokens = 4 * BS
    child = parent.fork(1)
    bm.fork(parent, child)
    group = [parent, child]
    for seq in group:
        seq.token_ids.append(7)  # each has sampled its next token when it is preempted
    bm.swap_out(group)
    bm.take_pending()
    # 4 blocks back + 1 growth block each + 4 private copies for the child; the parent then owns the originals.
    assert bm.swap_in_cost(group) == 4 + 2 + 4 == bm.num_free_gpu_blocks
    bm.swap_in(group)
    bm.take_pending()
    for seq in group:
        assert bm.allocate(seq, 1)  # still an upper bound: every allocation right after the swap-in succeeds
    bm.check_invariants(group)


# ---------------------------------------------------------------------------- prefix-cache identity


def _prefill(bm, tokens, cache_salt=None):
    """A sequence computed to its end (as a prefill would), its full blocks published; returns it."""
    from pagedserve.engine.block_manager import salted_root

    seq = Sequence(list(tokens), len(tokens))
    seq.cache_root = salted_root(cache_salt)
    cached = bm.find_cached_prefix(seq)
    todo = seq.num_tokens - len(cached) * BS
    assert bm.allocate(seq, todo, cached)
    seq.num_computed_tokens += todo
    bm.register_full_blocks(seq)
    return seq, len(cached)


def test_chain_hash_is_collision_resistant_where_python_hash_is_not():
    """The old key, ``hash((parent, tokens))``, reduces an integer parent modulo 2**61 - 1: two different parents
    collide by construction. The SHA-256 chain does not, and depends on every token and on the parent."""
    from pagedserve.engine.block_manager import chain_hash

    tokens = (1, 2, 3, 4)
    parent = 12345
    assert hash((parent, tokens)) == hash((parent + 2**61 - 1, tokens))  # the old scheme's collision
    root = chain_hash(None, tokens)
    assert len(root) == 32 and chain_hash(None, tokens) == root
    assert chain_hash(root, tokens) != chain_hash(chain_hash(None, (1, 2, 3, 5)), tokens)
    assert chain_hash(None, (1, 2, 3, 4)) != chain_hash(None, (4, 3, 2, 1))


def test_same_tokens_after_a_different_prefix_never_share(monkeypatch):
    """Even with a block key that ignores the parent (the worst case of a colliding hash), a cached block is only
    served after the same parent: the hit also checks the parent hash it was registered with."""
    import hashlib

    from pagedserve.engine import block_manager

    def parent_blind(parent, token_ids):
        return hashlib.sha256(repr(token_ids).encode()).digest()

    a, b, x, y = [10] * BS, [20] * BS, [30] * BS, [40] * BS
    for key in (block_manager.chain_hash, parent_blind):
        monkeypatch.setattr(block_manager, "chain_hash", key)
        bm = BlockManager(16, 0, BS, True)
        victim, _ = _prefill(bm, a + x + [1])  # another tenant's prefix: A then X
        probe, _ = _prefill(bm, b + y + [1])  # B is cached too
        attacker, hits = _prefill(bm, b + x + [1])  # X after B: its key equals the victim's X under parent_blind
        assert hits == 1  # B only
        assert attacker.block_table[1] not in victim.block_table
        again, hits = _prefill(bm, a + x + [2])  # the same chain is still shared
        assert hits == 2 and again.block_table[:2] == victim.block_table[:2]
        bm.check_invariants([victim, probe, attacker, again])


def test_a_fork_restarted_without_sharing_takes_exactly_the_blocks_it_was_counted():
    """A fork made with sharing off (it copies its shared blocks at its next allocate) was preempted by
    recompute before that allocate. Restarted, it found its prompt in the prefix cache, still held by its
    parent: allocate() copied those hits too, which blocks_needed() had not counted, and with the pool that
    tight the scheduler's checked allocation ran out of blocks (KeyError from the free list, the engine dead)."""
    bm = BlockManager(16, 0, BS, True, share_blocks=False)
    parent = Sequence(list(range(1, 2 * BS + 2)), 2 * BS + 1)
    assert bm.allocate(parent, parent.num_tokens)
    parent.num_computed_tokens = parent.num_tokens
    bm.register_full_blocks(parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.private_copy_pending
    bm.free(child)  # recompute preemption
    child.num_computed_tokens = 0
    hits = bm.find_cached_prefix(child)
    assert len(hits) == 2  # the parent's two full blocks, still held by it
    n = child.num_tokens - len(hits) * BS
    need, free = bm.blocks_needed(child, n, hits), bm.num_free_gpu_blocks
    assert bm.allocate(child, n, hits)
    assert free - bm.num_free_gpu_blocks == need
    bm.check_invariants([parent, child])


def test_a_cache_salt_keeps_each_salts_prefixes_to_itself(monkeypatch):
    """Requests of different ``cache_salt`` (tenants) never share a cached block, even under a key that ignores the
    parent (the hit checks the salted root as a parent); the same salt shares as unsalted requests do."""
    import hashlib

    from pagedserve.engine import block_manager

    def parent_blind(parent, token_ids):
        return hashlib.sha256(repr(token_ids).encode()).digest()

    prompt = [10] * BS + [20] * BS + [1]
    for key in (block_manager.chain_hash, parent_blind):
        monkeypatch.setattr(block_manager, "chain_hash", key)
        bm = BlockManager(16, 0, BS, True)
        victim, _ = _prefill(bm, prompt, "tenant-a")
        other, hits = _prefill(bm, prompt, "tenant-b")
        assert hits == 0 and not set(other.block_table) & set(victim.block_table)
        plain, hits = _prefill(bm, prompt)
        assert hits == 0
        assert not set(plain.block_table[:2]) & set(victim.block_table[:2])
        again, hits = _prefill(bm, prompt[:-1] + [2], "tenant-a")
        assert hits == 2 and again.block_table[:2] == victim.block_table[:2]
        child = again.fork(1)
        assert child.cache_root == again.cache_root  # n > 1 and beams keep their request's salt
        bm.check_invariants([victim, other, plain, again])
