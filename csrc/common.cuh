// Device helpers shared by the kernels: dtype conversion, index loads, warp sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace dysink {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// F.normalize's eps: x / max(||x||, eps).
constexpr float kNormEps = 1e-12f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// Bytes of an fp8 pool: moved as they are (their "float" value feeds only mean keys
// that the caller replaces).
__device__ __forceinline__ float to_float(uint8_t x) { return static_cast<float>(x); }

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ uint8_t from_float<uint8_t>(float x) {
  return static_cast<uint8_t>(x);
}

__device__ __forceinline__ int64_t load_index(IndexRef r, int64_t i) {
  return r.is64 ? static_cast<const int64_t*>(r.data)[i]
                : static_cast<const int32_t*>(r.data)[i];
}
__device__ __forceinline__ int64_t load_index(MutIndexRef r, int64_t i) {
  return r.is64 ? static_cast<const int64_t*>(r.data)[i]
                : static_cast<const int32_t*>(r.data)[i];
}
__device__ __forceinline__ void store_index(MutIndexRef r, int64_t i, int64_t v) {
  if (r.is64) {
    static_cast<int64_t*>(r.data)[i] = v;
  } else {
    static_cast<int32_t*>(r.data)[i] = static_cast<int32_t>(v);
  }
}

// Butterfly sum: every lane ends with the total, in the same order on every call,
// so equal inputs give bit-equal sums (the gate's strict vote relies on it).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// torch.amax propagates NaN; fmaxf would drop it.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (isnan(a) || isnan(b)) ? quiet_nan() : fmaxf(a, b);
}

// F.normalize's denominator, clamp_min(eps) of the norm, NaN kept as torch does.
__device__ __forceinline__ float norm_denom(float sum_sq) {
  const float n = sqrtf(sum_sq);
  return isnan(n) ? n : fmaxf(n, kNormEps);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the element type named by `t`.
template <typename Fn>
void dispatch_float(FloatType t, Fn&& fn) {
  switch (t) {
    case FloatType::kF32:
      fn(TypeTag<float>{});
      break;
    case FloatType::kF16:
      fn(TypeTag<__half>{});
      break;
    case FloatType::kBF16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dysink
