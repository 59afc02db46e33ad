// Group-relative advantages and REINFORCE++ returns on CPU.
//
// group_advantages_forward: one call, parallel over groups with at::parallel_for. Each group is
// read twice (sum and count, then squared deviations: two passes keep a group of equal rewards
// at exactly zero deviation, where a one-pass sum of squares would leave a residue that / eps
// turns into a large advantage) and written once. Statistics are in double.
//
// Ragged groups arrive already sorted: `order` is a stable argsort of the group ids and
// `offsets` the segment bounds into it, computed once by the caller with one torch.sort. A sort
// (rather than a hash table of ids) gives every backend the same segments, needs no per-thread
// tables or merging, and keeps the summation order deterministic; it costs O(B log B) on B
// scalars, negligible next to anything else in a training step. Contiguous groups (`order`
// empty) are runs of `group_size`.
//
// The per-element formula is documented in fastalign/reference/advantages.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace fastalign {
namespace {

// SCALE_GROUP and SCALE_GIVEN of kernels/contract.py (tests/ops/test_backend.py checks they agree).
constexpr int64_t kScaleGroup = 1;
constexpr int64_t kScaleGiven = 2;

template <typename scalar_t>
void group_advantages_kernel(const scalar_t* x, const int64_t* order, const int64_t* offsets, int64_t n_groups,
                             int64_t group_size, bool rloo, int64_t scale, double given, double eps, bool verl,
                             bool nan_to_zero, scalar_t* out) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Small groups are cheap: hand each thread many of them.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(group_size, 1));
  at::parallel_for(0, n_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t start = order ? offsets[g] : g * group_size;
      const int64_t length = order ? offsets[g + 1] - start : group_size;
      auto at = [&](int64_t j) { return order ? order[start + j] : start + j; };
      double count = 0.0, total = 0.0;
      for (int64_t j = 0; j < length; ++j) {
        const double v = static_cast<double>(x[at(j)]);
        if (verl || !std::isnan(v)) {
          count += 1.0;
          total += v;
        }
      }
      double mean = total / count;
      double m2 = 0.0;
      for (int64_t j = 0; j < length; ++j) {
        const double v = static_cast<double>(x[at(j)]);
        if (verl || !std::isnan(v)) m2 += (v - mean) * (v - mean);
      }
      double std = count > 1.0 ? std::sqrt(m2 / (count - 1.0)) : nan;
      if (verl && length == 1) {
        mean = 0.0;
        std = 1.0;
      }
      const double loo = count > 1.0 ? count / (count - 1.0) : 0.0;
      // Divided, not multiplied by a reciprocal, so each advantage rounds like the trainers'
      // (x - mean) / (std + eps).
      const double divisor = scale == kScaleGroup ? std + eps : scale == kScaleGiven ? given + eps : 1.0;
      for (int64_t j = 0; j < length; ++j) {
        const int64_t i = at(j);
        const double v = static_cast<double>(x[i]);
        double base;
        if (!rloo) {
          base = v - mean;
        } else if (count > 1.0) {
          base = loo * (v - mean);
        } else if (length == 1) {
          base = verl ? v : 0.0;
        } else {
          base = nan;
        }
        double a = base / divisor;
        if (nan_to_zero) {
          // torch.nan_to_num(x, nan=0.0) as TRL applies it: NaN -> 0, +-inf -> the dtype's finite extremes.
          const double limit = static_cast<double>(std::numeric_limits<scalar_t>::max());
          a = std::isnan(a) ? 0.0 : std::min(std::max(a, -limit), limit);
        }
        out[i] = static_cast<scalar_t>(a);
      }
    }
  });
}

at::Tensor group_advantages_forward(const at::Tensor& values, const at::Tensor& order, const at::Tensor& offsets,
                                    int64_t group_size, bool rloo, int64_t scale, const at::Tensor& denom, double eps,
                                    bool verl, bool nan_to_zero) {
  TORCH_CHECK(values.dim() == 1, "values must be 1-d, got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "values must be float32 or float64, got ", values.scalar_type());
  const bool ragged = order.numel() > 0;
  const int64_t n = values.numel();
  if (ragged) {
    TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == n, "order must be int64 of length ", n);
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1,
                "offsets must be a 1-d int64 tensor");
  } else {
    TORCH_CHECK(group_size > 0 && n % group_size == 0, "group_size ", group_size, " does not divide ", n);
  }
  TORCH_CHECK(scale != kScaleGiven || denom.numel() == 1, "scale 2 needs a one-element denom");
  auto x = values.contiguous();
  auto ord = order.contiguous();
  auto off = offsets.contiguous();
  auto out = at::empty({n}, values.options());
  if (n == 0) return out;
  const int64_t n_groups = ragged ? off.numel() - 1 : n / group_size;
  const double given = scale == kScaleGiven ? denom.to(at::kDouble).item<double>() : 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_advantages_forward", [&] {
    group_advantages_kernel<scalar_t>(x.data_ptr<scalar_t>(), ragged ? ord.data_ptr<int64_t>() : nullptr,
                                      ragged ? off.data_ptr<int64_t>() : nullptr, n_groups, group_size, rloo, scale,
                                      given, eps, verl, nan_to_zero, out.data_ptr<scalar_t>());
  });
  return out;
}

// REINFORCE++ returns as verl 0.9.1 computes them (compute_reinforce_plus_plus_outcome_advantage,
// in verl/trainer/ppo/core_algos.py), one row scanned from the right:
//   new = r_t + gamma * running;  G_t = new * m_t;  running = new * m_t + running * (1 - m_t).
// A masked token (a tool observation inside a multi-turn response, or padding) returns 0 and the
// running return is carried across it unchanged. The expression is kept as verl writes it (no
// branch on the mask) so fractional masks and non-finite rewards give verl's values too.
//
// Contraction is off here: with -march=native the compiler would fuse `a * b + c` into one FMA,
// which rounds once where verl's eager PyTorch rounds twice, and the scan would drift from verl's
// returns by an ulp or so per step. Rounded separately the result is verl's, bit for bit.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTALIGN_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define FASTALIGN_NO_FP_CONTRACT
#endif

template <typename scalar_t>
FASTALIGN_NO_FP_CONTRACT void reinforce_returns_row(const scalar_t* r, const scalar_t* m, scalar_t* out, int64_t T,
                                                    scalar_t gamma) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  scalar_t running = 0;
  for (int64_t t = T - 1; t >= 0; --t) {
    const scalar_t next = r[t] + gamma * running;
    out[t] = next * m[t];
    running = next * m[t] + running * (scalar_t(1) - m[t]);
  }
}

at::Tensor discounted_returns(const at::Tensor& rewards, const at::Tensor& mask, double gamma) {
  TORCH_CHECK(rewards.dim() == 2 && mask.sizes() == rewards.sizes(), "rewards and mask must both be [B, T]");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "rewards must be float32 or float64, got ", rewards.scalar_type());
  auto r = rewards.contiguous();
  auto m = mask.to(rewards.scalar_type()).contiguous();
  auto out = at::empty_like(r);
  const int64_t B = r.size(0), T = r.size(1);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "discounted_returns", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t g = static_cast<scalar_t>(gamma);
    at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) reinforce_returns_row(rp + b * T, mp + b * T, op + b * T, T, g);
    });
  });
  return out;
}

// ReMax (verl 0.9.1's compute_remax_outcome_advantage): the reward-to-go of the masked rewards,
// accumulated in double as torch's CPU cumsum does for verl's flip().cumsum().flip(), minus the
// greedy baseline on the response tokens. The product and the subtraction stay in scalar_t, each
// rounded on its own (no FMA), as verl's eager ops round them.
template <typename scalar_t>
FASTALIGN_NO_FP_CONTRACT void remax_row(const scalar_t* r, const scalar_t* m, scalar_t baseline, scalar_t* adv,
                                        scalar_t* ret, int64_t T) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  double running = 0;
  for (int64_t t = T - 1; t >= 0; --t) {
    const scalar_t weighted = r[t] * m[t];
    running += static_cast<double>(weighted);
    const scalar_t value = static_cast<scalar_t>(running);
    ret[t] = value;
    const scalar_t shift = baseline * m[t];
    adv[t] = value - shift;
  }
}

std::tuple<at::Tensor, at::Tensor> remax_advantages_forward(const at::Tensor& rewards, const at::Tensor& mask,
                                                            const at::Tensor& baselines) {
  TORCH_CHECK(rewards.dim() == 2 && mask.sizes() == rewards.sizes(), "rewards and mask must both be [B, T]");
  TORCH_CHECK(baselines.dim() == 1 && baselines.size(0) == rewards.size(0), "baselines must be [B]");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "rewards must be float32 or float64, got ", rewards.scalar_type());
  auto r = rewards.contiguous();
  auto m = mask.to(rewards.scalar_type()).contiguous();
  auto b = baselines.to(rewards.scalar_type()).contiguous();
  auto adv = at::empty_like(r);
  auto ret = at::empty_like(r);
  const int64_t B = r.size(0), T = r.size(1);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "remax_advantages_forward", [&] {
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* ap = adv.data_ptr<scalar_t>();
    scalar_t* op = ret.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) remax_row(rp + i * T, mp + i * T, bp[i], ap + i * T, op + i * T, T);
    });
  });
  return {adv, ret};
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY_FRAGMENT(fastalign_cpu, m) {
  m.def(
      "group_advantages_forward(Tensor values, Tensor order, Tensor offsets, int group_size, bool rloo, int scale, "
      "Tensor denom, float eps, bool verl, bool nan_to_zero) -> Tensor");
  m.def("discounted_returns(Tensor rewards, Tensor mask, float gamma) -> Tensor");
  m.def("remax_advantages_forward(Tensor rewards, Tensor mask, Tensor baselines) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalign_cpu, CPU, m) {
  m.impl("group_advantages_forward", &fastalign::group_advantages_forward);
  m.impl("discounted_returns", &fastalign::discounted_returns);
  m.impl("remax_advantages_forward", &fastalign::remax_advantages_forward);
}
