"""Beam search equals HF transformers' ``generate(num_beams=W, do_sample=False, ...)``, and sharing is real."""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve.engine import LLM, SamplingParams


def _hf_beams(model, prompt, width, n, max_new, length_penalty, early_stopping, eos=None, min_new=0):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                             max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=early_stopping,
                             pad_token_id=258, eos_token_id=eos if eos is not None else 257, min_new_tokens=min_new)
    seqs = []
    for row in out[:, len(prompt):].tolist():
        # HF pads finished beams; cut after the first EOS.
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        seqs.append(row)
    return seqs


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    import transformers

    return {f: transformers.AutoModelForCausalLM.from_pretrained(tiny_models[f]).eval() for f in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {f: LLM(model=tiny_models[f], device="cpu", block_size=16) for f in ("llama", "qwen2")}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 33])
def test_beam_search_matches_hf(family, width, length, engines, hf_models):
    rng = random.Random(length * 7 + width)
    prompt = [rng.randrange(256) for _ in range(length)]
    llm = engines[family]
    n = min(2, width)
    ours = llm.generate([prompt], SamplingParams(max_tokens=10, beam_width=width, n=n))[0].outputs
    assert [c.token_ids for c in ours] == _hf_beams(hf_models[family], prompt, width, n, 10, 1.0, False)
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]


@pytest.mark.parametrize("length_penalty,early_stopping,min_tokens", [(0.5, True, 0), (2.0, "never", 0),
                                                                        (1.0, False, 0), (2.0, "never", 5)])
def test_beam_search_with_eos_and_stop_rules(length_penalty, early_stopping, min_tokens, tiny_models, hf_models):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    llm = LLM(model=tiny_models["llama"], device="cpu", block_size=8)
    # Make a token the model likes into EOS so hypotheses finish at different lengths.
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    eos = greedy.token_ids[3]
    llm.engine.eos_token_ids = {eos}
    ours = llm.generate([prompt], SamplingParams(max_tokens=12, beam_width=4, n=3, length_penalty=length_penalty,
                                                 early_stopping=early_stopping, min_tokens=min_tokens))[0].outputs
    ref = _hf_beams(hf_models["llama"], prompt, 4, 3, 12, length_penalty, early_stopping, eos=eos, min_new=min_tokens)
    assert [c.token_ids for c in ours] == ref
    assert [c.finish_reason for c in ours] == ["stop" if c.token_ids[-1] == eos else "length" for c in ours]


def test_beam_search_holds_stop_tokens_for_min_tokens_as_hf():
    """``min_tokens`` as HF's min_new_tokens in beam search: the stop tokens set to -inf on the log-probs, not
    renormalised away (they were held on the logits before their log-softmax: other beams, other scores)."""
    import transformers

    from pagedserve.engine.model_source import resolve_model

    model_dir = str(resolve_model("pagedserve-tiny-random"))  # the service tests' model: its beams meet token 103
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    llm = LLM(model=model_dir, device="cpu", block_size=8)
    ours = llm.generate([prompt], SamplingParams(max_tokens=10, beam_width=4, n=3, length_penalty=2.0,
                                                 early_stopping="never", stop_token_ids=[103], min_tokens=5))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), num_beams=4, num_return_sequences=3, do_sample=False, max_new_tokens=10,
            length_penalty=2.0, early_stopping="never", eos_token_id=[257, 103], pad_token_id=258, min_new_tokens=5,
            output_scores=True, return_dict_in_generate=True)
    want = [[t for t in row if t != 258] for row in ref.sequences[:, len(prompt):].tolist()]
    assert [c.token_ids for c in ours[0].outputs] == want


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_beam_and_parallel_sampling_survive_preemption(mode, tiny_models):
    prompts = [[i % 250 + 1] * (10 + 7 * i) for i in range(4)]
    params = [SamplingParams(max_tokens=14, beam_width=3, n=2), SamplingParams(max_tokens=14, n=3, seed=4),
              SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=14, best_of=3, n=1, seed=9)]
    roomy = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
    expected = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)]
    tight = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=30, preemption_mode=mode,
                enable_prefix_caching=False)
    got = [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, params)]
    assert got == expected
    stats = tight.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


def test_beams_share_prompt_blocks(tiny_models):
    """With sharing, W beams over a long prompt hold far fewer blocks than W private copies."""
    prompt = list(range(1, 120))
    shared = LLM(model=tiny_models["llama"], device="cpu", block_size=8)
    private = LLM(model=tiny_models["llama"], device="cpu", block_size=8, share_blocks=False)
    params = SamplingParams(max_tokens=6, beam_width=4)
    a = shared.generate([prompt], params)[0].outputs
    b = private.generate([prompt], params)[0].outputs
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert shared.stats()["peak_used_gpu_blocks"] < private.stats()["peak_used_gpu_blocks"] / 2


def test_unshared_forks_survive_swap_preemption(tiny_models):
    """The no-sharing baseline copies its forks' blocks lazily; swapped back in, those copies must still fit."""
    prompts = [[i % 250 + 1] * (12 + 5 * i) for i in range(4)]
    params = [SamplingParams(max_tokens=12, n=3, seed=i) if i % 2 else SamplingParams(max_tokens=12, beam_width=3)
              for i in range(4)]
    roomy = LLM(model=tiny_models["llama"], device="cpu", block_size=4)
    expected = [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)]
    tight = LLM(model=tiny_models["llama"], device="cpu", block_size=4, num_gpu_blocks=40, preemption_mode="swap",
                enable_prefix_caching=False, share_blocks=False)
    assert [[c.token_ids for c in o.outputs] for o in tight.generate(prompts, params)] == expected
    stats = tight.stats()
    assert stats["num_swap_preemptions"] > 0
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]


class _OutputPenalties:
    """presence/frequency penalties over the generated tokens (OpenAI's semantics) as an HF logits processor,
    which HF's beam search applies to each beam's log-probs, as it does its own repetition penalty."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_len:]):
            counts = torch.bincount(ids, minlength=scores.shape[1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.8}, {"repetition_penalty": 0.7},
                                       {"presence_penalty": 1.5, "frequency_penalty": 0.5}])
def test_beam_search_applies_penalties_as_hf_does(penalties, engines, hf_models):
    """Penalties were ignored by beam search (the beams equal the unpenalised ones): HF applies its logits
    processors to every beam's log-probs, and so does the engine."""
    import transformers

    prompt = [5, 9, 5, 9, 5, 9, 17, 3]
    ours = engines["llama"].generate([prompt], SamplingParams(max_tokens=10, beam_width=3, n=2, **penalties))
    plain = engines["llama"].generate([prompt], SamplingParams(max_tokens=10, beam_width=3, n=2))
    hf_kw = {"repetition_penalty": penalties["repetition_penalty"]} if "repetition_penalty" in penalties else {
        "logits_processor": transformers.LogitsProcessorList(
            [_OutputPenalties(len(prompt), penalties["presence_penalty"], penalties["frequency_penalty"])])}
    with torch.no_grad():
        out = hf_models["llama"].generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=2,
                                          do_sample=False, max_new_tokens=10, pad_token_id=258, eos_token_id=257,
                                          **hf_kw)
    assert [c.token_ids for c in ours[0].outputs] == out[:, len(prompt):].tolist()
    assert [c.token_ids for c in ours[0].outputs] != [c.token_ids for c in plain[0].outputs]


def test_beam_search_returns_logprobs(engines, hf_models):
    """logprobs=k gave None with beam search: each beam token has its k top logprobs plus its own, of the raw
    model distribution at that position (as sampling reports them), equal to HF's log-softmax there."""
    prompt = [11, 22, 33, 44, 55]
    outs = engines["llama"].generate([prompt], SamplingParams(max_tokens=6, beam_width=3, n=3, logprobs=2))
    for c in outs[0].outputs:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        with torch.no_grad():
            logits = hf_models["llama"](torch.tensor([prompt + c.token_ids])).logits[0].float()
        ref = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        for pos, (tok, top) in enumerate(zip(c.token_ids, c.logprobs)):
            best = ref[pos].topk(2).indices.tolist()
            assert set(top) == set(best) | {tok}
            for t, v in top.items():
                assert v == pytest.approx(ref[pos, t].item(), abs=1e-4)
        assert c.cumulative_logprob == pytest.approx(sum(top[t] for t, top in zip(c.token_ids, c.logprobs)),
                                                     abs=1e-3)
    no_lp = engines["llama"].generate([prompt], SamplingParams(max_tokens=6, beam_width=3, n=3))
    assert [c.token_ids for c in no_lp[0].outputs] == [c.token_ids for c in outs[0].outputs]
    assert all(c.logprobs is None for c in no_lp[0].outputs)


def test_beam_search_refuses_stop_strings():
    """Stop strings were silently ignored by beam search; it ends beams on EOS and stop token ids only (as
    vLLM's beam search does), so a stop string is refused naming the field, not dropped."""
    with pytest.raises(ValueError, match="^stop cannot be combined with beam search"):
        SamplingParams(max_tokens=4, beam_width=2, stop=["\n"])
    SamplingParams(max_tokens=4, beam_width=2, stop_token_ids=[7])


def test_beam_search_with_more_stop_tokens_than_beams_as_hf():
    """``stop_token_ids`` end beams as EOS does, so they widen the candidates as HF's EOS ids do (HF's top
    ``max(2, 1 + n_eos) * W``): with the first step's six likeliest tokens as stop ids, every candidate of a
    ``2 * W`` top-k was finished and no beam ran on, where HF keeps its W beams running."""
    import transformers

    from pagedserve.engine.model_source import resolve_model

    model_dir = str(resolve_model("pagedserve-tiny-random"))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        first = hf(torch.tensor([prompt])).logits[0, -1]
    stops = [t for t in torch.topk(first, 8).indices.tolist() if t != 257][:6]
    llm = LLM(model=model_dir, device="cpu", block_size=8)
    ours = llm.generate([prompt], SamplingParams(max_tokens=6, beam_width=2, n=2, stop_token_ids=stops,
                                                 length_penalty=2.0, early_stopping="never"))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), num_beams=2, num_return_sequences=2, do_sample=False,
                          max_new_tokens=6, eos_token_id=[257, *stops], pad_token_id=258, length_penalty=2.0,
                          early_stopping="never")
    want = [[t for t in row if t != 258] for row in ref[:, len(prompt):].tolist()]
    assert [c.token_ids for c in ours[0].outputs] == want
