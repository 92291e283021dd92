"""The engine on a CUDA device against HF transformers on the same device (skipped without CUDA).

* fp32: greedy tokens equal HF ``generate`` token for token, for every supported family.
* bf16: the engine (Triton kernels, fused layers, CUDA graphs) and HF round differently, so a greedy path may
  part after a near-tie. The logits are compared instead: at every step the engine's top-k logprobs against
  HF's log-softmax of its raw logits (``output_logits=True``), within a bf16 tolerance, and the tokens up to
  the first step where HF's top-2 logprob gap is within that tolerance (a divergence anywhere else fails).
* CUDA graphs: ``enforce_eager=False`` gives the ``enforce_eager=True`` outputs for batches of mixed prompt
  lengths whose sizes are not powers of two (decode steps padded up the graph ladder).

The helpers take a device, so the bf16 comparison can be exercised on CPU by hand; the tests need CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import ignore_eos_config
from pagedserve.engine import LLM, SamplingParams

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, gpu]

# Llama and Qwen3 (per-head q/k norms): the other families share their code paths and are compared on the CPU.
FAMILIES = ["llama", "qwen3"]
LENGTHS = [1, 15, 16, 17, 33, 47, 64, 100]
MAX_NEW = 16
TOP_K = 5
PAD = 258  # the tiny checkpoints' pad id (tests/conftest.py)
# bf16 keeps 8 significant bits: a logit near 8 is off by up to 0.03 from rounding alone, and the two
# implementations round at different places through the layers. Measured on CPU (reference kernels vs HF bf16,
# these prompts, the four tiny models, 2026-11-22): at most 0.023 in logprob, and 4 of 32 greedy paths parted,
# each at a top-2 gap of 0 to 0.016 (HF's logits are bf16 values, so exact ties happen). On a GPU the Triton
# kernels also round softmax probabilities to bf16, hence the margin.
BF16_TOL = 0.15
FP32_TOL = 1e-3


def _prompts(seed: int = 0, lengths=LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


_HF_CACHE: dict = {}


def hf_generate(model_dir: str, prompt: list[int], max_new: int, dtype: torch.dtype, device: str):
    """HF greedy ``generate`` on ``device``: (new tokens, ``[steps, vocab]`` float32 log-softmax of raw logits).

    EOS is a token like any other, as in the engine's ``ignore_eos`` runs (:func:`conftest.ignore_eos_config`).
    """
    import transformers

    key = (model_dir, dtype, device)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model = _HF_CACHE[key]
    with torch.no_grad():
        config = ignore_eos_config(model, max_new, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
        out = model.generate(torch.tensor([prompt], device=device), generation_config=config)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.log_softmax(torch.stack([s[0] for s in out.logits]).float(), dim=-1).cpu()
    return tokens, logprobs


def compare_with_tolerance(engine_tokens: list[int], engine_logprobs: list[dict[int, float]], ref_tokens: list[int],
                           ref_logprobs: torch.Tensor, tol: float) -> dict:
    """Step by step while both paths share their prefix: every logprob the engine reports is within ``tol`` of
    the reference's, and the tokens agree unless the reference's top-2 logprob gap is within ``tol`` there
    (a near-tie either side may break). Returns what was compared; raises ``AssertionError`` on a mismatch."""
    steps = 0
    max_err = 0.0
    for t, (tok, ref_tok) in enumerate(zip(engine_tokens, ref_tokens)):
        row = ref_logprobs[t]
        for tid, lp in engine_logprobs[t].items():
            err = abs(lp - row[tid].item())
            max_err = max(max_err, err)
            assert err <= tol, f"step {t}: token {tid} logprob {lp:.4f} vs reference {row[tid].item():.4f}"
        steps += 1
        if tok != ref_tok:
            top2 = row.topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap <= tol, f"step {t}: tokens {tok} vs {ref_tok} part with a top-2 gap of {gap:.4f}"
            return {"steps": steps, "diverged_at": t, "max_err": max_err}
    return {"steps": steps, "diverged_at": None, "max_err": max_err}


def engine_outputs(model_dir: str, prompts: list[list[int]], max_new, dtype: str, device: str, **kwargs):
    # Sized for tests: a short graph ladder to capture and a small swap pool.
    kwargs = {"max_num_seqs": 16, "swap_space_gb": 0.05, **kwargs}
    llm = LLM(model=model_dir, device=device, dtype=dtype, **kwargs)
    lens = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=TOP_K) for m in lens]
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_fp32_greedy_equals_hf(family, tiny_models):
    model = tiny_models[family]
    prompts = _prompts()
    got = engine_outputs(model, prompts, MAX_NEW, "float32", "cuda")
    for prompt, (tokens, logprobs) in zip(prompts, got):
        ref_tokens, ref_lp = hf_generate(model, prompt, MAX_NEW, torch.float32, "cuda")
        assert tokens == ref_tokens, f"prompt of {len(prompt)} tokens"
        compare_with_tolerance(tokens, logprobs, ref_tokens, ref_lp, FP32_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_bf16_logits_match_hf(family, tiny_models):
    model = tiny_models[family]
    prompts = _prompts()
    got = engine_outputs(model, prompts, MAX_NEW, "bfloat16", "cuda")
    compared = []
    for prompt, (tokens, logprobs) in zip(prompts, got):
        ref_tokens, ref_lp = hf_generate(model, prompt, MAX_NEW, torch.bfloat16, "cuda")
        compared.append(compare_with_tolerance(tokens, logprobs, ref_tokens, ref_lp, BF16_TOL))
    # Near-ties are rare with these weights: most prompts must agree all the way.
    assert sum(c["diverged_at"] is None for c in compared) >= len(compared) // 2, compared


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gpu_graphs_equal_eager_for_mixed_batches(family, dtype, tiny_models):
    """Batches of 3, 5, 12 and 33 prompts of 1-119 tokens; staggered output lengths make the decode batch
    shrink a sequence at a time, so most steps are padded up the graph ladder (1, 2, 4, 8, 16, ... 48).
    fp32: identical tokens and logprobs within 1e-3. bf16: a padded matmul may round differently, so tokens may
    part only at a near-tie (top-2 gap within ``BF16_TOL``) and logprobs agree within ``BF16_TOL``."""
    model = tiny_models[family]
    rng = random.Random(3)
    for size in (3, 5, 12, 33):
        prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 120))] for _ in range(size)]
        lens = [2 + (i * 7) % 20 for i in range(size)]
        eager = engine_outputs(model, prompts, lens, dtype, "cuda", enforce_eager=True, max_num_seqs=48)
        graphs = engine_outputs(model, prompts, lens, dtype, "cuda", enforce_eager=False, max_num_seqs=48)
        for i, ((e_tok, e_lp), (g_tok, g_lp)) in enumerate(zip(eager, graphs)):
            if dtype == "float32":
                assert g_tok == e_tok, f"batch of {size}, request {i}"
            compare_sparse(g_tok, g_lp, e_tok, e_lp, FP32_TOL if dtype == "float32" else BF16_TOL)


def test_gpu_async_scheduling_equals_synchronous(tiny_models):
    """On the device, where the next step's input really is taken from the device before the host reads it:
    every feature's requests (test_async_scheduling's workload, a pool small enough to swap) get the tokens and
    texts of the synchronous engine, logprobs within fp32 tolerance, and every block comes back."""
    from test_async_scheduling import _run, _workload
    from pagedserve.engine.llm_engine import LLMEngine

    prompts, params = _workload(structured=False)
    finals = {}
    for mode in (False, True):
        engine = LLMEngine(tiny_models["llama"], device="cuda", dtype="float32", block_size=4, max_model_len=96,
                           seed=0, num_gpu_blocks=34, preemption_mode="swap", async_scheduling=mode, max_num_seqs=16)
        assert engine.async_scheduling is mode
        finals[mode], _ = _run(engine, prompts, params)
        assert engine.stats()["num_preemptions"] > 0
        bm = engine.block_manager
        assert (bm.gpu.num_free, bm.cpu.num_free) == (bm.gpu.num_blocks, bm.cpu.num_blocks)
        engine.close()
    for rid, ref in finals[False].items():
        got = finals[True][rid]
        assert [(c.token_ids, c.text, c.finish_reason) for c in got.outputs] == \
            [(c.token_ids, c.text, c.finish_reason) for c in ref.outputs], rid
        for c, r in zip(got.outputs, ref.outputs):
            if r.logprobs is not None:
                compare_sparse(c.token_ids, c.logprobs, r.token_ids, r.logprobs, FP32_TOL)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_async_decode_steps_never_wait_for_the_device(tiny_models, monkeypatch, enforce_eager):
    """With async scheduling the host waits for the device once a step, for the tokens of the step before the one
    it just queued (``Download.wait``); any other synchronizing call (a blocking copy, ``.item()``, ``nonzero``,
    ``unique``) would let the device run dry. torch's sync debug mode raises on those: decode steps of a batch
    with every sampling feature (greedy, temperature, top-k/p, min-p, seeds, penalties, min_tokens, logprobs,
    logit_bias, allowed_token_ids, bad_words) must run without one, with and without CUDA graphs."""
    from pagedserve.engine import device_copy
    from pagedserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(tiny_models["llama"], device="cuda", dtype="float32", enforce_eager=enforce_eager, seed=0,
                       max_num_seqs=16)
    assert engine.async_scheduling
    kinds = [dict(temperature=0), dict(temperature=0.8, top_k=20, top_p=0.9, seed=1), dict(temperature=1.0, min_p=0.1),
             dict(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2, seed=2),
             dict(temperature=0, min_tokens=30, stop_token_ids=[5, 6, 7]), dict(temperature=0.5, logprobs=2),
             dict(temperature=0.8, seed=3, logit_bias={5: 2.0, 9: -1.0}), dict(temperature=0, allowed_token_ids=list(
                 range(5, 60))), dict(temperature=0.9, seed=4, bad_words=["a"], logprobs=1)]
    for i in range(12):
        engine.add_request(f"r{i}", _prompts(i, [5 + 3 * i])[0],
                           SamplingParams(max_tokens=60, ignore_eos=True, **kinds[i % len(kinds)]))
    for _ in range(8):  # prefill, then warm-up decode steps (allocator, kernel compilation, graph buffers)
        engine.step()
    wait = device_copy.Download.wait

    def expected_wait(self):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return wait(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(device_copy.Download, "wait", expected_wait)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(len(r.seqs[0].token_ids) > 20 for r in engine.requests.values())
    engine.close()


def compare_sparse(tokens, logprobs, ref_tokens, ref_logprobs, tol) -> None:
    """``compare_with_tolerance`` against another engine run, which has only its top-k logprobs."""
    for t, (tok, ref_tok) in enumerate(zip(tokens, ref_tokens)):
        a, b = logprobs[t], ref_logprobs[t]
        for k in a.keys() & b.keys():
            assert abs(a[k] - b[k]) <= tol, f"step {t}: token {k} logprob {a[k]:.4f} vs {b[k]:.4f}"
        if tok != ref_tok:
            top2 = sorted(b.values(), reverse=True)[:2]
            assert len(top2) == 2 and top2[0] - top2[1] <= tol, f"step {t}: tokens {tok} vs {ref_tok}"
            return


@pytest.fixture(scope="module")
def model_1b_shape(tmp_path_factory) -> str:
    """The 1B bench model's layer shape (hidden 2048, 32 query / 4 KV heads: head_dim 64, 32000 vocab, 131072
    positions, so captured graphs hold 8192-block tables) with 2 layers instead of 22, random bf16 weights."""
    from pagedserve.bench.common import BENCH_MODELS
    from pagedserve.engine.builtin_model import write_llama

    cfg, vocab = BENCH_MODELS["1b"]
    path = tmp_path_factory.mktemp("llama-1b-shape")
    write_llama(path, seed=0, vocab_size=vocab, dtype=torch.bfloat16, device="cuda", **{**cfg, "num_hidden_layers": 2})
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graphs_equal_eager_on_the_1b_shape(dtype, model_1b_shape):
    """Graph replays vs eager steps at head_dim 64 with max_model_len-wide tables, batches 1, 5 and 16 of 2-300
    token prompts (padded up the ladder as the batch shrinks)."""
    rng = random.Random(4)
    for size in (1, 5, 16):
        prompts = [[rng.randrange(256) for _ in range(rng.randrange(2, 300))] for _ in range(size)]
        lens = [2 + (i * 5) % 12 for i in range(size)]
        eager = engine_outputs(model_1b_shape, prompts, lens, dtype, "cuda", enforce_eager=True)
        graphs = engine_outputs(model_1b_shape, prompts, lens, dtype, "cuda", enforce_eager=False)
        for i, ((e_tok, e_lp), (g_tok, g_lp)) in enumerate(zip(eager, graphs)):
            if dtype == "float32":
                assert g_tok == e_tok, f"batch of {size}, request {i}"
            compare_sparse(g_tok, g_lp, e_tok, e_lp, FP32_TOL if dtype == "float32" else BF16_TOL)


def test_gpu_a_dropped_engine_gives_its_device_memory_back(tiny_models):
    """``del llm`` returns the KV pool, the weights and the captured graphs' memory by reference counting alone
    (tests/test_engine_release.py checks the objects on the CPU). A first engine, dropped, leaves the process's
    one-time allocations (library workspaces) behind, so the second is measured against what the first left."""
    import gc

    def engine():  # a 256 MiB KV pool (4 KiB blocks), graphs captured up to 16, swap on
        return LLM(model=tiny_models["llama"], device="cuda", dtype="bfloat16", max_num_seqs=16, num_gpu_blocks=65536,
                   swap_space_gb=0.05, preemption_mode="swap")

    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 3
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        llm = engine()
        out = llm.generate(_prompts(lengths=[5, 17, 40]), params)
        del llm, out
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        llm = engine()
        out = llm.generate(_prompts(lengths=[5, 17, 40]), params)
        held = torch.cuda.memory_allocated() - before
        assert held >= 256 * 2**20
        del llm, out
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated() - before
        assert left <= 2**20, f"{left / 2**20:.1f} MiB of the engine's {held / 2**20:.0f} MiB still allocated after del"
    finally:
        if was_enabled:
            gc.enable()
