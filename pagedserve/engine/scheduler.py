"""Iteration-level scheduler: which tokens of which sequences run this step, and who gets preempted.

There are no prefill and decode phases: every sequence has ``num_tokens - num_computed_tokens`` tokens left to
compute (a whole prompt, a chunk of one, or the one token just sampled), and each step hands out at most
``max_num_batched_tokens`` of them. A long prompt is therefore chunked across steps and shares steps with
decodes. A step has three phases, each handing the budget it leaves to the next: the running requests first;
then the queued ones, swapped and waiting together in ``(priority, arrival)`` order, until the first that does
not fit (nothing worse goes ahead of it).

When the device pool runs dry the lowest-priority, latest running request is preempted: swapped to the CPU
pool, or recomputed (its blocks freed, prompt + output prefilled again later), or ``auto``: see ``PreemptionCost``.
Before the phases, each queued request in turn, best first, preempts running ones of strictly worse priority
while it lacks blocks or sequence slots (beside the better queued ones before it), and those that keep running
get only the token budget and the free blocks its next chunk leaves (``_Hold``). A victim queues behind the
request it made room for, so it is not swapped straight back in: priorities hold in every preemption mode (a
better request starts in the step after it arrives, unless better running requests take its room first; no
request waits a step while a strictly worse one runs), and nothing thrashes between priorities (among equals the
latest arrival is the victim, as in vLLM, so a group outgrowing the pool preempts later arrivals again and again).

Liveness: nothing waits forever on blocks. A single sequence always fits (the engine caps ``max_model_len`` at the
pool), but a group (``n`` samples, beams) can outgrow the whole pool. Samples alone on the device take turns
(``_part_that_fits``). A request short of blocks while it is the only one running is otherwise recomputed, never
swapped (swapping back would need every block it has now); if it is short again with no new token since, it can
never finish as a group and lands in ``capacity_bound`` for the engine to end. A swapped request that cannot
come back while nothing is running is turned into a recompute. A queued request that does not start while
nothing runs (the whole pool and budget on offer) never will: it leaves the queue in ``unschedulable`` with the
reason, for the engine to end with an error.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import Request, RequestStatus, Sequence


def _common_blocks(seq: Sequence, other: Sequence, block_size: int) -> int:
    """Full blocks of ``seq`` (its last token aside, which is always computed) whose tokens ``other`` has too.
    Compared a block's slice at a time: a recomputed group compares each sequence with its siblings."""
    a, b = seq.token_ids, other.token_ids
    num_blocks = min(seq.num_tokens - 1, other.num_tokens) // block_size
    n = 0
    while n < num_blocks and a[n * block_size:(n + 1) * block_size] == b[n * block_size:(n + 1) * block_size]:
        n += 1
    return n


@dataclass(slots=True)
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
    unschedulable: list[tuple[Request, str]] = field(default_factory=list)  # (request, why), out of every queue

    @property
    def empty(self) -> bool:
        """Nothing for the model runner to do this step."""
        return not self.scheduled and not self.swap_out and not self.swap_in and not self.copies


@dataclass
class _Hold:
    """What running requests of strictly worse ``priority`` must leave this step for the queued requests, best
    first up to one of that priority, that start in it: their next chunks' ``tokens`` and device ``blocks``
    (cumulative, so the last hold below a running request's priority is the one that applies to it)."""

    priority: int
    tokens: int
    blocks: int


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
        # A running sequence takes a token of every step's budget; more of them than the budget holds would not
        # all step, and worse-priority decodes could take a whole step's budget from a better request queued
        # behind them (the slots it may preempt for are what keeps priorities: there must be no more of them).
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.cost = cost
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens served from the prefix cache, all requests
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
            self.free_seq(req, seq)
        req.status = RequestStatus.FINISHED

    def free_seq(self, req: Request, seq: Sequence) -> None:
        """Free one sequence of ``req``'s blocks where they are: the CPU pool while ``req`` is swapped out, else
        the device (a sample can end on a token read back after its request was swapped out)."""
        (self.bm.free_cpu if req.status == RequestStatus.SWAPPED else self.bm.free)(seq)

    def num_running_seqs(self) -> int:
        return sum(r.max_seqs for r in self.running)

    def num_blocks_worse_than(self, priority: int) -> int:
        """Device blocks held by running requests of strictly worse priority than ``priority``: what a queued
        request of that priority may free by preempting them (``_preempt_for_priority``). An upper bound: a block
        one of them shares with another request (a fork, a prefix-cache hit) stays in use. Swapped and waiting
        requests hold no device blocks. O(running requests)."""
        held = 0
        for req in self.running:
            if req.priority > priority:
                seqs = req.unfinished_seqs()
                held += len(seqs[0].block_table) if len(seqs) == 1 else len({b for s in seqs for b in s.block_table})
        return held

    def num_queued_not_worse(self, priority: int) -> int:
        """Swapped and waiting requests whose priority is ``priority`` or better: they go ahead of a new request
        of that priority. O(log queued): both queues are sorted by ``(priority, ...)``."""
        bound = (priority + 1,)  # sorts before every key of a worse priority, after every other key
        return sum(bisect.bisect_left(q, bound, key=lambda r: r.sort_key) for q in (self.waiting, self.swapped))

    def waiting_worse_than(self, priority: int) -> list[Request]:
        """Waiting requests of strictly worse priority than ``priority``, in order. O(log queued + those)."""
        bound = (priority + 1,)
        return self.waiting[bisect.bisect_left(self.waiting, bound, key=lambda r: r.sort_key):]

    # ------------------------------------------------------------------ preemption
    def _preempt(self, req: Request, out: SchedulerOutput, for_room: bool = True) -> None:
        """Swap ``req`` out or queue it for recompute. ``for_room``: it is short of blocks itself (or makes room
        for a running one); alone, it is then recomputed and marked (``_never_fits``). A request preempted for
        a better queued one (``for_room=False``) follows the preemption mode and is not marked: it fitted."""
        seqs = req.unfinished_seqs()
        alone = for_room and self.running == [req]
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
        """Tokens to run per live sequence within ``budget``. Forked sequences decode together, or not at all
        within the budget (room for only some of them: ``_part_that_fits``).

        After a recompute preemption, a group's sequences all start empty: the first is prefilled alone, and the
        others then re-share what they have in common with their siblings (``_reshare``) instead of prefilling
        privately.
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
                    seqs = self._reshare(seqs)
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

    def _reshare(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences of a recomputed group to run now. Each empty one shares the blocks it has in common with
        the computed sibling it has most in common with, as a fork shared them before the preemption; one whose
        closest sibling is still computing that common part waits for it (it is left out this step), so the
        group never needs more blocks than it held: each private tail is computed once."""
        bs = self.bm.block_size
        going = [s for s in seqs if s.num_computed_tokens > 0]
        for seq in seqs:
            if seq.num_computed_tokens > 0:
                continue
            common = {id(o): _common_blocks(seq, o, bs) for o in going}
            now = max(going, key=lambda o: min(common[id(o)], o.num_computed_tokens // bs))
            later = max(going, key=lambda o: common[id(o)])
            if common[id(later)] > min(common[id(now)], now.num_computed_tokens // bs):
                continue  # ``later`` computes what they have in common this step: share it next step
            self.bm.share_prefix(seq, now)
            going.append(seq)
        running = {id(s) for s in going}
        return [s for s in seqs if id(s) in running]

    def _allocate(self, plan: list[tuple[Sequence, int]]) -> bool:
        """Room for the whole plan, or nothing allocated and False."""
        if len(plan) == 1:  # one call: allocate() is all-or-nothing itself
            return self.bm.allocate(*plan[0])
        if sum(self.bm.blocks_needed(s, n) for s, n in plan) > self.bm.num_free_gpu_blocks:
            return False
        for seq, n in plan:
            self._must_allocate(seq, n)
        return True

    def _must_allocate(self, seq: Sequence, num_tokens: int, cached: list = ()) -> None:
        """An allocation the caller has already checked for room; failing is a bookkeeping bug."""
        if not self.bm.allocate(seq, num_tokens, cached):
            raise RuntimeError(f"block accounting is wrong: no room for {num_tokens} tokens of {seq}")

    def _admit(self, req: Request, plan: list[tuple[Sequence, int]], out: SchedulerOutput) -> int:
        """Add ``req`` to the step; returns the tokens it takes from the budget."""
        tokens = plan[0][1] if len(plan) == 1 else sum(n for _, n in plan)  # one sequence: every decode, every step
        out.scheduled.append(ScheduledRequest(req, plan))
        out.num_batched_tokens += tokens
        return tokens

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        """Plan one step: running requests first, then swapped and waiting ones in ``(priority, arrival)`` order."""
        out = SchedulerOutput()
        self.running.sort(key=lambda r: r.sort_key)
        holds = self._preempt_for_priority(out)
        budget, starved = self._schedule_running(out, self.max_num_batched_tokens, holds)
        if not starved:  # a running request had to be preempted for room: admit nothing new this step
            self._schedule_queued(out, budget)
            if not self.running and not out.preempted:
                self._end_unschedulable(out)
        out.swap_out, out.swap_in, out.copies = self.bm.take_pending()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, holds: list[_Hold]) -> tuple[int, bool]:
        """Running requests, best first; room is made by preempting from the back of the queue. Those of worse
        priority than queued requests about to start get only what their next chunks leave (``_run_held``): a
        worse prompt prefilling in chunks would otherwise take every step's budget (or the blocks they were
        counted to fit in) before the better requests are looked at, and keep them out until it was all in. In a
        starved step they do not run at all, as those better requests do not start in it.

        Invariant (with ``_preempt_for_priority``): no request left queued after the step is strictly better
        than one that ran in it.

        Returns the budget left and whether any running request was preempted for room (starved)."""
        queue = deque(self.running)
        starved = False
        k = 0  # holds below the current request's priority: both lists are sorted, so it only moves forward
        while queue and budget > 0:
            req = queue.popleft()
            while k < len(holds) and holds[k].priority < req.priority:
                k += 1
            if k:  # sorted: every request that may preempt for room (``starved``) came before this one
                if not starved:  # else nothing new starts this step, the better queued requests included
                    budget -= self._run_held(req, budget, holds[k - 1], out)
                continue
            plan = self._plan(req, budget)
            if plan is None:
                continue
            while not self._allocate(plan):
                victim = queue.pop() if queue else req
                starved = True
                if victim is req and (part := self._part_that_fits(req, plan)):
                    plan = part
                    break
                if victim is req and self._never_fits(req):
                    out.capacity_bound.append(req)
                    plan = None
                    break
                self._preempt(victim, out)
                if victim is req:
                    plan = None
                    break
            if plan is not None:  # allocated: the request runs this step
                budget -= self._admit(req, plan, out)
        return budget, starved

    def _run_held(self, req: Request, budget: int, held: _Hold, out: SchedulerOutput) -> int:
        """A running request worse than queued ones that start this step: it runs within the budget and the free
        blocks they leave, or waits this step with the blocks it has. It never preempts for room: a victim would
        be worse still, and the better requests are not kept out by it. Returns the tokens it takes."""
        if budget <= held.tokens:
            return 0
        plan = self._plan(req, budget - held.tokens)
        room = self.bm.num_free_gpu_blocks - held.blocks
        if plan is None or sum(self.bm.blocks_needed(s, n) for s, n in plan) > room:
            return 0
        if not self._allocate(plan):
            raise RuntimeError(f"block accounting is wrong: no room for the plan of {req.request_id}")
        return self._admit(req, plan, out)

    def _part_that_fits(self, req: Request, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]] | None:
        """For samples alone on the device and short of blocks: the longest head of ``plan`` that fits,
        allocated. Samples are independent, so some step and the rest follow as blocks come free, where ending
        the group (or restarting it) would cut outputs that each fit. Beams step together or not at all."""
        if req.beam is not None or len(plan) < 2 or self.running != [req]:
            return None
        for k in range(len(plan) - 1, 0, -1):
            if self._allocate(plan[:k]):
                return plan[:k]
        return None

    def _queue_head(self) -> Request | None:
        """The best request that is not running: swapped and waiting ones compete by ``(priority, arrival)``."""
        if self.swapped and (not self.waiting or self.swapped[0].sort_key < self.waiting[0].sort_key):
            return self.swapped[0]
        return self.waiting[0] if self.waiting else None

    def _schedule_queued(self, out: SchedulerOutput, budget: int) -> int:
        """Swapped and waiting requests, best first, until one does not fit: nothing worse goes ahead of it
        (so a swapped-out request never takes back the room its preemption made for a better one).

        Returns the budget left."""
        num_seqs = None  # O(running requests): counted only once something is queued
        while budget > 0 and (req := self._queue_head()) is not None:
            if num_seqs is None:
                num_seqs = self.num_running_seqs()
            if req.status == RequestStatus.SWAPPED:
                left = self._swap_in(req, out, budget, num_seqs)
            else:
                left = self._start(req, out, budget, num_seqs)
            if left is None:
                break
            budget = left
            num_seqs = self.num_running_seqs()
        return budget

    def _swap_in(self, req: Request, out: SchedulerOutput, budget: int, num_seqs: int) -> int | None:
        """Bring a swapped request back and plan its step. Returns the budget left, or None if it does not fit."""
        seqs = req.unfinished_seqs()
        if num_seqs + req.max_seqs > self.max_num_seqs:  # not len(seqs): one swapped before its fork forks
            return None
        if not self.bm.can_swap_in(seqs):
            if self.running:
                return None  # blocks come free as running requests finish
            # The pool is as empty as it gets and the group still does not fit: recompute it instead.
            self.swapped.remove(req)
            for seq in seqs:
                self.bm.free_cpu(seq)
            self._restart(req)
            self.num_swapped_recomputed += 1
            return budget
        self.swapped.remove(req)
        self.bm.swap_in(seqs)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        plan = self._plan(req, budget)  # after the swap-in: planning may share blocks on the device
        if plan is None:
            return budget
        for seq, n in plan:  # one by one: a copy made for one sibling can spare the next its copy
            self._must_allocate(seq, n)
        return budget - self._admit(req, plan, out)

    def _start(self, req: Request, out: SchedulerOutput, budget: int, num_seqs: int) -> int | None:
        """Start (or restart after a recompute) a waiting request, with prefix-cache hits and chunked prefill.
        Returns the budget left, or None if it does not fit."""
        if num_seqs + req.max_seqs > self.max_num_seqs:
            return None
        plan, hits = [], []
        left = budget
        pending = req.unfinished_seqs()
        for seq in pending[:1] if len(pending) > 1 else pending:  # see _plan: siblings re-share later
            cached = self.bm.find_cached_prefix(seq)
            begin = seq.num_computed_tokens + len(cached) * self.bm.block_size
            n = min(seq.num_tokens - begin, left)
            if n <= 0:
                break
            plan.append((seq, n))
            hits.append(cached)
            left -= n
        need = sum(self.bm.blocks_needed(s, n, c) for (s, n), c in zip(plan, hits))
        if not plan or need > self.bm.num_free_gpu_blocks:
            return None
        self.waiting.remove(req)
        for (seq, n), cached in zip(plan, hits):
            self._must_allocate(seq, n, cached)
        if req.num_preemptions == 0:
            # Prompt tokens served from the cache at the first start, as vLLM counts them: a restart after a
            # recompute finds its own earlier blocks, generated tokens included, and counted them too (more
            # cached tokens than the prompt has). The engine's total is the sum of these.
            req.num_cached_tokens = min(max(map(len, hits)) * self.bm.block_size, len(req.prompt_token_ids))
            self.prefix_hit_tokens += req.num_cached_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return budget - self._admit(req, plan, out)

    def _end_unschedulable(self, out: SchedulerOutput) -> None:
        """Nothing runs, nothing was preempted, and the best queued request still did not start: the whole pool
        is free and the full budget was offered, so it never will. It leaves the queue with the reason."""
        req = self._queue_head()
        if req is None or req.status != RequestStatus.WAITING:  # a swapped head would have been recomputed
            return
        self.waiting.remove(req)
        seq = req.unfinished_seqs()[0] if req.unfinished_seqs() else None
        if seq is None or seq.num_tokens <= seq.num_computed_tokens:
            why = "it has no tokens to compute"
        else:
            need = self.bm.blocks_needed(seq, min(seq.num_tokens - seq.num_computed_tokens,
                                                  self.max_num_batched_tokens))
            why = (f"its next step needs {need} KV blocks and the whole pool has {self.bm.gpu.num_blocks} "
                   f"(block_size {self.bm.block_size})")
        out.unschedulable.append((req, f"request cannot be scheduled: {why}"))

    def _preempt_for_priority(self, out: SchedulerOutput) -> list[_Hold]:
        """Queued requests, best first, displace running ones of strictly worse priority while they lack blocks or
        sequence slots beside the queued ones before them; each that then fits gets a ``_Hold``, so it starts this
        step. Victims go from the back of the running queue, so they queue behind the request they made room for.

        Stops at the first queued request that no running one is worse than, that does not fit even with every
        worse one gone, or once the holds take a whole step's budget: none after it starts this step (the queued
        phase stops at the first that does not fit), so preempting for it would only cut a worse one's step."""
        holds: list[_Hold] = []
        num_seqs, tokens, blocks = None, 0, 0
        for req in self._queued():
            if tokens >= self.max_num_batched_tokens or not self._worse_runs(req):
                break
            if num_seqs is None:  # O(running requests): counted only when a queued request may preempt
                num_seqs = self.num_running_seqs()
            need_seqs, need_blocks, need_tokens = self._needs(req)
            while not (fits := num_seqs + need_seqs <= self.max_num_seqs
                       and blocks + need_blocks <= self.bm.num_free_gpu_blocks) and self._worse_runs(req):
                victim = self.running[-1]
                num_seqs -= victim.max_seqs
                self._preempt(victim, out, for_room=False)
            if not fits:
                break
            num_seqs, tokens, blocks = num_seqs + need_seqs, tokens + need_tokens, blocks + need_blocks
            holds.append(_Hold(req.priority, tokens, blocks))
        return holds

    def _worse_runs(self, req: Request) -> bool:
        """Whether a running request has strictly worse priority than the queued ``req`` (the running queue is
        sorted: the worst is last)."""
        return bool(self.running) and self.running[-1].priority > req.priority

    def _queued(self):
        """Swapped and waiting requests merged in ``(priority, arrival)`` order. Victims preempted meanwhile are
        inserted behind the request being looked at (they are worse), so the walk stays in order."""
        i = j = 0
        while i < len(self.waiting) or j < len(self.swapped):
            if j < len(self.swapped) and (i == len(self.waiting)
                                          or self.swapped[j].sort_key < self.waiting[i].sort_key):
                j += 1
                yield self.swapped[j - 1]
            else:
                i += 1
                yield self.waiting[i - 1]

    def _needs(self, req: Request) -> tuple[int, int, int]:
        """What the queued ``req`` needs to start: sequence slots, device blocks (roughly, prefix hits aside) and
        the tokens of its next chunk (at most a step's budget; a group starts with its first sequence, ``_start``)."""
        seqs = req.unfinished_seqs()
        if req.status == RequestStatus.SWAPPED:
            blocks = self.bm.swap_in_cost(seqs)
        else:
            seqs = seqs[:1]
            chunk = min(seqs[0].num_tokens - seqs[0].num_computed_tokens, self.max_num_batched_tokens)
            blocks = self.bm.blocks_needed(seqs[0], chunk)
        left = sum(s.num_tokens - s.num_computed_tokens for s in seqs)
        return req.max_seqs, blocks, max(1, min(left, self.max_num_batched_tokens))
