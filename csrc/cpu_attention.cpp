// gathered_sink_attention on CPU: the attended keys only, packed once per sample.
//
// The op reads its indices (slot_idx, local_ranges) itself: on CPU tensors that is a
// plain memory read, no host synchronisation. For each sample it packs, in fp32, the
// keys and values a query attends, head-major (H, N, D): the listed bank slots
// (dequantised for an fp8 bank, turned for re-positioned slots), the union of the
// local ranges, the current keys. Unlisted slots and rows outside the ranges are never
// read, so whatever they hold cannot reach a result, and no key is masked.
//
// Per block of queries, two batched matrix products (at::bmm_out, the BLAS torch was
// built with) and one pass over each score row between them, in base-2 units
// (y = score * log2(e), the scale folded into the packed queries): with m the row
// maximum, e = 2^(y - m), l = sum e,
//   out     = (e V) / l            (the division applied while out is written)
//   lse     = ln2 (m + log2 l)
//   entropy = ln2 (log2 l - sum e (y - m) / l)
//   mass[j] = mean over queries of sum over slot j's keys of e / l.
// The score pass is compiled for several x86-64 levels (DYSINK_CLONES, cpu_ops.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"

namespace dysink {
namespace {

using at::Tensor;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// fp32 elements of one score block (heads x queries x keys): 1 MB, within a core's L2.
constexpr int64_t kScoreElems = 1 << 18;
// Scratch kept per thread between calls, in fp32 elements (64 MB): fresh pages of a
// few MB cost as much as a small call's softmax. Larger calls allocate afresh.
constexpr int64_t kKeptScratch = 1 << 24;

// 2^y for y <= 0 (a score minus its row maximum), branch-free so that the score pass
// vectorises: y = n + f with n integer and |f| <= 1/2, 2^f by its Taylor polynomial to
// degree 7 (relative error below 1e-8), 2^n through the exponent bits. Results below
// 2^-126 are flushed to 0.
inline float exp2_nonpositive(float y) {
  y = y < -127.f ? -127.f : y;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y + kRound) - kRound;
  const float f = y - n;
  // (ln 2)^k / k!
  float p = 1.5252733804059840e-05f;
  p = p * f + 1.5403530393381609e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

// The row maximum over independent lanes (a float max reduction does not vectorise
// without fast-math). A NaN score may be skipped here; it still reaches the row's sums
// through its exponential.
DYSINK_CLONES float row_max(const float* s, int64_t n) {
  constexpr int64_t kW = 16;
  float acc[kW];
  for (int64_t j = 0; j < kW; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
#pragma omp simd
    for (int64_t j = 0; j < kW; ++j) acc[j] = std::max(acc[j], s[i + j]);
  }
  float m = acc[0];
  for (int64_t j = 1; j < kW; ++j) m = std::max(m, acc[j]);
  for (; i < n; ++i) m = std::max(m, s[i]);
  return m;
}

// s <- 2^(s - m) in place; returns sum e and sum e (s - m).
DYSINK_CLONES void exp2_row(float* s, int64_t n, float m, float* l_out, float* u_out) {
  float l = 0.f, u = 0.f;
#pragma omp simd reduction(+ : l, u)
  for (int64_t i = 0; i < n; ++i) {
    const float y = s[i] - m;
    const float e = exp2_nonpositive(y);
    s[i] = e;
    l += e;
    u += e * y;
  }
  *l_out = l;
  *u_out = u;
}

DYSINK_CLONES float sum_row(const float* s, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += s[i];
  return acc;
}

// Converts D contiguous elements of a float row to fp32.
template <typename T>
void load_row(const T* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

template <>
void load_row<float>(const float* src, float* dst, int64_t D) {
  std::memcpy(dst, src, D * sizeof(float));
}

// Every e4m3 byte's value (NaN for 0x7f and 0xff): a table lookup per element instead
// of decoding the bits.
const float* e4m3_table() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) {
      const auto byte = static_cast<uint8_t>(i);
      t[i] = static_cast<float>(c10::Float8_e4m3fn(byte, c10::Float8_e4m3fn::from_bits()));
    }
    return t;
  }();
  return table.data();
}

// An fp8 row dequantised as the other backends read it: stored * scale, rounded to
// the run dtype T, then fp32.
template <typename T>
void load_fp8_row(const uint8_t* src, float scale, float* dst, int64_t D) {
  const float* value = e4m3_table();
  for (int64_t d = 0; d < D; ++d) {
    dst[d] = static_cast<float>(static_cast<T>(value[src[d]] * scale));
  }
}

// A (B, S, H, D) tensor with a dense last dim, read row by row.
struct Rows {
  const char* base = nullptr;
  int64_t sb = 0, ss = 0, sh = 0;  // strides in bytes
  const char* row(int64_t b, int64_t s, int64_t h) const { return base + b * sb + s * ss + h * sh; }
};

// `len` tokens (all heads) of sample `b` from token `start` into dst (len, H, D) fp32:
// one copy when the source rows are contiguous fp32, else row by row.
template <typename T>
void copy_tokens(const Rows& src, int64_t b, int64_t start, int64_t len, int64_t H, int64_t D,
                 float* dst) {
  const int64_t e = sizeof(T);
  if (src.sh == D * e) {  // a token's heads are contiguous
    if (std::is_same_v<T, float> && src.ss == H * D * e) {
      std::memcpy(dst, src.row(b, start, 0), len * H * D * sizeof(float));
      return;
    }
    for (int64_t t = 0; t < len; ++t) {
      load_row(reinterpret_cast<const T*>(src.row(b, start + t, 0)), dst + t * H * D, H * D);
    }
    return;
  }
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      load_row(reinterpret_cast<const T*>(src.row(b, start + t, h)), dst + (t * H + h) * D, D);
    }
  }
}

Rows rows_of(const Tensor& t) {
  const int64_t e = t.element_size();
  return {static_cast<const char*>(t.data_ptr()), t.stride(0) * e, t.stride(1) * e,
          t.stride(2) * e};
}

int64_t index_at(const Tensor& t, int64_t i) {
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[i]
                                      : t.const_data_ptr<int32_t>()[i];
}

// One packed key segment of a sample: `len` consecutive rows starting at `start` of a
// source; slot segments also say which slot they are (for the mass and the fp8 scale).
struct Segment {
  int src;  // 0: pool, 1: local buffer, 2: current keys
  int64_t start, len;
  int64_t slot_pos;  // position j in slot_idx (pool segments), else -1
  int64_t slot;      // pool row (pool segments)
};

// Scratch fp32 memory, kept per thread up to kKeptScratch elements.
float* scratch(int64_t numel, Tensor& owner) {
  thread_local Tensor kept;
  if (numel > kKeptScratch) {
    owner = at::empty({numel}, at::kFloat);
    return owner.data_ptr<float>();
  }
  if (!kept.defined() || kept.numel() < numel) kept = at::empty({numel}, at::kFloat);
  return kept.data_ptr<float>();
}

template <typename T>
void attention_impl(const Tensor& q, const Tensor& pool_k, const Tensor& pool_v,
                    const Tensor& slot_idx, const Tensor& local_k, const Tensor& local_v,
                    const Tensor& local_ranges, const std::optional<Tensor>& cur_k,
                    const std::optional<Tensor>& cur_v, double softmax_scale, bool return_stats,
                    const std::optional<Tensor>& slot_delta, double rope_theta,
                    const std::optional<Tensor>& pool_k_scale,
                    const std::optional<Tensor>& pool_v_scale, Tensor& out, Tensor& lse,
                    Tensor& entropy, Tensor& mass) {
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t n = slot_idx.size(1), P = pool_k.size(0), S_e = pool_k.size(1);
  const int64_t n_local = local_k.size(1), R = local_ranges.size(1);
  const int64_t n_cur = cur_k.has_value() ? cur_k->size(1) : 0;
  const bool fp8 = pool_k.scalar_type() == at::kFloat8_e4m3fn;
  const float q_mul = static_cast<float>(softmax_scale) * kLog2e;

  const Rows q_rows = rows_of(q), out_rows = rows_of(out);
  const Rows src_k[3] = {rows_of(pool_k), rows_of(local_k),
                         n_cur ? rows_of(*cur_k) : Rows{}};
  const Rows src_v[3] = {rows_of(pool_v), rows_of(local_v),
                         n_cur ? rows_of(*cur_v) : Rows{}};
  // (bindings.cpp: an fp8 pool comes with its scales whenever a slot is listed)
  const float* k_scale = pool_k_scale.has_value() ? pool_k_scale->const_data_ptr<float>() : nullptr;
  const float* v_scale = pool_v_scale.has_value() ? pool_v_scale->const_data_ptr<float>() : nullptr;

  // Temporal RoPE pairs and their frequencies (fp64, as rope/tables.py).
  const int64_t n_t = D / 2 - 2 * (D / 6);
  std::vector<double> freq(slot_delta.has_value() ? n_t : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(freq.size()); ++j) {
    freq[j] = std::pow(rope_theta, -2.0 * static_cast<double>(j) / static_cast<double>(2 * n_t));
  }

  float* lse_p = return_stats ? lse.data_ptr<float>() : nullptr;
  float* ent_p = return_stats ? entropy.data_ptr<float>() : nullptr;
  float* mass_p = return_stats ? mass.data_ptr<float>() : nullptr;
  const float inv_sq = 1.f / static_cast<float>(Sq);

  std::vector<Segment> segs;
  std::vector<uint8_t> in_range(n_local);
  for (int64_t b = 0; b < B; ++b) {
    // The sample's key segments: listed slots, the union of its ranges, current keys.
    segs.clear();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = index_at(slot_idx, b * n + j);
      if (s >= 0 && S_e > 0) segs.push_back({0, 0, S_e, j, s});
    }
    const int64_t n_slot_segs = static_cast<int64_t>(segs.size());
    std::fill(in_range.begin(), in_range.end(), uint8_t{0});
    for (int64_t r = 0; r < R; ++r) {
      const int64_t lo = std::max<int64_t>(index_at(local_ranges, (b * R + r) * 2), 0);
      const int64_t hi = std::min(index_at(local_ranges, (b * R + r) * 2 + 1), n_local);
      for (int64_t t = lo; t < hi; ++t) in_range[t] = 1;
    }
    for (int64_t t = 0; t < n_local;) {
      if (!in_range[t]) {
        ++t;
        continue;
      }
      int64_t e = t;
      while (e < n_local && in_range[e]) ++e;
      segs.push_back({1, t, e - t, -1, -1});
      t = e;
    }
    if (n_cur > 0) segs.push_back({2, 0, n_cur, -1, -1});
    int64_t N = 0;
    std::vector<int64_t> seg_off(segs.size());
    for (size_t i = 0; i < segs.size(); ++i) {
      seg_off[i] = N;
      N += segs[i].len;
    }

    if (N == 0) {  // nothing attended: zeros, lse -inf, entropy and mass 0
      for (int64_t sq = 0; sq < Sq; ++sq) {
        for (int64_t h = 0; h < H; ++h) {
          T* o = reinterpret_cast<T*>(const_cast<char*>(out_rows.row(b, sq, h)));
          std::fill(o, o + D, T(0));
        }
      }
      if (return_stats) {
        std::fill(lse_p + b * H * Sq, lse_p + (b + 1) * H * Sq,
                  -std::numeric_limits<float>::infinity());
        std::fill(ent_p + b * H * Sq, ent_p + (b + 1) * H * Sq, 0.f);
      }
      continue;
    }

    const int64_t chunk = std::clamp<int64_t>(kScoreElems / (H * N), 1, Sq);
    const int64_t kv_elems = H * N * D, qs_elems = H * Sq * D;
    const int64_t total = 2 * kv_elems + qs_elems + H * chunk * (N + D) + H * chunk;
    Tensor owner;
    float* ws = scratch(total, owner);
    float* kp = ws;                      // (N, H, D)
    float* vp = kp + kv_elems;           // (N, H, D)
    float* qs = vp + kv_elems;           // (H, Sq, D)
    float* sc = qs + qs_elems;           // (H, chunk, N)
    float* oc = sc + H * chunk * N;      // (H, chunk, D)
    float* inv_l = oc + H * chunk * D;   // (H, chunk)

    // Pack keys and values token-major, (N, H, D): a segment of contiguous fp32 rows is
    // one copy. Then the scaled queries, head-major (H, Sq, D).
    const int64_t HD = H * D;
    at::parallel_for(0, static_cast<int64_t>(segs.size()), 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> turn(2 * n_t);
      for (int64_t i = i0; i < i1; ++i) {
        const Segment& sg = segs[i];
        float* kd = kp + seg_off[i] * HD;
        float* vd = vp + seg_off[i] * HD;
        const int64_t bb = sg.src == 0 ? sg.slot : b;
        if (sg.src == 0 && fp8) {
          for (int64_t t = 0; t < sg.len; ++t) {
            for (int64_t h = 0; h < H; ++h) {
              load_fp8_row<T>(reinterpret_cast<const uint8_t*>(src_k[0].row(bb, t, h)),
                              k_scale[sg.slot * H + h], kd + (t * H + h) * D, D);
              load_fp8_row<T>(reinterpret_cast<const uint8_t*>(src_v[0].row(bb, t, h)),
                              v_scale[sg.slot * H + h], vd + (t * H + h) * D, D);
            }
          }
        } else {
          copy_tokens<T>(src_k[sg.src], bb, sg.start, sg.len, H, D, kd);
          copy_tokens<T>(src_v[sg.src], bb, sg.start, sg.len, H, D, vd);
        }
        if (sg.src == 0 && slot_delta.has_value()) {  // re-positioned: turn temporal pairs
          const double delta =
              static_cast<double>(slot_delta->const_data_ptr<float>()[b * n + sg.slot_pos]);
          for (int64_t j = 0; j < n_t; ++j) {
            turn[2 * j] = static_cast<float>(std::cos(delta * freq[j]));
            turn[2 * j + 1] = static_cast<float>(std::sin(delta * freq[j]));
          }
          for (int64_t r = 0; r < sg.len * H; ++r) {
            float* x = kd + r * D;
            for (int64_t j = 0; j < n_t; ++j) {
              const float re = x[2 * j], im = x[2 * j + 1];
              const float c = turn[2 * j], s = turn[2 * j + 1];
              x[2 * j] = re * c - im * s;
              x[2 * j + 1] = re * s + im * c;
            }
          }
        }
      }
    });
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t sq = 0; sq < Sq; ++sq) {
          float* qd = qs + (h * Sq + sq) * D;
          load_row(reinterpret_cast<const T*>(q_rows.row(b, sq, h)), qd, D);
          for (int64_t d = 0; d < D; ++d) qd[d] *= q_mul;
        }
      }
    });

    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const Tensor V = at::from_blob(vp, {N, H, D}, f32).permute({1, 0, 2});   // (H, N, D)
    const Tensor Kt = at::from_blob(kp, {N, H, D}, f32).permute({1, 2, 0});  // (H, D, N)
    const Tensor Q = at::from_blob(qs, {H, Sq, D}, f32);

    for (int64_t q0 = 0; q0 < Sq; q0 += chunk) {
      const int64_t rows = std::min(chunk, Sq - q0);
      Tensor S = at::from_blob(sc, {H, rows, N}, f32);
      Tensor O = at::from_blob(oc, {H, rows, D}, f32);
      at::bmm_out(S, Q.narrow(1, q0, rows), Kt);
      // The score pass: per row max, exponentials, sums, statistics.
      at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t r = 0; r < rows; ++r) {
            float* s = sc + (h * rows + r) * N;
            const float m = row_max(s, N);
            float l, u;
            exp2_row(s, N, m, &l, &u);
            const float il = 1.f / l;
            inv_l[h * rows + r] = il;
            if (!return_stats) continue;
            const float log2_l = std::log2(l);
            const int64_t at_q = (b * H + h) * Sq + q0 + r;
            lse_p[at_q] = kLn2 * (m + log2_l);
            ent_p[at_q] = kLn2 * (log2_l - u * il);
            float* ms = mass_p + (b * H + h) * n;
            for (int64_t i = 0; i < n_slot_segs; ++i) {
              ms[segs[i].slot_pos] += sum_row(s + seg_off[i], S_e) * il * inv_sq;
            }
          }
        }
      });
      at::bmm_out(O, S, V);
      // out[b, q, h] = O[h, q] / l, in the output dtype.
      at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t r = 0; r < rows; ++r) {
            const float* o = oc + (h * rows + r) * D;
            const float il = inv_l[h * rows + r];
            T* dst = reinterpret_cast<T*>(const_cast<char*>(out_rows.row(b, q0 + r, h)));
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * il);
          }
        }
      });
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> gathered_sink_attention_cpu(
    const Tensor& q, const Tensor& pool_k, const Tensor& pool_v, const Tensor& slot_idx,
    const Tensor& local_k, const Tensor& local_v, const Tensor& local_ranges,
    const std::optional<Tensor>& cur_k, const std::optional<Tensor>& cur_v, double softmax_scale,
    bool return_stats, const std::optional<Tensor>& slot_delta, double rope_theta,
    const std::optional<Tensor>& pool_k_scale, const std::optional<Tensor>& pool_v_scale) {
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2);
  const int64_t n = slot_idx.size(1), P = pool_k.size(0);
  // q has a unit last stride here, so out (laid out like q) has one too.
  Tensor out = at::empty_like(q);
  Tensor lse, entropy, mass;
  if (return_stats) {
    lse = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
    entropy = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
    mass = at::zeros({B, H, n}, q.options().dtype(at::kFloat));
  } else {
    lse = at::empty({0}, q.options().dtype(at::kFloat));
    entropy = at::empty({0}, q.options().dtype(at::kFloat));
    mass = at::empty({0}, q.options().dtype(at::kFloat));
  }
  // Every listed slot must name a pool row (-1 skips): the packing reads it.
  const Tensor idx = slot_idx.contiguous();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    const int64_t s = index_at(idx, i);
    TORCH_CHECK_INDEX(s >= -1 && s < P, "slot_idx holds ", s, ", outside [-1, ", P, ")");
  }
  if (B * Sq * H == 0) return {out, lse, entropy, mass};
  const Tensor delta = slot_delta.has_value() ? slot_delta->to(at::kFloat).contiguous() : Tensor();
  const auto dtype = q.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gathered_attention", [&] {
    attention_impl<scalar_t>(
        q, pool_k, pool_v, idx, local_k, local_v, local_ranges.contiguous(), cur_k, cur_v,
        softmax_scale, return_stats,
        slot_delta.has_value() ? std::optional<Tensor>(delta) : std::nullopt, rope_theta,
        pool_k_scale.has_value() ? std::optional<Tensor>(pool_k_scale->contiguous()) : std::nullopt,
        pool_v_scale.has_value() ? std::optional<Tensor>(pool_v_scale->contiguous()) : std::nullopt,
        out, lse, entropy, mass);
  });
  return {out, lse, entropy, mass};
}

}  // namespace dysink
