// Argument checks shared by the CPU and CUDA adamw_step_ implementations. Every violation raises a ValueError
// (TORCH_CHECK_VALUE) naming the tensor and what to change; nothing is ever copied to make a call work.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "adam_coeffs.h"

namespace interleaf {

inline GradType grad_type_of(const at::Tensor& grad, size_t i) {
  switch (grad.scalar_type()) {
    case at::kFloat:
      return GradType::kFloat32;
    case at::kBFloat16:
      return GradType::kBFloat16;
    case at::kHalf:
      return GradType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "interleaf::adamw_step_: grads[", i, "] has dtype ", grad.scalar_type(),
                        "; expected float32, bfloat16 or float16");
  }
}

inline LowpType lowp_type_of(const at::Tensor& lowp, size_t i) {
  switch (lowp.scalar_type()) {
    case at::kBFloat16:
      return LowpType::kBFloat16;
    case at::kHalf:
      return LowpType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "interleaf::adamw_step_: lowp_out[", i, "] has dtype ", lowp.scalar_type(),
                        "; expected bfloat16 or float16");
  }
}

inline void check_companion(const at::Tensor& t, const at::Tensor& param, const char* name, size_t i) {
  TORCH_CHECK_VALUE(t.numel() == param.numel(), "interleaf::adamw_step_: ", name, "[", i, "] has ", t.numel(),
                    " elements but params[", i, "] has ", param.numel());
  TORCH_CHECK_VALUE(t.is_contiguous(), "interleaf::adamw_step_: ", name, "[", i,
                    "] is not contiguous; pass a contiguous tensor (the op never copies silently)");
  TORCH_CHECK_VALUE(t.device() == param.device(),
                    "interleaf::adamw_step_: ", name, "[", i, "] is on ", t.device(), " but params[", i,
                    "] is on ", param.device(), "; all tensors of one call must be on one device");
}

// Checks list lengths, dtypes, sizes, contiguity, devices and hyperparameters.
inline void check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList lowp_out, c10::DeviceType device_type,
                            double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                            bool bias_correction) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
                    "interleaf::adamw_step_: params, grads, exp_avgs, exp_avg_sqs must have the same length; got ",
                    n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK_VALUE(lowp_out.empty() || lowp_out.size() == n, "interleaf::adamw_step_: lowp_out must be empty or ",
                    "have one tensor per param; got ", lowp_out.size(), " for ", n, " params");
  TORCH_CHECK_VALUE(!bias_correction || step >= 1, "interleaf::adamw_step_: step must be >= 1 with bias ",
                    "correction (it counts this update); got ", step);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
                    "interleaf::adamw_step_: betas must lie in [0, 1); got beta1=", beta1, ", beta2=", beta2);
  TORCH_CHECK_VALUE(lr >= 0.0 && eps >= 0.0 && weight_decay >= 0.0,
                    "interleaf::adamw_step_: lr, eps and weight_decay must be >= 0; got lr=", lr, ", eps=", eps,
                    ", weight_decay=", weight_decay);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.scalar_type() == at::kFloat, "interleaf::adamw_step_: params[", i, "] has dtype ",
                      p.scalar_type(), "; the master parameters must be float32");
    TORCH_CHECK_VALUE(p.device().type() == device_type, "interleaf::adamw_step_: params[", i, "] is on ",
                      p.device(), " but this kernel runs on ", device_type);
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "interleaf::adamw_step_: params[", i, "] is on ",
                      p.device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK_VALUE(p.is_contiguous(), "interleaf::adamw_step_: params[", i,
                      "] is not contiguous; pass a contiguous tensor (the op never copies silently)");
    check_companion(grads[i], p, "grads", i);
    grad_type_of(grads[i], i);
    check_companion(exp_avgs[i], p, "exp_avgs", i);
    check_companion(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    TORCH_CHECK_VALUE(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat,
                      "interleaf::adamw_step_: exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be float32; got ",
                      exp_avgs[i].scalar_type(), " and ", exp_avg_sqs[i].scalar_type());
    if (!lowp_out.empty()) {
      check_companion(lowp_out[i], p, "lowp_out", i);
      lowp_type_of(lowp_out[i], i);
    }
  }
}

}  // namespace interleaf
