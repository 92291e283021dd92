// y [M, N] = x [M, K] @ W^T (+ bias) from W packed in column panels, any M, fp32 or bf16: the CPU's linear layers
// but where bf16 has dot products (amx_linear.cpp, oneDNN).
//
// Layout ("panel", kernels/cpu_extension.py packs it): W [N, K] as [P, K, 16], P = ceil(N / 16); panel p holds
// columns 16p .. 16p + 15 (zeros past N), and for each k their 16 weights side by side. A panel is one contiguous
// stream, read front to back: the hardware prefetcher follows it, where the transposed layout
// (small_batch_linear.cpp) walks K with a stride of N and needs software prefetches that stall when the misses
// queue up (docs/benchmarks.md).
//
// The tile is 6 rows x 16 columns with AVX2 (12 accumulators, 2 weight vectors and a broadcast, 15 of 16
// registers; the micro-kernel of BLIS's and oneDNN's AVX2 GEMMs) and 6 rows x 64 columns, four panels, with
// AVX-512 (24 of 32 registers accumulate). Each thread owns whole panels (kernel_threads.h) and walks them front to
// back in blocks of kKBlock k (in L1); every row tile of x passes over a block once, so a decode step reads each
// weight once from memory, and a prefill reuses it from L1 for the up to kMBlock rows it runs at a time. y holds
// the partial sums between blocks.
// At one or two rows a tile has too few FMA chains to hide the FMA latency; it spans twice the panels there.
//
// Arithmetic: fp32 products summed over k in order, one FMA chain per output: equal to F.linear within fp32
// summation order, and the same for every M and thread count (a row's sums never depend on the other rows).
// bf16 (x, W, bias and y all bf16): weights widened to fp32 in registers (exact), x and the bias widened once, y
// rounded to bf16 once at the end (round to nearest even), as torch's bf16 matmul does.

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include "cpu_ops.h"
#include "kernel_threads.h"
#include "widening_vectors.h"

namespace {

constexpr int kPanel = 16;  // columns of a panel: the layout, whatever the vector width
// A tile: kRowTile rows x kTilePanels panels in registers. At one or two rows a tile that narrow would leave too
// few independent FMA chains to hide the FMA latency; there it spans kFewRowsPanels panels.
#ifdef __AVX512F__
constexpr int kLanes = 16;          // one zmm: a panel's row of 16 weights is one vector
constexpr int kTilePanels = 4;      // 6 x 4 accumulators + 4 weight vectors + a broadcast: 29 of 32 registers
constexpr int64_t kKBlock = 128;    // k of a block: 128 x 4 panels x 64 B = 32 KB of fp32 weights, in L1
#else
constexpr int kLanes = 8;           // one ymm: a panel's row is two vectors
constexpr int kTilePanels = 1;      // 6 x 2 accumulators + 2 weight vectors + a broadcast: 15 of 16 registers
constexpr int64_t kKBlock = 256;    // 256 x 64 B = 16 KB of fp32 weights, in L1
#endif
constexpr int kVecs = kPanel / kLanes;
constexpr int kRowTile = 6;
constexpr int kFewRows = 2;
constexpr int kFewRowsPanels = 2 * kTilePanels;
// Rows of x that pass over a thread's panels together: at most 48 x K fp32, which stays in L2 while the panels
// stream past (a decode step of up to 48 sequences is one such block).
constexpr int64_t kMBlock = 48;

using Vec = widening::Vectors<kLanes>;
using vecw = Vec::vec;

// What a tile starts from: the bias (or zeros) in the first k-block, else the partial sums in y; ``cols`` of 16
// valid.
inline void start(vecw (&acc)[kVecs], const float* y, const float* bias, bool first, int cols) {
  const float* from = first ? bias : y;
  if (from != nullptr && cols == kPanel) {
    for (int v = 0; v < kVecs; ++v) acc[v] = Vec::load(from + v * kLanes);
    return;
  }
  float s[kPanel] = {};
  if (from != nullptr) std::memcpy(s, from, cols * sizeof(float));
  for (int v = 0; v < kVecs; ++v) acc[v] = Vec::load(s + v * kLanes);
}
inline void finish(float* y, const vecw (&acc)[kVecs], int cols) {
  if (cols == kPanel) {
    for (int v = 0; v < kVecs; ++v) Vec::store(y + v * kLanes, acc[v]);
    return;
  }
  float s[kPanel];
  for (int v = 0; v < kVecs; ++v) Vec::store(s + v * kLanes, acc[v]);
  std::memcpy(y, s, cols * sizeof(float));
}

// Rows [0, R) x panels [0, NP) of y over one k-block of ``kn`` k: ``x`` and ``wp`` point at the block's first k
// (x's rows ``ldx`` apart, the panels ``ldp`` elements apart); ``first``: the block starts the sums;
// ``cols[j]``: valid columns of panel j (16 but in the last panel).
template <int R, int NP, typename w_t>
inline void tile(float* y, int64_t ldy, const float* x, int64_t ldx, const w_t* wp, int64_t ldp, const float* bias,
                 const int* cols, bool first, int64_t kn) {
  vecw acc[R][NP][kVecs];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NP; ++j) {
      start(acc[r][j], y + r * ldy + j * kPanel, bias ? bias + j * kPanel : nullptr, first, cols[j]);
    }
  }
  for (int64_t k = 0; k < kn; ++k) {
    vecw w[NP][kVecs];
    for (int j = 0; j < NP; ++j) {
      for (int v = 0; v < kVecs; ++v) w[j][v] = Vec::load(wp + j * ldp + k * kPanel + v * kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      for (int j = 0; j < NP; ++j) {
        for (int v = 0; v < kVecs; ++v) acc[r][j][v] += xv * w[j][v];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NP; ++j) finish(y + r * ldy + j * kPanel, acc[r][j], cols[j]);
  }
}

// A tile of ``rows`` (1 .. kRowTile; at most kFewRows where NP > kTilePanels) x ``np`` (1 .. NP) panels.
template <int NP, typename w_t>
inline void tile_any(int np, int64_t rows, float* y, int64_t ldy, const float* x, int64_t ldx, const w_t* wp,
                     int64_t ldp, const float* bias, const int* cols, bool first, int64_t kn) {
  if constexpr (NP > 1) {
    if (np < NP) return tile_any<NP - 1, w_t>(np, rows, y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
  }
  switch (rows) {
    case 1: return tile<1, NP, w_t>(y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
    case 2: return tile<2, NP, w_t>(y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
    default: break;
  }
  if constexpr (NP <= kTilePanels) {
    switch (rows) {
      case 3: return tile<3, NP, w_t>(y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
      case 4: return tile<4, NP, w_t>(y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
      case 5: return tile<5, NP, w_t>(y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
      case 6: return tile<6, NP, w_t>(y, ldy, x, ldx, wp, ldp, bias, cols, first, kn);
      default: break;
    }
  }
  TORCH_CHECK(false, "panel_linear: bad tile of ", rows, " rows and ", NP, " panels");
}

// Panels [p0, p1) of y, kTilePanels at a time (kFewRowsPanels at one or two rows).
// bf16 weights are widened in registers, except where more than two row tiles pass over a block: there the block
// is widened once into an fp32 copy (in L1) that the tiles then read.
template <typename w_t>
void panel_range(float* y, const float* x, const w_t* wp, const float* bias, int64_t M, int64_t K, int64_t N,
                 int64_t p0, int64_t p1) {
  constexpr bool kWiden = !std::is_same_v<w_t, float>;
  constexpr int64_t kWideLd = kKBlock * kPanel;  // panel stride of the widened copy
  const int64_t ldp = K * kPanel;
  const int group = M <= kFewRows ? kFewRowsPanels : kTilePanels;
  float wide[kWiden ? kTilePanels * kWideLd : 1];
  for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
    const int64_t m1 = std::min(M, m0 + kMBlock);
    const bool widen_block = kWiden && m1 - m0 > 2 * kRowTile;
    for (int64_t p = p0; p < p1;) {
      const int np = static_cast<int>(std::min<int64_t>(group, p1 - p));
      int cols[kFewRowsPanels];
      for (int j = 0; j < np; ++j) cols[j] = static_cast<int>(std::min<int64_t>(kPanel, N - (p + j) * kPanel));
      const float* b = bias ? bias + p * kPanel : nullptr;
      for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
        const int64_t kn = std::min(K - k0, kKBlock);
        const w_t* w = wp + p * ldp + k0 * kPanel;
        if (widen_block) {
          for (int j = 0; j < np; ++j) {
            for (int64_t i = 0; i < kn * kPanel; i += kLanes) Vec::store(wide + j * kWideLd + i, Vec::load(w + j * ldp + i));
          }
        }
        for (int64_t m = m0; m < m1; m += kRowTile) {
          const int64_t rows = std::min<int64_t>(kRowTile, m1 - m);
          float* yt = y + m * N + p * kPanel;
          const float* xt = x + m * K + k0;
          if (widen_block) {
            tile_any<kTilePanels>(np, rows, yt, N, xt, K, static_cast<const float*>(wide), kWideLd, b, cols, k0 == 0, kn);
          } else {
            tile_any<kFewRowsPanels>(np, rows, yt, N, xt, K, w, ldp, b, cols, k0 == 0, kn);
          }
        }
      }
      p += np;
    }
  }
}

}  // namespace

// Entry points (cpu_ops.h).
namespace cpu_ops {

void panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kPanel && x.size(1) == packed.size(1),
              "panel_linear: x must be [M, K] and the packed weight [P, K, 16]");
  const at::ScalarType dtype = packed.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype && out.scalar_type() == dtype,
              "panel_linear: x, the weight and out must all be fp32 or all bf16");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == x.size(0),
              "panel_linear: x, the weight and out must be contiguous, out [M, N]");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = packed.size(0);
  TORCH_CHECK(N > (P - 1) * kPanel && N <= P * kPanel, "panel_linear: out has ", N, " columns, the weight ", P,
              " panels of 16");
  widening::Fp32Operands ops("panel_linear", out, x, bias);
  if (ops.done) return;
  const bool fp32 = dtype == at::kFloat;
  // A chunk of at least one tile's panels, so that tiles are whole but at a thread's last panels.
  const int64_t grain = M <= kFewRows ? kFewRowsPanels : kTilePanels;
  kernel_threads::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    if (fp32) panel_range(ops.y(), ops.x(), packed.data_ptr<float>(), ops.bias(), M, K, N, p0, p1);
    else panel_range(ops.y(), ops.x(), packed.data_ptr<c10::BFloat16>(), ops.bias(), M, K, N, p0, p1);
  });
  ops.finish();
}

}  // namespace cpu_ops

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("panel_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("panel_linear", &cpu_ops::panel_linear); }
