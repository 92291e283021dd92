"""Benchmarks of pagedserve, beside the product (``pagedserve bench offline|sharing|kernels|service``).

One module per benchmark, helpers shared once:

* :mod:`.common` - the workload, the bench models, driving an engine, percentiles, option parsing;
* :mod:`.bandwidth` - memory copy bandwidth (the roofline) and pinned host<->device copies;
* :mod:`.offline` - ``bench offline``: engine vs HF throughput, KV utilization, concurrency, profile; it also
  runs :mod:`.decode_roofline` (decode steps vs the memory roofline) and :mod:`.swap_recompute`
  (recompute vs swap per block size);
* :mod:`.sharing` - ``bench sharing``: KV blocks with and without block sharing (``n`` samples, beams);
* :mod:`.kernels` - ``bench kernels``: the Triton kernels against copy bandwidth and contiguous SDPA (CUDA);
* :mod:`.decode_configs` - ``bench decode-configs``: the split decode kernel's launches against each other (CUDA);
* :mod:`.host_work` - ``bench host-work``: the engine's own work per decode step, by output kind and length;
* :mod:`.service` - ``bench service``: the offline workload through Redis to a worker vs in process;
* :mod:`.aot_check` - compile every Triton kernel for sm_80/sm_90 without a GPU.

The engine has no benchmark-only hooks: these modules read it through its public API (``LLM``, ``LLMEngine``,
``stats()``). Results and machines are in docs/benchmarks.md.
"""
