// Generalized advantage estimation on CPU: one reverse scan per row, then (when whitening) one
// normalizing pass.
//
// The scan is a chain of dependent multiply-adds along each row, so a single row runs at the
// latency of that chain, not at the throughput of the core. Each thread therefore walks a group
// of kGroup rows in lockstep: their chains are independent and overlap in the pipeline.
//
// Whitening needs the mean and variance over every valid token of the batch: the scan gathers
// each row's count, mean and centred sum of squares as it goes (shifted sums in double), the rows
// are merged with Chan's formula, and a second parallel pass normalizes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace fastalign {
namespace {

// Rows scanned in lockstep per thread: enough independent chains to hide the multiply-add latency,
// few enough memory streams (5 per row, walked backwards) for the prefetchers to follow.
constexpr int kGroup = 4;
// TRL's and verl's masked_whiten: (x - mean) * rsqrt(var + 1e-8).
constexpr double kWhitenEps = 1e-8;

// Count, mean and centred sum of squares of a row's valid advantages.
struct RowStats {
  double n = 0;
  double mean = 0;
  double m2 = 0;
};

// mask_t: the mask is read in its own dtype (bool, uint8, int32, int64, float, double; nonzero =
// valid), so a verl-style integer or float response mask costs no conversion pass.
template <typename acc_t, typename mask_t>
struct Rows {
  const acc_t* rewards;
  int64_t r_b, r_t;
  const acc_t* values;
  int64_t v_b, v_t;
  const mask_t* mask;  // null: every position is valid
  int64_t m_b, m_t;
  acc_t* adv;  // contiguous [B, T]
  acc_t* ret;
  int64_t T;
};

// verl's recurrence (MASKED_SCAN): a masked position neither updates the carried advantage nor
// the carried next value, so the scan steps over it. TRL's: every position updates both.
// With WHITEN the row's whitening statistics are gathered in the same walk, over the valid
// positions (HAS_MASK), shifted by the row's first valid advantage so that the sum of squares
// keeps its precision when the mean is large against the spread.
template <typename acc_t, typename mask_t, bool MASKED_SCAN, bool HAS_MASK, bool WHITEN, int R>
void scan_group(const Rows<acc_t, mask_t>& x, int64_t b0, acc_t gamma, acc_t gamma_lam, RowStats* stats) {
  acc_t next_value[R];
  acc_t last[R];
  double shift[R], sum[R], sum_sq[R], count[R];
  for (int i = 0; i < R; ++i) {
    next_value[i] = 0;
    last[i] = 0;
    shift[i] = sum[i] = sum_sq[i] = count[i] = 0;
  }
  for (int64_t t = x.T - 1; t >= 0; --t) {
    for (int i = 0; i < R; ++i) {
      const int64_t b = b0 + i;
      const acc_t r = x.rewards[b * x.r_b + t * x.r_t];
      const acc_t v = x.values[b * x.v_b + t * x.v_t];
      const acc_t candidate = (r + gamma * next_value[i] - v) + gamma_lam * last[i];
      bool valid = true;
      if constexpr (HAS_MASK) valid = x.mask[b * x.m_b + t * x.m_t] != mask_t(0);
      if constexpr (MASKED_SCAN) {
        last[i] = valid ? candidate : last[i];
        next_value[i] = valid ? v : next_value[i];
      } else {
        last[i] = candidate;
        next_value[i] = v;
      }
      x.adv[b * x.T + t] = last[i];
      x.ret[b * x.T + t] = last[i] + v;
      if constexpr (WHITEN) {
        if (valid) {
          if (count[i] == 0) shift[i] = static_cast<double>(last[i]);
          const double d = static_cast<double>(last[i]) - shift[i];
          sum[i] += d;
          sum_sq[i] += d * d;
          count[i] += 1;
        }
      }
    }
  }
  if constexpr (WHITEN) {
    for (int i = 0; i < R; ++i) {
      RowStats& st = stats[b0 + i];
      st.n = count[i];
      if (count[i] > 0) {
        const double centred = sum[i] / count[i];
        st.mean = shift[i] + centred;
        st.m2 = std::max(0.0, sum_sq[i] - sum[i] * centred);
      }
    }
  }
}

template <typename acc_t, typename mask_t, bool MASKED_SCAN, bool HAS_MASK, bool WHITEN>
void scan_rows(const Rows<acc_t, mask_t>& x, int64_t begin, int64_t end, acc_t gamma, acc_t gamma_lam, RowStats* stats) {
  int64_t b = begin;
  for (; b + kGroup <= end; b += kGroup) {
    scan_group<acc_t, mask_t, MASKED_SCAN, HAS_MASK, WHITEN, kGroup>(x, b, gamma, gamma_lam, stats);
  }
  for (; b < end; ++b) scan_group<acc_t, mask_t, MASKED_SCAN, HAS_MASK, WHITEN, 1>(x, b, gamma, gamma_lam, stats);
}

template <typename acc_t, typename mask_t, bool WHITEN>
void scan_dispatch(const Rows<acc_t, mask_t>& x, int64_t begin, int64_t end, acc_t g, acc_t gl, bool trl, RowStats* stats) {
  if (x.mask == nullptr) {
    scan_rows<acc_t, mask_t, false, false, WHITEN>(x, begin, end, g, gl, stats);
  } else if (trl) {
    scan_rows<acc_t, mask_t, false, true, WHITEN>(x, begin, end, g, gl, stats);
  } else {
    scan_rows<acc_t, mask_t, true, true, WHITEN>(x, begin, end, g, gl, stats);
  }
}

template <typename acc_t, typename mask_t>
void gae_kernel(const Rows<acc_t, mask_t>& x, int64_t B, double gamma, double lam, bool trl, bool whiten,
                bool shift_mean, bool unbiased) {
  const acc_t g = static_cast<acc_t>(gamma);
  const acc_t gl = static_cast<acc_t>(gamma * lam);
  std::vector<RowStats> stats(whiten ? B : 0);
  at::parallel_for(0, B, kGroup, [&](int64_t begin, int64_t end) {
    if (whiten) {
      scan_dispatch<acc_t, mask_t, true>(x, begin, end, g, gl, trl, stats.data());
    } else {
      scan_dispatch<acc_t, mask_t, false>(x, begin, end, g, gl, trl, nullptr);
    }
  });
  if (!whiten) return;

  // Chan's pairwise merge of the row statistics, in double.
  RowStats total;
  double weighted = 0;
  for (const RowStats& s : stats) {
    total.n += s.n;
    weighted += s.n * s.mean;
  }
  const double ddof = unbiased ? 1.0 : 0.0;
  TORCH_CHECK_VALUE(total.n > ddof, "mask: whitening needs at least ", unbiased ? 2 : 1,
                    " valid position(s) in the batch (", unbiased ? "unbiased" : "biased", " variance), got ",
                    static_cast<int64_t>(total.n));
  total.mean = weighted / total.n;
  for (const RowStats& s : stats) {
    const double d = s.mean - total.mean;
    total.m2 += s.m2 + s.n * d * d;
  }
  const double var = total.m2 / (total.n - ddof);
  const acc_t mean = static_cast<acc_t>(total.mean);
  const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(var + kWhitenEps));
  const acc_t add_back = shift_mean ? acc_t(0) : mean;
  // TRL's PPOTrainer zeroes the whitened advantages of padding positions.
  const bool zero_masked = trl && x.mask != nullptr;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* a = x.adv + b * x.T;
      if (zero_masked) {
        const mask_t* m = x.mask + b * x.m_b;
        if (x.m_t == 1) {
          // The common contiguous mask, in blocks: normalize every element (vectorizes), then zero
          // the masked ones through a select the compiler also vectorizes.
          constexpr int64_t kBlock = 256;
          for (int64_t t0 = 0; t0 < x.T; t0 += kBlock) {
            const int64_t t1 = std::min(x.T, t0 + kBlock);
            for (int64_t t = t0; t < t1; ++t) a[t] = (a[t] - mean) * rstd + add_back;
            for (int64_t t = t0; t < t1; ++t) a[t] = m[t] != mask_t(0) ? a[t] : acc_t(0);
          }
        } else {
          for (int64_t t = 0; t < x.T; ++t) a[t] = m[t * x.m_t] != mask_t(0) ? (a[t] - mean) * rstd + add_back : acc_t(0);
        }
      } else {
        for (int64_t t = 0; t < x.T; ++t) a[t] = (a[t] - mean) * rstd + add_back;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const std::optional<at::Tensor>& mask, double gamma, double lam,
                                               bool trl, bool whiten, bool shift_mean, bool unbiased) {
  TORCH_CHECK(rewards.dim() == 2, "rewards: expected shape [B, T], got ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes(), "values: expected shape ", rewards.sizes(), " (that of rewards), got ",
              values.sizes());
  TORCH_CHECK(rewards.is_floating_point(), "rewards: expected a floating-point tensor, got ", rewards.scalar_type());
  TORCH_CHECK(values.is_floating_point(), "values: expected a floating-point tensor, got ", values.scalar_type());
  const bool fp64 = rewards.scalar_type() == at::kDouble || values.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  // Reduced-precision inputs are widened once; fp32 and fp64 inputs are read in place.
  const at::Tensor r = rewards.scalar_type() == acc ? rewards : rewards.to(acc);
  const at::Tensor v = values.scalar_type() == acc ? values : values.to(acc);
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == rewards.sizes(), "mask: expected shape ", rewards.sizes(), " (that of rewards), got ",
                mask->sizes());
    const auto kind = mask->scalar_type();
    const bool direct = kind == at::kBool || kind == at::kByte || kind == at::kInt || kind == at::kLong ||
                        kind == at::kFloat || kind == at::kDouble;
    m = direct ? *mask : mask->ne(0);
  }
  const int64_t B = r.size(0);
  const int64_t T = r.size(1);
  at::Tensor adv = at::empty({B, T}, r.options().dtype(acc));
  at::Tensor ret = at::empty({B, T}, r.options().dtype(acc));
  if (B == 0 || T == 0) {
    TORCH_CHECK_VALUE(!whiten, "mask: whitening needs at least ", unbiased ? 2 : 1,
                " valid position(s) in the batch, got an empty batch");
    return {adv, ret};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "fastalign_gae", [&] {
    auto run = [&](auto mask_tag) {
      using mask_t = decltype(mask_tag);
      Rows<scalar_t, mask_t> x{
          r.data_ptr<scalar_t>(), r.stride(0), r.stride(1),
          v.data_ptr<scalar_t>(), v.stride(0), v.stride(1),
          m.defined() ? m.data_ptr<mask_t>() : nullptr, m.defined() ? m.stride(0) : 0, m.defined() ? m.stride(1) : 0,
          adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>(), T,
      };
      gae_kernel<scalar_t, mask_t>(x, B, gamma, lam, trl, whiten, shift_mean, unbiased);
    };
    switch (m.defined() ? m.scalar_type() : at::kBool) {
      case at::kByte: run(uint8_t{}); break;
      case at::kInt: run(int32_t{}); break;
      case at::kLong: run(int64_t{}); break;
      case at::kFloat: run(float{}); break;
      case at::kDouble: run(double{}); break;
      default: run(bool{}); break;
    }
  });
  return {adv, ret};
}

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY_FRAGMENT(fastalign_cpu, m) {
  m.def(
      "gae_forward(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam, bool trl, bool whiten, "
      "bool shift_mean, bool unbiased) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalign_cpu, CPU, m) {
  m.impl("gae_forward", &fastalign::gae_forward);
}
