// Student-teacher divergences on CPU (fastalign/reference/divergence.py has the math).
//
// Forward, per row. The two KLs read both rows once (kl_row): both models' online softmax
// statistics and the weighting model's sum of e (d_w - d_o), with d each model's exponent at its
// running max, rebased whenever a max moves (so no large shared offset cancels at the end). The
// mixture and total variation need both normalizers before any term: one online-softmax pass over
// each model's logits (forward_row, as token log-probs run it), then one pass over both rows
// together that forms log p_s and log p_t exactly and sums the divergence, the student's entropy
// and the two sums sum p g the gradients need (re-reading rows of a few hundred KiB at most, from
// cache for the vocabularies of today). Backward: one pass over both rows, writing the gradient
// of the first argument once (the teacher's gradient is the same kernel with the roles swapped).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "softmax_rows.h"

#include <cmath>
#include <memory>
#include <tuple>
#include <type_traits>

namespace fastalign {
namespace {

using namespace rows;

enum Kind : int64_t { kForwardKL = 0, kReverseKL = 1, kMixture = 2, kTotalVariation = 3 };

// The per-kind constants; lb = log(beta), l1b = log(1 - beta), -inf at the ends.
template <typename acc_t>
struct Params {
  acc_t beta, w_t, w_s, lb, l1b;
};

template <typename acc_t>
Params<acc_t> make_params(double beta, double w_t, double w_s) {
  const double inf = std::numeric_limits<double>::infinity();
  return {static_cast<acc_t>(beta), static_cast<acc_t>(w_t), static_cast<acc_t>(w_s),
          static_cast<acc_t>(beta > 0 ? std::log(beta) : -inf),
          static_cast<acc_t>(beta < 1 ? std::log1p(-beta) : -inf)};
}

template <typename acc_t>
using Vec = Vectorized<acc_t>;

// p * x, 0 where p is 0 (x may be -inf - -inf there).
template <typename acc_t>
inline Vec<acc_t> times(const Vec<acc_t>& p, const Vec<acc_t>& x) {
  return Vec<acc_t>::blendv(p * x, Vec<acc_t>(acc_t(0)), p == Vec<acc_t>(acc_t(0)));
}

// log m, m = (1 - beta) p_1 + beta p_2, from log p_1 + log(1 - beta) = a and log p_2 + log beta = b.
template <typename acc_t>
inline Vec<acc_t> log_mixture(const Vec<acc_t>& a, const Vec<acc_t>& b) {
  const Vec<acc_t> top = at::vec::maximum(a, b), low = at::vec::minimum(a, b);
  const Vec<acc_t> lm = top + (low - top).exp().log1p();
  const Vec<acc_t> ninf(neg_inf<acc_t>());
  return Vec<acc_t>::blendv(lm, ninf, top == ninf);
}

// p_1 * g, g the derivative w.r.t. log p_1 of the divergence taking argument 1 as its student, up
// to a constant per row (kinds 1-3; kind 0 needs none). Formed as one product: g alone overflows
// where p_1 is far below the mixture (a mixture's p_1 / m = exp(log p_1 - log m) <= 1 / (1 - beta)).
template <typename acc_t, int64_t KIND>
inline Vec<acc_t> weighted_grad(const Vec<acc_t>& lp1, const Vec<acc_t>& lp2, const Vec<acc_t>& p1,
                                const Vec<acc_t>& p2, const Params<acc_t>& k) {
  const Vec<acc_t> zero(acc_t(0));
  if constexpr (KIND == kReverseKL) {
    return times<acc_t>(p1, lp1 - lp2);
  } else if constexpr (KIND == kMixture) {
    const Vec<acc_t> lm = log_mixture<acc_t>(lp1 + Vec<acc_t>(k.l1b), lp2 + Vec<acc_t>(k.lb));
    const Vec<acc_t> own = Vec<acc_t>(k.w_s) * times<acc_t>(p1, lp1 - lm);
    if (k.beta >= acc_t(1)) return own;
    const Vec<acc_t> ratio = Vec<acc_t>::blendv((lp1 - lm).exp(), zero, p1 == zero);
    return own - Vec<acc_t>(acc_t(1) - k.beta) * (Vec<acc_t>(k.w_t) * p2 + Vec<acc_t>(k.w_s) * p1) * ratio;
  } else {
    const Vec<acc_t> half(acc_t(0.5));
    const Vec<acc_t> d = p1 - p2;
    return p1 * Vec<acc_t>::blendv(Vec<acc_t>::blendv(zero, half, d > zero), zero - half, d < zero);
  }
}

// The teacher-side constants of a mixture (beta -> 1 - beta, weights swapped).
template <typename acc_t>
inline Params<acc_t> swapped(const Params<acc_t>& k) {
  return {acc_t(1) - k.beta, k.w_s, k.w_t, k.l1b, k.lb};
}

template <typename acc_t>
struct Sums {
  acc_t value = 0, entropy = 0, aux_s = 0, aux_t = 0;
};

// log p of a chunk's values: (w - shift) * factor - log_s, rounded once as forward_row does; -inf
// for a -inf logit (the clamp only keeps -inf * factor_lo = 0 * inf out of the product).
template <typename acc_t>
inline Vec<acc_t> log_probs(const ChunkView<acc_t>& c, int64_t i, acc_t shift, acc_t log_s) {
  const Vec<acc_t> w = Vec<acc_t>::loadu(c.x + i), ninf(neg_inf<acc_t>());
  const Vec<acc_t> diff = at::vec::maximum(w - Vec<acc_t>(shift), Vec<acc_t>(std::numeric_limits<acc_t>::lowest()));
  const Vec<acc_t> lp =
      at::vec::fmadd(diff, Vec<acc_t>(c.factor), at::vec::fmadd(diff, Vec<acc_t>(c.factor_lo), Vec<acc_t>(-log_s)));
  return Vec<acc_t>::blendv(lp, ninf, w == ninf);
}

// Vector lanes of one chunk's tail, padded with -inf logits (p = 0: they add nothing).
template <typename acc_t>
inline int64_t padded_tail(acc_t* x, int64_t n) {
  const int64_t size = Vec<acc_t>::size();
  const int64_t padded = (n + size - 1) / size * size;
  std::fill(x + n, x + padded, neg_inf<acc_t>());
  return padded;
}

template <typename acc_t>
inline acc_t vsum(const Vec<acc_t>& v) {
  return hsum(v);
}

// The second forward pass over one row pair, with both normalizers known.
template <typename scalar_t, typename acc_t, int64_t KIND>
Sums<acc_t> divergence_row(const scalar_t* s_row, int64_t s_sv, const Transform<acc_t>& s_tf, acc_t s_shift,
                           acc_t s_log_s, const scalar_t* t_row, int64_t t_sv, const Transform<acc_t>& t_tf,
                           acc_t t_shift, acc_t t_log_s, int64_t V, const Params<acc_t>& k, acc_t* s_buf,
                           acc_t* t_buf) {
  using V_ = Vec<acc_t>;
  const V_ zero(acc_t(0));
  V_ value(acc_t(0)), entropy(acc_t(0)), aux_s(acc_t(0)), aux_t(acc_t(0));
  const Params<acc_t> kt = swapped(k);
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    // Staged (never read in place) so that the tail can be padded.
    const ChunkView<acc_t> cs = view_chunk<scalar_t, acc_t>(s_row, s_sv, start, n, s_tf, false, s_buf);
    const ChunkView<acc_t> ct = view_chunk<scalar_t, acc_t>(t_row, t_sv, start, n, t_tf, false, t_buf);
    const int64_t padded = std::max(padded_tail(s_buf, n), padded_tail(t_buf, n));
    for (int64_t i = 0; i < padded; i += V_::size()) {
      const V_ lp_s = log_probs(cs, i, s_shift, s_log_s), lp_t = log_probs(ct, i, t_shift, t_log_s);
      const V_ p_s = lp_s.exp(), p_t = lp_t.exp();
      entropy = entropy - times<acc_t>(p_s, lp_s);
      if constexpr (KIND == kForwardKL) {
        value = value + times<acc_t>(p_t, lp_t - lp_s);
      } else if constexpr (KIND == kReverseKL) {
        value = value + times<acc_t>(p_s, lp_s - lp_t);
      } else if constexpr (KIND == kMixture) {
        const V_ lm = log_mixture<acc_t>(lp_s + V_(k.l1b), lp_t + V_(k.lb));
        value = value + V_(k.w_t) * times<acc_t>(p_t, lp_t - lm) + V_(k.w_s) * times<acc_t>(p_s, lp_s - lm);
        aux_s = aux_s + weighted_grad<acc_t, kMixture>(lp_s, lp_t, p_s, p_t, k);
        aux_t = aux_t + weighted_grad<acc_t, kMixture>(lp_t, lp_s, p_t, p_s, kt);
      } else {
        const V_ d = p_s - p_t;
        value = value + V_(acc_t(0.5)) * d.abs();
        aux_s = aux_s + weighted_grad<acc_t, kTotalVariation>(lp_s, lp_t, p_s, p_t, k);
        aux_t = aux_t + weighted_grad<acc_t, kTotalVariation>(lp_t, lp_s, p_t, p_s, k);
      }
    }
  }
  Sums<acc_t> out{vsum(value), vsum(entropy), vsum(aux_s), vsum(aux_t)};
  // Each KL is its own side's aux: sum p (lp_1 - lp_2) over the KL's first distribution.
  if constexpr (KIND == kForwardKL) out.aux_t = out.value;
  if constexpr (KIND == kReverseKL) out.aux_s = out.value;
  return out;
}

// sum e c after every e is scaled by `rescale` and every c moves by -`move`: nothing where there
// is no mass yet (or it all underflowed); an infinite total (a zero of the other model under this
// one's mass) stays infinite. NaN passes through.
template <typename acc_t>
inline acc_t rebased(acc_t total, acc_t mass, acc_t rescale, acc_t move) {
  if (mass == acc_t(0) || rescale == acc_t(0)) return acc_t(0);
  return rescale * (total - mass * move);
}

// One model's running max moving to include a chunk's max: (new max, how far its exponent moved,
// the factor its sums take). NaN propagates.
template <typename acc_t>
struct MaxMove {
  acc_t m, move, rescale;
};

template <typename acc_t>
inline MaxMove<acc_t> move_max(acc_t m, acc_t cmax, const ChunkView<acc_t>& c) {
  if (cmax <= m) return {m, acc_t(0), acc_t(1)};
  const acc_t move = -c.shifted(m, cmax);  // (new - old) * factor >= 0; huge when old is -inf
  return {nan_max(m, cmax), move, std::exp(-move)};
}

template <typename acc_t>
struct KLRow {
  acc_t m_s, log_s_s, m_t, log_s_t, value, entropy;
};

// Forward (KIND 0) or reverse KL and the student's entropy from one read of both rows.
template <typename scalar_t, typename acc_t, int64_t KIND>
KLRow<acc_t> kl_row(const scalar_t* s_row, int64_t s_sv, const Transform<acc_t>& s_tf, const scalar_t* t_row,
                    int64_t t_sv, const Transform<acc_t>& t_tf, int64_t V, acc_t* s_buf, acc_t* t_buf) {
  using V_ = Vec<acc_t>;
  const acc_t ninf = neg_inf<acc_t>();
  acc_t m_s = ninf, m_t = ninf, sum_s = 0, sum_t = 0, kl = 0, ent = 0;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    // Staged (never read in place) so that the tail can be padded.
    const ChunkView<acc_t> cs = view_chunk<scalar_t, acc_t>(s_row, s_sv, start, n, s_tf, false, s_buf);
    const ChunkView<acc_t> ct = view_chunk<scalar_t, acc_t>(t_row, t_sv, start, n, t_tf, false, t_buf);
    const int64_t padded = std::max(padded_tail(s_buf, n), padded_tail(t_buf, n));
    const MaxMove<acc_t> ms = move_max(m_s, max_and_sum<acc_t, false>(cs.x, n).first, cs);
    const MaxMove<acc_t> mt = move_max(m_t, max_and_sum<acc_t, false>(ct.x, n).first, ct);
    if constexpr (KIND == kForwardKL) {
      kl = rebased(kl, sum_t, mt.rescale, mt.move - ms.move);
    } else {
      kl = rebased(kl, sum_s, ms.rescale, ms.move - mt.move);
    }
    ent = rebased(ent, sum_s, ms.rescale, ms.move);
    sum_s *= ms.rescale;
    sum_t *= mt.rescale;
    m_s = ms.m;
    m_t = mt.m;
    // A model still at -inf shifts by 0: its -inf logits must not meet -inf - -inf = NaN.
    const V_ vms(m_s == ninf ? acc_t(0) : m_s), vmt(m_t == ninf ? acc_t(0) : m_t), vninf(ninf), zero(acc_t(0)),
        vlowest(std::numeric_limits<acc_t>::lowest()), vks(cs.factor), vks_lo(cs.factor_lo), vkt(ct.factor),
        vkt_lo(ct.factor_lo);
    V_ vsum_s(zero), vsum_t(zero), vkl(zero), vent(zero);
    for (int64_t i = 0; i < padded; i += V_::size()) {
      const V_ ws = V_::loadu(s_buf + i), wt = V_::loadu(t_buf + i);
      const V_ diff_s = at::vec::maximum(ws - vms, vlowest), diff_t = at::vec::maximum(wt - vmt, vlowest);
      const V_ d_s = at::vec::fmadd(diff_s, vks, diff_s * vks_lo), d_t = at::vec::fmadd(diff_t, vkt, diff_t * vkt_lo);
      const V_ e_s = d_s.exp(), e_t = d_t.exp();
      // The exponents' own -inf where a logit is -inf (the clamp above only kept NaN out).
      const V_ c_s = V_::blendv(d_s, vninf, ws == vninf), c_t = V_::blendv(d_t, vninf, wt == vninf);
      vsum_s = vsum_s + e_s;
      vsum_t = vsum_t + e_t;
      if constexpr (KIND == kForwardKL) {
        vkl = vkl + times<acc_t>(e_t, c_t - c_s);
      } else {
        vkl = vkl + times<acc_t>(e_s, c_s - c_t);
      }
      vent = vent + times<acc_t>(e_s, c_s);
    }
    sum_s += vsum(vsum_s);
    sum_t += vsum(vsum_t);
    kl += vsum(vkl);
    ent += vsum(vent);
  }
  const acc_t log_s_s = std::log(sum_s), log_s_t = std::log(sum_t);
  const acc_t value = KIND == kForwardKL ? kl / sum_t - log_s_t + log_s_s : kl / sum_s - log_s_s + log_s_t;
  return {m_s, log_s_s, m_t, log_s_t, value, log_s_s - ent / sum_s};
}

template <typename scalar_t, typename acc_t, int64_t KIND>
void forward_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* valid,
                  const Transform<acc_t>& s_tf, const Transform<acc_t>& t_tf, const Params<acc_t>& k,
                  acc_t* value, acc_t* entropy, acc_t* stats) {
  const int64_t T = student.size(1), V = student.size(2), N = student.size(0) * T;
  const scalar_t* s_base = student.const_data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.const_data_ptr<scalar_t>();
  const int64_t ssb = student.stride(0), sst = student.stride(1), ssv = student.stride(2);
  const int64_t tsb = teacher.stride(0), tst = teacher.stride(1), tsv = teacher.stride(2);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, N, row_grain(2 * V), [&](int64_t begin, int64_t end) {
    // Vector padding past the chunk: the tail is filled with -inf.
    std::unique_ptr<acc_t[]> s_buf(new acc_t[kChunk + 64]), t_buf(new acc_t[kChunk + 64]);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* st = stats + 6 * r;
      if (!valid[r]) {
        value[r] = 0;
        if (entropy) entropy[r] = 0;
        std::fill(st, st + 6, acc_t(0));
        continue;
      }
      const scalar_t* s_row = s_base + (r / T) * ssb + (r % T) * sst;
      const scalar_t* t_row = t_base + (r / T) * tsb + (r % T) * tst;
      if constexpr (KIND == kForwardKL || KIND == kReverseKL) {
        const KLRow<acc_t> kl =
            kl_row<scalar_t, acc_t, KIND>(s_row, ssv, s_tf, t_row, tsv, t_tf, V, s_buf.get(), t_buf.get());
        st[0] = s_tf.stored_shift(kl.m_s);
        st[1] = kl.log_s_s;
        st[2] = t_tf.stored_shift(kl.m_t);
        st[3] = kl.log_s_t;
        // A row with no finite logit (or a NaN) has no distribution: NaN, as the reference gives.
        const bool s_ok = kl.log_s_s > neg_inf<acc_t>(), ok = s_ok && kl.log_s_t > neg_inf<acc_t>();
        value[r] = ok ? kl.value : nan;
        if (entropy) entropy[r] = s_ok ? kl.entropy : nan;
        // Each KL is its own first distribution's aux (sum p (lp_1 - lp_2)); the other side has none.
        st[4] = KIND == kReverseKL ? value[r] : (ok ? acc_t(0) : nan);
        st[5] = KIND == kForwardKL ? value[r] : (ok ? acc_t(0) : nan);
        continue;
      }
      const RowStats<acc_t> s = forward_row<scalar_t, acc_t, false, false>(s_row, ssv, V, -1, s_tf, s_tf.in_place(ssv),
                                                                           false, false, s_buf.get());
      const RowStats<acc_t> t = forward_row<scalar_t, acc_t, false, false>(t_row, tsv, V, -1, t_tf, t_tf.in_place(tsv),
                                                                           false, false, t_buf.get());
      st[0] = s_tf.stored_shift(s.max_w);
      st[1] = s.log_s;
      st[2] = t_tf.stored_shift(t.max_w);
      st[3] = t.log_s;
      // A row with no finite logit (or a NaN) has no distribution: NaN, as the reference gives.
      const bool s_ok = s.log_s > neg_inf<acc_t>(), t_ok = t.log_s > neg_inf<acc_t>();
      if (!s_ok || !t_ok) {
        value[r] = st[4] = st[5] = nan;
        if (entropy) {
          entropy[r] = s_ok ? forward_row<scalar_t, acc_t, true, false>(s_row, ssv, V, -1, s_tf, s_tf.in_place(ssv),
                                                                        false, false, s_buf.get()).entropy
                            : nan;
        }
        continue;
      }
      const Sums<acc_t> sums = divergence_row<scalar_t, acc_t, KIND>(
          s_row, ssv, s_tf, s.max_w, s.log_s, t_row, tsv, t_tf, t.max_w, t.log_s, V, k, s_buf.get(), t_buf.get());
      value[r] = sums.value;
      if (entropy) entropy[r] = sums.entropy;
      st[4] = sums.aux_s;
      st[5] = sums.aux_t;
    }
  });
}

template <typename F>
void dispatch_kind(int64_t kind, F&& f) {
  switch (kind) {
    case kForwardKL: f(std::integral_constant<int64_t, kForwardKL>{}); break;
    case kReverseKL: f(std::integral_constant<int64_t, kReverseKL>{}); break;
    case kMixture: f(std::integral_constant<int64_t, kMixture>{}); break;
    case kTotalVariation: f(std::integral_constant<int64_t, kTotalVariation>{}); break;
    default: TORCH_CHECK_VALUE(false, "token_divergence: unknown divergence kind ", kind);
  }
}

void check_pair(const at::Tensor& first, const at::Tensor& second, const at::Tensor& valid) {
  TORCH_CHECK(first.dim() == 3 && second.sizes() == first.sizes(), "token_divergence: expected two [B, T, V] views "
              "of one shape, got ", first.sizes(), " and ", second.sizes());
  TORCH_CHECK(first.device().is_cpu() && second.device().is_cpu(), "token_divergence: the native kernels take CPU "
              "tensors");
  TORCH_CHECK(first.scalar_type() == second.scalar_type(), "token_divergence: the native kernels take both models' "
              "logits in one dtype, got ", first.scalar_type(), " and ", second.scalar_type());
  TORCH_CHECK(valid.dim() == 1 && valid.numel() == first.size(0) * first.size(1) && valid.scalar_type() == at::kBool &&
              valid.is_contiguous(), "token_divergence: valid must be a contiguous bool [B*T]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_divergence_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& valid, int64_t kind, double beta,
    double w_t, double w_s, double temperature, double student_scale, double student_softcap, double teacher_scale,
    double teacher_softcap, bool with_entropy) {
  check_pair(student, teacher, valid);
  const int64_t N = valid.numel();
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = student.options().dtype(acc_type);
  at::Tensor value = at::empty({N}, opts), entropy = at::empty({with_entropy ? N : 0}, opts),
             stats = at::empty({N, 6}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "token_divergence_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto s_tf = make_transform<acc_t>(temperature, student_scale, student_softcap);
    const auto t_tf = make_transform<acc_t>(temperature, teacher_scale, teacher_softcap);
    const auto k = make_params<acc_t>(beta, w_t, w_s);
    dispatch_kind(kind, [&](auto kind_c) {
      forward_rows<scalar_t, acc_t, decltype(kind_c)::value>(
          student, teacher, valid.const_data_ptr<bool>(), s_tf, t_tf, k, value.mutable_data_ptr<acc_t>(),
          with_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr, stats.mutable_data_ptr<acc_t>());
    });
  });
  return {value, entropy, stats};
}

// d/dx of grad * divergence for one row of the first argument, into grad_row (contiguous).
template <typename scalar_t, typename acc_t, int64_t KIND>
void backward_row(const scalar_t* row1, int64_t sv1, const Transform<acc_t>& tf1, const scalar_t* row2, int64_t sv2,
                  const Transform<acc_t>& tf2, const acc_t* st, acc_t g, int64_t V, const Params<acc_t>& k,
                  scalar_t* grad_row, acc_t* buf1, acc_t* buf2, acc_t* out) {
  using V_ = Vec<acc_t>;
  const acc_t shift1 = tf1.sweep_shift(st[0]), shift2 = tf2.sweep_shift(st[2]);
  const V_ aux(st[4]), vg(g * tf1.chain), one(acc_t(1));
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const ChunkView<acc_t> c1 = view_chunk<scalar_t, acc_t>(row1, sv1, start, n, tf1, false, buf1);
    const ChunkView<acc_t> c2 = view_chunk<scalar_t, acc_t>(row2, sv2, start, n, tf2, false, buf2);
    const int64_t padded = std::max(padded_tail(buf1, n), padded_tail(buf2, n));
    for (int64_t i = 0; i < padded; i += V_::size()) {
      const V_ lp1 = log_probs(c1, i, shift1, st[1]), lp2 = log_probs(c2, i, shift2, st[3]);
      const V_ p1 = lp1.exp(), p2 = lp2.exp();
      V_ dz;
      if constexpr (KIND == kForwardKL) {
        dz = p1 - p2;
      } else {
        dz = weighted_grad<acc_t, KIND>(lp1, lp2, p1, p2, k) - times<acc_t>(p1, aux);
      }
      dz = dz * vg;
      if (tf1.has_softcap()) {
        const V_ u = V_::loadu(buf1 + i);
        dz = dz * (one - u * u);
      }
      dz.store(out + i);
    }
    for (int64_t i = 0; i < n; ++i) grad_row[start + i] = static_cast<scalar_t>(out[i]);
  }
}

template <typename scalar_t, typename acc_t, int64_t KIND>
void backward_rows(const at::Tensor& first, const at::Tensor& second, const bool* valid, const acc_t* stats,
                   const acc_t* grad, const Transform<acc_t>& tf1, const Transform<acc_t>& tf2,
                   const Params<acc_t>& k, at::Tensor& out) {
  const int64_t T = first.size(1), V = first.size(2), N = first.size(0) * T;
  const scalar_t* base1 = first.const_data_ptr<scalar_t>();
  const scalar_t* base2 = second.const_data_ptr<scalar_t>();
  scalar_t* grad_base = out.mutable_data_ptr<scalar_t>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, N, row_grain(2 * V), [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> buf1(new acc_t[kChunk + 64]), buf2(new acc_t[kChunk + 64]), tmp(new acc_t[kChunk + 64]);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* grad_row = grad_base + r * V;
      const acc_t* st = stats + 6 * r;
      if (!valid[r] || grad[r] == 0) {
        std::fill(grad_row, grad_row + V, scalar_t(0));
        continue;
      }
      if (!(st[1] > neg_inf<acc_t>()) || !(st[3] > neg_inf<acc_t>())) {
        std::fill(grad_row, grad_row + V, static_cast<scalar_t>(nan));
        continue;
      }
      const scalar_t* row1 = base1 + (r / T) * first.stride(0) + (r % T) * first.stride(1);
      const scalar_t* row2 = base2 + (r / T) * second.stride(0) + (r % T) * second.stride(1);
      backward_row<scalar_t, acc_t, KIND>(row1, first.stride(2), tf1, row2, second.stride(2), tf2, st, grad[r], V, k,
                                          grad_row, buf1.get(), buf2.get(), tmp.get());
    }
  });
}

at::Tensor token_divergence_backward(const at::Tensor& grad, const at::Tensor& first, const at::Tensor& second,
                                     const at::Tensor& valid, const at::Tensor& stats, int64_t kind, double beta,
                                     double w_t, double w_s, double temperature, double first_scale,
                                     double first_softcap, double second_scale, double second_softcap) {
  check_pair(first, second, valid);
  const int64_t N = valid.numel();
  const auto acc_type = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == 6,
              "token_divergence_backward: stats must be the forward's [", N, ", 6], got ", stats.sizes());
  TORCH_CHECK(grad.dim() == 1 && grad.numel() == N, "token_divergence_backward: grad must be [", N, "]");
  const at::Tensor stats_c = stats.to(acc_type).contiguous(), grad_c = grad.to(acc_type).contiguous();
  at::Tensor out = empty_huge_pages(first.sizes(), first.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "token_divergence_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto tf1 = make_transform<acc_t>(temperature, first_scale, first_softcap);
    const auto tf2 = make_transform<acc_t>(temperature, second_scale, second_softcap);
    const auto k = make_params<acc_t>(beta, w_t, w_s);
    dispatch_kind(kind, [&](auto kind_c) {
      backward_rows<scalar_t, acc_t, decltype(kind_c)::value>(first, second, valid.const_data_ptr<bool>(),
                                                              stats_c.const_data_ptr<acc_t>(),
                                                              grad_c.const_data_ptr<acc_t>(), tf1, tf2, k, out);
    });
  });
  return out;
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY_FRAGMENT(fastalign_cpu, m) {
  m.def(
      "token_divergence_forward(Tensor student, Tensor teacher, Tensor valid, int kind, float beta, float w_t, "
      "float w_s, float temperature, float student_scale, float student_softcap, float teacher_scale, "
      "float teacher_softcap, bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "token_divergence_backward(Tensor grad, Tensor first, Tensor second, Tensor valid, Tensor stats, int kind, "
      "float beta, float w_t, float w_s, float temperature, float first_scale, float first_softcap, "
      "float second_scale, float second_softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastalign_cpu, CPU, m) {
  m.impl("token_divergence_forward", &fastalign::token_divergence_forward);
  m.impl("token_divergence_backward", &fastalign::token_divergence_backward);
}
