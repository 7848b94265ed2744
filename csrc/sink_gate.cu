// sink_gate on CUDA: window means (two kernels) and the vote (one block).
#include <climits>

#include "common.cuh"

namespace dysink {
namespace {

// Window means: one thread per (h, d) column, kMeanRows tokens per block, so a
// long window spreads over many blocks; chunk partials are summed in a fixed
// order by the second kernel (deterministic, no atomics).
constexpr int kMeanCols = 256;
constexpr int64_t kMeanRows = 128;
constexpr int kFinalThreads = 256;
constexpr int64_t kMaxFinalBlocks = 4096;

// The vote: one block, warps over (b, h) voters.
constexpr int kGateThreads = 512;
constexpr int kGateWarps = kGateThreads / kWarp;
constexpr int64_t kGateSmemBytes = 47 * 1024;
// Vote counts alone: warps over (b, h) voters across the grid.
constexpr int kVoteThreads = 256;

__host__ __device__ inline int64_t gate_smem_ints(int64_t B, int64_t n) {
  return 2 * B * n + B + n;  // votes, rank [B*n]; count [B]; by_rank [n]
}

// partials[t, b, c, col] = sum of x_t[b, s, col] over the tokens s of chunk c that
// are valid (all Sq for t = q, the first k_len[b] for t = k).
// Grid: x = (t * B + b) * col_tiles + tile, y = chunk. Memory: reads q and the
// valid part of k once (coalesced along H*D), writes 2*B*chunks*HD floats.
template <typename T>
__global__ void __launch_bounds__(kMeanCols)
    window_partials_kernel(WindowMeansArgs a, int64_t col_tiles, int64_t chunks) {
  const int64_t tile = blockIdx.x % col_tiles;
  const int64_t tb = blockIdx.x / col_tiles;
  const bool is_k = tb >= a.B;
  const int64_t b = is_k ? tb - a.B : tb;
  const int64_t col = tile * kMeanCols + threadIdx.x;
  if (col >= a.HD) return;
  int64_t len = a.Sq;
  if (is_k) {
    const int64_t kl = load_index(a.k_len, b);
    len = kl < 0 ? 0 : (kl > a.Sk ? a.Sk : kl);
  }
  const T* x = static_cast<const T*>(is_k ? a.k : a.q) +
               b * (is_k ? a.k_stride_b : a.q_stride_b) + col;
  const int64_t stride_s = is_k ? a.k_stride_s : a.q_stride_s;
  const int64_t s0 = blockIdx.y * kMeanRows;
  const int64_t s1 = s0 + kMeanRows < len ? s0 + kMeanRows : len;
  float acc = 0.f;
#pragma unroll 8
  for (int64_t s = s0; s < s1; ++s) acc += to_float(x[s * stride_s]);
  a.partials[(tb * chunks + blockIdx.y) * a.HD + col] = acc;
}

// qbar[b, col] = sum_c partials / Sq (NaN when Sq = 0, as torch's mean);
// kbar[b, col] = sum_c partials / max(k_len[b], 1). Memory: reads the partials once.
__global__ void __launch_bounds__(kFinalThreads)
    window_means_kernel(WindowMeansArgs a, int64_t chunks) {
  const int64_t total = 2 * a.B * a.HD;
  for (int64_t i = blockIdx.x * int64_t{kFinalThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kFinalThreads) {
    const int64_t tb = i / a.HD;
    const int64_t col = i % a.HD;
    const bool is_k = tb >= a.B;
    const int64_t b = is_k ? tb - a.B : tb;
    float sum = 0.f;
    for (int64_t c = 0; c < chunks; ++c) sum += a.partials[(tb * chunks + c) * a.HD + col];
    if (is_k) {
      const int64_t kl = load_index(a.k_len, b);
      a.kbar[b * a.HD + col] = sum / static_cast<float>(kl > 1 ? kl : 1);
    } else {
      a.qbar[b * a.HD + col] = sum / static_cast<float>(a.Sq);
    }
  }
}

template <typename T>
__device__ __forceinline__ float warp_dot(const float* x, const T* y, int64_t D, int lane) {
  float acc = 0.f;
  for (int64_t d = lane; d < D; d += kWarp) acc += x[d] * to_float(y[d]);
  return warp_sum(acc);
}

// One block. Voter (b, h) votes against entry j of sample b when
//   qbar[b,h] . mean_k[slot[b,j], h] > qbar[b,h] . kbar_local[b,h]   (strict),
// votes counted in shared memory by integer atomics (order-free, exact). Then
// ratio = votes / H, or with scope "batch" and equal valid counts, the votes of
// the r-th valid slot of every sample summed / (B*H); kept = -1 where ratio > tau.
// Memory: reads qbar, kbar once and the chosen slots' mean keys once per voter
// head; writes 2*B*n outputs. Latency-bound: one launch, four barriers.
template <typename TM>
__global__ void __launch_bounds__(kGateThreads) gate_kernel(GateArgs a) {
  extern __shared__ int gate_smem[];
  __shared__ int s_uniform;
  const int64_t Bn = a.B * a.n;
  int* votes = gate_smem;
  int* rank = votes + Bn;
  int* count = rank + Bn;
  int* by_rank = count + a.B;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  for (int64_t i = threadIdx.x; i < gate_smem_ints(a.B, a.n); i += kGateThreads) gate_smem[i] = 0;
  __syncthreads();

  const TM* mean_k = static_cast<const TM*>(a.slot_mean_k);
  for (int64_t item = warp; item < a.B * a.H; item += kGateWarps) {
    const int64_t b = item / a.H;
    const int64_t h = item % a.H;
    const float* qv = a.qbar + item * a.D;
    const float s_local = warp_dot(qv, a.kbar_local + item * a.D, a.D, lane);
    for (int64_t j = 0; j < a.n; ++j) {
      const int64_t s = load_index(a.slot_idx, b * a.n + j);
      if (s < 0) continue;
      // A slot past the pool (only P = 0 passes the checks) has a zero mean key.
      const float s_entry = s < a.P ? warp_dot(qv, mean_k + (s * a.H + h) * a.D, a.D, lane) : 0.f;
      if (lane == 0 && s_entry > s_local) atomicAdd(&votes[b * a.n + j], 1);
    }
  }

  for (int64_t i = threadIdx.x; i < Bn; i += kGateThreads) {
    const int64_t b = i / a.n;
    const int64_t j = i % a.n;
    if (load_index(a.slot_idx, i) < 0) {
      rank[i] = -1;
      continue;
    }
    int r = 0;
    for (int64_t jj = 0; jj < j; ++jj) r += load_index(a.slot_idx, b * a.n + jj) >= 0;
    rank[i] = r;
    atomicAdd(&count[b], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int uniform = 1;
    for (int64_t b = 1; b < a.B; ++b) uniform &= count[b] == count[0];
    s_uniform = uniform;
  }
  __syncthreads();
  const bool together = a.batch_scope && s_uniform;
  if (together) {
    for (int64_t i = threadIdx.x; i < Bn; i += kGateThreads) {
      if (rank[i] >= 0) atomicAdd(&by_rank[rank[i]], votes[i]);
    }
  }
  __syncthreads();

  // votes * (1 / voters) and a float compare with tau: torch on CUDA divides a tensor
  // by a scalar through its float reciprocal, so the ratios match the naive op on the
  // same device bit for bit (and tau decisions at equality with them).
  const float inv_voters = 1.0f / static_cast<float>(together ? a.B * a.H : a.H);
  for (int64_t i = threadIdx.x; i < Bn; i += kGateThreads) {
    const int64_t s = load_index(a.slot_idx, i);
    float ratio = 0.f;
    if (rank[i] >= 0) {
      ratio = static_cast<float>(together ? by_rank[rank[i]] : votes[i]) * inv_voters;
    }
    a.ratio[i] = ratio;
    store_index(a.kept, i, ratio > a.tau ? -1 : s);
  }
}

// Vote counts alone, for head parallelism (the ranks add them up before deciding):
// warp per voter (b, h) over the grid; votes[b, j] += 1 when
//   qbar[b,h] . mean_k[slot[b,j], h] > qbar[b,h] . kbar_local[b,h]   (strict),
// by float atomics on a zeroed output (adding ones is exact and order-free below
// 2^24). Memory: reads qbar, kbar once and the listed slots' mean keys once per
// voter; writes B*n counts.
template <typename TM>
__global__ void __launch_bounds__(kVoteThreads) gate_votes_kernel(VoteArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t item = (blockIdx.x * int64_t{kVoteThreads} + threadIdx.x) / kWarp;
  if (item >= a.B * a.H) return;
  const int64_t b = item / a.H;
  const int64_t h = item % a.H;
  const TM* mean_k = static_cast<const TM*>(a.slot_mean_k);
  const float* qv = a.qbar + item * a.D;
  const float s_local = warp_dot(qv, a.kbar_local + item * a.D, a.D, lane);
  for (int64_t j = 0; j < a.n; ++j) {
    const int64_t s = load_index(a.slot_idx, b * a.n + j);
    if (s < 0) continue;
    const float s_entry = s < a.P ? warp_dot(qv, mean_k + (s * a.H + h) * a.D, a.D, lane) : 0.f;
    if (lane == 0 && s_entry > s_local) atomicAdd(&a.votes[b * a.n + j], 1.f);
  }
}

}  // namespace

cudaError_t launch_gate_votes(const VoteArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.n == 0 || a.H == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(a.B * a.H * kWarp, kVoteThreads);
  dispatch_float(a.mean_type, [&](auto tag) {
    using TM = typename decltype(tag)::type;
    gate_votes_kernel<TM><<<static_cast<unsigned>(blocks), kVoteThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

int64_t window_means_workspace_floats(int64_t B, int64_t Sq, int64_t Sk, int64_t HD) {
  const int64_t chunks = ceil_div(Sq > Sk ? Sq : Sk, kMeanRows);
  return 2 * B * chunks * HD;
}

cudaError_t launch_window_means(const WindowMeansArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.HD == 0) return cudaSuccess;
  const int64_t chunks = ceil_div(a.Sq > a.Sk ? a.Sq : a.Sk, kMeanRows);
  if (chunks > 0) {
    const int64_t col_tiles = ceil_div(a.HD, kMeanCols);
    const dim3 grid(static_cast<unsigned>(2 * a.B * col_tiles), static_cast<unsigned>(chunks));
    dispatch_float(a.type, [&](auto tag) {
      using T = typename decltype(tag)::type;
      window_partials_kernel<T><<<grid, kMeanCols, 0, stream>>>(a, col_tiles, chunks);
    });
  }
  const int64_t blocks = ceil_div(2 * a.B * a.HD, kFinalThreads);
  window_means_kernel<<<static_cast<unsigned>(blocks < kMaxFinalBlocks ? blocks : kMaxFinalBlocks),
                        kFinalThreads, 0, stream>>>(a, chunks);
  return cudaGetLastError();
}

bool gate_from_means_fits(int64_t B, int64_t n) {
  return gate_smem_ints(B, n) * 4 <= kGateSmemBytes;
}

cudaError_t launch_gate_from_means(const GateArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.n == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(gate_smem_ints(a.B, a.n)) * 4;
  dispatch_float(a.mean_type, [&](auto tag) {
    using TM = typename decltype(tag)::type;
    gate_kernel<TM><<<1, kGateThreads, smem, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace dysink
