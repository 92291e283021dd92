"""How this process launches Triton kernels: compiled or in Triton's interpreter, and with programmatic dependent
launch (PDL) or without.

With PDL (sm_90 and later) a kernel is scheduled as soon as every program of the kernel before it in the stream
has released it (:func:`release_dependents`) or exited, and waits (:func:`wait_for_inputs`) until that kernel
has finished and its writes are visible. What it does before the wait overlaps the previous kernel's tail: its
launch, its index arithmetic, and reads of memory no kernel writes (the linear layers' weights, fetched into L2
by :func:`prefetch_l2`). A decode step is hundreds of short kernels, each paying that ramp.

Rules for a kernel launched with PDL (``tests/test_dependent_launch.py`` checks them in the compiled PTX):
  * Every program waits before it reads or writes a tensor any kernel writes, and before it exits. A kernel's
    completion then implies its predecessor's, so the stream order holds along the whole chain: the kernel after
    it waits only for it.
  * Before the wait only weights (never written while the engine runs) are touched.
  * A kernel releases its dependents once its main work is done, not at its start, so that their prefetches do
    not compete with it for L2 while it streams.

A kernel compiled with ``PDL`` false holds none of this (a constexpr); that is what runs below sm_90, in the
interpreter (which has no grid dependency control) and unless the kernel set asks for PDL.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Decided at import, like Triton's own choice between a compiled and an interpreted kernel.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

PDL_MIN_CAPABILITY = 9  # griddepcontrol is a PTX instruction of sm_90 and later


_LAUNCH_OPTIONS = {pdl: {"PDL": pdl and not INTERPRETED, "launch_pdl": pdl and not INTERPRETED}
                   for pdl in (False, True)}


def pdl_options(pdl: bool) -> dict:
    """The ``PDL`` constexpr and Triton's ``launch_pdl`` option of a launch: both off in the interpreter. One dict
    per choice, made at import (every launch asks; callers unpack it and never change it)."""
    return _LAUNCH_OPTIONS[bool(pdl)]


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under PDL: block until the kernel before this one has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Under PDL: the kernel after this one may be scheduled once every program has called this (or exited)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at ``ptrs`` (a tensor of valid addresses) to be brought into L2; nothing is
    loaded into registers and nothing waits for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


__all__ = ["INTERPRETED", "PDL_MIN_CAPABILITY", "pdl_options", "prefetch_l2", "release_dependents",
           "wait_for_inputs"]
