"""Iteration-level scheduler: which tokens of which sequences run this step, and who gets preempted.

There are no prefill and decode phases: every sequence has ``num_tokens - num_computed_tokens`` tokens left to
compute (a whole prompt, a chunk of one, or the one token just sampled), and each step hands out at most
``max_num_batched_tokens`` of them. A long prompt is therefore chunked across steps and shares steps with
decodes. Order is ``(priority, arrival)``; running requests are served first, then swapped ones, then waiting.

When the device pool runs dry the lowest-priority, latest running request is preempted: swapped to the CPU
pool, or recomputed (its blocks freed, prompt + output prefilled again later), or ``auto``: see ``PreemptionCost``.

Liveness: nothing waits forever on blocks. A single sequence always fits (the engine caps ``max_model_len`` at the
pool), but a group (``n`` samples, beams) can outgrow the whole pool. A request short of blocks while it is the
only one running is recomputed, never swapped (swapping back would need every block it has now); if it is short
again with no new token since, it can never finish as a group and lands in ``capacity_bound`` for the engine to
end. A swapped request that cannot come back while nothing is running is turned into a recompute.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import Request, RequestStatus, Sequence


@dataclass
class ScheduledRequest:
    request: Request
    seqs: list[tuple[Sequence, int]]  # (sequence, number of new tokens this step)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    capacity_bound: list[Request] = field(default_factory=list)  # hold the whole pool and still cannot step

    @property
    def empty(self) -> bool:
        """Nothing for the model runner to do this step."""
        return not self.scheduled and not self.swap_out and not self.swap_in and not self.copies


@dataclass
class PreemptionCost:
    """``auto`` preemption: swap when moving the blocks out and back costs less than recomputing the tokens.

    recompute ~ tokens * flops_per_token / flops_per_s; swap ~ 2 * blocks * block_bytes / swap_bytes_per_s.
    Requests with several live sequences always swap: they share blocks, and recompute would prefill every
    fork separately. Without CPU room, swap falls back to recompute.
    """

    flops_per_token: float
    flops_per_s: float
    block_bytes: int
    swap_bytes_per_s: float

    def prefer_swap(self, num_tokens: int, num_blocks: int) -> bool:
        recompute_s = num_tokens * self.flops_per_token / self.flops_per_s
        swap_s = 2 * num_blocks * self.block_bytes / self.swap_bytes_per_s
        return swap_s < recompute_s


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str, cost: PreemptionCost) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.cost = cost
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_preemptions = 0
        self.num_recomputed = 0
        self.num_swapped = 0
        self.num_swapped_recomputed = 0  # swapped requests that could not come back and were recomputed instead

    # ------------------------------------------------------------------ queues
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def release(self, req: Request) -> None:
        """Take ``req`` out of every queue and free all its blocks (finish, cancel, deadline)."""
        for queue in (self.waiting, self.running, self.swapped):
            if req in queue:
                queue.remove(req)
        for seq in req.seqs:
            if req.status == RequestStatus.SWAPPED:
                self.bm.free_cpu(seq)
            else:
                self.bm.free(seq)
        req.status = RequestStatus.FINISHED

    def num_running_seqs(self) -> int:
        return sum(r.max_seqs for r in self.running)

    # ------------------------------------------------------------------ preemption
    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        seqs = req.unfinished_seqs()
        alone = self.running == [req]
        if alone:
            req.tokens_at_lone_preemption = req.num_tokens
        self.running.remove(req)
        if not alone and self._should_swap(seqs) and self.bm.can_swap_out(seqs):
            self.bm.swap_out(seqs)
            req.status = RequestStatus.SWAPPED
            bisect.insort(self.swapped, req, key=lambda r: r.sort_key)
            self.num_swapped += 1
        else:
            for seq in seqs:
                self.bm.free(seq)
            self._restart(req)
            self.num_recomputed += 1
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)

    def _restart(self, req: Request) -> None:
        """Queue ``req`` to be prefilled again from its tokens (its blocks are already freed)."""
        for seq in req.unfinished_seqs():
            seq.num_computed_tokens = 0
        self.add(req)

    def _never_fits(self, req: Request) -> bool:
        """``req`` is the only running request, is short of blocks, and has not produced a token since it was last
        preempted in this same position: restarting again cannot help."""
        return self.running == [req] and req.tokens_at_lone_preemption == req.num_tokens

    def _should_swap(self, seqs: list[Sequence]) -> bool:
        if self.preemption_mode != "auto":
            return self.preemption_mode == "swap"
        if len(seqs) > 1:
            return True
        blocks = len({b for s in seqs for b in s.block_table})
        return self.cost.prefer_swap(sum(s.num_computed_tokens for s in seqs), blocks)

    # ------------------------------------------------------------------ planning
    def _plan(self, req: Request, budget: int) -> list[tuple[Sequence, int]] | None:
        """Tokens to run per live sequence within ``budget``. Forked sequences step together or not at all.

        After a recompute preemption, a group's sequences all start empty: the first is prefilled alone, and the
        others then re-share their common prefix with it (``share_prefix``) instead of prefilling privately.
        """
        if len(req.seqs) == 1:  # the common case, kept cheap: it runs for every running request every step
            seq = req.seqs[0]
            n = 0 if seq.finished else min(seq.num_tokens - seq.num_computed_tokens, budget)
            return [(seq, n)] if n > 0 else None
        seqs = req.unfinished_seqs()
        if len(seqs) > 1:
            computed = [s for s in seqs if s.num_computed_tokens > 0]
            if not computed:
                seqs = seqs[:1]
            else:
                best = max(computed, key=lambda s: s.num_computed_tokens)
                if best.num_computed_tokens < best.num_prompt_tokens:
                    seqs = [best]  # the shared prompt is still being (re)computed
                else:
                    for seq in seqs:
                        if seq.num_computed_tokens == 0:
                            self.bm.share_prefix(seq, best)
        remaining = [s.num_tokens - s.num_computed_tokens for s in seqs]
        if len(seqs) > 1 and sum(remaining) > budget and all(r == 1 for r in remaining):
            return None
        plan = []
        for seq, left in zip(seqs, remaining):
            if left == 0:
                continue  # computed, waiting for its siblings (a beam whose logits are stashed)
            n = min(left, budget)
            if n <= 0:
                break
            plan.append((seq, n))
            budget -= n
        return plan or None

    def _allocate(self, plan: list[tuple[Sequence, int]]) -> bool:
        """Room for the whole plan, or nothing allocated and False."""
        if len(plan) == 1:  # one call: allocate() is all-or-nothing itself
            return self.bm.allocate(*plan[0])
        if sum(self.bm.blocks_needed(s, n) for s, n in plan) > self.bm.num_free_gpu_blocks:
            return False
        for seq, n in plan:
            assert self.bm.allocate(seq, n)
        return True

    def _admit(self, req: Request, plan: list[tuple[Sequence, int]], out: SchedulerOutput) -> int:
        """Add ``req`` to the step; returns the tokens it takes from the budget."""
        tokens = sum(n for _, n in plan)
        out.scheduled.append(ScheduledRequest(req, plan))
        out.num_batched_tokens += tokens
        return tokens

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.running.sort(key=lambda r: r.sort_key)
        self._preempt_for_priority(out)
        budget = self.max_num_batched_tokens

        # 1. running requests, best first; make room by preempting from the back of the queue.
        queue = deque(self.running)
        starved = False  # a running request had to be preempted for room: admit nothing new this step
        while queue and budget > 0:
            req = queue.popleft()
            plan = self._plan(req, budget)
            if plan is None:
                continue
            while not self._allocate(plan):
                victim = queue.pop() if queue else req
                starved = True
                if victim is req and self._never_fits(req):
                    out.capacity_bound.append(req)
                    break
                self._preempt(victim, out)
                if victim is req:
                    break
            else:  # allocated (no break): the request runs this step
                budget -= self._admit(req, plan, out)

        # 2. swapped requests come back before new ones start (they hold CPU blocks and have waited).
        num_seqs = self.num_running_seqs()
        if not starved:
            while self.swapped and budget > 0:
                req = self.swapped[0]
                seqs = req.unfinished_seqs()
                if num_seqs + len(seqs) > self.max_num_seqs:
                    break
                if not self.bm.can_swap_in(seqs):
                    if self.running:
                        break  # blocks come free as running requests finish
                    # The pool is as empty as it gets and the group still does not fit: recompute it instead.
                    self.swapped.pop(0)
                    for seq in seqs:
                        self.bm.free_cpu(seq)
                    self._restart(req)
                    self.num_swapped_recomputed += 1
                    continue
                self.swapped.pop(0)
                self.bm.swap_in(seqs)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                num_seqs += len(seqs)
                plan = self._plan(req, budget)  # after the swap-in: planning may share blocks on the device
                if plan is None:
                    continue
                for seq, n in plan:  # one by one: a copy made for one sibling can spare the next its copy
                    assert self.bm.allocate(seq, n)
                budget -= self._admit(req, plan, out)

        # 3. waiting requests (new, or preempted by recompute), with prefix-cache hits and chunked prefill.
        if not starved and not self.swapped:
            while self.waiting and budget > 0:
                req = self.waiting[0]
                if num_seqs + req.max_seqs > self.max_num_seqs:
                    break
                plan, hits = [], []
                left = budget
                pending = req.unfinished_seqs()
                for seq in pending[:1] if len(pending) > 1 else pending:  # see _plan: siblings re-share later
                    cached = self.bm.find_cached_prefix(seq)
                    start = seq.num_computed_tokens + len(cached) * self.bm.block_size
                    n = min(seq.num_tokens - start, left)
                    if n <= 0:
                        break
                    plan.append((seq, n))
                    hits.append(cached)
                    left -= n
                need = sum(self.bm.blocks_needed(s, n, c) for (s, n), c in zip(plan, hits))
                if not plan or need > self.bm.num_free_gpu_blocks:
                    break
                self.waiting.pop(0)
                for (seq, n), cached in zip(plan, hits):
                    assert self.bm.allocate(seq, n, cached)
                    req.num_cached_tokens = max(req.num_cached_tokens, len(cached) * self.bm.block_size)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                budget -= self._admit(req, plan, out)
                num_seqs += req.max_seqs

        out.swap_out, out.swap_in, out.copies = self.bm.take_pending()
        return out

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """A waiting request of strictly better priority displaces worse running ones if blocks are short."""
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        chunk = min(head.seqs[0].num_tokens, self.max_num_batched_tokens)
        need = (chunk + self.bm.block_size - 1) // self.bm.block_size
        while need > self.bm.num_free_gpu_blocks and self.running and self.running[-1].priority > head.priority:
            self._preempt(self.running[-1], out)
