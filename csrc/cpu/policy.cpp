// Token-level policy losses on CPU in one pass over the logits.
//
// Per row: the online-softmax forward (log-prob, entropy, logsumexp), then the token's gradient
// coefficient g = d loss / d logp from its old/reference log-probs, advantage and weights (the
// surrogate and KL of fastalign/token_objective.py), then the row's gradient
//     g * (1[j = label] - p_j) - gH * p_j * (log p_j + H)
// written right away. The logits cross the memory bus once and the gradient is written once (a
// separate backward would read the logits a second time); the forward keeps each exp(z - m) in a
// per-thread row buffer, so p_j costs a multiply, not a second exp — exp is most of the CPU time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "softmax_rows.h"

#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

namespace fastalign {
namespace {

using namespace rows;

// The ids and the order of `params` of kernels/contract.py (tests/ops/test_backend.py checks they agree).
enum Surrogate : int64_t { kClip = 0, kCispo = 1, kSapo = 2 };
enum Kl : int64_t { kNone = 0, kK1 = 1, kAbs = 2, kK2 = 3, kK3 = 4, kLowVarKl = 5 };
enum Param : int {
  kRatioLow = 0,
  kRatioHigh = 1,
  kDelta = 2,
  kDualClip = 3,
  kLogRatioClamp = 4,
  kTauPos = 5,
  kTauNeg = 6,
  kKlStraightThrough = 7,
  kKlBiasCorrection = 8,
  kNumParams = 9
};

// TokenObjective.kernel_args(), in acc_t.
template <typename T>
struct Objective {
  int64_t surrogate, kl;
  T ratio_low, ratio_high, delta, dual_clip, log_ratio_clamp, tau_pos, tau_neg;
  bool straight_through, bias_correction;
};

template <typename T>
inline T clamp(T x, T lo, T hi) {
  return std::min(std::max(x, lo), hi);  // NaN stays NaN, like torch.clamp
}

template <typename T>
inline T sign(T x) {
  return std::isnan(x) ? x : T((x > 0) - (x < 0));
}

// d loss / d logp for one token: fastalign.reference.policy.objective_grad, term for term (the
// 0/1 factors multiply, as there, so a NaN input stays NaN).
template <typename T>
T objective_grad(T l, const T* old, const T* ref, T a, T w_pg, T w_kl, const Objective<T>& ob) {
  const T lr = old ? l - *old : T(0);
  const T in_clamp = T(std::abs(lr) <= ob.log_ratio_clamp);
  const T r = std::exp(clamp(lr, -ob.log_ratio_clamp, ob.log_ratio_clamp));
  T d;
  if (ob.surrogate == kClip) {
    const T d1 = -a * r * in_clamp * T(r <= ob.delta);
    const T d2 = -a * r * in_clamp * T(r >= ob.ratio_low && r <= ob.ratio_high);
    const T loss1 = -a * std::min(r, ob.delta);
    const T loss2 = -a * clamp(r, ob.ratio_low, ob.ratio_high);
    // Ties split the gradient evenly, as torch.maximum does.
    d = loss1 > loss2 ? d1 : (loss2 > loss1 ? d2 : T(0.5) * (d1 + d2));
    if (std::isfinite(ob.dual_clip) && a < 0) {
      const T loss3 = -a * ob.dual_clip;
      const T best = loss1 > loss2 || std::isnan(loss1) ? loss1 : loss2;
      d = loss3 < best ? T(0) : (loss3 > best ? d : T(0.5) * d);
    }
  } else if (ob.surrogate == kCispo) {
    d = -clamp(r, ob.ratio_low, ob.ratio_high) * a;
  } else {
    const T tau = a > 0 ? ob.tau_pos : ob.tau_neg;
    const T s = T(1) / (T(1) + std::exp(-tau * (r - 1)));
    d = T(-4) * a * s * (1 - s) * r * in_clamp;
  }
  T grad = w_pg != 0 ? d * w_pg : T(0);
  if (ob.kl != kNone) {
    const T q = *ref;
    const T diff = l - q, x = q - l;
    T value, dk;
    switch (ob.kl) {
      case kK1:
        value = diff;
        dk = 1;
        break;
      case kAbs:
        value = std::abs(diff);
        dk = sign(diff);
        break;
      case kK2:
        value = T(0.5) * diff * diff;
        dk = diff;
        break;
      case kK3:
        value = std::exp(x) - x - 1;
        dk = 1 - std::exp(x);
        break;
      default: {
        const T xc = clamp(x, T(-20), T(20));
        const T raw = std::exp(xc) - xc - 1;
        value = clamp(raw, T(-10), T(10));
        dk = (1 - std::exp(xc)) * T(std::abs(x) <= 20) * T(std::abs(raw) <= 10);
      }
    }
    if (ob.straight_through) dk = diff;
    if (ob.bias_correction) dk = (dk + value * in_clamp) * r;
    grad += w_kl != 0 ? dk * w_kl : T(0);
  }
  return grad;
}

struct Vectors {
  at::Tensor old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy;
};

template <typename scalar_t, typename acc_t>
void policy_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index, const Transform<acc_t>& tf,
                 const Objective<acc_t>& ob, const Vectors& in, bool with_grad, at::Tensor& logps_t,
                 at::Tensor& entropy_t, at::Tensor& norm_t, at::Tensor& grad) {
  const int64_t T = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * T;
  const int64_t sb = logits.stride(0), st_ = logits.stride(1), sv = logits.stride(2);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* grad_base = with_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const bool in_place = tf.in_place(sv);
  auto data = [](const at::Tensor& t) { return t.numel() ? t.const_data_ptr<acc_t>() : nullptr; };
  const acc_t *old = data(in.old_logps), *ref = data(in.ref_logps), *adv = data(in.advantages),
              *w_pg = data(in.w_pg), *w_kl = data(in.w_kl), *g_entropy = data(in.grad_entropy);
  acc_t* logps = logps_t.mutable_data_ptr<acc_t>();
  acc_t* entropy = entropy_t.mutable_data_ptr<acc_t>();
  acc_t* norm = norm_t.mutable_data_ptr<acc_t>();  // [N, 2]: (max, log s)

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> buffer(new acc_t[kChunk]);
    std::unique_ptr<acc_t[]> out_buffer(new acc_t[kChunk]);
    // The row's exps, kept from the forward for the gradient (a multiply instead of a second exp).
    std::unique_ptr<acc_t[]> kept_e(new acc_t[with_grad ? V : 0]);
    std::unique_ptr<acc_t[]> kept_shift(new acc_t[with_grad ? (V + kChunk - 1) / kChunk : 0]);
    const KeptExp<acc_t> kept{kept_e.get(), kept_shift.get()};
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      scalar_t* grad_row = with_grad ? grad_base + r * V : nullptr;
      if (label == ignore_index) {
        logps[r] = entropy[r] = norm[2 * r] = norm[2 * r + 1] = 0;
        if (grad_row) std::fill(grad_row, grad_row + V, scalar_t(0));
        continue;
      }
      const scalar_t* row = base + (r / T) * sb + (r % T) * st_;
      if (!grad_row) {
        const RowStats<acc_t> s =
            forward_row<scalar_t, acc_t, true, false>(row, sv, V, label, tf, in_place, false, false, buffer.get());
        logps[r] = s.logp;
        entropy[r] = s.entropy;
        norm[2 * r] = tf.stored_shift(s.max_w);
        norm[2 * r + 1] = s.log_s;
        continue;
      }
      const RowStats<acc_t> s = forward_row<scalar_t, acc_t, true, false, true>(row, sv, V, label, tf, in_place, false,
                                                                                false, buffer.get(), kept);
      logps[r] = s.logp;
      entropy[r] = s.entropy;
      norm[2 * r] = tf.stored_shift(s.max_w);
      norm[2 * r + 1] = s.log_s;
      const acc_t g = objective_grad<acc_t>(s.logp, old ? old + r : nullptr, ref ? ref + r : nullptr, adv[r],
                                            w_pg[r], w_kl ? w_kl[r] : acc_t(0), ob);
      const acc_t gh = g_entropy ? g_entropy[r] : acc_t(0);
      if (gh != 0) {
        backward_row<scalar_t, acc_t, true, true>(row, sv, V, label, tf, in_place, g, gh, s.entropy, s.max_w,
                                                  s.log_s, grad_row, buffer.get(), out_buffer.get(), kept);
      } else {
        backward_row<scalar_t, acc_t, false, true>(row, sv, V, label, tf, in_place, g, gh, s.entropy, s.max_w,
                                                   s.log_s, grad_row, buffer.get(), out_buffer.get(), kept);
      }
    }
    stream_fence();
  });
}

// `grad_into`: where the gradient goes when with_grad: a fresh tensor, or the logits themselves
// (the policy_token_forward_ variant), since each element of a row is read before its gradient is written.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_pass(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logps, const at::Tensor& ref_logps,
    const at::Tensor& advantages, const at::Tensor& w_pg, const at::Tensor& w_kl, const at::Tensor& grad_entropy,
    double temperature, double logit_scale, double softcap, int64_t ignore_index, int64_t surrogate, int64_t kl,
    const std::vector<double>& params, bool with_grad, bool in_place) {
  check_inputs(logits, labels);
  const int64_t N = labels.numel(), V = logits.size(2);
  check_label_range(labels.const_data_ptr<int64_t>(), N, V, ignore_index);
  TORCH_CHECK(params.size() == kNumParams, "policy_token_forward: expected ", int(kNumParams),
              " objective parameters, got ", params.size());
  TORCH_CHECK(surrogate >= kClip && surrogate <= kSapo, "policy_token_forward: unknown surrogate id ", surrogate);
  TORCH_CHECK(kl >= kNone && kl <= kLowVarKl, "policy_token_forward: unknown KL id ", kl);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto vector = [&](const at::Tensor& t, const char* name, bool required) {
    TORCH_CHECK(t.numel() == N || (!required && t.numel() == 0), "policy_token_forward: ", name, " must have ", N,
                required ? "" : " or 0", " elements, got ", t.numel());
    return t.to(acc_type).contiguous();
  };
  const Vectors in{vector(old_logps, "old_logps", false), vector(ref_logps, "ref_logps", false),
                   vector(advantages, "advantages", true),  vector(w_pg, "w_pg", true),
                   vector(w_kl, "w_kl", false),             vector(grad_entropy, "grad_entropy", false)};
  TORCH_CHECK(kl == kNone || (in.ref_logps.numel() && in.w_kl.numel()),
              "policy_token_forward: a KL term needs ref_logps and w_kl");
  const auto opts = logits.options().dtype(acc_type);
  at::Tensor logps = at::empty({N}, opts), entropy = at::empty({N}, opts), norm = at::empty({N, 2}, opts);
  at::Tensor grad = !with_grad ? at::empty({0}, logits.options())
                   : in_place    ? logits
                                 : empty_huge_pages(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "policy_token_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto tf = make_transform<acc_t>(temperature, logit_scale, softcap);
    auto p = [&](int i) { return static_cast<acc_t>(params[i]); };
    const Objective<acc_t> ob{surrogate,
                              kl,
                              p(kRatioLow),
                              p(kRatioHigh),
                              p(kDelta),
                              p(kDualClip),
                              p(kLogRatioClamp),
                              p(kTauPos),
                              p(kTauNeg),
                              params[kKlStraightThrough] != 0,
                              params[kKlBiasCorrection] != 0};
    policy_rows<scalar_t, acc_t>(logits, labels.const_data_ptr<int64_t>(), ignore_index, tf, ob, in, with_grad, logps,
                                 entropy, norm, grad);
  });
  return {logps, entropy, grad, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_token_forward(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logps, const at::Tensor& ref_logps,
    const at::Tensor& advantages, const at::Tensor& w_pg, const at::Tensor& w_kl, const at::Tensor& grad_entropy,
    double temperature, double logit_scale, double softcap, int64_t ignore_index, int64_t surrogate, int64_t kl,
    std::vector<double> params, bool with_grad) {
  return policy_pass(logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl, grad_entropy, temperature,
                     logit_scale, softcap, ignore_index, surrogate, kl, params, with_grad, false);
}

// The gradient overwrites the logits: the blocked hidden-states path needs only one [rows, V] buffer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_token_forward_(
    at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logps, const at::Tensor& ref_logps,
    const at::Tensor& advantages, const at::Tensor& w_pg, const at::Tensor& w_kl, const at::Tensor& grad_entropy,
    double temperature, double logit_scale, double softcap, int64_t ignore_index, int64_t surrogate, int64_t kl,
    std::vector<double> params) {
  TORCH_CHECK(logits.is_contiguous(), "policy_token_forward_: logits must be contiguous to take the gradient in place");
  auto [logps, entropy, grad, norm] = policy_pass(logits, labels, old_logps, ref_logps, advantages, w_pg, w_kl,
                                                 grad_entropy, temperature, logit_scale, softcap, ignore_index,
                                                 surrogate, kl, params, true, true);
  return {logps, entropy, norm};
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY_FRAGMENT(fastalign_cpu, m) {
  m.def(
      "policy_token_forward(Tensor logits, Tensor labels, Tensor old_logps, Tensor ref_logps, Tensor advantages, "
      "Tensor w_pg, Tensor w_kl, Tensor grad_entropy, float temperature, float logit_scale, float softcap, "
      "int ignore_index, int surrogate, int kl, float[] params, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "policy_token_forward_(Tensor(a!) logits, Tensor labels, Tensor old_logps, Tensor ref_logps, "
      "Tensor advantages, Tensor w_pg, Tensor w_kl, Tensor grad_entropy, float temperature, float logit_scale, "
      "float softcap, int ignore_index, int surrogate, int kl, float[] params) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalign_cpu, CPU, m) {
  m.impl("policy_token_forward", &fastalign::policy_token_forward);
  m.impl("policy_token_forward_", &fastalign::policy_token_forward_);
}
