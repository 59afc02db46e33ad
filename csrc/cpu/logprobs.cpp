// Token log-probs on CPU: one read of the logits in forward, one read and one write in backward.
//
// Rows are split across threads with at::parallel_for. Each row is walked in chunks small enough
// to stay in L1: a max pass, then one exp pass that folds the chunk into online-softmax
// statistics (running max m, s = sum e^(z-m), and the entropy / sum-of-squares accumulators).
// The chunk is re-read from L1, never from memory, so the logits cross the memory bus once.
//
// Logits arrive as a [B, T, V] view with arbitrary strides (trainers pass logits[:, :-1]);
// rows are addressed with 64-bit offsets b * stride_b + t * stride_t.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "softmax_rows.h"

#include <memory>
#include <string>
#include <tuple>
#include <type_traits>

namespace fastalign {
namespace {

using namespace rows;

struct ForwardOutputs {
  at::Tensor logps, entropy, log_sum_sq_probs, mean_logits, is_top1, norm;
};

struct Flags {
  bool entropy, log_sum_sq, mean, top1;
};

template <typename scalar_t, typename acc_t, bool ENTROPY, bool SQ>
void forward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                  const Transform<acc_t>& tf, const Flags& flags, ForwardOutputs& out) {
  const int64_t T = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * T;
  const int64_t sb = logits.stride(0), st_ = logits.stride(1), sv = logits.stride(2);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const bool in_place = tf.in_place(sv);
  acc_t* logps = out.logps.mutable_data_ptr<acc_t>();
  acc_t* norm = out.norm.mutable_data_ptr<acc_t>();  // [N, 2]: (max, log s)
  acc_t* entropy = flags.entropy ? out.entropy.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* log_sum_sq = flags.log_sum_sq ? out.log_sum_sq_probs.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* mean = flags.mean ? out.mean_logits.mutable_data_ptr<acc_t>() : nullptr;
  bool* top1 = flags.top1 ? out.is_top1.mutable_data_ptr<bool>() : nullptr;

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> buffer(new acc_t[kChunk]);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      if (label == ignore_index) {
        logps[r] = 0;
        norm[2 * r] = norm[2 * r + 1] = 0;
        if (entropy) entropy[r] = 0;
        if (log_sum_sq) log_sum_sq[r] = 0;
        if (mean) mean[r] = 0;
        if (top1) top1[r] = false;
        continue;
      }
      const scalar_t* row = base + (r / T) * sb + (r % T) * st_;
      const RowStats<acc_t> s = forward_row<scalar_t, acc_t, ENTROPY, SQ>(row, sv, V, label, tf, in_place,
                                                                          mean != nullptr, top1 != nullptr,
                                                                          buffer.get());
      logps[r] = s.logp;
      norm[2 * r] = tf.stored_shift(s.max_w);
      norm[2 * r + 1] = s.log_s;
      if (entropy) entropy[r] = s.entropy;
      if (log_sum_sq) log_sum_sq[r] = s.log_sum_sq;
      if (mean) mean[r] = s.mean;
      if (top1) top1[r] = s.top1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, double logit_scale, double softcap,
    int64_t ignore_index, bool with_entropy, bool with_log_sum_sq_probs, bool with_mean_logits, bool with_is_top1) {
  check_inputs(logits, labels);
  const int64_t N = labels.numel(), V = logits.size(2);
  check_label_range(labels.const_data_ptr<int64_t>(), N, V, ignore_index);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc_type);
  auto sized = [&](bool wanted) { return at::empty({wanted ? N : 0}, opts); };
  ForwardOutputs out{at::empty({N}, opts),  sized(with_entropy),
                     sized(with_log_sum_sq_probs), sized(with_mean_logits),
                     at::empty({with_is_top1 ? N : 0}, logits.options().dtype(at::kBool)), at::empty({N, 2}, opts)};
  const Flags flags{with_entropy, with_log_sum_sq_probs, with_mean_logits, with_is_top1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto tf = make_transform<acc_t>(temperature, logit_scale, softcap);
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    if (with_entropy && with_log_sum_sq_probs) {
      forward_rows<scalar_t, acc_t, true, true>(logits, lab, ignore_index, tf, flags, out);
    } else if (with_entropy) {
      forward_rows<scalar_t, acc_t, true, false>(logits, lab, ignore_index, tf, flags, out);
    } else if (with_log_sum_sq_probs) {
      forward_rows<scalar_t, acc_t, false, true>(logits, lab, ignore_index, tf, flags, out);
    } else {
      forward_rows<scalar_t, acc_t, false, false>(logits, lab, ignore_index, tf, flags, out);
    }
  });
  return {out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1, out.norm};
}

template <typename scalar_t, typename acc_t, bool ENTROPY_GRAD>
void backward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                   const Transform<acc_t>& tf, const acc_t* grad_logps, const acc_t* grad_entropy,
                   const acc_t* norm, const acc_t* entropy, at::Tensor& grad, int64_t vocab_offset) {
  const int64_t T = logits.size(1), V = logits.size(2);
  const int64_t N = logits.size(0) * T;
  const int64_t sb = logits.stride(0), st_ = logits.stride(1), sv = logits.stride(2);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* grad_base = grad.mutable_data_ptr<scalar_t>();
  const bool in_place = tf.in_place(sv);

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> buffer(new acc_t[kChunk]);
    std::unique_ptr<acc_t[]> out_buffer(new acc_t[kChunk]);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* grad_row = grad_base + r * V;
      const int64_t label = labels[r];
      if (label == ignore_index) {
        std::fill(grad_row, grad_row + V, scalar_t(0));
        continue;
      }
      const scalar_t* row = base + (r / T) * sb + (r % T) * st_;
      const acc_t g = grad_logps ? grad_logps[r] : acc_t(0);
      const acc_t gh = ENTROPY_GRAD ? grad_entropy[r] : acc_t(0);
      const acc_t h = ENTROPY_GRAD ? entropy[r] : acc_t(0);
      backward_row<scalar_t, acc_t, ENTROPY_GRAD>(row, sv, V, label - vocab_offset, tf, in_place, g, gh, h,
                                                  tf.sweep_shift(norm[2 * r]), norm[2 * r + 1], grad_row,
                                                  buffer.get(), out_buffer.get());
    }
    stream_fence();
  });
}

// The gradient for logits [B, T, Vc] that are the columns [vocab_offset, vocab_offset + Vc) of the
// full rows (norm and entropy are the full rows'); labels are ids in the full vocabulary.
at::Tensor token_logprobs_backward_columns(const std::optional<at::Tensor>& grad_logps,
                                           const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                           const at::Tensor& labels, const at::Tensor& norm,
                                           const std::optional<at::Tensor>& entropy, double temperature,
                                           double logit_scale, double softcap, int64_t ignore_index,
                                           int64_t vocab_offset) {
  check_inputs(logits, labels);
  const bool entropy_grad = grad_entropy.has_value() && grad_entropy->defined();
  TORCH_CHECK(!entropy_grad || (entropy.has_value() && entropy->defined()),
              "token_logprobs_backward: an entropy gradient needs the forward entropy");
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == labels.numel() && norm.size(1) == 2,
              "token_logprobs_backward: norm must be the forward's [", labels.numel(), ", 2] normalizer, got ",
              norm.sizes());
  const at::Tensor norm_c = as_acc(norm);
  const at::Tensor g_logps = grad_logps.has_value() && grad_logps->defined() ? as_acc(*grad_logps) : at::Tensor();
  const at::Tensor g_entropy = entropy_grad ? as_acc(*grad_entropy) : at::Tensor();
  const at::Tensor entropy_c = entropy_grad ? as_acc(*entropy) : at::Tensor();
  at::Tensor grad = empty_huge_pages(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto tf = make_transform<acc_t>(temperature, logit_scale, softcap);
    const acc_t* gl = g_logps.defined() ? g_logps.const_data_ptr<acc_t>() : nullptr;
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    if (entropy_grad) {
      backward_rows<scalar_t, acc_t, true>(logits, lab, ignore_index, tf, gl, g_entropy.const_data_ptr<acc_t>(),
                                           norm_c.const_data_ptr<acc_t>(), entropy_c.const_data_ptr<acc_t>(), grad,
                                           vocab_offset);
    } else {
      backward_rows<scalar_t, acc_t, false>(logits, lab, ignore_index, tf, gl, nullptr,
                                            norm_c.const_data_ptr<acc_t>(), nullptr, grad, vocab_offset);
    }
  });
  return grad;
}

at::Tensor token_logprobs_backward(const std::optional<at::Tensor>& grad_logps,
                                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                   const at::Tensor& labels, const at::Tensor& norm,
                                   const std::optional<at::Tensor>& entropy, double temperature, double logit_scale,
                                   double softcap, int64_t ignore_index) {
  check_inputs(logits, labels);
  check_label_range(labels.const_data_ptr<int64_t>(), labels.numel(), logits.size(2), ignore_index);
  return token_logprobs_backward_columns(grad_logps, grad_entropy, logits, labels, norm, entropy, temperature,
                                         logit_scale, softcap, ignore_index, 0);
}

#define FASTALIGN_STR2(x) #x
#define FASTALIGN_STR(x) FASTALIGN_STR2(x)

// The instruction set the Vectorized<T> code was compiled for, for `python -m fastalign info`.
std::string cpu_capability() { return FASTALIGN_STR(CPU_CAPABILITY); }

}  // namespace
}  // namespace fastalign

TORCH_LIBRARY(fastalign_cpu, m) {
  m.def("cpu_capability() -> str", &fastalign::cpu_capability);
  m.def(
      "token_logprobs_forward(Tensor logits, Tensor labels, float temperature, float logit_scale, float softcap, "
      "int ignore_index, bool with_entropy, bool with_log_sum_sq_probs, bool with_mean_logits, bool with_is_top1) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_logprobs_backward(Tensor? grad_logps, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor norm, "
      "Tensor? entropy, float temperature, float logit_scale, float softcap, int ignore_index) -> Tensor");
  m.def(
      "token_logprobs_backward_columns(Tensor? grad_logps, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor norm, Tensor? entropy, float temperature, float logit_scale, float softcap, int ignore_index, "
      "int vocab_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastalign_cpu, CPU, m) {
  m.impl("token_logprobs_forward", &fastalign::token_logprobs_forward);
  m.impl("token_logprobs_backward", &fastalign::token_logprobs_backward);
  m.impl("token_logprobs_backward_columns", &fastalign::token_logprobs_backward_columns);
}
