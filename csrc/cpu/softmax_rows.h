// Row kernels shared by the CPU ops: the online-softmax forward of one row of logits and the
// gradient of  g * logp_label + gH * entropy  for one row, with the chunk, transform and store
// helpers they use. Token log-probs (logprobs.cpp) run them in two passes; the policy losses
// (policy.cpp) run both on the same row back to back, so the second read hits the cache.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastalign {
namespace rows {

using at::vec::Vectorized;

// 2048 floats = 8 KiB: a chunk and its output buffer fit L1 together.
constexpr int64_t kChunk = 2048;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max that propagates NaN, so NaN logits give NaN results instead of being skipped.
template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || std::isnan(a)) ? a : b;
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T best = neg_inf<T>();
  for (int i = 0; i < Vectorized<T>::size(); ++i) best = nan_max(best, lanes[i]);
  return best;
}

// The logit transform applied to every logit, in TRL's order:
// z = softcap * tanh(x * logit_scale / softcap) / temperature   (without softcap: x * scale / T),
// taken as z = w * factor with factor >= 0. The passes work on w: w = x (read in place), -x when
// scale / T is negative, or tanh(x * scale / softcap) with softcap; the row's max is kept in w and
// each exponent is (w - max w) * factor. The difference of two close logits is exact, so the
// largest probabilities keep full precision at any magnitude (rounding z = x * k first would
// shift them by |z| * 6e-8: 6e-4 at |z| = 1e4). factor is split into hi + lo so that the product
// keeps the accuracy of one rounding (1 / 0.7 rounded to fp32 alone is off by 1e-8 relative).
template <typename acc_t>
struct Transform {
  acc_t scale;
  acc_t softcap;  // 0 means no softcap
  acc_t chain;    // dz/dx apart from the tanh term: scale / T
  acc_t factor_hi;
  acc_t factor_lo;
  bool negate;  // w = -x (no softcap, scale / T < 0)

  bool has_softcap() const { return softcap > 0; }
  // Whether a row of element stride `sv` is read in place (w = x) instead of staged.
  bool in_place(int64_t sv) const { return sv == 1 && !has_softcap() && !negate; }
  // The row's max in w, as the forward stores it (in x or tanh units: -w when negated).
  acc_t stored_shift(acc_t max_w) const {
    return std::isfinite(max_w) ? (negate ? -max_w : max_w) : acc_t(0);
  }
  acc_t sweep_shift(acc_t stored) const { return negate ? -stored : stored; }
};

// Copies n logits (element stride `stride`) into `dst` as acc_t.
template <typename scalar_t, typename acc_t>
inline void load_as_acc(const scalar_t* src, int64_t stride, int64_t n, acc_t* dst) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * stride]);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + bVec::size() <= n; i += bVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fVec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// A vector store that bypasses the cache (dst must be vector-aligned). The gradient is written
// once and not read back by this kernel; a plain store would first read each line from memory
// (read-for-ownership), a third pass over an [N, V] tensor. Needs a fence before other threads
// read the data: see `stream_fence`.
template <typename T>
inline void stream_store(T* dst, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(dst, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(dst, v);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(dst, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(dst, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
  }
#else
  v.store(dst);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename T>
inline bool vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (Vectorized<T>::size() * sizeof(T)) == 0;
}

template <typename T>
inline void store_vec(T* dst, const Vectorized<T>& v, bool stream) {
  if (stream) {
    stream_store(dst, v);
  } else {
    v.store(dst);
  }
}

// Writes n acc_t values to a contiguous scalar_t destination (streaming when `stream`: dst aligned).
template <typename scalar_t, typename acc_t>
inline void store_from_acc(const acc_t* src, int64_t n, scalar_t* dst, bool stream) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + bVec::size() <= n; i += bVec::size()) {
      store_vec(dst + i,
                at::vec::convert_from_float<scalar_t>(fVec::loadu(src + i), fVec::loadu(src + i + fVec::size())),
                stream);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Turns a staged chunk of logits into w in place: -x, or tanh(x * scale / softcap).
template <typename acc_t>
inline void sweep_values_in_place(acc_t* w, int64_t n, const Transform<acc_t>& tf) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  if (tf.has_softcap()) {
    const Vec scale_over_cap(tf.scale / tf.softcap);
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(w + i) * scale_over_cap).tanh().store(w + i);
    for (; i < n; ++i) w[i] = std::tanh(w[i] * (tf.scale / tf.softcap));
  } else if (tf.negate) {
    const Vec vzero(acc_t(0));
    for (; i + Vec::size() <= n; i += Vec::size()) (vzero - Vec::loadu(w + i)).store(w + i);
    for (; i < n; ++i) w[i] = -w[i];
  }
}

// A chunk of a row, ready for the passes: values w with z = w * (factor + factor_lo).
template <typename acc_t>
struct ChunkView {
  const acc_t* x;
  acc_t factor;
  acc_t factor_lo;

  // (w - shift) * factor = z - z_shift, the product rounded once. The difference is clamped to
  // the lowest finite value: a -inf one times factor_lo = 0 would be NaN, the clamped one still
  // yields exp(...) = 0 (NaN stays NaN).
  acc_t shifted(acc_t w, acc_t shift) const {
    const acc_t diff = std::max(w - shift, std::numeric_limits<acc_t>::lowest());
    return std::fma(diff, factor, diff * factor_lo);
  }
  // The same minus c, with one rounding less.
  acc_t shifted_minus(acc_t w, acc_t shift, acc_t c) const {
    const acc_t diff = std::max(w - shift, std::numeric_limits<acc_t>::lowest());
    return std::fma(diff, factor, std::fma(diff, factor_lo, -c));
  }
};

// Read in place (`in_place`: unit stride, w = x) fp32/fp64 logits are used where they lie and
// bf16/fp16 are only widened into `buffer`; otherwise w is staged in `buffer`.
template <typename scalar_t, typename acc_t>
inline ChunkView<acc_t> view_chunk(const scalar_t* row, int64_t stride, int64_t start, int64_t n,
                                   const Transform<acc_t>& tf, bool in_place, acc_t* buffer) {
  if (in_place) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return {row + start, tf.factor_hi, tf.factor_lo};
    } else {
      load_as_acc<scalar_t, acc_t>(row + start, 1, n, buffer);
      return {buffer, tf.factor_hi, tf.factor_lo};
    }
  }
  load_as_acc<scalar_t, acc_t>(row + start * stride, stride, n, buffer);
  sweep_values_in_place(buffer, n, tf);
  return {buffer, tf.factor_hi, tf.factor_lo};
}

template <typename acc_t>
struct SoftmaxState {
  acc_t m = neg_inf<acc_t>();  // running max of w
  acc_t s = 0;                 // sum of exp(z - z(m))
  acc_t xs = 0;                // sum of exp(z - m) * (z - m): entropy without cancellation at |z| ~ 1e4
  acc_t sq = 0;                // sum of exp(z - m)^2
};

// Max (NaN-propagating) and sum of x over a chunk.
template <typename acc_t, bool SUM>
inline std::pair<acc_t, acc_t> max_and_sum(const acc_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec vmax(neg_inf<acc_t>()), vsum(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec v = Vec::loadu(x + i);
    vmax = at::vec::maximum(vmax, v);
    if constexpr (SUM) vsum += v;
  }
  acc_t mx = hmax(vmax), total = SUM ? hsum(vsum) : acc_t(0);
  for (; i < n; ++i) {
    mx = nan_max(mx, x[i]);
    if constexpr (SUM) total += x[i];
  }
  return {mx, total};
}

template <typename acc_t>
inline acc_t prefix_max(const acc_t* x, int64_t n) {
  acc_t mx = neg_inf<acc_t>();
  for (int64_t i = 0; i < n; ++i) mx = nan_max(mx, x[i]);
  return mx;
}

// Folds one chunk (z = w * factor, chunk max `cmax` of w already known and not -inf) into the state.
// KEEP: also stores each e = exp(z - m) into `kept`, for a gradient that follows at once.
template <typename acc_t, bool ENTROPY, bool SQ, bool KEEP = false>
inline void fold_chunk(const ChunkView<acc_t>& c, int64_t n, acc_t cmax, SoftmaxState<acc_t>& st,
                       acc_t* kept = nullptr) {
  using Vec = Vectorized<acc_t>;
  if (!(cmax <= st.m)) {  // a new maximum, or NaN
    if (st.s > 0) {
      const acc_t shift = c.shifted(st.m, cmax);
      const acc_t r = std::exp(shift);
      if constexpr (ENTROPY) st.xs = r * (st.xs + shift * st.s);
      if constexpr (SQ) st.sq *= r * r;
      st.s *= r;
    }
    st.m = cmax;
  }
  const Vec vk(c.factor), vk_lo(c.factor_lo), vm(st.m), vlowest(std::numeric_limits<acc_t>::lowest());
  Vec vs(acc_t(0)), vxs(acc_t(0)), vsq(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec diff = at::vec::maximum(Vec::loadu(c.x + i) - vm, vlowest);
    const Vec d = at::vec::fmadd(diff, vk, diff * vk_lo);
    const Vec e = d.exp();
    if constexpr (KEEP) e.store(kept + i);
    vs += e;
    // d = -inf has e = 0; clamping d keeps 0 * -inf from turning into NaN.
    if constexpr (ENTROPY) vxs = at::vec::fmadd(e, at::vec::maximum(d, vlowest), vxs);
    if constexpr (SQ) vsq = at::vec::fmadd(e, e, vsq);
  }
  acc_t s = hsum(vs), xs = ENTROPY ? hsum(vxs) : acc_t(0), sq = SQ ? hsum(vsq) : acc_t(0);
  for (; i < n; ++i) {
    const acc_t d = c.shifted(c.x[i], st.m);
    const acc_t e = std::exp(d);
    if constexpr (KEEP) kept[i] = e;
    s += e;
    if constexpr (ENTROPY) xs += e * std::max(d, std::numeric_limits<acc_t>::lowest());
    if constexpr (SQ) sq += e * e;
  }
  st.s += s;
  if constexpr (ENTROPY) st.xs += xs;
  if constexpr (SQ) st.sq += sq;
}

template <typename acc_t>
struct RowStats {
  acc_t logp = 0, max_w = 0, log_s = 0, entropy = 0, log_sum_sq = 0, mean = 0;
  bool top1 = false;
};

// What a forward pass keeps for a gradient computed right after it: e_j = exp(z_j - z(m_c)) for
// every logit (V values) and the shift m_c (in w) its chunk used, so that
// p_j = e_j * exp(z(m_c) - z(m) - log s) costs a multiply instead of a second exp.
template <typename acc_t>
struct KeptExp {
  acc_t* e;        // V values
  acc_t* shift;    // one per chunk; -inf for a chunk of -inf logits (its e are 0)
};

// One pass over a row (V logits, element stride sv): log p(label), the normalizer (max of w and
// log s), and the fields asked for. `buffer` holds kChunk acc_t values. KEEP fills `kept` (see KeptExp).
template <typename scalar_t, typename acc_t, bool ENTROPY, bool SQ, bool KEEP = false>
inline RowStats<acc_t> forward_row(const scalar_t* row, int64_t sv, int64_t V, int64_t label,
                                   const Transform<acc_t>& tf, bool in_place, bool want_mean, bool want_top1,
                                   acc_t* buffer, KeptExp<acc_t> kept = {nullptr, nullptr}) {
  SoftmaxState<acc_t> state;
  acc_t z_sum = 0, max_before_label = neg_inf<acc_t>();
  acc_t w_label = 0;  // in w, like the max
  ChunkView<acc_t> label_chunk{nullptr, tf.factor_hi, tf.factor_lo};
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const ChunkView<acc_t> c = view_chunk<scalar_t, acc_t>(row, sv, start, n, tf, in_place, buffer);
    acc_t cmax, csum;
    if (want_mean) {
      std::tie(cmax, csum) = max_and_sum<acc_t, true>(c.x, n);
      z_sum += csum;
    } else {
      cmax = max_and_sum<acc_t, false>(c.x, n).first;
    }
    if (label >= start && label < start + n) {
      w_label = c.x[label - start];
      label_chunk = c;
      // argmax takes the first maximum: a tie with an earlier token is not a top-1 hit.
      if (want_top1) max_before_label = nan_max(state.m, prefix_max(c.x, label - start));
    }
    if (cmax == neg_inf<acc_t>()) {  // an all -inf chunk adds nothing
      if constexpr (KEEP) {
        std::fill(kept.e + start, kept.e + start + n, acc_t(0));
        kept.shift[start / kChunk] = neg_inf<acc_t>();
      }
      continue;
    }
    fold_chunk<acc_t, ENTROPY, SQ, KEEP>(c, n, cmax, state, KEEP ? kept.e + start : nullptr);
    if constexpr (KEEP) kept.shift[start / kChunk] = state.m;
  }
  RowStats<acc_t> out;
  const acc_t log_s = std::log(state.s);
  out.max_w = state.m;
  out.log_s = log_s;
  // (z - max z) - log s, with z - max z taken as the sums' exponents were: 0 at the maximum. A
  // label logit of -inf gives -inf (the clamped difference would give a huge finite number).
  const acc_t diff = w_label - state.m;
  out.logp = (diff == neg_inf<acc_t>() ? diff * tf.factor_hi : label_chunk.shifted(w_label, state.m)) - log_s;
  if constexpr (ENTROPY) out.entropy = log_s - state.xs / state.s;
  if constexpr (SQ) out.log_sum_sq = std::log(state.sq) - 2 * log_s;
  out.mean = z_sum * tf.factor_hi / static_cast<acc_t>(V);
  out.top1 = w_label >= state.m && w_label > max_before_label;
  return out;
}

// Writes d/dx of  g * logp_label + gh * H  for one row into grad_row (contiguous, V values):
// dz_j = g * (1[j = label] - p_j) - gH * p_j * (log p_j + H), then back through the transform:
// * scale / T, times (1 - tanh^2) under softcap. `buffer` and `out_buffer` hold kChunk values.
// The row's normalizer is (max_w, log_s) as forward_row found it: log p_j = (w_j - max_w) * factor
// - log_s. KEPT: p_j = e_j * exp(z(m_c) - z(max_w) - log_s) from the exps a KEEP forward stored in
// `kept`, a multiply instead of an exp; the logits are then read only where the formula needs them
// (entropy gradient, softcap). Otherwise p_j = exp(log p_j) from the logits.
template <typename scalar_t, typename acc_t, bool ENTROPY_GRAD, bool KEPT = false>
inline void backward_row(const scalar_t* row, int64_t sv, int64_t V, int64_t label, const Transform<acc_t>& tf,
                         bool in_place, acc_t g, acc_t gh, acc_t h, acc_t max_w, acc_t log_s, scalar_t* grad_row,
                         acc_t* buffer, acc_t* out_buffer, KeptExp<acc_t> kept = {nullptr, nullptr}) {
  using Vec = Vectorized<acc_t>;
  if (!(log_s > neg_inf<acc_t>())) {  // no finite logit, or NaN: a NaN log-prob, a NaN gradient
    std::fill(grad_row, grad_row + V, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  const acc_t chain = tf.chain;
  const bool need_x = !KEPT || ENTROPY_GRAD || tf.has_softcap();
  alignas(64) acc_t lanes[Vec::size()];
  // Chunks start at multiples of kChunk, so an aligned row keeps every vector store aligned.
  const bool stream = vector_aligned(grad_row);
  // The 1[j = label] term, through the transform's chain rule.
  acc_t label_term = g * chain;
  // A label outside [0, V) is a row of a column block that holds no label: no one-hot term.
  if (tf.has_softcap() && label >= 0 && label < V) {
    const acc_t t = std::tanh(static_cast<acc_t>(row[label * sv]) * (tf.scale / tf.softcap));
    label_term *= (1 - t * t);
  }
  const Vec vg(g), vgh(gh), vh(h), vm(max_w), vneg_log_s(-log_s), vzero(acc_t(0)), vchain(chain), vone(acc_t(1)),
      vlowest(std::numeric_limits<acc_t>::lowest());
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    ChunkView<acc_t> c{nullptr, tf.factor_hi, tf.factor_lo};
    if (need_x) c = view_chunk<scalar_t, acc_t>(row, sv, start, n, tf, in_place, buffer);
    acc_t* dz = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(grad_row + start) : out_buffer;
    const bool stream_dz = stream && std::is_same_v<scalar_t, acc_t>;
    const int64_t label_at = label - start;  // the label's offset in this chunk, if it is here
    const acc_t* e = KEPT ? kept.e + start : nullptr;
    const acc_t scale = KEPT ? std::exp(c.shifted_minus(kept.shift[start / kChunk], max_w, log_s)) : acc_t(0);
    const Vec vk(c.factor), vk_lo(c.factor_lo), vscale(scale);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec raw, logp, p;
      if (need_x) {
        raw = Vec::loadu(c.x + i);
        const Vec diff = at::vec::maximum(raw - vm, vlowest);
        logp = at::vec::fmadd(diff, vk, at::vec::fmadd(diff, vk_lo, vneg_log_s));
      }
      if constexpr (KEPT) {
        p = Vec::loadu(e + i) * vscale;
      } else {
        p = logp.exp();
      }
      Vec d;
      if constexpr (ENTROPY_GRAD) {
        d = p * at::vec::fmadd(vgh, logp + vh, vg);
        d = Vec::blendv(d, vzero, p == vzero);  // p = 0 where z = -inf: no 0 * inf
      } else {
        d = p * vg;
      }
      if (tf.has_softcap()) {
        d = (vzero - d) * vchain * (vone - raw * raw);  // raw is tanh's value
      } else {
        d = (vzero - d) * vchain;
      }
      if (label_at >= i && label_at < i + Vec::size()) {
        d.store(lanes);
        lanes[label_at - i] += label_term;
        d = Vec::loadu(lanes);
      }
      store_vec(dz + i, d, stream_dz);
    }
    for (; i < n; ++i) {
      const acc_t logp = need_x ? c.shifted_minus(c.x[i], max_w, log_s) : acc_t(0);
      const acc_t p = KEPT ? e[i] * scale : std::exp(logp);
      acc_t d = ENTROPY_GRAD ? (p == 0 ? acc_t(0) : p * (g + gh * (logp + h))) : p * g;
      d = -d * chain;
      if (tf.has_softcap()) d *= (1 - c.x[i] * c.x[i]);
      dz[i] = i == label_at ? d + label_term : d;
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      store_from_acc<scalar_t, acc_t>(dz, n, grad_row + start, stream);
    }
  }
}

template <typename acc_t>
Transform<acc_t> make_transform(double temperature, double logit_scale, double softcap) {
  const double k = logit_scale / temperature;
  const bool negate = !(softcap > 0) && k < 0;
  const double factor = softcap > 0 ? softcap / temperature : std::abs(k);
  const acc_t hi = static_cast<acc_t>(factor);
  const acc_t lo = std::is_same_v<acc_t, double> ? acc_t(0) : static_cast<acc_t>(factor - static_cast<double>(hi));
  return {static_cast<acc_t>(logit_scale), static_cast<acc_t>(softcap), static_cast<acc_t>(k), hi, lo, negate};
}

// Checks of the op contract: logits [B, T, V] on CPU, labels [B*T] int64 in range.
inline void check_label_range(const int64_t* labels, int64_t N, int64_t V, int64_t ignore_index) {
  for (int64_t r = 0; r < N; ++r) {
    const int64_t label = labels[r];
    TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < V), "labels: every value must lie in [0, ", V,
                      ") (the vocabulary size, logits.shape[-1]) or equal ignore_index=", ignore_index, "; found ",
                      label, " at flattened position ", r);
  }
}

inline void check_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected a [B, T, V] view, got ", logits.dim(), " dims");
  TORCH_CHECK(logits.device().is_cpu(), "logits: the native kernels take CPU tensors, got ", logits.device());
  TORCH_CHECK(labels.dim() == 1 && labels.numel() == logits.size(0) * logits.size(1),
              "labels: expected [B*T] = [", logits.size(0) * logits.size(1), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "labels: expected contiguous int64");
}

// Rows per parallel_for grain: about 16K logits of work per grain.
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

}  // namespace rows
}  // namespace fastalign
