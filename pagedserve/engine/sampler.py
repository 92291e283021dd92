"""Token sampling for one step: allowed tokens, logit bias, penalties, greedy, temperature, top-k / top-p / min-p,
seeds, logprobs.

Sampling is ``argmax(probs / E)`` with ``E ~ Exp(1)`` (the exponential-race form of categorical sampling).

Seeded sequences use counter-based draws: the ``E`` row of the token at output position ``pos`` of sample ``i`` of
a request seeded ``seed`` comes from a generator re-seeded with ``key(seed, i, pos)``, so it depends on nothing
but those three numbers: not on what else is in the batch, not on how many steps came before, and not on any
state that could be lost with a worker (a request resumed elsewhere with its emitted tokens draws exactly the
tokens an uninterrupted run would). Re-seeding costs a few microseconds per seeded row per step, far below the
draw itself. Unseeded rows share one draw from the engine's generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pagedserve.engine.device_copy import Download, upload
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence
from pagedserve.kernels import reference


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float  # log-softmax of the raw model logits at the chosen token
    top_logprobs: dict[int, float] | None
    # Nothing could be drawn: allowed_token_ids, bad_words, min_tokens and a grammar left every token out (the
    # token is then meaningless)
    excluded: bool = False


def hold_tokens(scores: torch.Tensor, held: list[list[int]]) -> None:
    """In place, on logits (sampling) or log-probs (beam search): row ``r`` cannot draw ``held[r]`` (``min_tokens``
    holding its stop tokens back). Like HF's min_new_tokens processor, it acts where the penalties do, after the
    raw log-probs were taken: the reported logprobs stay those of the model."""
    vocab = scores.shape[1]
    rows = [r for r, ids in enumerate(held) for t in ids if t < vocab]
    cols = [t for ids in held for t in ids if t < vocab]
    if rows:
        # The value as a device tensor: a Python scalar would go up by a blocking copy (a stream sync).
        scores.index_put_(tuple(upload([rows, cols], torch.int64, scores.device)),
                          torch.full((len(rows),), -torch.inf, dtype=scores.dtype, device=scores.device))


class _Shaping(NamedTuple):
    """One params object's shaping on the device, and what it was made from."""

    params: SamplingParams
    allowed_from: list[int] | None
    bias_from: dict[int, float] | None
    bad_from: list[list[int]] | None
    device: torch.device
    allowed: torch.Tensor | None
    bias_ids: torch.Tensor | None
    bias: torch.Tensor | None
    bad: BadWords | None


class BadWords:
    """Bad words' token ids, looked up by the token an output ends with: a step compares only the words whose
    rest ends with it (64 words compared at every step cost a request a third of a millisecond a step)."""

    def __init__(self, words: list[list[int]]) -> None:
        self.always = sorted({ids[0] for ids in words if len(ids) == 1})
        self.after: dict[int, list[list[int]]] = {}
        for ids in words:
            if len(ids) > 1:
                self.after.setdefault(ids[-2], []).append(ids)

    def banned(self, seq: Sequence) -> list[int]:
        """The tokens ``seq`` may not draw next: a word's last token where its output ends with the rest."""
        out, tokens = seq.num_output_tokens, seq.token_ids
        found = list(self.always)
        for ids in self.after.get(tokens[-1], ()) if out else ():
            if len(ids) - 1 <= out and tokens[len(tokens) - len(ids) + 1:] == ids[:-1]:
                found.append(ids[-1])
        return found


def bad_words_token_ids(words: list[str], encode: Callable[[list[str]], list[list[int]]]) -> list[list[list[int]]]:
    """Per bad word, its token ids as it would be generated, as vLLM finds them: the word (its leading spaces
    stripped) at the start of a text, and after a space where that encodes to another first token of as many
    tokens (a word-starting token, in tokenizers that mark a word's start). ``encode``: texts to token ids, all
    at once (a tokenizer's batch encode: a request's 64 words of 256 characters, one by one, took 30 ms)."""
    stripped = [word.lstrip() for word in words]
    encoded = encode(stripped + [" " + word for word in stripped])
    out = []
    for alone, after_space in zip(encoded[:len(words)], encoded[len(words):]):
        ways = [alone] if alone else []
        if after_space and alone and after_space[0] != alone[0] and len(after_space) == len(alone):
            ways.append(after_space)
        out.append(ways)
    return out


class LogitShaping:
    """``allowed_token_ids`` and ``logit_bias``, in place, on logits (sampling) or log-probs (beam search): a row
    keeps only its allowed tokens (the rest -inf), then gets its bias added, as vLLM and HF (``sequence_bias``,
    ``prefix_allowed_tokens_fn``) do before the penalties.

    Each request's token ids go to the device once, when its params first come, and stay while they come every
    call (a call drops those of params that did not come): up to a thousand ids a row, read from Python lists
    every step, cost milliseconds a row. They are made again when the params' list or dict is another object
    (``validate()``, which ``add_request`` runs, makes new ones: params changed between requests are read anew).
    Token ids are within the vocabulary (``LLMEngine.add_request``). ``bad_words``, which ``add_request`` encodes,
    are looked for at each call, as vLLM does, in each row's output tokens (``seqs``): a word's last token is -inf
    where they end with the rest of it."""

    def __init__(self) -> None:
        self._made: dict[int, _Shaping] = {}

    def _tensors(self, made: dict[int, _Shaping], p: SamplingParams, device: torch.device) -> _Shaping:
        entry = made.get(id(p))
        if (entry is None or entry.params is not p or entry.allowed_from is not p.allowed_token_ids
                or entry.bias_from is not p.logit_bias or entry.bad_from is not p._bad_words_token_ids
                or entry.device != device):
            allowed = sorted(set(p.allowed_token_ids)) if p.allowed_token_ids is not None else []
            bias = sorted((p.logit_bias or {}).items())
            ids, cols = upload([allowed, [t for t, _ in bias]], torch.int64, device)
            (vals,) = upload([[b for _, b in bias]], torch.float32, device)
            if p.bad_words is not None and p._bad_words_token_ids is None:
                raise ValueError("bad_words have no token ids: LLMEngine.add_request finds them")
            bad = BadWords(p._bad_words_token_ids) if p.bad_words is not None and p._bad_words_token_ids else None
            entry = _Shaping(p, p.allowed_token_ids, p.logit_bias, p._bad_words_token_ids, device,
                             ids if allowed else None, cols if bias else None, vals if bias else None, bad)
        self._made[id(p)] = entry
        return entry

    def __call__(self, scores: torch.Tensor, params: list[SamplingParams], seqs: list[Sequence]) -> None:
        made, self._made = self._made, {}
        device = scores.device
        allowed, biased, banned = [], [], []
        for row, p in enumerate(params):
            if p.allowed_token_ids is None and not p.logit_bias and p.bad_words is None:
                continue
            entry = self._tensors(made, p, device)
            if entry.allowed is not None:
                allowed.append((row, entry.allowed))
            if entry.bias_ids is not None:
                biased.append((row, entry.bias_ids, entry.bias))
            if entry.bad is not None:
                banned += [(row, t) for t in entry.bad.banned(seqs[row])]
        if allowed:  # the allowed values kept aside, the rows filled with -inf, the values put back
            rows, at = _places(allowed, device)
            kept = scores[at]
            scores.index_fill_(0, rows, -torch.inf)
            scores[at] = kept
        if biased:  # each (row, token) once (a row is one request's, its keys unique): no accumulating put
            _, at = _places([(row, cols) for row, cols, _ in biased], device)
            scores[at] = scores[at] + torch.cat([vals for _, _, vals in biased]).to(scores.dtype)
        if banned:  # token ids within the vocabulary: add_request refuses a word's beyond it
            at = tuple(upload([[r for r, _ in banned], [t for _, t in banned]], torch.int64, device))
            scores.index_put_(at, torch.full((len(banned),), -torch.inf, dtype=scores.dtype, device=device))


def _places(rows_ids: list[tuple[int, torch.Tensor]], device: torch.device,
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The rows, and the (row, token id) places of each row's ids, as index tensors: one upload and a few
    launches however many rows (a tensor per row cost a launch each, hundreds a step at large batches), and no
    wait for the device (the repeat's size is given)."""
    lengths = [ids.numel() for _, ids in rows_ids]
    rows, counts = upload([[row for row, _ in rows_ids], lengths], torch.int64, device)
    at_rows = torch.repeat_interleave(rows, counts, output_size=sum(lengths))
    return rows, (at_rows, torch.cat([ids for _, ids in rows_ids]))


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams]) -> None:
    """In place, on logits (sampling) or log-probs (beam search). Repetition penalty (HF/CTRL style) over prompt +
    output; presence/frequency over output. The token sets are made on the host and nothing here waits for the
    device (``unique``, boolean masks and ``bincount`` would: their output size depends on the data)."""
    vocab = logits.shape[1]
    device = logits.device
    for row, (seq, p) in enumerate(zip(seqs, params)):
        if not p.needs_penalties:
            continue
        if p.repetition_penalty != 1.0:
            (seen,) = upload([sorted({t for t in seq.token_ids if t < vocab})], torch.int64, device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        out_ids = [t for t in seq.output_token_ids if t < vocab]
        if out_ids and (p.presence_penalty or p.frequency_penalty):
            (ids,) = upload([out_ids], torch.int64, device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
            counts.index_add_(0, ids, torch.ones(len(out_ids), dtype=logits.dtype, device=device))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks; returns probabilities."""
    device = logits.device
    vocab = logits.shape[1]
    temps, top_p, min_p = upload([[p.temperature for p in params], [p.top_p for p in params],
                                  [p.min_p for p in params]], torch.float32, device)
    (top_k,) = upload([[p.top_k if p.top_k > 0 else vocab for p in params]], torch.int64, device)
    logits = logits / temps.to(logits.dtype).unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        mask = ranks >= top_k.unsqueeze(1)
        top_p = top_p.to(logits.dtype)
        probs_sorted = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p. Only rows that ask: at top_p = 1 the float32 running
        # sum reaches 1 before the tail and would cut it. The top token is kept by rank, not by its mass: a top_p
        # below float32's smallest value uploads as 0, which every mass reaches, and a row of -inf samples id 0.
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        mask |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1) & (ranks > 0)
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = min_p.to(probs.dtype)
        probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _fill_disallowed(lowest: list[int], ids: list[int], vals: list[float]) -> tuple[list[int], list[float]]:
    """A top-k list that runs into tokens at -inf gets the lowest disallowed ids (``lowest``, ascending): ``topk``
    leaves the order of ties open and it changes with k, the batch's largest ``logprobs``, so a row's list would
    depend on its batch."""
    finite = [(i, v) for i, v in zip(ids, vals) if v != -math.inf]
    fill = lowest[:len(ids) - len(finite)]
    return [i for i, _ in finite] + fill, [v for _, v in finite] + [-math.inf] * len(fill)


def _lowest_disallowed(raw_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, its ``k`` lowest token ids at -inf, ascending, padded with the vocabulary size: found on the
    device with the step's other results, so that reading them back waits for nothing more (``nonzero`` on a
    row, read back in the next step under async scheduling, waited for that step's forward)."""
    vocab = raw_logits.shape[1]
    cols = torch.arange(vocab, device=raw_logits.device).expand_as(raw_logits)
    return torch.where(torch.isneginf(raw_logits), cols, vocab).topk(k, dim=-1, largest=False).values


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers whose outputs for nearby inputs look unrelated."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_key(seed: int, index: int) -> int:
    """The key of sample ``index`` of a request seeded ``seed`` (distinct samples draw distinct tokens)."""
    return _mix64(_mix64(seed & _MASK64) ^ index)


def draw_key(sample: int, position: int) -> int:
    """The generator seed for output position ``position`` of the sample keyed ``sample`` (63 bits)."""
    return _mix64(sample ^ _mix64(position)) >> 1


class Sampler:
    def __init__(self, seed: int, argmax_logsumexp: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                 = reference.argmax_logsumexp) -> None:
        """``argmax_logsumexp``: the kernel set's (``KernelOps.argmax_logsumexp``) for the logits' device."""
        self.seed = seed
        self.argmax_logsumexp = argmax_logsumexp
        self._generators: dict[torch.device, torch.Generator] = {}
        self._keyed: dict[torch.device, torch.Generator] = {}  # re-seeded for every seeded row it draws
        self.shape_logits = LogitShaping()

    def _engine_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def _keyed_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._keyed:
            self._keyed[device] = torch.Generator(device=device)
        return self._keyed[device]

    @staticmethod
    def seed_sequence(seq: Sequence, params: SamplingParams, device: torch.device) -> None:
        """Sample ``i`` of a seeded request is keyed ``(seed, i)``: reproducible, distinct per sample."""
        if params.seed is None or seq.seed_key is not None:
            return
        seq.seed_key = sample_key(params.seed, seq.index)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams],
                 held: list[list[int]] | None = None) -> list[SampleResult]:
        """Sample one token per row and read the results back at once (:meth:`draw`, then ``results()``)."""
        return self.draw(logits, seqs, params, held).results()

    def draw(self, logits: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams],
             held: list[list[int]] | None = None) -> Drawn:
        """Sample one token per row of ``logits`` ``[R, V]`` (float32) for ``seqs[r]`` under ``params[r]``;
        ``held[r]``: tokens row ``r`` may not draw now (``min_tokens``), None when no row holds any.

        Everything runs on the logits' device and nothing waits for it: the tokens (``Drawn.tokens``) can feed
        the next step's input before the host has seen them, and ``Drawn.results()`` reads them back."""
        # Logprobs are of the raw logits: log_softmax = logits - lse, taken only where asked (the chosen token,
        # and the top-k where requested), not as a [R, V] tensor every step.
        raw_logits = logits
        tokens, lse = self.argmax_logsumexp(logits)
        shaped = any(p.shapes_logits for p in params)
        if shaped or held is not None:
            logits = logits.clone()
            if shaped:
                self.shape_logits(logits, params, seqs)
                apply_penalties(logits, seqs, params)
            if held is not None:
                hold_tokens(logits, held)
            tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            (idx,) = upload([sampled_rows], torch.int64, logits.device)
            sub_params = [params[i] for i in sampled_rows]
            probs = _filter(logits[idx], sub_params)
            noise = torch.empty_like(probs)
            unseeded = [j for j, i in enumerate(sampled_rows) if seqs[i].seed_key is None]
            if unseeded:
                draw = torch.empty((len(unseeded), probs.shape[1]), device=probs.device, dtype=probs.dtype)
                draw.exponential_(generator=self._engine_generator(probs.device))
                noise[upload([unseeded], torch.int64, probs.device)[0]] = draw
            keyed = self._keyed_generator(probs.device) if len(unseeded) < len(sampled_rows) else None
            for j, i in enumerate(sampled_rows):
                seq = seqs[i]
                if keyed is not None and seq.seed_key is not None:
                    # The draw of output position p depends on (seed, sample, p) alone: see the module docstring.
                    keyed.manual_seed(draw_key(seq.seed_key, seq.num_output_tokens))
                    noise[j].exponential_(generator=keyed)
            tokens[idx] = (probs / noise).argmax(dim=-1)
        chosen = raw_logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse
        want_top = [p.logprobs for p in params]
        top_k = max((k for k in want_top if k), default=0)
        # Allowed tokens and bad words can leave a row nothing (all the allowed ones bad after some token): read
        # back with the tokens, so that nothing waits for it here. Bias and penalties never make -inf.
        may_empty = shaped and any(p.allowed_token_ids is not None or p.bad_words is not None for p in params)
        # Only a grammar's mask (written into the raw logits) leaves a row's top-k short of allowed tokens.
        fills = bool(top_k) and any(p.logprobs and p.structured_outputs is not None for p in params)
        copies = [tokens, chosen]
        if top_k:
            top_vals, top_ids = raw_logits.topk(top_k, dim=-1)
            copies += [top_vals - lse.unsqueeze(1), top_ids]
        if fills:
            copies.append(_lowest_disallowed(raw_logits, top_k))
        if may_empty:
            copies.append(torch.isneginf(logits).all(dim=-1))
        return Drawn(tokens, Download(copies), want_top, may_empty, fills)


class Drawn:
    """One step's sampled tokens: ``tokens`` on the device, and their results once read back (``results``)."""

    def __init__(self, tokens: torch.Tensor, download: Download, want_top: list[int | None],
                 may_empty: bool = False, fills: bool = False) -> None:
        self.tokens = tokens
        self._download = download
        # The download: tokens, chosen logprobs, [top-k values and ids], [lowest disallowed ids], [rows left nothing]
        self._may_empty = may_empty  # its last tensor says which rows had nothing left to draw
        self._want_top = want_top
        self._fills = fills  # it holds each row's lowest disallowed ids (_lowest_disallowed)

    def results(self) -> list[SampleResult]:
        """A result per row; waits for the device to reach the step's sampling (not for later work)."""
        host = self._download.wait()
        results = self._results(host, host[0].tolist(), host[1].tolist())
        if self._may_empty:
            for result, none in zip(results, host[-1].tolist()):
                result.excluded = none
        return results

    def _results(self, host: list, token_list: list[int], chosen: list[float]) -> list[SampleResult]:
        if self._want_top.count(None) == len(self._want_top):  # no logprobs asked for: the common case, kept cheap
            return [SampleResult(tok, logprob, None) for tok, logprob in zip(token_list, chosen)]
        top_vals, top_ids = (host[2].tolist(), host[3].tolist()) if any(self._want_top) else (None, None)
        lowest = host[4].tolist() if self._fills else None
        results = []
        for r, tok in enumerate(token_list):
            top = None
            k = self._want_top[r]
            if k is not None:
                top = {}
                if k:
                    ids, vals = top_ids[r][:k], top_vals[r][:k]
                    if vals[-1] == -math.inf and lowest is not None:  # filled up with a grammar's disallowed
                        ids, vals = _fill_disallowed(lowest[r], ids, vals)
                    top = dict(zip(ids, vals))
                top[tok] = chosen[r]
            results.append(SampleResult(tok, chosen[r], top))
        return results
