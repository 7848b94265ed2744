// select_sinks on CUDA: mean-cosine relevance of bank slots and a warp-level top-k.
#include <climits>

#include "common.cuh"

namespace dysink {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / kWarp;
// A sample's scratch goes to shared memory when it fits under the default
// dynamic limit (48 KiB, no opt-in), less the kernel's static shared arrays;
// otherwise to a global workspace, with the same code.
constexpr int64_t kSelectSmemBytes = 47 * 1024;

// Per-sample scratch, in 4-byte words; the int64 array first, for alignment.
struct SelectLayout {
  int64_t chosen_frame;  // int64 [cap]  frames of the chosen slots, in pick order
  int64_t chosen_slot;   // int32 [cap]
  int64_t chosen_score;  // float [cap]
  int64_t row_denom;     // float [M]    max(||q_m||, eps), 0 for an all-zero row
  int64_t qsum;          // float [F]    sum over valid rows of q_m / ||q_m||
  int64_t score;         // float [P]    masked scores, -inf = not a candidate
  int64_t words;         // total, even, so the next sample's int64 array aligns
};

__host__ __device__ inline SelectLayout select_layout(int64_t M, int64_t F, int64_t P,
                                                      int64_t k) {
  const int64_t cap = k < P ? k : P;
  SelectLayout l;
  l.chosen_frame = 0;
  l.chosen_slot = 2 * cap;
  l.chosen_score = l.chosen_slot + cap;
  l.row_denom = l.chosen_score + cap;
  l.qsum = l.row_denom + M;
  l.score = l.qsum + F;
  l.words = (l.score + P + 1) / 2 * 2;
  return l;
}

struct Cand {
  float score;
  int64_t frame;
  int32_t slot;
};

__device__ __forceinline__ Cand no_cand() { return Cand{-INFINITY, INT64_MAX, INT32_MAX}; }

// The ranking of select_sinks_naive: score desc, then frame asc, then slot asc.
__device__ __forceinline__ bool ranks_before(const Cand& a, const Cand& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.frame != b.frame) return a.frame < b.frame;
  return a.slot < b.slot;
}

// Butterfly arg-max: every lane ends with the warp's best candidate.
__device__ __forceinline__ Cand warp_best(Cand c) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const Cand other{__shfl_xor_sync(kFullMask, c.score, o),
                     __shfl_xor_sync(kFullMask, c.frame, o),
                     __shfl_xor_sync(kFullMask, c.slot, o)};
    if (ranks_before(other, c)) c = other;
  }
  return c;
}

// One block per sample b.
//   score[p] = (sum_m q_m/||q_m||) . s_p / ||s_p|| / M_valid   (= mean cosine)
// for the candidates p (owned by b, frame outside [lo, hi) and [0, sink_frames),
// score a number), blended with the usage prior when there is one
// (w_cos * score + w_prior * prior[b, p], each product rounded, as torch), then
// min(k, P) rounds of a block arg-max (warp butterflies,
// then one over the warps' winners), each removing its winner; the winners are
// written ordered by (frame, slot) through a rank count, -1 / -inf padding.
// Memory: reads query_feat[b] twice, slot_feat rows of b's candidates once,
// slot_frame once per round (cached); writes 2k outputs. Latency-bound: one
// launch, 2 barriers per round.
template <typename TQ, typename TS>
__global__ void __launch_bounds__(kSelectThreads) select_sinks_kernel(SelectSinksArgs a) {
  extern __shared__ __align__(16) uint32_t select_smem[];
  __shared__ int s_valid_rows, s_chosen, s_done;
  __shared__ float w_score[kSelectWarps];
  __shared__ int64_t w_frame[kSelectWarps];
  __shared__ int32_t w_slot[kSelectWarps];

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const SelectLayout lay = select_layout(a.M, a.F, a.P, a.k);
  uint32_t* base = a.workspace != nullptr
                       ? reinterpret_cast<uint32_t*>(a.workspace) + b * lay.words
                       : select_smem;
  int64_t* chosen_frame = reinterpret_cast<int64_t*>(base + lay.chosen_frame);
  int32_t* chosen_slot = reinterpret_cast<int32_t*>(base + lay.chosen_slot);
  float* chosen_score = reinterpret_cast<float*>(base + lay.chosen_score);
  float* row_denom = reinterpret_cast<float*>(base + lay.row_denom);
  float* qsum = reinterpret_cast<float*>(base + lay.qsum);
  float* score = reinterpret_cast<float*>(base + lay.score);

  const TQ* q = static_cast<const TQ*>(a.query_feat) + b * a.M * a.F;
  const TS* sf = static_cast<const TS*>(a.slot_feat);

  if (threadIdx.x == 0) {
    s_valid_rows = 0;
    s_chosen = 0;
    s_done = 0;
  }
  __syncthreads();

  // A row that is all zeros is padding; NaN counts as non-zero, as in torch.
  for (int64_t m = warp; m < a.M; m += kSelectWarps) {
    float ss = 0.f;
    bool nonzero = false;
    for (int64_t f = lane; f < a.F; f += kWarp) {
      const float x = to_float(q[m * a.F + f]);
      ss += x * x;
      nonzero |= (x != 0.f);
    }
    ss = warp_sum(ss);
    nonzero = __any_sync(kFullMask, nonzero);
    if (lane == 0) {
      row_denom[m] = nonzero ? norm_denom(ss) : 0.f;
      if (nonzero) atomicAdd(&s_valid_rows, 1);
    }
  }
  __syncthreads();
  const int valid_rows = s_valid_rows;

  for (int64_t f = threadIdx.x; f < a.F; f += kSelectThreads) {
    float acc = 0.f;
    for (int64_t m = 0; m < a.M; ++m) {
      const float d = row_denom[m];
      if (d != 0.f) acc += to_float(q[m * a.F + f]) / d;
    }
    qsum[f] = acc;
  }
  __syncthreads();

  const int64_t lo = load_index(a.exclude_lo, b);
  const int64_t hi = load_index(a.exclude_hi, b);
  for (int64_t p = warp; p < a.P; p += kSelectWarps) {
    const int64_t frame = load_index(a.slot_frame, p);
    const bool candidate = valid_rows > 0 && load_index(a.slot_owner, p) == b &&
                           !(frame >= lo && frame < hi) && frame >= a.sink_frames;
    float sc = -INFINITY;
    if (candidate) {
      float dot = 0.f, ss = 0.f;
      for (int64_t f = lane; f < a.F; f += kWarp) {
        const float x = to_float(sf[p * a.F + f]);
        dot += qsum[f] * x;
        ss += x * x;
      }
      dot = warp_sum(dot);
      ss = warp_sum(ss);
      float cosine = dot / norm_denom(ss) / static_cast<float>(valid_rows);
      if (a.prior != nullptr) {
        const float prior = a.prior[b * a.P + p];
        cosine = __fadd_rn(__fmul_rn(a.w_cos, cosine), __fmul_rn(a.w_prior, prior));
      }
      if (!isnan(cosine)) sc = cosine;
    }
    if (lane == 0) score[p] = sc;
  }
  __syncthreads();

  const int64_t cap = a.k < a.P ? a.k : a.P;
  for (int64_t r = 0; r < cap; ++r) {
    Cand best = no_cand();
    for (int64_t p = threadIdx.x; p < a.P; p += kSelectThreads) {
      const float sc = score[p];
      if (sc == -INFINITY) continue;
      const Cand c{sc, load_index(a.slot_frame, p), static_cast<int32_t>(p)};
      if (ranks_before(c, best)) best = c;
    }
    best = warp_best(best);
    if (lane == 0) {
      w_score[warp] = best.score;
      w_frame[warp] = best.frame;
      w_slot[warp] = best.slot;
    }
    __syncthreads();
    if (warp == 0) {
      Cand c = lane < kSelectWarps ? Cand{w_score[lane], w_frame[lane], w_slot[lane]} : no_cand();
      c = warp_best(c);
      if (lane == 0) {
        if (c.score == -INFINITY) {
          s_done = 1;
        } else {
          chosen_frame[r] = c.frame;
          chosen_slot[r] = c.slot;
          chosen_score[r] = c.score;
          score[c.slot] = -INFINITY;
          s_chosen = static_cast<int>(r + 1);
        }
      }
    }
    __syncthreads();
    if (s_done) break;
  }

  const int chosen = s_chosen;
  int32_t* out_slot = a.out_slot + b * a.k;
  float* out_score = a.out_score + b * a.k;
  for (int64_t j = threadIdx.x; j < a.k; j += kSelectThreads) {
    if (j < chosen) {
      const int64_t fj = chosen_frame[j];
      const int32_t sj = chosen_slot[j];
      int rank = 0;
      for (int i = 0; i < chosen; ++i) {
        const int64_t fi = chosen_frame[i];
        rank += (fi < fj) || (fi == fj && chosen_slot[i] < sj);
      }
      out_slot[rank] = sj;
      out_score[rank] = chosen_score[j];
    } else {
      out_slot[j] = -1;
      out_score[j] = -INFINITY;
    }
  }
}

}  // namespace

int64_t select_sinks_workspace_floats(int64_t B, int64_t M, int64_t F, int64_t P, int64_t k) {
  const SelectLayout lay = select_layout(M, F, P, k);
  return lay.words * 4 <= kSelectSmemBytes ? 0 : B * lay.words;
}

cudaError_t launch_select_sinks(const SelectSinksArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.k == 0) return cudaSuccess;
  const SelectLayout lay = select_layout(a.M, a.F, a.P, a.k);
  const size_t smem = a.workspace != nullptr ? 0 : static_cast<size_t>(lay.words) * 4;
  dispatch_float(a.query_type, [&](auto tq) {
    dispatch_float(a.slot_type, [&](auto ts) {
      using TQ = typename decltype(tq)::type;
      using TS = typename decltype(ts)::type;
      select_sinks_kernel<TQ, TS>
          <<<static_cast<unsigned>(a.B), kSelectThreads, smem, stream>>>(a);
    });
  });
  return cudaGetLastError();
}

}  // namespace dysink
