// Host entry points of the CUDA kernels in csrc/*.cu.
//
// Raw pointers, plain structs and a cudaStream_t, no torch types: every .cu file
// compiles with nvcc alone, on a machine without a GPU or a CUDA build of torch.
// bindings.cpp checks shapes and dtypes, allocates outputs and workspaces, and
// calls these on the current stream. No launcher reads device memory on the host;
// each returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dysink {

enum class FloatType : int { kF32, kF16, kBF16 };

// An int32 or int64 tensor: the ops accept both for indices.
struct IndexRef {
  const void* data;
  bool is64;
};
struct MutIndexRef {
  void* data;
  bool is64;
};

// select_sinks (DESIGN 3.2). All tensors contiguous.
struct SelectSinksArgs {
  const void* query_feat;  // (B, M, F)
  FloatType query_type;
  const void* slot_feat;  // (P, F)
  FloatType slot_type;
  IndexRef slot_owner;  // (P,)
  IndexRef slot_frame;  // (P,)
  IndexRef exclude_lo;  // (B,)
  IndexRef exclude_hi;  // (B,)
  int64_t B, M, F, P, k, sink_frames;
  // Usage prior (B, P) fp32 contiguous, null for none: a candidate's score is
  // w_cos * cosine + w_prior * prior[b, p].
  const float* prior;
  float w_cos, w_prior;
  float* workspace;  // select_sinks_workspace_floats() floats, null when that is 0
  int32_t* out_slot;  // (B, k)
  float* out_score;   // (B, k)
};
// Floats of global scratch the kernel needs: 0 when a sample's scratch fits in
// shared memory.
int64_t select_sinks_workspace_floats(int64_t B, int64_t M, int64_t F, int64_t P, int64_t k);
cudaError_t launch_select_sinks(const SelectSinksArgs& a, cudaStream_t stream);

// Mean query over the chunk and mean key over each sample's valid window prefix,
// fp32 (B, H*D): the first half of sink_gate. q, k: (B, S, H, D) with (H, D) dense.
struct WindowMeansArgs {
  const void* q;
  const void* k;
  FloatType type;
  int64_t q_stride_b, q_stride_s, k_stride_b, k_stride_s;  // in elements
  IndexRef k_len;  // (B,)
  int64_t B, Sq, Sk, HD;
  float* partials;  // window_means_workspace_floats() floats
  float* qbar;      // (B, HD)
  float* kbar;      // (B, HD)
};
int64_t window_means_workspace_floats(int64_t B, int64_t Sq, int64_t Sk, int64_t HD);
cudaError_t launch_window_means(const WindowMeansArgs& a, cudaStream_t stream);

// gate_from_means (DESIGN 3.3): the vote, the scopes and the threshold.
struct GateArgs {
  const float* qbar;        // (B, H, D)
  const float* kbar_local;  // (B, H, D)
  const void* slot_mean_k;  // (P, H, D)
  FloatType mean_type;
  IndexRef slot_idx;  // (B, n)
  MutIndexRef kept;   // (B, n), same dtype as slot_idx
  float* ratio;       // (B, n)
  int64_t B, n, H, D, P;
  float tau;
  bool batch_scope;
};
// Per-slot vote counts alone (head parallelism sums them across ranks before the
// decision): votes (B, n) fp32, zero-filled by the caller, gets +1 per voting head.
struct VoteArgs {
  const float* qbar;        // (B, H, D)
  const float* kbar_local;  // (B, H, D)
  const void* slot_mean_k;  // (P, H, D)
  FloatType mean_type;
  IndexRef slot_idx;  // (B, n)
  float* votes;       // (B, n)
  int64_t B, n, H, D, P;
};
cudaError_t launch_gate_votes(const VoteArgs& a, cudaStream_t stream);

// Whether (B, n) fits the single-block kernel's shared memory.
bool gate_from_means_fits(int64_t B, int64_t n);
cudaError_t launch_gate_from_means(const GateArgs& a, cudaStream_t stream);

// bank_insert: slot choice with dedup, K/V copy through src_pos, mean keys.
struct BankInsertArgs {
  void* pool_k;  // (L, P, S_e, H, D) contiguous
  void* pool_v;
  FloatType kv_type;
  bool kv_bytes;              // uint8 pools (fp8 storage): kv_type is ignored
  float* pool_mean_k;         // (L, P, H, D)
  float* slot_feat;           // (P, F)
  MutIndexRef slot_owner;     // (P,)
  MutIndexRef slot_frame;     // (P,)
  int64_t* slot_stamp;        // (P,)
  int64_t* clock;             // ()
  const void* src_k;          // (L, B, N, H, D) with (H, D) dense
  const void* src_v;
  int64_t src_k_stride_l, src_k_stride_b, src_k_stride_n;  // in elements
  int64_t src_v_stride_l, src_v_stride_b, src_v_stride_n;
  IndexRef src_pos;  // (S_e,)
  int64_t src_pos_stride;
  const void* feature;  // (B, F) contiguous
  FloatType feature_type;
  IndexRef frame;  // ()
  int64_t L, B, N, S_e, HD, F, P, C, limit;
  bool has_dedup;
  float dedup;
  bool* stored;      // (B,)
  int64_t* slot;     // (B,)
  float* partials;   // bank_insert_workspace_floats() floats
};
int64_t bank_insert_workspace_floats(int64_t L, int64_t B, int64_t S_e, int64_t HD);
cudaError_t launch_bank_insert(const BankInsertArgs& a, cudaStream_t stream);

// What nvcc compiled: "80,90" style list of __CUDA_ARCH_LIST__, and CUDART_VERSION.
const char* compiled_cuda_archs();
int cuda_runtime_version();

}  // namespace dysink
