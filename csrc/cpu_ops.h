// C++ CPU implementations of the dysink_C ops (cpu_ops.cpp). Inputs are checked by
// bindings.cpp (ranks, sizes, dtypes, one device); semantics are those of the
// naive.py oracles.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

// Hot CPU loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 (picked at load
// time) with GCC/Clang on x86-64 Linux; elsewhere for the build's target.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DYSINK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DYSINK_CLONES
#endif

namespace dysink {

std::tuple<at::Tensor, at::Tensor> select_sinks_cpu(
    const at::Tensor& query_feat, const at::Tensor& slot_feat, const at::Tensor& slot_owner,
    const at::Tensor& slot_frame, int64_t k, const at::Tensor& exclude_lo,
    const at::Tensor& exclude_hi, int64_t sink_frames, const std::optional<at::Tensor>& slot_prior,
    double prior_mix);

// (B, n) fp32 count of heads voting against each listed slot (0 for -1).
at::Tensor gate_votes_cpu(const at::Tensor& qbar, const at::Tensor& kbar_local,
                          const at::Tensor& slot_mean_k, const at::Tensor& slot_idx);

std::tuple<at::Tensor, at::Tensor> gate_from_means_cpu(
    const at::Tensor& qbar, const at::Tensor& kbar_local, const at::Tensor& slot_mean_k,
    const at::Tensor& slot_idx, double tau, bool batch_scope);

std::tuple<at::Tensor, at::Tensor> sink_gate_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& slot_mean_k,
    const at::Tensor& slot_idx, const at::Tensor& k_len, double tau, bool batch_scope);

std::tuple<at::Tensor, at::Tensor> bank_insert_cpu(
    const at::Tensor& pool_k, const at::Tensor& pool_v, const at::Tensor& pool_mean_k,
    const at::Tensor& slot_feat, const at::Tensor& slot_owner, const at::Tensor& slot_frame,
    const at::Tensor& slot_stamp, const at::Tensor& clock, const at::Tensor& src_k,
    const at::Tensor& src_v, const at::Tensor& src_pos, const at::Tensor& feature,
    const at::Tensor& frame, int64_t slots_per_sample, int64_t limit,
    std::optional<double> dedup);

// acc[b] = max(acc[b], largest |x[b]| over every x in xs), NaN if any of them is NaN
// (acc: (B,) fp32; each x: (B, ...) float).
void fold_max_abs_cpu(const at::Tensor& acc, at::TensorList xs);

// gathered_sink_attention on CPU (cpu_attention.cpp): (out, lse, entropy, slot_mass), the
// statistics empty unless return_stats. Rows of q, pools, local and current K/V are read
// with a unit last stride.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gathered_sink_attention_cpu(
    const at::Tensor& q, const at::Tensor& pool_k, const at::Tensor& pool_v,
    const at::Tensor& slot_idx, const at::Tensor& local_k, const at::Tensor& local_v,
    const at::Tensor& local_ranges, const std::optional<at::Tensor>& cur_k,
    const std::optional<at::Tensor>& cur_v, double softmax_scale, bool return_stats,
    const std::optional<at::Tensor>& slot_delta, double rope_theta,
    const std::optional<at::Tensor>& pool_k_scale, const std::optional<at::Tensor>& pool_v_scale);

}  // namespace dysink
