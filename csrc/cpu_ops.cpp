// C++ CPU implementations of the dysink_C ops: fp32 accumulation, loops over
// contiguous rows, at::parallel_for over independent rows or samples.
#include "cpu_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace dysink {
namespace {

using at::Tensor;

// F.normalize's eps: x / max(||x||, eps).
constexpr float kNormEps = 1e-12f;
// Independent partial sums per dot product: the compiler turns them into SIMD
// lanes without reassociating, and the order is fixed, so equal inputs give
// bit-equal results wherever they sit in memory (the gate's strict vote needs it).
constexpr int64_t kLanes = 8;
// Rough element count below which at::parallel_for runs a range inline.
constexpr int64_t kGrainElems = 1 << 15;

float dot(const float* x, const float* y, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j] * y[i + j];
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += x[i] * y[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// F.normalize's denominator, clamp_min(eps) of the norm, NaN kept as torch does.
float norm_denom(float sum_sq) {
  const float n = std::sqrt(sum_sq);
  return std::isnan(n) ? n : std::max(n, kNormEps);
}

// torch.amax propagates NaN.
float nan_max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<float>::quiet_NaN()
                                          : std::max(a, b);
}

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, work_per_item));
}

std::vector<int64_t> to_int64_vector(const Tensor& t) {
  const Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

void store_int(const Tensor& t, int64_t i, int64_t v) {
  if (t.scalar_type() == at::kLong) {
    t.data_ptr<int64_t>()[i] = v;
  } else {
    t.data_ptr<int32_t>()[i] = static_cast<int32_t>(v);
  }
}

// out[c] = sum over rows r < n_rows of x[r * cols + c], in fp32.
template <typename T>
void column_sums(const T* x, int64_t n_rows, int64_t cols, float* out) {
  std::fill(out, out + cols, 0.f);
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] += static_cast<float>(row[c]);
  }
}

// slot_idx as int64, every slot checked against the pool (an empty pool admits any).
std::vector<int64_t> slot_list(const Tensor& slot_idx, int64_t P) {
  std::vector<int64_t> idx = to_int64_vector(slot_idx);
  for (const int64_t s : idx) {
    TORCH_CHECK(s < P || P == 0, "slot_idx holds slot ", s, " but slot_mean_k has ", P,
                " slots");
  }
  return idx;
}

// votes[b*n + j] = heads h with qbar[b,h] . mean_k[idx[b*n+j], h] > qbar[b,h] . kbar_local[b,h]
// (strict; both dots by the same routine). A slot past an empty pool has a zero
// mean key, as the oracle's zero fill; -1 entries get no vote.
std::vector<int64_t> vote_counts(const Tensor& qbar, const Tensor& kbar_local,
                                 const Tensor& slot_mean_k, const std::vector<int64_t>& idx,
                                 int64_t B, int64_t n) {
  const int64_t H = qbar.size(1), D = qbar.size(2), P = slot_mean_k.size(0);
  const Tensor q = qbar.to(at::kFloat).contiguous();
  const Tensor kl = kbar_local.to(at::kFloat).contiguous();
  const Tensor mk = slot_mean_k.to(at::kFloat).contiguous();
  const float* qp = q.data_ptr<float>();
  const float* kp = kl.data_ptr<float>();
  const float* mp = mk.data_ptr<float>();
  std::vector<int64_t> votes(B * n, 0);
  at::parallel_for(0, B, grain(H * D * (n + 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* qv = qp + (b * H + h) * D;
        const float s_local = dot(qv, kp + (b * H + h) * D, D);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t s = idx[b * n + j];
          if (s < 0) continue;
          const float s_entry = s < P ? dot(qv, mp + (s * H + h) * D, D) : 0.f;
          votes[b * n + j] += s_entry > s_local;
        }
      }
    }
  });
  return votes;
}

}  // namespace

Tensor gate_votes_cpu(const Tensor& qbar, const Tensor& kbar_local, const Tensor& slot_mean_k,
                      const Tensor& slot_idx) {
  const int64_t B = slot_idx.size(0), n = slot_idx.size(1);
  Tensor out = at::zeros({B, n}, qbar.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return out;
  const std::vector<int64_t> idx = slot_list(slot_idx, slot_mean_k.size(0));
  const std::vector<int64_t> votes = vote_counts(qbar, kbar_local, slot_mean_k, idx, B, n);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < B * n; ++i) op[i] = static_cast<float>(votes[i]);
  return out;
}

std::tuple<Tensor, Tensor> select_sinks_cpu(const Tensor& query_feat, const Tensor& slot_feat,
                                            const Tensor& slot_owner, const Tensor& slot_frame,
                                            int64_t k, const Tensor& exclude_lo,
                                            const Tensor& exclude_hi, int64_t sink_frames,
                                            const std::optional<Tensor>& slot_prior,
                                            double prior_mix) {
  const int64_t B = query_feat.size(0), M = query_feat.size(1), F = query_feat.size(2);
  const int64_t P = slot_feat.size(0);
  const auto opts = query_feat.options();
  Tensor out_slot = at::full({B, k}, -1, opts.dtype(at::kInt));
  Tensor out_score = at::full({B, k}, -std::numeric_limits<float>::infinity(),
                              opts.dtype(at::kFloat));
  if (k == 0 || P == 0 || B == 0) return {out_slot, out_score};

  const Tensor q = query_feat.to(at::kFloat).contiguous();
  const Tensor s = slot_feat.to(at::kFloat).contiguous();
  const float* qp = q.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const std::vector<int64_t> owner = to_int64_vector(slot_owner);
  const std::vector<int64_t> frame = to_int64_vector(slot_frame);
  const std::vector<int64_t> lo = to_int64_vector(exclude_lo);
  const std::vector<int64_t> hi = to_int64_vector(exclude_hi);

  // Mean cosine = (sum over valid rows of q_m / ||q_m||) . s_p / ||s_p|| / M_valid;
  // an all-zero row is padding (NaN counts as non-zero, as in torch).
  std::vector<float> qsum(B * F, 0.f);
  std::vector<int64_t> valid(B, 0);
  at::parallel_for(0, B, grain(M * F), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = qsum.data() + b * F;
      for (int64_t m = 0; m < M; ++m) {
        const float* row = qp + (b * M + m) * F;
        if (std::none_of(row, row + F, [](float x) { return x != 0.f; })) continue;
        const float d = norm_denom(dot(row, row, F));
        for (int64_t f = 0; f < F; ++f) acc[f] += row[f] / d;
        ++valid[b];
      }
    }
  });
  std::vector<float> slot_denom(P);
  at::parallel_for(0, P, grain(F), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) slot_denom[p] = norm_denom(dot(sp + p * F, sp + p * F, F));
  });

  // Usage prior: w_cos * cosine + w_prior * prior, each product rounded to fp32 as
  // torch's tensor-by-scalar products (the build targets no fma, so nothing fuses).
  const bool has_prior = slot_prior.has_value() && prior_mix > 0;
  const Tensor prior = has_prior ? slot_prior->to(at::kFloat).contiguous() : Tensor();
  const float* pp = has_prior ? prior.data_ptr<float>() : nullptr;
  const float w_cos = static_cast<float>(1.0 - prior_mix);
  const float w_prior = static_cast<float>(prior_mix);

  constexpr float kNone = -std::numeric_limits<float>::infinity();
  std::vector<float> score(B * P, kNone);
  at::parallel_for(0, B * P, grain(F), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / P, p = i % P;
      const int64_t f = frame[p];
      if (valid[b] == 0 || owner[p] != b || (f >= lo[b] && f < hi[b]) || f < sink_frames) {
        continue;
      }
      float c = dot(qsum.data() + b * F, sp + p * F, F) / slot_denom[p] /
                static_cast<float>(valid[b]);
      if (has_prior) {
        const float from_cos = w_cos * c;
        const float from_prior = w_prior * pp[i];
        c = from_cos + from_prior;
      }
      if (!std::isnan(c)) score[i] = c;
    }
  });

  int32_t* slot_out = out_slot.data_ptr<int32_t>();
  float* score_out = out_score.data_ptr<float>();
  at::parallel_for(0, B, grain(P), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cand;
    for (int64_t b = b0; b < b1; ++b) {
      const float* sc = score.data() + b * P;
      cand.clear();
      for (int64_t p = 0; p < P; ++p) {
        if (sc[p] != kNone) cand.push_back(p);
      }
      const int64_t chosen = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
      // Rank: score desc, frame asc, slot asc; then output by (frame, slot) asc.
      std::partial_sort(cand.begin(), cand.begin() + chosen, cand.end(),
                        [&](int64_t x, int64_t y) {
                          if (sc[x] != sc[y]) return sc[x] > sc[y];
                          if (frame[x] != frame[y]) return frame[x] < frame[y];
                          return x < y;
                        });
      std::sort(cand.begin(), cand.begin() + chosen, [&](int64_t x, int64_t y) {
        return frame[x] != frame[y] ? frame[x] < frame[y] : x < y;
      });
      for (int64_t j = 0; j < chosen; ++j) {
        slot_out[b * k + j] = static_cast<int32_t>(cand[j]);
        score_out[b * k + j] = sc[cand[j]];
      }
    }
  });
  return {out_slot, out_score};
}

std::tuple<Tensor, Tensor> gate_from_means_cpu(const Tensor& qbar, const Tensor& kbar_local,
                                               const Tensor& slot_mean_k, const Tensor& slot_idx,
                                               double tau, bool batch_scope) {
  const int64_t B = slot_idx.size(0), n = slot_idx.size(1);
  const int64_t H = qbar.size(1), P = slot_mean_k.size(0);
  Tensor kept = slot_idx.clone(at::MemoryFormat::Contiguous);
  Tensor ratio = at::zeros({B, n}, qbar.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return {kept, ratio};

  const std::vector<int64_t> idx = slot_list(slot_idx, P);

  const std::vector<int64_t> votes = vote_counts(qbar, kbar_local, slot_mean_k, idx, B, n);

  std::vector<int64_t> rank(B * n, -1), count(B, 0), by_rank(n, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < n; ++j) {
      if (idx[b * n + j] >= 0) rank[b * n + j] = count[b]++;
    }
  }
  const bool together =
      batch_scope && std::all_of(count.begin(), count.end(), [&](int64_t c) { return c == count[0]; });
  if (together) {
    for (int64_t i = 0; i < B * n; ++i) {
      if (rank[i] >= 0) by_rank[rank[i]] += votes[i];
    }
  }
  // Float division then a float compare with tau, as the oracle's float32 math.
  const float tau_f = static_cast<float>(tau);
  float* rp = ratio.data_ptr<float>();
  for (int64_t i = 0; i < B * n; ++i) {
    if (rank[i] < 0) continue;
    rp[i] = together ? static_cast<float>(by_rank[rank[i]]) / static_cast<float>(B * H)
                     : static_cast<float>(votes[i]) / static_cast<float>(H);
    if (rp[i] > tau_f) store_int(kept, i, -1);
  }
  return {kept, ratio};
}

std::tuple<Tensor, Tensor> sink_gate_cpu(const Tensor& q, const Tensor& k,
                                         const Tensor& slot_mean_k, const Tensor& slot_idx,
                                         const Tensor& k_len, double tau, bool batch_scope) {
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), HD = H * D;
  const Tensor qc = q.contiguous();
  const Tensor kc = k.contiguous();
  const std::vector<int64_t> len = to_int64_vector(k_len);
  Tensor qbar = at::empty({B, H, D}, q.options().dtype(at::kFloat));
  Tensor kbar = at::empty({B, H, D}, q.options().dtype(at::kFloat));
  float* qb = qbar.data_ptr<float>();
  float* kb = kbar.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sink_gate_cpu", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain((Sq + Sk) * HD), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        // mean over the chunk (NaN for Sq = 0, as torch's mean); masked mean of the
        // valid prefix of the window, divided by max(k_len, 1) as the oracle.
        column_sums(qp + b * Sq * HD, Sq, HD, qb + b * HD);
        for (int64_t c = 0; c < HD; ++c) qb[b * HD + c] /= static_cast<float>(Sq);
        const int64_t valid = std::clamp<int64_t>(len[b], 0, Sk);
        column_sums(kp + b * Sk * HD, valid, HD, kb + b * HD);
        const float denom = static_cast<float>(std::max<int64_t>(len[b], 1));
        for (int64_t c = 0; c < HD; ++c) kb[b * HD + c] /= denom;
      }
    });
  });
  return gate_from_means_cpu(qbar, kbar, slot_mean_k, slot_idx, tau, batch_scope);
}

std::tuple<Tensor, Tensor> bank_insert_cpu(
    const Tensor& pool_k, const Tensor& pool_v, const Tensor& pool_mean_k,
    const Tensor& slot_feat, const Tensor& slot_owner, const Tensor& slot_frame,
    const Tensor& slot_stamp, const Tensor& clock, const Tensor& src_k, const Tensor& src_v,
    const Tensor& src_pos, const Tensor& feature, const Tensor& frame, int64_t slots_per_sample,
    int64_t limit, std::optional<double> dedup) {
  const int64_t L = pool_k.size(0), P = pool_k.size(1), S_e = pool_k.size(2);
  const int64_t HD = pool_k.size(3) * pool_k.size(4);
  const int64_t B = feature.size(0), F = feature.size(1), N = src_k.size(2);
  const int64_t C = slots_per_sample;
  Tensor stored = at::zeros({B}, feature.options().dtype(at::kBool));
  Tensor slot = at::zeros({B}, feature.options().dtype(at::kLong));
  const std::vector<int64_t> pos = to_int64_vector(src_pos);
  for (const int64_t p : pos) {
    TORCH_CHECK(p >= 0 && p < N, "src_pos holds ", p, " outside [0, ", N, ")");
  }
  const Tensor fe = feature.to(at::kFloat).contiguous();
  const std::vector<int64_t> owner = to_int64_vector(slot_owner);
  const int64_t* stamp = slot_stamp.data_ptr<int64_t>();
  const int64_t clock0 = clock.item<int64_t>();
  const int64_t frame_value = frame.item<int64_t>();
  float* sf = slot_feat.data_ptr<float>();
  bool* stored_p = stored.data_ptr<bool>();
  int64_t* slot_p = slot.data_ptr<int64_t>();

  // Each sample reads and writes only its region [b*C, (b+1)*C), so deciding and
  // writing sample by sample equals deciding all first.
  std::vector<float> fn(F);
  for (int64_t b = 0; b < B; ++b) {
    const float* f = fe.data_ptr<float>() + b * F;
    const bool finite = std::all_of(f, f + F, [](float x) { return std::isfinite(x); });
    const float denom = norm_denom(dot(f, f, F));
    for (int64_t i = 0; i < F; ++i) fn[i] = f[i] / denom;
    bool any_occupied = false;
    float max_cos = -std::numeric_limits<float>::infinity();
    int64_t first_free = -1, oldest = -1;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t p = b * C + c;
      if (owner[p] < 0) {
        if (first_free < 0 && c < limit) first_free = c;
        continue;
      }
      any_occupied = true;
      const float* row = sf + p * F;
      max_cos = nan_max(max_cos, dot(fn.data(), row, F) / norm_denom(dot(row, row, F)));
      if (oldest < 0 || stamp[p] < stamp[b * C + oldest]) oldest = c;
    }
    // dedup compares in float32, as the oracle's tensor-with-scalar compare.
    const bool novel =
        !any_occupied || !dedup.has_value() || max_cos <= static_cast<float>(*dedup);
    const bool store = finite && novel;
    const int64_t s = b * C + (first_free >= 0 ? first_free : std::max<int64_t>(oldest, 0));
    stored_p[b] = store;
    slot_p[b] = s;
    if (!store) continue;

    store_int(slot_owner, s, b);
    store_int(slot_frame, s, frame_value);
    slot_stamp.data_ptr<int64_t>()[s] = clock0 + b;
    std::copy(fn.begin(), fn.end(), sf + s * F);
    // uint8: the bytes of an fp8 bank, copied as they are.
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, pool_k.scalar_type(), "bank_insert_cpu", [&] {
      const scalar_t* sk = src_k.data_ptr<scalar_t>();
      const scalar_t* sv = src_v.data_ptr<scalar_t>();
      scalar_t* pk = pool_k.data_ptr<scalar_t>();
      scalar_t* pv = pool_v.data_ptr<scalar_t>();
      float* pm = pool_mean_k.data_ptr<float>();
      at::parallel_for(0, L, grain(S_e * HD), [&](int64_t l0, int64_t l1) {
        for (int64_t l = l0; l < l1; ++l) {
          scalar_t* dk = pk + (l * P + s) * S_e * HD;
          scalar_t* dv = pv + (l * P + s) * S_e * HD;
          float* mean = pm + (l * P + s) * HD;
          std::fill(mean, mean + HD, 0.f);
          for (int64_t t = 0; t < S_e; ++t) {
            const scalar_t* rk = sk + l * src_k.stride(0) + b * src_k.stride(1) + pos[t] * src_k.stride(2);
            const scalar_t* rv = sv + l * src_v.stride(0) + b * src_v.stride(1) + pos[t] * src_v.stride(2);
            std::memcpy(dk + t * HD, rk, HD * sizeof(scalar_t));
            std::memcpy(dv + t * HD, rv, HD * sizeof(scalar_t));
            for (int64_t c = 0; c < HD; ++c) mean[c] += static_cast<float>(rk[c]);
          }
          // NaN for S_e = 0, as torch's mean of nothing.
          for (int64_t c = 0; c < HD; ++c) mean[c] /= static_cast<float>(S_e);
        }
      });
    });
  }
  clock.add_(B);
  return {stored, slot};
}

namespace {

// Largest |x[i]| of n floats, NaN if one of them is NaN (lanes: a float max reduction
// does not vectorise without fast-math).
DYSINK_CLONES float max_abs_f32(const float* x, int64_t n) {
  constexpr int64_t kW = 16;
  float m[kW] = {};
  int32_t nan[kW] = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
#pragma omp simd
    for (int64_t j = 0; j < kW; ++j) {
      const float v = x[i + j];
      m[j] = std::max(m[j], std::fabs(v));
      nan[j] |= static_cast<int32_t>(v != v);
    }
  }
  float r = 0.f;
  int32_t any_nan = 0;
  for (int64_t j = 0; j < kW; ++j) {
    r = std::max(r, m[j]);
    any_nan |= nan[j];
  }
  for (; i < n; ++i) {
    r = std::max(r, std::fabs(x[i]));
    any_nan |= static_cast<int32_t>(x[i] != x[i]);
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : r;
}

template <typename T>
float max_abs_row(const T* x, int64_t n) {
  constexpr int64_t kChunk = 1024;
  float buf[kChunk];
  float r = 0.f;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t len = std::min(kChunk, n - i);
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(x[i + j]);
    r = nan_max(r, max_abs_f32(buf, len));
  }
  return r;
}

template <>
float max_abs_row<float>(const float* x, int64_t n) {
  return max_abs_f32(x, n);
}

}  // namespace

void fold_max_abs_cpu(const Tensor& acc, at::TensorList xs) {
  float* a = acc.data_ptr<float>();
  const int64_t B = acc.size(0);
  for (const Tensor& x_in : xs) {
    const Tensor x = x_in.contiguous();
    const int64_t row = B > 0 ? x.numel() / B : 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fold_max_abs", [&] {
      const scalar_t* p = x.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(row), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) a[b] = nan_max(a[b], max_abs_row(p + b * row, row));
      });
    });
  }
}

}  // namespace dysink
