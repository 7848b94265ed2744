// The extension's one bindings file: the dysink_C op schema, the input checks,
// and the registrations: C++ loops on CPU (cpu_ops.cpp), shape-only Meta kernels
// (fake tensors, torch.compile), and with DYSINK_WITH_CUDA the CUDA kernels, whose
// launchers (launchers.h) take raw pointers and the current stream. Nothing here
// reads device memory on the host.
//
// Python module dysink_kernels._C: importing it registers the ops; it carries
// WITH_CUDA, CUDA_ARCHS and CUDA_RUNTIME_VERSION for dysink_kernels._cuda.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "cpu_ops.h"

#ifdef DYSINK_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "launchers.h"
#endif

namespace dysink {
namespace {

using at::Tensor;
using Pair = std::tuple<Tensor, Tensor>;

bool is_float(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

bool is_index(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kInt || s == at::kLong;
}

void check_rank(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_float(const Tensor& t, const char* name, int64_t dim) {
  check_rank(t, name, dim);
  TORCH_CHECK(is_float(t), name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_index(const Tensor& t, const char* name, int64_t dim) {
  check_rank(t, name, dim);
  TORCH_CHECK(is_index(t), name, " must be int32 or int64, got ", t.scalar_type());
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_size(const Tensor& t, const char* name, int64_t d, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(d) == expected, name, ".shape[", d, "] (", what, ") must be ", expected,
              ", got ", t.size(d), " (shape ", t.sizes(), ")");
}

void check_device(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " is written in place and must be contiguous");
}

bool batch_scope(std::string_view scope) {
  TORCH_CHECK(scope == "batch" || scope == "sample",
              "scope must be 'batch' or 'sample', got '", std::string(scope), "'");
  return scope == "batch";
}

// (H, D) must be dense for the row copies and column sums; other strides are free.
Tensor inner_dense(const Tensor& t) {
  const int64_t d = t.dim();
  const bool dense = t.stride(d - 1) == 1 && t.stride(d - 2) == t.size(d - 1);
  return dense ? t : t.contiguous();
}

void check_select_sinks(const Tensor& query_feat, const Tensor& slot_feat,
                        const Tensor& slot_owner, const Tensor& slot_frame, int64_t k,
                        const Tensor& exclude_lo, const Tensor& exclude_hi, int64_t sink_frames,
                        const std::optional<Tensor>& slot_prior, double prior_mix) {
  check_float(query_feat, "query_feat", 3);
  check_float(slot_feat, "slot_feat", 2);
  const int64_t B = query_feat.size(0), P = slot_feat.size(0);
  check_size(slot_feat, "slot_feat", 1, query_feat.size(2), "feature dim");
  check_index(slot_owner, "slot_owner", 1);
  check_index(slot_frame, "slot_frame", 1);
  check_size(slot_owner, "slot_owner", 0, P, "slots");
  check_size(slot_frame, "slot_frame", 0, P, "slots");
  check_index(exclude_lo, "exclude_lo", 1);
  check_index(exclude_hi, "exclude_hi", 1);
  check_size(exclude_lo, "exclude_lo", 0, B, "batch");
  check_size(exclude_hi, "exclude_hi", 0, B, "batch");
  for (const auto& [t, name] : {std::pair{&slot_feat, "slot_feat"}, {&slot_owner, "slot_owner"},
                                {&slot_frame, "slot_frame"}, {&exclude_lo, "exclude_lo"},
                                {&exclude_hi, "exclude_hi"}}) {
    check_device(*t, name, query_feat);
  }
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(sink_frames >= 0, "sink_frames must be >= 0, got ", sink_frames);
  TORCH_CHECK(P <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 slots, got ", P);
  TORCH_CHECK(prior_mix >= 0 && prior_mix <= 1, "prior_mix must be in [0, 1], got ", prior_mix);
  if (slot_prior.has_value()) {
    check_float(*slot_prior, "slot_prior", 2);
    check_size(*slot_prior, "slot_prior", 0, B, "batch");
    check_size(*slot_prior, "slot_prior", 1, P, "slots");
    check_device(*slot_prior, "slot_prior", query_feat);
  }
}

void check_gate_from_means(const Tensor& qbar, const Tensor& kbar_local,
                           const Tensor& slot_mean_k, const Tensor& slot_idx) {
  check_float(qbar, "qbar", 3);
  check_float(kbar_local, "kbar_local", 3);
  check_float(slot_mean_k, "slot_mean_k", 3);
  check_index(slot_idx, "slot_idx", 2);
  TORCH_CHECK(kbar_local.sizes() == qbar.sizes(), "kbar_local must have the shape of qbar ",
              qbar.sizes(), ", got ", kbar_local.sizes());
  check_size(slot_mean_k, "slot_mean_k", 1, qbar.size(1), "heads");
  check_size(slot_mean_k, "slot_mean_k", 2, qbar.size(2), "head_dim");
  check_size(slot_idx, "slot_idx", 0, qbar.size(0), "batch");
  check_device(kbar_local, "kbar_local", qbar);
  check_device(slot_mean_k, "slot_mean_k", qbar);
  check_device(slot_idx, "slot_idx", qbar);
}

void check_sink_gate(const Tensor& q, const Tensor& k, const Tensor& slot_mean_k,
                     const Tensor& slot_idx, const Tensor& k_len) {
  check_float(q, "q", 4);
  check_float(k, "k", 4);
  check_dtype(k, "k", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  check_size(k, "k", 0, B, "batch");
  check_size(k, "k", 2, H, "heads");
  check_size(k, "k", 3, D, "head_dim");
  check_float(slot_mean_k, "slot_mean_k", 3);
  check_size(slot_mean_k, "slot_mean_k", 1, H, "heads");
  check_size(slot_mean_k, "slot_mean_k", 2, D, "head_dim");
  check_index(slot_idx, "slot_idx", 2);
  check_size(slot_idx, "slot_idx", 0, B, "batch");
  check_index(k_len, "k_len", 1);
  check_size(k_len, "k_len", 0, B, "batch");
  check_device(k, "k", q);
  check_device(slot_mean_k, "slot_mean_k", q);
  check_device(slot_idx, "slot_idx", q);
  check_device(k_len, "k_len", q);
}

void check_bank_insert(const Tensor& pool_k, const Tensor& pool_v, const Tensor& pool_mean_k,
                       const Tensor& slot_feat, const Tensor& slot_owner,
                       const Tensor& slot_frame, const Tensor& slot_stamp, const Tensor& clock,
                       const Tensor& src_k, const Tensor& src_v, const Tensor& src_pos,
                       const Tensor& feature, const Tensor& frame, int64_t slots_per_sample) {
  check_rank(pool_k, "pool_k", 5);
  TORCH_CHECK(is_float(pool_k) || pool_k.scalar_type() == at::kByte,
              "pool_k must be float32, float16, bfloat16 or uint8 (fp8 bytes), got ",
              pool_k.scalar_type());
  TORCH_CHECK(pool_v.sizes() == pool_k.sizes(), "pool_v must have the shape of pool_k ",
              pool_k.sizes(), ", got ", pool_v.sizes());
  check_dtype(pool_v, "pool_v", pool_k.scalar_type());
  const int64_t L = pool_k.size(0), P = pool_k.size(1), H = pool_k.size(3), D = pool_k.size(4);
  check_float(feature, "feature", 2);
  const int64_t B = feature.size(0), F = feature.size(1);
  check_rank(pool_mean_k, "pool_mean_k", 4);
  check_dtype(pool_mean_k, "pool_mean_k", at::kFloat);
  TORCH_CHECK(pool_mean_k.sizes() == at::IntArrayRef({L, P, H, D}), "pool_mean_k must have shape ",
              at::IntArrayRef({L, P, H, D}), ", got ", pool_mean_k.sizes());
  check_rank(slot_feat, "slot_feat", 2);
  check_dtype(slot_feat, "slot_feat", at::kFloat);
  check_size(slot_feat, "slot_feat", 0, P, "slots");
  check_size(slot_feat, "slot_feat", 1, F, "feature dim");
  check_index(slot_owner, "slot_owner", 1);
  check_index(slot_frame, "slot_frame", 1);
  check_rank(slot_stamp, "slot_stamp", 1);
  check_dtype(slot_stamp, "slot_stamp", at::kLong);
  check_size(slot_owner, "slot_owner", 0, P, "slots");
  check_size(slot_frame, "slot_frame", 0, P, "slots");
  check_size(slot_stamp, "slot_stamp", 0, P, "slots");
  check_rank(clock, "clock", 0);
  check_dtype(clock, "clock", at::kLong);
  for (const auto& [t, name] : {std::pair{&src_k, "src_k"}, {&src_v, "src_v"}}) {
    check_rank(*t, name, 5);
    check_dtype(*t, name, pool_k.scalar_type());
    check_size(*t, name, 0, L, "layers");
    check_size(*t, name, 1, B, "batch");
    check_size(*t, name, 3, H, "heads");
    check_size(*t, name, 4, D, "head_dim");
  }
  check_size(src_v, "src_v", 2, src_k.size(2), "tokens");
  check_index(src_pos, "src_pos", 1);
  check_size(src_pos, "src_pos", 0, pool_k.size(2), "entry tokens");
  TORCH_CHECK(frame.numel() == 1 && is_index(frame), "frame must be a one-element int tensor");
  TORCH_CHECK(slots_per_sample > 0 && P == B * slots_per_sample, "the pool's ", P,
              " slots must be batch (", B, ") x slots_per_sample (", slots_per_sample, ") > 0");
  for (const auto& [t, name] :
       {std::pair{&pool_k, "pool_k"}, {&pool_v, "pool_v"}, {&pool_mean_k, "pool_mean_k"},
        {&slot_feat, "slot_feat"}, {&slot_owner, "slot_owner"}, {&slot_frame, "slot_frame"},
        {&slot_stamp, "slot_stamp"}, {&clock, "clock"}}) {
    check_contiguous(*t, name);
    check_device(*t, name, feature);
  }
  for (const auto& [t, name] : {std::pair{&src_k, "src_k"}, {&src_v, "src_v"},
                                {&src_pos, "src_pos"}, {&frame, "frame"}}) {
    check_device(*t, name, feature);
  }
}

using Quad = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// A (B, S, H, D) or (P, S_e, H, D) tensor whose rows the C++ loops read with a unit
// last stride; other strides are free.
Tensor last_dense(const Tensor& t) {
  return t.stride(t.dim() - 1) == 1 || t.size(t.dim() - 1) <= 1 ? t : t.contiguous();
}

void check_kv_like(const Tensor& t, const char* name, const Tensor& q, int64_t dim1) {
  check_rank(t, name, 4);
  check_dtype(t, name, q.scalar_type());
  check_size(t, name, 0, q.size(0), "batch");
  if (dim1 >= 0) check_size(t, name, 1, dim1, "tokens");
  check_size(t, name, 2, q.size(2), "heads");
  check_size(t, name, 3, q.size(3), "head_dim");
  check_device(t, name, q);
}

void check_gathered_attention(const Tensor& q, const Tensor& pool_k, const Tensor& pool_v,
                              const Tensor& slot_idx, const Tensor& local_k,
                              const Tensor& local_v, const Tensor& local_ranges,
                              const std::optional<Tensor>& cur_k,
                              const std::optional<Tensor>& cur_v, double softmax_scale,
                              const std::optional<Tensor>& slot_delta, double rope_theta,
                              const std::optional<Tensor>& pool_k_scale,
                              const std::optional<Tensor>& pool_v_scale) {
  check_float(q, "q", 4);
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  TORCH_CHECK(D > 0, "q.shape[3] (head_dim) must be > 0, got shape ", q.sizes());
  check_kv_like(local_k, "local_k", q, -1);
  check_kv_like(local_v, "local_v", q, local_k.size(1));
  TORCH_CHECK(cur_k.has_value() == cur_v.has_value(), "cur_k and cur_v come together");
  if (cur_k.has_value()) {
    check_kv_like(*cur_k, "cur_k", q, -1);
    check_kv_like(*cur_v, "cur_v", q, cur_k->size(1));
  }
  check_rank(pool_k, "pool_k", 4);
  const bool fp8 = pool_k.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || pool_k.scalar_type() == q.scalar_type(), "pool_k must be ",
              q.scalar_type(), " (the dtype of q) or float8_e4m3fn, got ", pool_k.scalar_type());
  TORCH_CHECK(pool_v.sizes() == pool_k.sizes(), "pool_v must have the shape of pool_k ",
              pool_k.sizes(), ", got ", pool_v.sizes());
  check_dtype(pool_v, "pool_v", pool_k.scalar_type());
  check_size(pool_k, "pool_k", 2, H, "heads");
  check_size(pool_k, "pool_k", 3, D, "head_dim");
  check_device(pool_k, "pool_k", q);
  check_device(pool_v, "pool_v", q);
  // An fp8 pool is read through its scales; without a listed slot it is not read at all.
  TORCH_CHECK(pool_k_scale.has_value() == pool_v_scale.has_value() &&
                  (!pool_k_scale.has_value() || fp8) &&
                  (pool_k_scale.has_value() || !fp8 || slot_idx.size(1) == 0),
              "pool_k_scale and pool_v_scale are given together, with an fp8 pool, and an "
              "fp8 pool with listed slots needs them");
  for (const auto& [t, name] :
       {std::pair{&pool_k_scale, "pool_k_scale"}, {&pool_v_scale, "pool_v_scale"}}) {
    if (!t->has_value()) continue;
    check_rank(**t, name, 2);
    check_dtype(**t, name, at::kFloat);
    check_size(**t, name, 0, pool_k.size(0), "slots");
    check_size(**t, name, 1, H, "heads");
    check_device(**t, name, q);
  }
  check_index(slot_idx, "slot_idx", 2);
  check_size(slot_idx, "slot_idx", 0, B, "batch");
  check_device(slot_idx, "slot_idx", q);
  check_index(local_ranges, "local_ranges", 3);
  check_size(local_ranges, "local_ranges", 0, B, "batch");
  check_size(local_ranges, "local_ranges", 2, 2, "(start, end)");
  check_device(local_ranges, "local_ranges", q);
  if (slot_delta.has_value()) {
    check_rank(*slot_delta, "slot_delta", 2);
    TORCH_CHECK(slot_delta->sizes() == slot_idx.sizes(), "slot_delta must have the shape of "
                "slot_idx ", slot_idx.sizes(), ", got ", slot_delta->sizes());
    check_device(*slot_delta, "slot_delta", q);
  }
  TORCH_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale),
              "softmax_scale must be a finite positive number, got ", softmax_scale);
  TORCH_CHECK(rope_theta > 0 && std::isfinite(rope_theta),
              "rope_theta must be a finite positive number, got ", rope_theta);
}

// ---- CPU ---------------------------------------------------------------------

Pair select_sinks_cpu_op(const Tensor& query_feat, const Tensor& slot_feat,
                         const Tensor& slot_owner, const Tensor& slot_frame, int64_t k,
                         const Tensor& exclude_lo, const Tensor& exclude_hi,
                         int64_t sink_frames, const std::optional<Tensor>& slot_prior,
                         double prior_mix) {
  check_select_sinks(query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi,
                     sink_frames, slot_prior, prior_mix);
  return select_sinks_cpu(query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo,
                          exclude_hi, sink_frames, slot_prior, prior_mix);
}

Tensor gate_votes_cpu_op(const Tensor& qbar, const Tensor& kbar_local, const Tensor& slot_mean_k,
                         const Tensor& slot_idx) {
  check_gate_from_means(qbar, kbar_local, slot_mean_k, slot_idx);
  return gate_votes_cpu(qbar, kbar_local, slot_mean_k, slot_idx);
}

Pair gate_from_means_cpu_op(const Tensor& qbar, const Tensor& kbar_local,
                            const Tensor& slot_mean_k, const Tensor& slot_idx, double tau,
                            c10::string_view scope) {
  check_gate_from_means(qbar, kbar_local, slot_mean_k, slot_idx);
  return gate_from_means_cpu(qbar, kbar_local, slot_mean_k, slot_idx, tau,
                             batch_scope({scope.data(), scope.size()}));
}

Pair sink_gate_cpu_op(const Tensor& q, const Tensor& k, const Tensor& slot_mean_k,
                      const Tensor& slot_idx, const Tensor& k_len, double tau,
                      c10::string_view scope) {
  check_sink_gate(q, k, slot_mean_k, slot_idx, k_len);
  return sink_gate_cpu(q, k, slot_mean_k, slot_idx, k_len, tau,
                       batch_scope({scope.data(), scope.size()}));
}

Pair bank_insert_cpu_op(const Tensor& pool_k, const Tensor& pool_v, const Tensor& pool_mean_k,
                        const Tensor& slot_feat, const Tensor& slot_owner,
                        const Tensor& slot_frame, const Tensor& slot_stamp, const Tensor& clock,
                        const Tensor& src_k, const Tensor& src_v, const Tensor& src_pos,
                        const Tensor& feature, const Tensor& frame, int64_t slots_per_sample,
                        int64_t limit, std::optional<double> dedup) {
  check_bank_insert(pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp,
                    clock, src_k, src_v, src_pos, feature, frame, slots_per_sample);
  return bank_insert_cpu(pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame,
                         slot_stamp, clock, inner_dense(src_k), inner_dense(src_v), src_pos,
                         feature, frame, slots_per_sample, limit, dedup);
}

Quad gathered_sink_attention_cpu_op(
    const Tensor& q, const Tensor& pool_k, const Tensor& pool_v, const Tensor& slot_idx,
    const Tensor& local_k, const Tensor& local_v, const Tensor& local_ranges,
    const std::optional<Tensor>& cur_k, const std::optional<Tensor>& cur_v, double softmax_scale,
    bool return_stats, const std::optional<Tensor>& slot_delta, double rope_theta,
    const std::optional<Tensor>& pool_k_scale, const std::optional<Tensor>& pool_v_scale) {
  check_gathered_attention(q, pool_k, pool_v, slot_idx, local_k, local_v, local_ranges, cur_k,
                           cur_v, softmax_scale, slot_delta, rope_theta, pool_k_scale,
                           pool_v_scale);
  const auto dense = [](const std::optional<Tensor>& t) {
    return t.has_value() ? std::optional<Tensor>(last_dense(*t)) : std::nullopt;
  };
  Quad res = gathered_sink_attention_cpu(
      last_dense(q), last_dense(pool_k), last_dense(pool_v), slot_idx, last_dense(local_k),
      last_dense(local_v), local_ranges, dense(cur_k), dense(cur_v), softmax_scale, return_stats,
      slot_delta, rope_theta, pool_k_scale, pool_v_scale);
  Tensor& out = std::get<0>(res);
  if (out.strides() != q.strides()) {  // q was copied: lay out out like q, as the fake
    Tensor like = at::empty_like(q);
    if (like.strides() != out.strides()) out = like.copy_(out);
  }
  return res;
}

void fold_max_abs_cpu_op(const Tensor& acc, at::TensorList xs) {
  check_rank(acc, "acc", 1);
  check_dtype(acc, "acc", at::kFloat);
  check_contiguous(acc, "acc");
  for (const Tensor& x : xs) {
    TORCH_CHECK(is_float(x), "xs must be float32, float16 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.dim() >= 1 && x.size(0) == acc.size(0), "each of xs must have ",
                acc.size(0), " rows (the size of acc), got shape ", x.sizes());
    check_device(x, "xs", acc);
  }
  fold_max_abs_cpu(acc, xs);
}

void fold_max_abs_meta(const Tensor&, at::TensorList) {}

// ---- Meta (shapes only) --------------------------------------------------------

Pair select_sinks_meta(const Tensor& query_feat, const Tensor&, const Tensor&, const Tensor&,
                       int64_t k, const Tensor&, const Tensor&, int64_t,
                       const std::optional<Tensor>&, double) {
  const auto opts = query_feat.options();
  return {at::empty({query_feat.size(0), k}, opts.dtype(at::kInt)),
          at::empty({query_feat.size(0), k}, opts.dtype(at::kFloat))};
}

Pair gate_meta(const Tensor& slot_idx, const Tensor& like) {
  return {at::empty_like(slot_idx, at::MemoryFormat::Contiguous),
          at::empty(slot_idx.sizes(), like.options().dtype(at::kFloat))};
}

Tensor gate_votes_meta(const Tensor& qbar, const Tensor&, const Tensor&, const Tensor& slot_idx) {
  return at::empty(slot_idx.sizes(), qbar.options().dtype(at::kFloat));
}

Pair gate_from_means_meta(const Tensor& qbar, const Tensor&, const Tensor&,
                          const Tensor& slot_idx, double, c10::string_view) {
  return gate_meta(slot_idx, qbar);
}

Pair sink_gate_meta(const Tensor& q, const Tensor&, const Tensor&, const Tensor& slot_idx,
                    const Tensor&, double, c10::string_view) {
  return gate_meta(slot_idx, q);
}

Quad gathered_sink_attention_meta(const Tensor& q, const Tensor&, const Tensor&,
                                  const Tensor& slot_idx, const Tensor&, const Tensor&,
                                  const Tensor&, const std::optional<Tensor>&,
                                  const std::optional<Tensor>&, double, bool return_stats,
                                  const std::optional<Tensor>&, double,
                                  const std::optional<Tensor>&, const std::optional<Tensor>&) {
  const auto f32 = q.options().dtype(at::kFloat);
  if (!return_stats) {
    return {at::empty_like(q), at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
  }
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2);
  return {at::empty_like(q), at::empty({B, H, Sq}, f32), at::empty({B, H, Sq}, f32),
          at::empty({B, H, slot_idx.size(1)}, f32)};
}

Pair bank_insert_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor& feature, const Tensor&, int64_t, int64_t,
                      std::optional<double>) {
  const auto opts = feature.options();
  return {at::empty({feature.size(0)}, opts.dtype(at::kBool)),
          at::empty({feature.size(0)}, opts.dtype(at::kLong))};
}

// ---- CUDA --------------------------------------------------------------------

#ifdef DYSINK_WITH_CUDA

FloatType float_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return FloatType::kF16;
    case at::kBFloat16:
      return FloatType::kBF16;
    default:
      return FloatType::kF32;
  }
}

IndexRef index_ref(const Tensor& t) { return {t.data_ptr(), t.scalar_type() == at::kLong}; }
MutIndexRef mut_index_ref(const Tensor& t) {
  return {t.data_ptr(), t.scalar_type() == at::kLong};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "dysink_C::", op, " launch failed: ", cudaGetErrorString(err));
}

Tensor float_workspace(int64_t n, const Tensor& like) {
  return at::empty({n}, like.options().dtype(at::kFloat));
}

Pair select_sinks_cuda(const Tensor& query_feat, const Tensor& slot_feat,
                       const Tensor& slot_owner, const Tensor& slot_frame, int64_t k,
                       const Tensor& exclude_lo, const Tensor& exclude_hi, int64_t sink_frames,
                       const std::optional<Tensor>& slot_prior, double prior_mix) {
  check_select_sinks(query_feat, slot_feat, slot_owner, slot_frame, k, exclude_lo, exclude_hi,
                     sink_frames, slot_prior, prior_mix);
  const c10::cuda::CUDAGuard guard(query_feat.device());
  // A usage prior is blended in only when given and prior_mix > 0 (as the oracle).
  const bool has_prior = slot_prior.has_value() && prior_mix > 0;
  const Tensor prior = has_prior ? slot_prior->to(at::kFloat).contiguous() : Tensor();
  const Tensor qf = query_feat.contiguous(), sf = slot_feat.contiguous();
  const Tensor owner = slot_owner.contiguous(), frame = slot_frame.contiguous();
  const Tensor lo = exclude_lo.contiguous(), hi = exclude_hi.contiguous();
  const int64_t B = qf.size(0), M = qf.size(1), F = qf.size(2), P = sf.size(0);
  const auto opts = qf.options();
  Tensor out_slot = at::empty({B, k}, opts.dtype(at::kInt));
  Tensor out_score = at::empty({B, k}, opts.dtype(at::kFloat));
  const int64_t ws_floats = select_sinks_workspace_floats(B, M, F, P, k);
  const Tensor ws = ws_floats > 0 ? float_workspace(ws_floats, qf) : Tensor();
  SelectSinksArgs a{qf.data_ptr(),         float_type(qf),
                    sf.data_ptr(),         float_type(sf),
                    index_ref(owner),      index_ref(frame),
                    index_ref(lo),         index_ref(hi),
                    B, M, F, P, k, sink_frames,
                    has_prior ? prior.data_ptr<float>() : nullptr,
                    static_cast<float>(1.0 - prior_mix), static_cast<float>(prior_mix),
                    ws_floats > 0 ? ws.data_ptr<float>() : nullptr,
                    out_slot.data_ptr<int32_t>(), out_score.data_ptr<float>()};
  check_launch(launch_select_sinks(a, at::cuda::getCurrentCUDAStream()), "select_sinks");
  return {out_slot, out_score};
}

// The gate on fp32 means already on the device; shared by both gate ops.
Pair gate_cuda(const Tensor& qbar, const Tensor& kbar_local, const Tensor& slot_mean_k,
               const Tensor& slot_idx, double tau, bool batch) {
  const int64_t B = slot_idx.size(0), n = slot_idx.size(1);
  TORCH_CHECK(gate_from_means_fits(B, n), "the CUDA gate handles batch x slots up to its "
              "shared memory, got ", B, " x ", n);
  const Tensor mk = slot_mean_k.contiguous(), idx = slot_idx.contiguous();
  Tensor kept = at::empty_like(idx, at::MemoryFormat::Contiguous);
  Tensor ratio = at::empty({B, n}, qbar.options().dtype(at::kFloat));
  GateArgs a{qbar.data_ptr<float>(), kbar_local.data_ptr<float>(),
             mk.data_ptr(), float_type(mk),
             index_ref(idx), mut_index_ref(kept), ratio.data_ptr<float>(),
             B, n, qbar.size(1), qbar.size(2), mk.size(0),
             static_cast<float>(tau), batch};
  check_launch(launch_gate_from_means(a, at::cuda::getCurrentCUDAStream()), "gate");
  return {kept, ratio};
}

Pair gate_from_means_cuda(const Tensor& qbar, const Tensor& kbar_local, const Tensor& slot_mean_k,
                          const Tensor& slot_idx, double tau, c10::string_view scope) {
  check_gate_from_means(qbar, kbar_local, slot_mean_k, slot_idx);
  const bool batch = batch_scope({scope.data(), scope.size()});
  const c10::cuda::CUDAGuard guard(qbar.device());
  return gate_cuda(qbar.to(at::kFloat).contiguous(), kbar_local.to(at::kFloat).contiguous(),
                   slot_mean_k, slot_idx, tau, batch);
}

Tensor gate_votes_cuda(const Tensor& qbar, const Tensor& kbar_local, const Tensor& slot_mean_k,
                       const Tensor& slot_idx) {
  check_gate_from_means(qbar, kbar_local, slot_mean_k, slot_idx);
  const c10::cuda::CUDAGuard guard(qbar.device());
  const Tensor q = qbar.to(at::kFloat).contiguous(), kl = kbar_local.to(at::kFloat).contiguous();
  const Tensor mk = slot_mean_k.contiguous(), idx = slot_idx.contiguous();
  Tensor votes = at::zeros(idx.sizes(), q.options());
  VoteArgs a{q.data_ptr<float>(), kl.data_ptr<float>(), mk.data_ptr(), float_type(mk),
             index_ref(idx), votes.data_ptr<float>(),
             idx.size(0), idx.size(1), q.size(1), q.size(2), mk.size(0)};
  check_launch(launch_gate_votes(a, at::cuda::getCurrentCUDAStream()), "gate_votes");
  return votes;
}

Pair sink_gate_cuda(const Tensor& q, const Tensor& k, const Tensor& slot_mean_k,
                    const Tensor& slot_idx, const Tensor& k_len, double tau,
                    c10::string_view scope) {
  check_sink_gate(q, k, slot_mean_k, slot_idx, k_len);
  const bool batch = batch_scope({scope.data(), scope.size()});
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor qd = inner_dense(q), kd = inner_dense(k), kl = k_len.contiguous();
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1), HD = q.size(2) * q.size(3);
  const int64_t partials = window_means_workspace_floats(B, Sq, Sk, HD);
  Tensor ws = float_workspace(partials + 2 * B * HD, q);
  float* base = ws.data_ptr<float>();
  WindowMeansArgs m{qd.data_ptr(), kd.data_ptr(), float_type(qd),
                    qd.stride(0), qd.stride(1), kd.stride(0), kd.stride(1),
                    index_ref(kl), B, Sq, Sk, HD,
                    base, base + partials, base + partials + B * HD};
  check_launch(launch_window_means(m, at::cuda::getCurrentCUDAStream()), "sink_gate");
  const auto means = ws.narrow(0, partials, 2 * B * HD).view({2, B, q.size(2), q.size(3)});
  return gate_cuda(means[0], means[1], slot_mean_k, slot_idx, tau, batch);
}

Pair bank_insert_cuda(const Tensor& pool_k, const Tensor& pool_v, const Tensor& pool_mean_k,
                      const Tensor& slot_feat, const Tensor& slot_owner, const Tensor& slot_frame,
                      const Tensor& slot_stamp, const Tensor& clock, const Tensor& src_k,
                      const Tensor& src_v, const Tensor& src_pos, const Tensor& feature,
                      const Tensor& frame, int64_t slots_per_sample, int64_t limit,
                      std::optional<double> dedup) {
  check_bank_insert(pool_k, pool_v, pool_mean_k, slot_feat, slot_owner, slot_frame, slot_stamp,
                    clock, src_k, src_v, src_pos, feature, frame, slots_per_sample);
  const c10::cuda::CUDAGuard guard(feature.device());
  const Tensor sk = inner_dense(src_k), sv = inner_dense(src_v);
  const Tensor fe = feature.contiguous();
  const int64_t L = pool_k.size(0), P = pool_k.size(1), S_e = pool_k.size(2);
  const int64_t HD = pool_k.size(3) * pool_k.size(4), B = fe.size(0);
  Tensor stored = at::empty({B}, fe.options().dtype(at::kBool));
  Tensor slot = at::empty({B}, fe.options().dtype(at::kLong));
  const int64_t ws_floats = bank_insert_workspace_floats(L, B, S_e, HD);
  const Tensor ws = float_workspace(std::max<int64_t>(ws_floats, 1), fe);
  BankInsertArgs a{pool_k.data_ptr(), pool_v.data_ptr(), float_type(pool_k),
                   pool_k.scalar_type() == at::kByte,
                   pool_mean_k.data_ptr<float>(), slot_feat.data_ptr<float>(),
                   mut_index_ref(slot_owner), mut_index_ref(slot_frame),
                   slot_stamp.data_ptr<int64_t>(), clock.data_ptr<int64_t>(),
                   sk.data_ptr(), sv.data_ptr(),
                   sk.stride(0), sk.stride(1), sk.stride(2),
                   sv.stride(0), sv.stride(1), sv.stride(2),
                   index_ref(src_pos), src_pos.stride(0),
                   fe.data_ptr(), float_type(fe), index_ref(frame),
                   L, B, sk.size(2), S_e, HD, fe.size(1), P, slots_per_sample, limit,
                   dedup.has_value(), static_cast<float>(dedup.value_or(0.0)),
                   stored.data_ptr<bool>(), slot.data_ptr<int64_t>(), ws.data_ptr<float>()};
  check_launch(launch_bank_insert(a, at::cuda::getCurrentCUDAStream()), "bank_insert");
  return {stored, slot};
}

#endif  // DYSINK_WITH_CUDA

}  // namespace
}  // namespace dysink

TORCH_LIBRARY(dysink_C, m) {
  m.def(
      "select_sinks(Tensor query_feat, Tensor slot_feat, Tensor slot_owner, Tensor slot_frame, "
      "int k, Tensor exclude_lo, Tensor exclude_hi, int sink_frames, Tensor? slot_prior=None, "
      "float prior_mix=0.0) -> (Tensor, Tensor)");
  m.def(
      "gate_votes(Tensor qbar, Tensor kbar_local, Tensor slot_mean_k, Tensor slot_idx) "
      "-> Tensor");
  m.def(
      "gate_from_means(Tensor qbar, Tensor kbar_local, Tensor slot_mean_k, Tensor slot_idx, "
      "float tau, str scope) -> (Tensor, Tensor)");
  m.def(
      "sink_gate(Tensor q, Tensor k, Tensor slot_mean_k, Tensor slot_idx, Tensor k_len, "
      "float tau, str scope) -> (Tensor, Tensor)");
  m.def(
      "bank_insert(Tensor(a!) pool_k, Tensor(b!) pool_v, Tensor(c!) pool_mean_k, "
      "Tensor(d!) slot_feat, Tensor(e!) slot_owner, Tensor(f!) slot_frame, "
      "Tensor(g!) slot_stamp, Tensor(h!) clock, Tensor src_k, Tensor src_v, Tensor src_pos, "
      "Tensor feature, Tensor frame, int slots_per_sample, int limit, float? dedup) "
      "-> (Tensor, Tensor)");
  // CPU only: on GPUs gathered attention is the Triton kernel, and the finiteness
  // check below runs as PyTorch ops.
  m.def("fold_max_abs(Tensor(a!) acc, Tensor[] xs) -> ()");
  m.def(
      "gathered_sink_attention(Tensor q, Tensor pool_k, Tensor pool_v, Tensor slot_idx, "
      "Tensor local_k, Tensor local_v, Tensor local_ranges, Tensor? cur_k, Tensor? cur_v, "
      "float softmax_scale, bool return_stats, Tensor? slot_delta, float rope_theta, "
      "Tensor? pool_k_scale, Tensor? pool_v_scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dysink_C, CPU, m) {
  m.impl("select_sinks", &dysink::select_sinks_cpu_op);
  m.impl("gate_votes", &dysink::gate_votes_cpu_op);
  m.impl("gate_from_means", &dysink::gate_from_means_cpu_op);
  m.impl("sink_gate", &dysink::sink_gate_cpu_op);
  m.impl("bank_insert", &dysink::bank_insert_cpu_op);
  m.impl("gathered_sink_attention", &dysink::gathered_sink_attention_cpu_op);
  m.impl("fold_max_abs", &dysink::fold_max_abs_cpu_op);
}

TORCH_LIBRARY_IMPL(dysink_C, Meta, m) {
  m.impl("select_sinks", &dysink::select_sinks_meta);
  m.impl("gate_votes", &dysink::gate_votes_meta);
  m.impl("gate_from_means", &dysink::gate_from_means_meta);
  m.impl("sink_gate", &dysink::sink_gate_meta);
  m.impl("bank_insert", &dysink::bank_insert_meta);
  m.impl("gathered_sink_attention", &dysink::gathered_sink_attention_meta);
  m.impl("fold_max_abs", &dysink::fold_max_abs_meta);
}

#ifdef DYSINK_WITH_CUDA
TORCH_LIBRARY_IMPL(dysink_C, CUDA, m) {
  m.impl("select_sinks", &dysink::select_sinks_cuda);
  m.impl("gate_votes", &dysink::gate_votes_cuda);
  m.impl("gate_from_means", &dysink::gate_from_means_cuda);
  m.impl("sink_gate", &dysink::sink_gate_cuda);
  m.impl("bank_insert", &dysink::bank_insert_cuda);
}
#endif

namespace {

PyModuleDef dysink_module = {PyModuleDef_HEAD_INIT, "_C",
                             "dysink_kernels' compiled ops (torch.ops.dysink_C).", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&dysink_module);
  if (m == nullptr) return nullptr;
#ifdef DYSINK_WITH_CUDA
  const bool with_cuda = true;
  const char* archs = dysink::compiled_cuda_archs();
  const int runtime = dysink::cuda_runtime_version();
#else
  const bool with_cuda = false;
  const char* archs = "";
  const int runtime = 0;
#endif
  if (PyModule_AddObject(m, "WITH_CUDA", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCHS", archs) < 0 ||
      PyModule_AddIntConstant(m, "CUDA_RUNTIME_VERSION", runtime) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
