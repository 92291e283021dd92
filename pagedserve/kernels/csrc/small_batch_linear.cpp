// y [M, N] = x [M, K] @ W^T (+ bias) for decode-sized M, W [N, K] stored transposed: a weight-streaming
// kernel, fp32 or bf16.
//
// At a few rows a decode step reads every weight once for a few multiply-adds per element, so its linears run
// at the rate memory delivers the weights, not at the FMA peak. This kernel is written for that. The weight is
// stored input-major (the "column" layout: a [N, K] tensor with strides (1, N), i.e. Wt = W^T [K, N]
// contiguous, which MKL also takes as-is for large M). Each thread owns a contiguous range of output columns
// and walks K in blocks; inside a block, a tile of kColTile columns stays in registers for up to kRowTile rows
// while the weight rows stream past once. A software prefetch runs kPrefetchRows rows ahead: each row of a
// tile is a short piece of a long strided walk, which the hardware prefetcher does not follow far enough
// ahead; without it the kernel streamed no faster than oneDNN (docs/benchmarks.md). Further row tiles of the
// same block re-read the block's weights from L1.
//
// Arithmetic: fp32 products summed over k in order, one FMA chain per output; the result equals
// F.linear within fp32 summation order. Rows of x and y are contiguous; bias is optional ([N], x's dtype).
//
// bf16 (x, W, bias and y all bf16) is for CPUs without bf16 dot products (AVX2, AVX-512 before AVX512-BF16),
// where oneDNN emulates bf16 slowly: each weight vector is widened to fp32 in registers as it is loaded (exact:
// a zero-extend and a shift), x and the bias are widened once up front, the sums are fp32 as for fp32 and y is
// rounded to bf16 once at the end (round to nearest even), as torch's bf16 matmul does. The weights stream at
// half the bytes of fp32. Where the CPU has bf16 dot products the caller uses the AMX or oneDNN layouts instead.
// The caller (kernels/cpu_extension.py) sends any M above its threshold elsewhere.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include "kernel_threads.h"
#include "widening_vectors.h"

namespace {

// A tile: kRowTile rows x V vectors of columns, accumulated in registers. Up to kFewRows rows the tile is four
// vectors wide whatever the ISA: at one or two rows, fewer vectors would leave too few independent FMA chains to
// hide the FMA latency.
#ifdef __AVX512F__
constexpr int kLanes = 16;       // one zmm
constexpr int kVecsPerTile = 4;  // 6 x 4 accumulators + 4 weight vectors + a broadcast: 29 of 32 registers
#else
constexpr int kLanes = 8;        // one ymm (two xmm without AVX)
constexpr int kVecsPerTile = 2;  // 6 x 2 accumulators + 2 weight vectors + a broadcast: 15 of 16 registers
#endif
constexpr int kRowTile = 6;
constexpr int kFewRows = 2;
constexpr int kVecsFewRows = 4;  // 2 x 4 accumulators + 4 weight vectors + a broadcast
constexpr int kColTile = kLanes * std::max(kVecsPerTile, kVecsFewRows);  // the columns a thread takes at a time
constexpr int64_t kKBlock = 64;  // rows of Wt per block: at most kKBlock * kColTile * 4 B = 16 KB, in L1
constexpr int64_t kPrefetchRows = 16;  // how far ahead in k the weights are requested

using Vec = widening::Vectors<kLanes>;
using vecw = Vec::vec;

// Rows [0, R) of y's tile of V vectors (columns n.. of y, Wt, bias, passed offset) over k in [k0, k1): the
// first block starts from the bias (or 0), later ones from the partial sums in y.
template <int R, int V, typename w_t>
inline void tile(float* y, int64_t ldy, const float* x, int64_t ldx, const w_t* wt, int64_t ldw, const float* bias,
                 int64_t k0, int64_t k1, int64_t K) {
  vecw acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      acc[r][v] = k0 > 0 ? Vec::load(y + r * ldy + v * kLanes) : (bias ? Vec::load(bias + v * kLanes) : vecw{});
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    const w_t* wk = wt + k * ldw;
    if (k + kPrefetchRows < K) {
      const char* ahead = reinterpret_cast<const char*>(wk + kPrefetchRows * ldw);
      for (int line = 0; line < (V * kLanes * static_cast<int>(sizeof(w_t)) + 63) / 64; ++line) {
        __builtin_prefetch(ahead + 64 * line, 0, 3);
      }
    }
    vecw w[V];
    for (int v = 0; v < V; ++v) w[v] = Vec::load(wk + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xv * w[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) Vec::store(y + r * ldy + v * kLanes, acc[r][v]);
  }
}

template <int V, typename w_t>
inline void tile_rows(int64_t rows, float* y, int64_t ldy, const float* x, int64_t ldx, const w_t* wt,
                      int64_t ldw, const float* bias, int64_t k0, int64_t k1, int64_t K) {
  switch (rows) {  // the remainder of M after full row tiles
    case 1: return tile<1, V, w_t>(y, ldy, x, ldx, wt, ldw, bias, k0, k1, K);
    case 2: return tile<2, V, w_t>(y, ldy, x, ldx, wt, ldw, bias, k0, k1, K);
    case 3: return tile<3, V, w_t>(y, ldy, x, ldx, wt, ldw, bias, k0, k1, K);
    case 4: return tile<4, V, w_t>(y, ldy, x, ldx, wt, ldw, bias, k0, k1, K);
    case 5: return tile<5, V, w_t>(y, ldy, x, ldx, wt, ldw, bias, k0, k1, K);
    case 6: return tile<6, V, w_t>(y, ldy, x, ldx, wt, ldw, bias, k0, k1, K);
    default: TORCH_CHECK(false, "small_batch_linear: bad row tile ", rows);
  }
}

// Columns [n0, n1) of y (the last range may end in a partial tile: one vector at a time, then scalars).
template <int V, typename w_t>
void column_range(float* y, const float* x, const w_t* wt, const float* bias, int64_t M, int64_t K, int64_t N,
                  int64_t n0, int64_t n1) {
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
    int64_t n = n0;
    for (; n + kLanes * V <= n1; n += kLanes * V) {
      for (int64_t m = 0; m < M; m += kRowTile) {
        tile_rows<V>(std::min<int64_t>(kRowTile, M - m), y + m * N + n, N, x + m * K, K, wt + n, N,
                     bias ? bias + n : nullptr, k0, k1, K);
      }
    }
    for (; n + kLanes <= n1; n += kLanes) {
      for (int64_t m = 0; m < M; m += kRowTile) {
        tile_rows<1>(std::min<int64_t>(kRowTile, M - m), y + m * N + n, N, x + m * K, K, wt + n, N,
                     bias ? bias + n : nullptr, k0, k1, K);
      }
    }
    for (; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        float acc = k0 > 0 ? y[m * N + n] : (bias ? bias[n] : 0.f);
        for (int64_t k = k0; k < k1; ++k) acc += x[m * K + k] * static_cast<float>(wt[k * N + n]);
        y[m * N + n] = acc;
      }
    }
  }
}

void small_batch_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_batch_linear: x must be [M, K] and weight [N, K]");
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype && out.scalar_type() == dtype,
              "small_batch_linear: x, weight and out must all be fp32 or all bf16");
  // Strides, not weight.t().is_contiguous(): a transposed view per call cost more than the check is worth.
  TORCH_CHECK((weight.stride(0) == 1 || weight.size(0) == 1) && (weight.stride(1) == weight.size(0) || weight.size(1) == 1),
              "small_batch_linear: weight must be stored transposed (strides (1, N))");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0) &&
                  out.size(1) == weight.size(0),
              "small_batch_linear: x and out must be contiguous, out [M, N]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  widening::Fp32Operands ops("small_batch_linear", out, x, bias);
  if (ops.done) return;
  const bool fp32 = dtype == at::kFloat;
  float* y = ops.y();
  const float* xp = ops.x();
  const float* b = ops.bias();
  const int64_t tiles = (N + kColTile - 1) / kColTile;
  kernel_threads::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kColTile, n1 = std::min(N, t1 * kColTile);
    const bool few = M <= kFewRows;
    if (fp32 && few) column_range<kVecsFewRows>(y, xp, weight.data_ptr<float>(), b, M, K, N, n0, n1);
    else if (fp32) column_range<kVecsPerTile>(y, xp, weight.data_ptr<float>(), b, M, K, N, n0, n1);
    else if (few) column_range<kVecsFewRows>(y, xp, weight.data_ptr<c10::BFloat16>(), b, M, K, N, n0, n1);
    else column_range<kVecsPerTile>(y, xp, weight.data_ptr<c10::BFloat16>(), b, M, K, N, n0, n1);
  });
  ops.finish();
}

// The fp32 lanes of this build's vectors (16 with AVX-512, else 8): which instruction set the build targets.
int64_t small_batch_lanes() { return kLanes; }

}  // namespace

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("small_batch_linear(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias) -> ()");
  m.def("small_batch_lanes() -> int", &small_batch_lanes);
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("small_batch_linear", &small_batch_linear); }
