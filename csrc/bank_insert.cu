// bank_insert on CUDA: device-side dedup and slot choice, K/V copy, mean keys.
// The pools hold float16/bfloat16/float32 elements or the bytes of an fp8 bank
// (uint8, copied as they are).
//
// Three launches in stream order: choose (reads the bank, writes the metadata of
// the samples that store), copy (K/V rows and per-chunk key sums), means (mean
// keys, then the clock). The choice reads `clock` before the last kernel bumps it.
#include <climits>

#include "common.cuh"

namespace dysink {
namespace {

constexpr int kChooseThreads = 256;
constexpr int kChooseWarps = kChooseThreads / kWarp;
constexpr int kCopyThreads = 256;
// Tokens per copy block: a block of S_e tokens spreads over many blocks; the
// chunks' key sums are added in a fixed order by the means kernel.
constexpr int64_t kCopyRows = 128;
constexpr int kMeanThreads = 256;
constexpr int64_t kMaxMeanBlocks = 4096;
// Widest load: 16 bytes per thread when the layout allows it.
constexpr int kVecBytes = 16;

// One block per sample b, over its region [b*C, (b+1)*C) of the pool:
//   f = feature[b] / max(||feature[b]||, eps)
//   max_cos = max over occupied c of f . slot_feat[c] / max(||slot_feat[c]||, eps)
//   store = f finite and (no entry, or no dedup, or max_cos <= dedup)
//   slot = first free c < limit, else the occupied c with the smallest stamp.
// When storing, writes owner, frame, stamp = clock + b and f; else nothing.
// Memory: reads feature[b] 1 + (#occupied) times (cached), the region's features
// once; writes F + 3 values per storing sample.
template <typename TF>
__global__ void __launch_bounds__(kChooseThreads) insert_choose_kernel(BankInsertArgs a) {
  __shared__ float w_sum[kChooseWarps];
  __shared__ float w_max[kChooseWarps];
  __shared__ int64_t w_stamp[kChooseWarps];
  __shared__ int w_oldest[kChooseWarps];
  // The block-wide flags live in shared memory: held in predicate registers across
  // the loops, ptxas spilled them to local memory.
  __shared__ int s_first_free, s_store, s_finite, s_any_occupied;
  __shared__ float s_denom;
  __shared__ int64_t s_slot;

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const TF* f = static_cast<const TF*>(a.feature) + b * a.F;

  if (threadIdx.x == 0) s_first_free = INT_MAX;
  float ss = 0.f;
  bool finite = true;
  for (int64_t i = threadIdx.x; i < a.F; i += kChooseThreads) {
    const float x = to_float(f[i]);
    ss += x * x;
    finite &= isfinite(x);
  }
  ss = warp_sum(ss);
  if (lane == 0) w_sum[warp] = ss;
  const int all_finite = __syncthreads_and(finite);
  if (threadIdx.x == 0) {
    s_finite = all_finite;
    float total = 0.f;
    for (int w = 0; w < kChooseWarps; ++w) total += w_sum[w];
    s_denom = norm_denom(total);
  }

  // Occupancy, first free slot, oldest entry (smallest stamp, then lowest index).
  bool any_occupied = false;
  int64_t best_stamp = INT64_MAX;
  int best_c = INT_MAX;
  for (int64_t c = threadIdx.x; c < a.C; c += kChooseThreads) {
    const int64_t p = b * a.C + c;
    if (load_index(a.slot_owner, p) >= 0) {
      any_occupied = true;
      const int64_t st = a.slot_stamp[p];
      if (st < best_stamp || (st == best_stamp && c < best_c)) {
        best_stamp = st;
        best_c = static_cast<int>(c);
      }
    } else if (c < a.limit) {
      atomicMin(&s_first_free, static_cast<int>(c));
    }
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const int64_t st = __shfl_xor_sync(kFullMask, best_stamp, o);
    const int c = __shfl_xor_sync(kFullMask, best_c, o);
    if (st < best_stamp || (st == best_stamp && c < best_c)) {
      best_stamp = st;
      best_c = c;
    }
  }
  if (lane == 0) {
    w_stamp[warp] = best_stamp;
    w_oldest[warp] = best_c;
  }
  const int occupied = __syncthreads_or(any_occupied);
  if (threadIdx.x == 0) s_any_occupied = occupied;
  const float denom = s_denom;

  float max_cos = -INFINITY;
  for (int64_t c = warp; c < a.C; c += kChooseWarps) {
    const int64_t p = b * a.C + c;
    if (load_index(a.slot_owner, p) < 0) continue;
    float dot = 0.f, ssq = 0.f;
    for (int64_t i = lane; i < a.F; i += kWarp) {
      const float x = a.slot_feat[p * a.F + i];
      dot += (to_float(f[i]) / denom) * x;
      ssq += x * x;
    }
    dot = warp_sum(dot);
    ssq = warp_sum(ssq);
    max_cos = nan_max(max_cos, dot / norm_denom(ssq));
  }
  if (lane == 0) w_max[warp] = max_cos;
  __syncthreads();

  if (threadIdx.x == 0) {
    float m = -INFINITY;
    int64_t st = INT64_MAX;
    int oldest = INT_MAX;
    for (int w = 0; w < kChooseWarps; ++w) {
      m = nan_max(m, w_max[w]);
      if (w_stamp[w] < st || (w_stamp[w] == st && w_oldest[w] < oldest)) {
        st = w_stamp[w];
        oldest = w_oldest[w];
      }
    }
    // With nothing occupied every stamp is "big" and argmin gives 0.
    if (oldest == INT_MAX) oldest = 0;
    const bool novel = !s_any_occupied || !a.has_dedup || m <= a.dedup;
    const bool store = s_finite && novel;
    const int64_t local = s_first_free != INT_MAX ? s_first_free : oldest;
    const int64_t slot = b * a.C + local;
    a.stored[b] = store;
    a.slot[b] = slot;
    if (store) {
      store_index(a.slot_owner, slot, b);
      store_index(a.slot_frame, slot, load_index(a.frame, 0));
      a.slot_stamp[slot] = *a.clock + b;
    }
    s_store = store;
    s_slot = slot;
  }
  __syncthreads();
  if (s_store) {
    for (int64_t i = threadIdx.x; i < a.F; i += kChooseThreads) {
      a.slot_feat[s_slot * a.F + i] = to_float(f[i]) / denom;
    }
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// pool[l, slot_b, t] = src[l, b, src_pos[t]] for K and V of every storing b, and
// partials[l, b, chunk, col] = sum over the chunk's tokens of float(K).
// Grid: x = (l * B + b) * col_tiles + tile, y = chunk of kCopyRows tokens; VEC
// elements (16 bytes when aligned) per thread. A src_pos outside [0, N) (the
// public boundary rejects it) copies zeros rather than reading out of bounds.
// Memory: reads and writes the block's K and V once (the bandwidth of the op),
// writes L*B*chunks*HD floats of partials.
template <typename T, int VEC>
__global__ void __launch_bounds__(kCopyThreads)
    insert_copy_kernel(BankInsertArgs a, int64_t col_tiles, int64_t chunks) {
  using P = Pack<T, VEC>;
  const int64_t tile = blockIdx.x % col_tiles;
  const int64_t lb = blockIdx.x / col_tiles;
  const int64_t l = lb / a.B;
  const int64_t b = lb % a.B;
  if (!a.stored[b]) return;
  const int64_t col = (tile * kCopyThreads + threadIdx.x) * VEC;
  if (col >= a.HD) return;
  const int64_t slot = a.slot[b];
  const T* src_k = static_cast<const T*>(a.src_k) + l * a.src_k_stride_l + b * a.src_k_stride_b + col;
  const T* src_v = static_cast<const T*>(a.src_v) + l * a.src_v_stride_l + b * a.src_v_stride_b + col;
  const int64_t dst0 = (l * a.P + slot) * a.S_e * a.HD + col;
  T* dst_k = static_cast<T*>(a.pool_k) + dst0;
  T* dst_v = static_cast<T*>(a.pool_v) + dst0;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  const int64_t t0 = blockIdx.y * kCopyRows;
  const int64_t t1 = t0 + kCopyRows < a.S_e ? t0 + kCopyRows : a.S_e;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t pos = load_index(a.src_pos, t * a.src_pos_stride);
    P kx, vx;
    if (pos >= 0 && pos < a.N) {
      kx = *reinterpret_cast<const P*>(src_k + pos * a.src_k_stride_n);
      vx = *reinterpret_cast<const P*>(src_v + pos * a.src_v_stride_n);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) kx.v[i] = vx.v[i] = from_float<T>(0.f);
    }
    *reinterpret_cast<P*>(dst_k + t * a.HD) = kx;
    *reinterpret_cast<P*>(dst_v + t * a.HD) = vx;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += to_float(kx.v[i]);
  }
  float* out = a.partials + (lb * chunks + blockIdx.y) * a.HD + col;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = acc[i];
}

// pool_mean_k[l, slot_b, col] = sum over chunks of partials / S_e for storing b
// (NaN for S_e = 0, as torch's mean); then clock += B. Memory: reads the partials.
__global__ void __launch_bounds__(kMeanThreads) insert_mean_kernel(BankInsertArgs a, int64_t chunks) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.clock += a.B;
  const int64_t total = a.L * a.B * a.HD;
  for (int64_t i = blockIdx.x * int64_t{kMeanThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kMeanThreads) {
    const int64_t lb = i / a.HD;
    const int64_t col = i % a.HD;
    const int64_t b = lb % a.B;
    if (!a.stored[b]) continue;
    float sum = 0.f;
    for (int64_t c = 0; c < chunks; ++c) sum += a.partials[(lb * chunks + c) * a.HD + col];
    const int64_t l = lb / a.B;
    a.pool_mean_k[(l * a.P + a.slot[b]) * a.HD + col] = sum / static_cast<float>(a.S_e);
  }
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, int VEC>
void launch_copy(const BankInsertArgs& a, int64_t chunks, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(a.HD, int64_t{kCopyThreads} * VEC);
  const dim3 grid(static_cast<unsigned>(a.L * a.B * col_tiles), static_cast<unsigned>(chunks));
  insert_copy_kernel<T, VEC><<<grid, kCopyThreads, 0, stream>>>(a, col_tiles, chunks);
}

}  // namespace

int64_t bank_insert_workspace_floats(int64_t L, int64_t B, int64_t S_e, int64_t HD) {
  return L * B * ceil_div(S_e, kCopyRows) * HD;
}

cudaError_t launch_bank_insert(const BankInsertArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  dispatch_float(a.feature_type, [&](auto tag) {
    using TF = typename decltype(tag)::type;
    insert_choose_kernel<TF><<<static_cast<unsigned>(a.B), kChooseThreads, 0, stream>>>(a);
  });
  const int64_t chunks = ceil_div(a.S_e, kCopyRows);
  if (chunks > 0 && a.HD > 0 && a.L > 0) {
    const auto copy = [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kVec = kVecBytes / sizeof(T);
      const int64_t vb = kVecBytes;
      const bool wide = a.HD % kVec == 0 && a.src_k_stride_l % kVec == 0 &&
                        a.src_k_stride_b % kVec == 0 && a.src_k_stride_n % kVec == 0 &&
                        a.src_v_stride_l % kVec == 0 && a.src_v_stride_b % kVec == 0 &&
                        a.src_v_stride_n % kVec == 0 && aligned(a.src_k, vb) &&
                        aligned(a.src_v, vb) && aligned(a.pool_k, vb) && aligned(a.pool_v, vb);
      if (wide) {
        launch_copy<T, kVec>(a, chunks, stream);
      } else {
        launch_copy<T, 1>(a, chunks, stream);
      }
    };
    if (a.kv_bytes) {
      copy(TypeTag<uint8_t>{});
    } else {
      dispatch_float(a.kv_type, copy);
    }
  }
  const int64_t blocks = ceil_div(a.L * a.B * a.HD, kMeanThreads);
  const int64_t grid = blocks < 1 ? 1 : (blocks < kMaxMeanBlocks ? blocks : kMaxMeanBlocks);
  insert_mean_kernel<<<static_cast<unsigned>(grid), kMeanThreads, 0, stream>>>(a, chunks);
  return cudaGetLastError();
}

}  // namespace dysink
