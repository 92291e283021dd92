"""Beam search inside the engine, with HF transformers' semantics (``_beam_search`` in generation/utils.py).

Each step, the W live beams' next-token log-probs plus their running scores give W x V candidates; the best
``K = max(2, 1 + #eos) * W`` are kept. Candidates that end (EOS, or the length limit) and rank in the top W are
offered to the finished set with score ``sum_logprob / generated_len ** length_penalty``; the best W unfinished
candidates become the next beams. Stopping follows HF's ``early_stopping`` rules (True, False, "never").

Memory: a new beam is a fork of its parent's sequence, so it shares every block of the parent's table (the
partial last block is copied on write when two children of one parent append); beams that are not chosen
release their references at once. The finished hypotheses keep only token ids, no blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pagedserve.engine.sampling_params import SamplingParams

@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens only
    score: float  # length-normalised
    logprob: float  # sum of the log-probs it was ranked by (penalties included), not length-normalised
    hit_eos: bool
    logprobs: list[dict[int, float]] | None = None  # per token, when the request asks for logprobs


@dataclass
class BeamState:
    """Per-request beam bookkeeping. ``scores[i]`` is the running log-prob sum of ``seqs[i]`` of the request."""

    width: int
    params: SamplingParams
    scores: list[float] = field(default_factory=lambda: [0.0])
    finished: list[Hypothesis] = field(default_factory=list)
    improvable: bool = True  # HF's is_early_stop_heuristic_unsatisfied
    done: bool = False

    def _full(self) -> bool:
        return len(self.finished) >= self.width

    def select(self, logprobs: torch.Tensor, beam_tokens: list[list[int]], eos_ids: set[int],
               max_len_hit: bool, history: Callable[[int, int], list[dict[int, float]]] | None = None,
               ) -> list[tuple[int, int, float]]:
        """One beam step over ``logprobs`` ``[num_beams, V]`` (the log-softmax of each live beam, penalised as
        HF's logits processors would; its generated tokens are ``beam_tokens``). ``max_len_hit``: every candidate
        of this step reaches the length limit. ``history(parent, token)``: the per-token logprobs of a candidate,
        kept with it if it finishes (None: not asked for).

        Returns the next beams as ``(parent index, token, running score)``, best first; empty once it is over.
        """
        w, vocab = self.width, logprobs.shape[1]
        scores = torch.tensor(self.scores, dtype=logprobs.dtype, device=logprobs.device)
        acc = (logprobs + scores[:, None]).flatten()
        stop_ids = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else eos_ids)
        # HF's top max(2, 1 + n_eos) * W, its stop ids being its EOS ids: enough candidates that W run on even
        # if every stop id is among the best.
        k = min(max(2, 1 + len(stop_ids)) * w, acc.numel())
        top_vals, top_idx = torch.topk(acc, k)
        parents = (top_idx // vocab).tolist()
        tokens = (top_idx % vocab).tolist()
        vals = top_vals.tolist()
        hits = [max_len_hit or t in stop_ids for t in tokens]
        gen_len = len(beam_tokens[0]) + 1

        # Finished candidates among the top W (HF only finalises those), unless the set can no longer change.
        locked = (self._full() and self.params.early_stopping is True) or not self.improvable
        if not locked:
            self._finalize([(beam_tokens[parents[rank]] + [tokens[rank]], vals[rank], tokens[rank] in stop_ids,
                             history(parents[rank], tokens[rank]) if history else None)
                            for rank in range(min(w, k)) if hits[rank]])

        running = [(p, t, v) for p, t, v, hit in zip(parents, tokens, vals, hits) if not hit][:w]
        # HF keeps W running beams even when fewer are valid, at score -1e9; they can never win, so drop them.
        self.scores = [v for _, _, v in running]
        self._update_improvable(gen_len)
        if not running or all(hits) or not self.improvable or (self._full() and self.params.early_stopping is True):
            self.done = True
            return []
        return running

    def _update_improvable(self, gen_len: int) -> None:
        if not self.improvable or not self.scores or not self._full():
            return
        lp = self.params.length_penalty
        if self.params.early_stopping == "never" and lp > 0.0:
            best_len = self.params.max_tokens
        else:
            best_len = gen_len
        best_possible = self.scores[0] / best_len**lp
        worst_finished = min(h.score for h in self.finished)
        self.improvable = best_possible > worst_finished

    def _finalize(self, candidates: list[tuple[list[int], float, bool, list | None]]) -> None:
        """Add ``(generated tokens, log-prob sum, hit EOS, per-token logprobs)`` candidates to the finished
        hypotheses (scored with the length penalty) and keep the best ``width``."""
        lp = self.params.length_penalty
        for tokens, logprob, hit_eos, logprobs in candidates:
            self.finished.append(Hypothesis(tokens, logprob / max(1, len(tokens)) ** lp, logprob, hit_eos,
                                            logprobs))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.width:]

    def finish_at_length(self, beam_tokens: list[list[int]], beam_logprobs: list[list | None]) -> None:
        """End the search now, as a length limit would: the live beams (generated tokens ``beam_tokens``, scores
        ``self.scores``, per-token logprobs ``beam_logprobs``) compete with the finished hypotheses for the final
        ``width``."""
        self._finalize([(list(tokens), logprob, False, logprobs)
                        for tokens, logprob, logprobs in zip(beam_tokens, self.scores, beam_logprobs)])
        self.done = True

    def best(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]
