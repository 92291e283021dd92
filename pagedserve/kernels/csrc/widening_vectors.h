// What the linear kernels (small_batch_linear.cpp, panel_linear.cpp) share to compute in fp32 from fp32 or bf16
// operands: float vectors of L lanes (GCC vector extensions) loaded from either dtype, and the operands widened
// once. A bf16 value widens exactly: its 16 bits become the high half of the fp32 value.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

namespace widening {

// The vector types of each width, spelled out: GCC drops a vector_size that depends on a template parameter.
template <int L>
struct Types;
template <>
struct Types<8> {
  typedef float vec __attribute__((vector_size(32)));
  typedef uint16_t half_bits __attribute__((vector_size(16)));
  typedef uint32_t bits __attribute__((vector_size(32)));
};
template <>
struct Types<16> {
  typedef float vec __attribute__((vector_size(64)));
  typedef uint16_t half_bits __attribute__((vector_size(32)));
  typedef uint32_t bits __attribute__((vector_size(64)));
};

template <int L>
struct Vectors {
  using vec = typename Types<L>::vec;
  using half_bits = typename Types<L>::half_bits;
  using bits = typename Types<L>::bits;

  static vec load(const float* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static vec load(const c10::BFloat16* p) {
    half_bits h;
    std::memcpy(&h, p, sizeof h);
    return reinterpret_cast<vec>(__builtin_convertvector(h, bits) << 16);
  }
  static void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
};

// y [M, N] = x [M, K] @ W^T (+ bias) in fp32: x and the bias widened once (bf16: a few rows), y summed in fp32
// and rounded into ``out`` once by finish() (round to nearest even, as torch's bf16 matmul). Checks the bias;
// ``done`` when there is nothing for the kernel to do (no rows or columns; K = 0: ``out`` is the bias, or zeros).
struct Fp32Operands {
  at::Tensor out, x32, b32, y32;
  bool done = false;

  Fp32Operands(const char* op, at::Tensor out_, const at::Tensor& x, const std::optional<at::Tensor>& bias)
      : out(std::move(out_)) {
    const int64_t M = out.size(0), N = out.size(1), K = x.size(1);
    const bool has_bias = bias.has_value() && bias->defined();
    if (has_bias) {
      TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type(), op,
                  ": bias must be [N] of x's dtype");
    }
    if (M == 0 || N == 0 || K == 0) {
      if (has_bias && M > 0) out.copy_(bias->view({1, N}).expand({M, N}));
      else out.zero_();
      done = true;
      return;
    }
    const bool fp32 = x.scalar_type() == at::kFloat;
    x32 = fp32 ? x : x.to(at::kFloat);
    if (has_bias) b32 = fp32 ? *bias : bias->to(at::kFloat);
    y32 = fp32 ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
  }
  const float* x() const { return x32.data_ptr<float>(); }
  const float* bias() const { return b32.defined() ? b32.data_ptr<float>() : nullptr; }
  float* y() { return y32.data_ptr<float>(); }
  void finish() {
    if (!y32.is_same(out)) out.copy_(y32);
  }
};

}  // namespace widening
