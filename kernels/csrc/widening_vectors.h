// Float vectors of L lanes (GCC vector extensions) loaded from fp32 or bf16 memory: how the linear kernels
// (small_batch_linear.cpp, panel_linear.cpp) read weights of either dtype into fp32 registers. A bf16 value widens
// exactly: its 16 bits become the high half of the fp32 value.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

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

}  // namespace widening
