// bf16 linear layers on AMX: out[M, N] = x[M, K] W^T (+ bias).
//
// A decode step reads every weight once for a few rows of activations, so what counts is how fast the weights
// stream. The weights are stored as AMX B tiles in the order this kernel reads them (engine/cpu_linear.py packs
// them once, at load): W [N, K] as [N / 64][K / 32][4][16][32] bf16, where group g, k-step kb, tile t holds
// columns g * 64 + t * 16 + n (n < 16) and k = kb * 32 + 2p + e at [p][2n + e] (VNNI pairs). A group's four
// tiles of one k-step are 2 KB in a row, so a group streams front to back, and requesting it a few k-steps ahead
// keeps the memory busy. The activations (zero-padded to whole 16-row tiles) stay in the cache.
//
// Up to 48 rows (a decode step) are one chunk per column group: the group's weights are read from memory once.
// Larger batches (prefill) go in blocks of kBlockRows rows, all column groups of one block before the next, so the
// block's activations stay in L2 too, and in chunks of 32 rows: a group's weights, read from memory for the first
// chunk, serve the next ones from L2, and 32 rows take one tile load per product where 48 take 4/3. (At prefill
// sizes this is still slower than oneDNN's blocked GEMM: docs/benchmarks.md.)
//
// Tiles: C accumulators (fp32, 16 rows x 16 columns, stored to the chunk's fp32 sums at the end), A
// (16 rows x 32 k of x), B (one weight tile). Up to 16 rows: four C tiles, one per column tile of the group, fed
// by one A load per k-step. Up to 32 rows: two passes of 2 x 2 C tiles. Up to 48: four passes of 3 x 1. Each
// pass keeps at least three independent accumulator chains.
//
// The products are exact in fp32 and summed in fp32 along k, as oneDNN's AMX kernels do; the result is rounded
// to bf16 once, after the bias (round to nearest even, as torch). Where AMX is missing, amx_linear_supported()
// says no and the weights keep oneDNN's layout.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PAGEDSERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_ops.h"
#include "kernel_threads.h"

namespace {

constexpr int64_t kChunkRows = 48;   // three row tiles: the most one pass over a group's weights accumulates
constexpr int64_t kPrefillChunkRows = 32;  // two row tiles, 2 x 2 accumulators: a tile load per product
constexpr int64_t kBlockRows = 192;  // activations kept in L2 while every column group passes over them
constexpr int64_t kGroupCols = 64;           // four 16-column B tiles
constexpr int64_t kStepK = 32;               // the k of one tile (16 VNNI pairs)
constexpr int64_t kStepElems = 4 * 16 * 32;  // a group's weights of one k-step (2 KB)

#if defined(PAGEDSERVE_AMX)

// Linux hands out AMX state only to a process that asks for it once (oneDNN asks too; asking twice is harmless).
bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool permitted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register as 16 rows of 64 bytes (16 fp32 or 32 bf16).
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// The compiler does not see tile loads and stores as memory accesses: order them with the plain ones around.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

constexpr int64_t kAccRowBytes = kGroupCols * static_cast<int64_t>(sizeof(float));  // acc rows: a group's columns
constexpr int64_t kAccRows16 = 16 * kGroupCols;  // floats from one 16-row tile of acc to the next

// How many k-steps ahead a group's weights are requested.
constexpr int64_t kPrefetchSteps = 8;

inline void prefetch_step(const c10::BFloat16* w, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(w);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// The group kernels: acc (fp32, the group's 64 columns a row) = x's tile rows . every k-step of ``w`` (the packed
// weight's).
//
// Tile rows 0-15: four C tiles, one per column tile, fed by one A load per k-step.
void group_rows16(const c10::BFloat16* x, int64_t x_stride_bytes, const c10::BFloat16* w, int64_t steps, float* acc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < steps; ++kb) {
    const c10::BFloat16* wt = w + kb * kStepElems;
    if (kb + kPrefetchSteps < steps) prefetch_step(wt + kPrefetchSteps * kStepElems, 2048);
    _tile_loadd(4, x + kb * kStepK, x_stride_bytes);
    _tile_loadd(5, wt, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, wt + 512, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, wt + 1024, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, wt + 1536, 64);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, acc, kAccRowBytes);
  _tile_stored(1, acc + 16, kAccRowBytes);
  _tile_stored(2, acc + 32, kAccRowBytes);
  _tile_stored(3, acc + 48, kAccRowBytes);
}

// Tile rows 0-31 in two passes over column tiles (0, 1) and (2, 3).
void group_rows32(const c10::BFloat16* x, int64_t x_stride_bytes, const c10::BFloat16* w, int64_t steps, float* acc) {
  const int64_t x_rows16 = x_stride_bytes / 2 * 16;  // elements to the second row tile
  for (int64_t half = 0; half < 2; ++half) {
    float* c = acc + half * 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < steps; ++kb) {
      const c10::BFloat16* wt = w + kb * kStepElems + half * 1024;
      if (kb + kPrefetchSteps < steps) prefetch_step(wt + kPrefetchSteps * kStepElems, 1024);
      _tile_loadd(5, wt, 64);
      _tile_loadd(6, wt + 512, 64);
      _tile_loadd(4, x + kb * kStepK, x_stride_bytes);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, x + x_rows16 + kb * kStepK, x_stride_bytes);
      _tile_dpbf16ps(2, 7, 5);
      _tile_dpbf16ps(3, 7, 6);
    }
    _tile_stored(0, c, kAccRowBytes);
    _tile_stored(1, c + 16, kAccRowBytes);
    _tile_stored(2, c + kAccRows16, kAccRowBytes);
    _tile_stored(3, c + kAccRows16 + 16, kAccRowBytes);
  }
}

// Tile rows 0-47 in four passes, one per column tile.
void group_rows48(const c10::BFloat16* x, int64_t x_stride_bytes, const c10::BFloat16* w, int64_t steps, float* acc) {
  const int64_t x_rows16 = x_stride_bytes / 2 * 16;
  for (int64_t col = 0; col < 4; ++col) {
    float* c = acc + col * 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t kb = 0; kb < steps; ++kb) {
      const c10::BFloat16* wt = w + kb * kStepElems + col * 512;
      if (kb + kPrefetchSteps < steps) prefetch_step(wt + kPrefetchSteps * kStepElems, 512);
      _tile_loadd(6, wt, 64);
      _tile_loadd(3, x + kb * kStepK, x_stride_bytes);
      _tile_loadd(4, x + x_rows16 + kb * kStepK, x_stride_bytes);
      _tile_loadd(5, x + 2 * x_rows16 + kb * kStepK, x_stride_bytes);
      _tile_dpbf16ps(0, 3, 6);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, c, kAccRowBytes);
    _tile_stored(1, c + kAccRows16, kAccRowBytes);
    _tile_stored(2, c + 2 * kAccRows16, kAccRowBytes);
  }
}

// out[m][n0 + c] = bf16(acc[m * 64 + c] + bias[n0 + c]) for m < M, c < 64 (round to nearest even).
void write_group(const float* acc, int64_t M, const c10::BFloat16* bias, int64_t n0,
                 c10::BFloat16* out, int64_t out_stride) {
  __m512 b[4];
  for (int i = 0; i < 4; ++i) {
    b[i] = bias == nullptr ? _mm512_setzero_ps()
                           : _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                     reinterpret_cast<const __m256i*>(bias + n0 + 16 * i))),
                                 16));
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int i = 0; i < 4; ++i) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + m * kGroupCols + 16 * i), b[i]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * out_stride + n0 + 16 * i),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

#endif  // PAGEDSERVE_AMX

bool amx_linear_supported() {
#if defined(PAGEDSERVE_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

}  // namespace

// Entry points (cpu_ops.h).
namespace cpu_ops {

void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_linear_supported(), "amx_linear needs AMX (AMX-TILE, AMX-BF16) and the kernel's permission to use it");
  TORCH_CHECK(packed.dim() == 5 && packed.size(2) == 4 && packed.size(3) == 16 && packed.size(4) == 32 &&
                  packed.is_contiguous() && packed.scalar_type() == at::kBFloat16,
              "packed must be a contiguous bf16 [N / 64, K / 32, 4, 16, 32] weight");
  const int64_t groups = packed.size(0), steps = packed.size(1), N = groups * kGroupCols, K = steps * kStepK;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "x must be bf16 [M, ", K, "] with contiguous rows");
  const int64_t M = x.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous() &&
                  out.scalar_type() == at::kBFloat16,
              "out must be a contiguous bf16 [M, N]");
  const c10::BFloat16* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() && bias->scalar_type() == at::kBFloat16,
                "bias must be a contiguous bf16 [N]");
    bias_ptr = bias->data_ptr<c10::BFloat16>();
  }
  if (M == 0) return;
#if defined(PAGEDSERVE_AMX)
  // x in whole 16-row tiles, zero rows below M (their products land in accumulator rows nobody reads).
  const int64_t tile_rows = (M + 15) / 16 * 16;
  std::vector<c10::BFloat16> x_tiles(tile_rows * K, c10::BFloat16(0.f));
  const c10::BFloat16* x_ptr = x.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; ++m) std::memcpy(x_tiles.data() + m * K, x_ptr + m * x.stride(0), K * sizeof(c10::BFloat16));
  const c10::BFloat16* w = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* out_ptr = out.data_ptr<c10::BFloat16>();
  const int64_t x_stride_bytes = K * static_cast<int64_t>(sizeof(c10::BFloat16));
  const int64_t chunk_rows = tile_rows > kChunkRows ? kPrefillChunkRows : kChunkRows;
  for (int64_t block = 0; block < tile_rows; block += kBlockRows) {
    const int64_t block_end = std::min(tile_rows, block + kBlockRows), block_rows = block_end - block;
    kernel_threads::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
      configure_tiles();  // tile state is per thread
      std::vector<float> acc(block_rows * kGroupCols);
      for (int64_t g = first; g < last; ++g) {
        const c10::BFloat16* wg = w + g * steps * kStepElems;
        for (int64_t row = block; row < block_end;) {
          const int64_t rows = std::min(chunk_rows, block_end - row);
          const c10::BFloat16* xr = x_tiles.data() + row * K;
          float* c = acc.data() + (row - block) * kGroupCols;
          memory_barrier();
          if (rows == 16) {
            group_rows16(xr, x_stride_bytes, wg, steps, c);
          } else if (rows == 32) {
            group_rows32(xr, x_stride_bytes, wg, steps, c);
          } else {
            group_rows48(xr, x_stride_bytes, wg, steps, c);
          }
          memory_barrier();
          row += rows;
        }
        write_group(acc.data(), std::min(block_rows, M - block), bias_ptr, g * kGroupCols,
                    out_ptr + block * N, N);
      }
      _tile_release();
    });
  }
#endif
}

}  // namespace cpu_ops

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("amx_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("amx_linear_supported() -> bool", &amx_linear_supported);
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("amx_linear", &cpu_ops::amx_linear); }
