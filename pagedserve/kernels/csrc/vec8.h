// fp32 lanes as GCC/Clang vector types (eight and sixteen), shared by the CPU kernels (kernels/csrc/*.cpp).
#pragma once

#include <cstdint>
#include <cstring>

// Eight fp32 lanes as a GCC/Clang vector type: one AVX register (two SSE ones where AVX is missing). Written
// out by hand because the compiler's own vectorization of a dot product keeps one accumulator chain and
// prefers 128-bit vectors on some CPUs (-march=native on AMD EPYC picks znver1), which ran at a fraction
// of the rate.
typedef float vec8 __attribute__((vector_size(32)));
inline vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(vec8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

typedef int32_t ivec8 __attribute__((vector_size(32)));

// Sixteen lanes: one AVX-512 register. Only for AVX-512 code: without it GCC lowers the selects and conversions
// of a sixteen-lane vector piece by piece (sampling_ops.cpp ran ten times slower that way on an AVX2 CPU).
typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));

// The lanes of any of these float vectors from p (unaligned).
template <typename V>
inline V load_lanes(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// exp of every lane of a GCC vector of floats V with its int32 twin IV (Cephes' expf: 2^n times a degree-6
// polynomial on [-ln2/2, ln2/2], relative error ~1e-7), for the softmax's exp(score - max) <= 1: one exp per
// score, a cost next to a D-long dot product otherwise. Inputs below -87 give ~1e-38 rather than 0, which weighs
// nothing next to the max's 1.
template <typename V, typename IV>
inline V exp_lanes(V x) {
  const V hi = V{} + 88.3762626647949f, lo = V{} - 87.0f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  V fx = x * 1.44269504088896341f + 0.5f;
  IV n = __builtin_convertvector(fx, IV);
  n += (__builtin_convertvector(n, V) > fx);  // truncation -> floor (true lanes are -1)
  fx = __builtin_convertvector(n, V);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  V y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const IV pow2n_bits = (n + 127) << 23;
  V pow2n;
  std::memcpy(&pow2n, &pow2n_bits, sizeof pow2n);
  return y * pow2n;
}

inline vec8 exp8(vec8 x) { return exp_lanes<vec8, ivec8>(x); }
