"""Three small kernels for the programmatic-dependent-launch check of ``aot_check`` (tests/test_dependent_launch.py):
one that keeps the rules and two that break them. Run as a script (with ``TRITON_INTERPRET`` unset) it compiles
each for sm_90 with PDL on and prints ``{kernel: violations}`` as JSON."""

import json

import triton
import triton.language as tl

from pagedserve.kernels.triton_launch import release_dependents, wait_for_inputs


@triton.jit
def waits_first(x_ptr, y_ptr, n, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    offs = tl.arange(0, 128)
    x = tl.load(x_ptr + offs, mask=offs < n)
    release_dependents(PDL)
    tl.store(y_ptr + offs, x * 2, mask=offs < n)


@triton.jit
def reads_before_waiting(x_ptr, y_ptr, n, PDL: tl.constexpr):
    offs = tl.arange(0, 128)
    x = tl.load(x_ptr + offs, mask=offs < n)  # may read what the kernel before has not written yet
    wait_for_inputs(PDL)
    release_dependents(PDL)
    tl.store(y_ptr + offs, x * 2, mask=offs < n)


@triton.jit
def exits_before_waiting(x_ptr, y_ptr, n, PDL: tl.constexpr):
    if tl.program_id(0) >= n:  # this program's end no longer implies the kernel before has finished
        return
    wait_for_inputs(PDL)
    offs = tl.arange(0, 128)
    x = tl.load(x_ptr + offs, mask=offs < n)
    release_dependents(PDL)
    tl.store(y_ptr + offs, x * 2, mask=offs < n)


if __name__ == "__main__":
    from pagedserve.bench.aot_check import _compile, pdl_violations

    found = {}
    for kernel in (waits_first, reads_before_waiting, exits_before_waiting):
        compiled = _compile(kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {"PDL": True}, (), 90, 2,
                            {"launch_pdl": True})
        found[kernel.__name__] = pdl_violations(compiled.asm["ptx"])
    print(json.dumps(found))
