"""Compile every Triton kernel for real NVIDIA targets without a GPU (``python -m pagedserve.bench.aot_check``).

The interpreter (``TRITON_INTERPRET=1``) skips most of the compiler's checks (``tl.dot`` shape and dtype
rules, loop-carried types, shared-memory budget), so CI on CPU-only machines compiles the kernels ahead of
time with Triton's bundled ``ptxas`` for sm_80 and sm_90. Must run with ``TRITON_INTERPRET`` unset.

Each kernel is compiled as the JIT specializes it for the tensors it runs on: every pointer 16-byte aligned and
every integer argument it specializes a multiple of 16. Without those hints the compiler can prove no alignment,
cannot stage loads asynchronously and builds a kernel without its software pipeline, whose shared memory (one
stage) says nothing of the budget the real kernel needs (four stages of the linear's tiles: four times as much).
The registers and stack frame of each compiled kernel are printed beside it (from the cubin, where Triton ships
``cuobjdump``).

Kernels that can be launched with programmatic dependent launch (a ``PDL`` constexpr) are compiled for sm_90 a
second time with it on, and their PTX is checked against its rules (:func:`pdl_violations`,
``pagedserve/kernels/triton_launch.py``): a race there would show only now and then, on a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory per block (bytes) available on the targets we care about.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# Instructions a kernel launched with PDL must not run before its first wait: any access to global, shared or
# local memory but the kernel's parameters (``ld.param``) and L2 prefetches, and returning.
_BEFORE_WAIT = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?((?:ld|ldu|st|atom|red|cp|tex|suld|sust)\.(?!param)\S*|ret;|exit;)", re.M)


_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def pdl_violations(ptx: str) -> list[str]:
    """What a kernel compiled for programmatic dependent launch does against its rules (:mod:`.triton_launch`):
    before its first ``griddepcontrol.wait``, an instruction that touches memory or returns, or a branch past the
    wait (a path that skips it: an early exit); or no wait or no release at all. Empty when it keeps them.

    Read in the PTX's textual order, in which the wait's block precedes every block it dominates."""
    body = ptx[ptx.find(".entry"):]
    wait = body.find("griddepcontrol.wait")
    if wait < 0:
        return ["no griddepcontrol.wait"]
    before = body[:wait]
    found = [m[1] for m in _BEFORE_WAIT.finditer(before)]
    labels = set(_LABEL.findall(before))
    found += [f"bra {target} (past the wait)" for target in _BRANCH.findall(before) if target not in labels]
    if "griddepcontrol.launch_dependents" not in body:
        found.append("no griddepcontrol.launch_dependents")
    return found


def _compile(
    fn,
    pointers: dict[str, str],
    constants: dict,
    floats: tuple[str, ...],
    capability: int,
    stages: int,
    extra_options: dict | None = None,
):
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    signature, attrs = {}, {}
    aligned = [["tt.divisibility", 16]]  # what the JIT infers from a 16-byte-aligned pointer or a multiple of 16
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(index,)] = aligned
        else:
            signature[name] = "fp32" if name in floats else "i32"
            if name not in floats and name not in fn.do_not_specialize:
                attrs[(index,)] = aligned
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": 4, "num_stages": stages, **(extra_options or {})}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def resource_usage(cubin: bytes) -> str:
    """Registers and stack frame per thread of a compiled kernel (``cuobjdump``'s resource usage), or "" where
    Triton ships no ``cuobjdump``."""
    import triton  # noqa: PLC0415

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f", {found[1]} registers, stack {found[2]} B" if found else ""


def cases(full: bool):
    """(label, kernel, pointer types, constexprs, float args, num_stages[, extra compile options]) to compile."""
    import triton  # noqa: PLC0415

    from pagedserve.kernels import triton_attention as ta  # noqa: PLC0415
    from pagedserve.kernels import triton_cache as tc  # noqa: PLC0415

    configs = [("bf16", 4, 128, 16), ("fp16", 1, 80, 8), ("bf16", 8, 64, 16)]
    if full:
        configs += [("fp32", 8, 96, 128), ("bf16", 2, 64, 32), ("fp16", 3, 128, 64)]
    for (dt, group, head_dim, block_size), fused in zip(configs, [True, False, True, False, False, True]):
        precision = "ieee" if dt == "fp32" else "tf32"
        stages = 1 if dt == "fp32" else 2
        yield (
            f"decode {dt} group={group} d={head_dim} bs={block_size}{' fused reduce' if fused else ''}",
            ta._decode_kernel,
            {
                "out_ptr": f"*{dt}",
                "part_out_ptr": "*fp32",
                "m_ptr": "*fp32",
                "l_ptr": "*fp32",
                "q_ptr": f"*{dt}",
                "k_cache_ptr": f"*{dt}",
                "v_cache_ptr": f"*{dt}",
                "block_tables_ptr": "*i32",
                "seq_lens_ptr": "*i32",
                "done_ptr": "*i32",
            },
            {
                "GROUP": group,
                "GROUP_PAD": max(16, triton.next_power_of_2(group)),
                "HEAD_DIM": head_dim,
                "D_PAD": max(16, triton.next_power_of_2(head_dim)),
                "BLOCK_SIZE": block_size,
                "TILE": ta.DECODE_TILE,
                "DOT_PRECISION": precision,
                "DOT_UPCAST": False,
                "FUSED_REDUCE": fused,
                "NP_PAD": 64,
            },
            ("qk_scale",),
            2,
        )
        group_pad = triton.next_power_of_2(group)
        yield (
            f"prefill {dt} group={group} d={head_dim} bs={block_size}",
            ta._prefill_kernel,
            {
                "out_ptr": f"*{dt}",
                "q_ptr": f"*{dt}",
                "k_cache_ptr": f"*{dt}",
                "v_cache_ptr": f"*{dt}",
                "cu_seqlens_q_ptr": "*i32",
                "seq_lens_ptr": "*i32",
                "block_tables_ptr": "*i32",
            },
            {
                "GROUP": group,
                "GROUP_PAD": group_pad,
                "BLOCK_Q": max(1, ta.PREFILL_BLOCK_M // group_pad),
                "HEAD_DIM": head_dim,
                "D_PAD": max(16, triton.next_power_of_2(head_dim)),
                "BLOCK_SIZE": block_size,
                "TILE_N": ta.PREFILL_TILE_N,
                "DOT_PRECISION": precision,
                "DOT_UPCAST": False,
            },
            ("qk_scale",),
            stages,
        )
    yield (
        "decode reduce",
        ta._decode_reduce_kernel,
        {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "seq_lens_ptr": "*i32"},
        {"HEAD_DIM": 80, "D_PAD": 128, "NP_PAD": 64, "TILE": ta.DECODE_TILE},
        (),
        2,
    )
    yield (
        "write_kv",
        tc._write_kv_kernel,
        {
            "key_ptr": "*bf16",
            "value_ptr": "*bf16",
            "k_cache_ptr": "*bf16",
            "v_cache_ptr": "*bf16",
            "slot_mapping_ptr": "*i64",
        },
        {"NUM_HEADS": 8, "HEAD_DIM": 80, "H_PAD": 8, "D_PAD": 128, "BLOCK_SIZE": 16},
        (),
        2,
    )
    yield (
        "copy_blocks",
        tc._copy_blocks_kernel,
        {"src_cache_ptr": "*bf16", "dst_cache_ptr": "*bf16", "src_ptr": "*i64", "dst_ptr": "*i64"},
        {"CHUNK": tc.COPY_CHUNK},
        (),
        2,
    )
    yield from _fused_cases(full)
    yield from _linear_cases()


def _linear_cases():
    """The small-M linear contender at the launches ``.ci/gpu-probe`` times (one part, and K split)."""
    from pagedserve.kernels import triton_linear as tl_  # noqa: PLC0415

    for block_n, block_k, split_k, gated in ((64, 128, 1, False), (32, 128, 4, False), (128, 64, 2, True),
                                             (64, 128, 1, True)):
        yield (
            f"linear bf16 block_n={block_n} block_k={block_k} split_k={split_k}{' gate_up_silu' if gated else ''}",
            tl_._linear_kernel,
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "acc_ptr": "*fp32", "done_ptr": "*i32"},
            {"BLOCK_M": 64, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "PRECISION": "tf32",
             "UPCAST": False, "GATED": gated, "EXACT_EXP": True, "LINE": 64, "LINES": max(1, block_k // 64)},
            (),
            4,
            {"enable_fp_fusion": False},
        )


def _fused_cases(full: bool):
    """The element-wise model ops (pagedserve.kernels.triton_fused), with the launch options their wrappers use."""
    import triton  # noqa: PLC0415

    from pagedserve.kernels import triton_fused as tf  # noqa: PLC0415

    no_fma = {"enable_fp_fusion": False}
    dtypes = ["bf16", "fp16", "fp32"] if full else ["bf16"]
    widths = [4096, 80, 16384, 200] if full else [4096, 80]
    for dt in dtypes:
        for width in widths:
            block = triton.next_power_of_2(width)
            warps = {**no_fma, "num_warps": tf._row_warps(block)}
            yield (
                f"rms_norm {dt} n={width}",
                tf._rms_norm_kernel,
                {"out_ptr": f"*{dt}", "x_ptr": f"*{dt}", "weight_ptr": f"*{dt}"},
                {"BLOCK": block},
                ("inv_n", "eps"),
                1,
                warps,
            )
            yield (
                f"add_rms_norm {dt} n={width}",
                tf._add_rms_norm_kernel,
                {
                    "out_ptr": f"*{dt}",
                    "residual_out_ptr": f"*{dt}",
                    "x_ptr": f"*{dt}",
                    "residual_ptr": f"*{dt}",
                    "weight_ptr": f"*{dt}",
                },
                {"BLOCK": block},
                ("inv_n", "eps"),
                1,
                warps,
            )
            yield (
                f"silu_and_mul {dt} i={width}",
                tf._silu_and_mul_kernel,
                {"out_ptr": f"*{dt}", "x_ptr": f"*{dt}"},
                {"BLOCK": min(tf.SILU_BLOCK, block), "EXACT_EXP": True},
                (),
                1,
                no_fma,
            )
        heads = [(32, 8, 128), (12, 2, 80)] + ([(8, 8, 64), (16, 4, 96), (8, 1, 256)] if full else [])
        for (num_q, num_kv, head_dim), write_kv in zip(heads, [False, True, True, False, True]):
            yield (
                f"rotary {dt} hq={num_q} hkv={num_kv} d={head_dim}{' + write_kv' if write_kv else ''}",
                tf._rotary_kernel,
                {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                 "v_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}", "slot_mapping_ptr": "*i64"},
                {
                    "NUM_Q_HEADS": num_q,
                    "NUM_KV_HEADS": num_kv,
                    "HALF": head_dim // 2,
                    "QH_PAD": triton.next_power_of_2(num_q),
                    "KH_PAD": triton.next_power_of_2(num_kv),
                    "HALF_PAD": triton.next_power_of_2(head_dim // 2),
                    "WRITE_KV": write_kv,
                    "BLOCK_SIZE": 16,
                },
                (),
                1,
                no_fma,
            )


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces @triton.jit kernels", file=sys.stderr)
        return 2
    from pagedserve.kernels.triton_launch import PDL_MIN_CAPABILITY  # noqa: PLC0415  (imports triton)

    full = "--full" in argv
    capabilities = [80, 90] if full else [90]
    pdl_capability = PDL_MIN_CAPABILITY * 10  # sm_90: griddepcontrol's first target
    failures = 0
    for label, fn, pointers, constants, floats, stages, *extra in cases(full):
        takes_pdl = "PDL" in fn.arg_names
        for capability, pdl in [(c, False) for c in capabilities] + [(pdl_capability, True)] * takes_pdl:
            start = time.perf_counter()
            name = f"{label}{' pdl' if pdl else ''}"
            options = {**(extra[0] if extra else {}), **({"launch_pdl": True} if pdl else {})}
            try:
                compiled = _compile(fn, pointers, {**constants, **({"PDL": pdl} if takes_pdl else {})}, floats,
                                    capability, stages, options)
            except Exception as exc:  # noqa: BLE001  (report every failing kernel, then fail)
                failures += 1
                print(f"FAIL sm_{capability} {name}: {type(exc).__name__}: {exc}")
                continue
            shared = compiled.metadata.shared
            limit = SHARED_LIMIT[capability]
            problems = [f"shared {shared} B over {limit}"] if shared > limit else []
            if pdl:
                problems += [f"before its wait: {v}" for v in pdl_violations(compiled.asm["ptx"])]
            failures += bool(problems)
            status = "FAIL" if problems else "ok  "
            took = time.perf_counter() - start
            usage = resource_usage(compiled.asm["cubin"])
            why = f" ({'; '.join(problems)})" if problems else ""
            print(f"{status} sm_{capability} {name}: shared {shared} B{usage}, {took:.1f}s{why}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
