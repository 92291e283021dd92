// The per-layer element-wise ops of the CPU path, each one pass over its rows (the torch reference makes
// several passes and temporaries per op: fp32 copies, squares, halves, a cat).
//
// Semantics are kernels/reference.py's exactly, rounding included: fp32 arithmetic inside, rounded to the
// model dtype where the reference rounds (and so where HF rounds). Only summation order (the RMS mean)
// differs from torch. Inputs are fp32 or bf16; the Python wrappers (kernels/cpu_extension.py) send any other
// dtype, and any layout not described here, to the reference.
//
//   rms_norm       out [R, D] = weight * round(x * rsqrt(mean(x^2) + eps))    x rows may be strided
//   add_rms_norm   residual_out = round(x + residual); out = rms_norm(residual_out)
//   rotary         q [T, Hq, D], k [T, Hkv, D] rotated in place (neox / HF rotate_half), any T and head stride,
//                  cos / sin fp32 [max_positions, D / 2] contiguous, positions int64 [T]
//   silu_and_mul   out [T, I] = round(round(silu(gate)) * up) for x = [gate | up] [T, 2I]
//   write_kv       k_cache / v_cache [NB, BS, Hkv, D] slot s = key / value [T, Hkv, D] row t, for slot s =
//                  slot_mapping[t] >= 0 (negative: a padding row, skipped); key/value rows may be strided
//                  (views of the fused q/k/v projection), each row's heads contiguous; the cache's dtype
//
// Rows are split over the kernels' threads (kernel_threads.h); the inner loops are `omp simd` loops over one row.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_ops.h"
#include "vec8.h"
#include "widening_vectors.h"
#include "kernel_threads.h"

namespace {

// About this many elements per parallel chunk: below it a thread hand-off costs more than the work.
constexpr int64_t kGrainElements = 16384;

inline int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

// fp32 <-> T conversions written as integer lane operations, so `omp simd` loops and vec8 code vectorize them
// (c10::BFloat16's own conversion branches on NaN per element and kept the bf16 loops scalar, at about twice
// the fp32 time). Same results as torch's `.to()`: bf16 rounds to nearest even, NaN stays a quiet NaN. Each
// helper takes one lane (F = float, U = uint32_t) or eight (F = vec8, U = u32x8).
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

// The fp32 value(s) whose top 16 bits are ``bf16`` (bf16 bits widened to 32-bit lanes).
template <typename F, typename U>
inline F from_bf16_bits(U bf16) {
  const U bits = bf16 << 16;
  F f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// bf16 bits (in 32-bit lanes) of ``v`` rounded to nearest even; NaN -> 0x7fc0.
template <typename U, typename F>
inline U to_bf16_bits(F v) {
  U u;
  std::memcpy(&u, &v, sizeof u);
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return v != v ? U{} + 0x7fc0u : rounded;
}

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return from_bf16_bits<float>(static_cast<uint32_t>(v.x)); }
inline void put(float* p, float v) { *p = v; }
inline void put(c10::BFloat16* p, float v) { p->x = static_cast<uint16_t>(to_bf16_bits<uint32_t>(v)); }

// Rounds fp32 lanes (a float or a vec8) to T the way torch's `.to(T)` does (bf16: round to nearest even).
template <typename F>
struct LaneBits {
  using type = uint32_t;
};
template <>
struct LaneBits<vec8> {
  using type = u32x8;
};
#ifdef __AVX512F__
using Lanes16 = widening::Vectors<16>;  // sixteen-lane loads, bf16 widened as it is loaded
template <>
struct LaneBits<vec16> {
  using type = Lanes16::bits;
};
#endif
template <typename T, typename F>
inline F round_to(F v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return from_bf16_bits<F>(to_bf16_bits<typename LaneBits<F>::type>(v));
  } else {
    return v;
  }
}

// The same on eight lanes at once.
inline vec8 load8f(const float* p) { return load8(p); }
inline vec8 load8f(const c10::BFloat16* p) {
  u16x8 half;
  std::memcpy(&half, p, sizeof half);
  return from_bf16_bits<vec8>(__builtin_convertvector(half, u32x8));
}
inline void store8f(float* p, vec8 v) { store8(p, v); }
inline void store8f(c10::BFloat16* p, vec8 v) {
  const u16x8 half = __builtin_convertvector(to_bf16_bits<u32x8>(v), u16x8);
  std::memcpy(p, &half, sizeof half);
}

#ifdef __AVX512F__
// Sixteen lanes where the CPU has AVX-512 (only there: elsewhere GCC would split them piece by piece).
inline void store16f(float* p, vec16 v) { Lanes16::store(p, v); }
inline void store16f(c10::BFloat16* p, vec16 v) {
  const Lanes16::half_bits half = __builtin_convertvector(to_bf16_bits<Lanes16::bits>(v), Lanes16::half_bits);
  std::memcpy(p, &half, sizeof half);
}
#endif

// SiLU's exp(-gate) uses exp_lanes (vec8.h): a scalar libm call per element cost more than the rest of the op.

template <typename T>
inline void norm_row(T* out, const T* x, const T* w, int64_t d, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) {
    const float v = to_f32(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    put(out + i, to_f32(w[i]) * round_to<T>(to_f32(x[i]) * inv));
  }
}

template <typename T>
void rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), d = x.size(1), xs = x.stride(0);
  T* o = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  const float feps = static_cast<float>(eps);
  kernel_threads::parallel_for(0, rows, grain_rows(d), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) norm_row<T>(o + r * d, xp + r * xs, w, d, feps);
  });
}

template <typename T>
void add_rms_norm_impl(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                       const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), d = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  T* o = out.data_ptr<T>();
  T* ro = residual_out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* rp = residual.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  const float feps = static_cast<float>(eps);
  kernel_threads::parallel_for(0, rows, grain_rows(d), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      T* sum = ro + r * d;
      const T* a = xp + r * xs;
      const T* b = rp + r * rs;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) put(sum + i, to_f32(a[i]) + to_f32(b[i]));
      norm_row<T>(o + r * d, sum, w, d, feps);  // the rounded sum, still in cache
    }
  });
}

template <typename T>
inline void rotate_heads(T* base, int64_t heads, int64_t head_stride, int64_t half, const float* c, const float* s) {
  for (int64_t h = 0; h < heads; ++h) {
    T* x = base + h * head_stride;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
      put(x + i, x1 * c[i] - x2 * s[i]);
      put(x + i + half, x2 * c[i] + x1 * s[i]);
    }
  }
}

template <typename T>
void rotary_impl(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                 const at::Tensor& sin) {
  const int64_t tokens = q.size(0), half = cos.size(1), max_pos = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const int64_t hq = q.size(1), hk = k.size(1);
  for (int64_t t = 0; t < tokens; ++t) {  // checked up front: an exception inside parallel_for is costlier
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rotary_embedding: position ", pos[t], " out of range [0, ",
                max_pos, ")");
  }
  kernel_threads::parallel_for(0, tokens, grain_rows((hq + hk) * 2 * half), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      rotate_heads<T>(qp + t * q.stride(0), hq, q.stride(1), half, c, s);
      rotate_heads<T>(kp + t * k.stride(0), hk, k.stride(1), half, c, s);
    }
  });
}

template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = out.size(0), inter = out.size(1), xs = x.stride(0);
  T* o = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  kernel_threads::parallel_for(0, rows, grain_rows(inter), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* gate = xp + r * xs;
      const T* up = gate + inter;
      T* dst = o + r * inter;
      int64_t i = 0;
#ifdef __AVX512F__
      for (; i + 16 <= inter; i += 16) {
        const vec16 g = Lanes16::load(gate + i);
        const vec16 act = g / (1.f + exp_lanes<vec16, ivec16>(-g));
        store16f(dst + i, round_to<T>(act) * Lanes16::load(up + i));
      }
#endif
      for (; i + 8 <= inter; i += 8) {
        const vec8 g = load8f(gate + i);
        const vec8 act = g / (1.f + exp8(-g));
        store8f(dst + i, round_to<T>(act) * load8f(up + i));  // F.silu rounds to the model dtype before the product
      }
      for (; i < inter; ++i) {
        const float g = to_f32(gate[i]);
        put(dst + i, round_to<T>(g / (1.f + std::exp(-g))) * to_f32(up[i]));
      }
    }
  });
}

// One memcpy per token and cache: a row's Hkv * D elements are contiguous on both sides.
template <typename T>
void write_kv_impl(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                   const int64_t* slots) {
  const int64_t tokens = key.size(0), row = key.size(1) * key.size(2);
  const int64_t k_stride = key.stride(0), v_stride = value.stride(0);
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  kernel_threads::parallel_for(0, tokens, grain_rows(2 * row), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      std::memcpy(kc + s * row, k + t * k_stride, row * sizeof(T));
      std::memcpy(vc + s * row, v + t * v_stride, row * sizeof(T));
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

#define PAGEDSERVE_DISPATCH(dtype, op_name, ...)                                                  \
  do {                                                                                             \
    if ((dtype) == at::kFloat) {                                                                   \
      using scalar_t = float;                                                                      \
      __VA_ARGS__;                                                                                 \
    } else if ((dtype) == at::kBFloat16) {                                                         \
      using scalar_t = c10::BFloat16;                                                              \
      __VA_ARGS__;                                                                                 \
    } else {                                                                                       \
      TORCH_CHECK(false, op_name " supports fp32 and bf16, got ", (dtype));                       \
    }                                                                                              \
  } while (0)

}  // namespace

// Entry points (cpu_ops.h).
namespace cpu_ops {

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() && weight.is_contiguous() &&
                  weight.numel() == x.size(1) && out.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              "rms_norm: out / weight do not match x");
  PAGEDSERVE_DISPATCH(x.scalar_type(), "rms_norm", rms_norm_impl<scalar_t>(out, x, weight, eps));
}

void add_rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x, const at::Tensor& residual,
                  const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && out.is_contiguous() && out.sizes() == x.sizes() &&
                  residual_out.is_contiguous() && residual_out.sizes() == x.sizes() && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "add_rms_norm: shapes do not match x");
  for (const auto dtype :
       {out.scalar_type(), residual_out.scalar_type(), residual.scalar_type(), weight.scalar_type()}) {
    TORCH_CHECK(dtype == x.scalar_type(), "add_rms_norm: every tensor must have x's dtype");
  }
  PAGEDSERVE_DISPATCH(x.scalar_type(), "add_rms_norm",
                      add_rms_norm_impl<scalar_t>(out, residual_out, x, residual, weight, eps));
}

void rotary_embedding(const at::Tensor& positions, at::Tensor q, at::Tensor k, const at::Tensor& cos,
                      const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "q and k must be [T, H, D] with contiguous heads");
  TORCH_CHECK(q.size(0) == k.size(0) && positions.numel() == q.size(0) && positions.is_contiguous() &&
                  positions.scalar_type() == at::kLong,
              "rotary_embedding: positions must be int64 [T]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
                  q.size(2) == 2 * cos.size(1) && k.size(2) == q.size(2),
              "rotary_embedding: cos / sin must be fp32 [max_positions, D / 2]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rotary_embedding: q and k must have one dtype");
  PAGEDSERVE_DISPATCH(q.scalar_type(), "rotary_embedding", rotary_impl<scalar_t>(positions, q, k, cos, sin));
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0) && 2 * out.size(1) == x.size(1) &&
                  out.scalar_type() == x.scalar_type(),
              "silu_and_mul: out must be [T, I] of x's dtype for x [T, 2I]");
  PAGEDSERVE_DISPATCH(x.scalar_type(), "silu_and_mul", silu_and_mul_impl<scalar_t>(out, x));
}

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.stride(1) == key.size(2) && value.stride(1) == value.size(2),
              "write_kv: key / value must be [T, Hkv, D] with each row's heads contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == key.size(1) &&
                  k_cache.size(3) == key.size(2),
              "write_kv: caches must be contiguous [NB, BS, Hkv, D] matching key");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: key, value and caches must have one dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.numel() == key.size(0) && slot_mapping.is_contiguous() &&
                  slot_mapping.scalar_type() == at::kLong,
              "write_kv: slot_mapping must be int64 [T]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < key.size(0); ++t) {  // checked before any write: a bad slot never corrupts the pool
    TORCH_CHECK(slots[t] < num_slots, "write_kv: slot ", slots[t], " of token ", t, " is past the cache (",
                num_slots, " slots)");
  }
  PAGEDSERVE_DISPATCH(key.scalar_type(), "write_kv", write_kv_impl<scalar_t>(key, value, k_cache, v_cache, slots));
}

}  // namespace cpu_ops

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def(
      "add_rms_norm(Tensor(a!) out, Tensor(b!) residual_out, Tensor x, Tensor residual, Tensor weight, "
      "float eps) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) {
  m.impl("rms_norm", &cpu_ops::rms_norm);
  m.impl("add_rms_norm", &cpu_ops::add_rms_norm);
  m.impl("rotary_embedding", &cpu_ops::rotary_embedding);
  m.impl("silu_and_mul", &cpu_ops::silu_and_mul);
  m.impl("write_kv", &cpu_ops::write_kv);
}
