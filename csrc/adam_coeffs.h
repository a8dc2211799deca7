// Per-call AdamW scalars, shared by the CPU and CUDA kernels (no torch, no ISA-specific code).
//
// The scalars are computed in double exactly as torch.optim.AdamW's for-loop implementation computes them in
// Python (`1 - beta1 ** step`, `lr / bias_correction1`, `bias_correction2 ** 0.5`, `1 - lr * weight_decay`) and
// then rounded to float, which is what torch does when a Python float meets a float32 tensor. Every kernel then
// applies the same float32 operations in the same order, so CPU (scalar/AVX2/AVX-512) and CUDA agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

namespace interleaf {

enum class GradType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class LowpType : int { kNone = 0, kBFloat16 = 1, kFloat16 = 2 };

struct AdamCoeffs {
  float decoupled_decay;   // p *= decoupled_decay before the update (AdamW, weight_decay != 0)
  float l2_weight_decay;   // g += l2_weight_decay * p (Adam with L2 penalty, weight_decay != 0)
  float lerp_coeff;        // m = fma(lerp_coeff, g - m, lerp_base ? g : m), torch's lerp_(g, 1 - beta1)
  float beta2;             // v = fma((1 - beta2) * g, g, v * beta2)
  float one_minus_beta2;
  float bias_correction2_sqrt;  // denom = sqrt(v) / bias_correction2_sqrt + eps
  float eps;
  float neg_step_size;     // p = p + (neg_step_size * m) / denom, neg_step_size = -lr / bias_correction1
  bool apply_decoupled_decay;
  bool apply_l2;
  bool lerp_base_is_grad;  // torch's lerp switches formula at weight 0.5 (1 - beta1 >= 0.5)
};

// Mirrors torch/optim/adam.py::_single_tensor_adam (capturable=False, amsgrad=False, maximize=False).
inline AdamCoeffs make_adam_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   int64_t step, bool adamw_mode, bool bias_correction) {
  AdamCoeffs c{};
  const bool has_decay = weight_decay != 0.0;
  c.apply_decoupled_decay = has_decay && adamw_mode;
  c.apply_l2 = has_decay && !adamw_mode;
  c.decoupled_decay = static_cast<float>(1.0 - lr * weight_decay);
  c.l2_weight_decay = static_cast<float>(weight_decay);
  const float lerp_weight = static_cast<float>(1.0 - beta1);
  c.lerp_base_is_grad = !(std::fabs(lerp_weight) < 0.5f);
  c.lerp_coeff = c.lerp_base_is_grad ? lerp_weight - 1.0f : lerp_weight;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  double bias_correction1 = 1.0;
  double bias_correction2 = 1.0;
  if (bias_correction) {
    const double step_d = static_cast<double>(step);
    bias_correction1 = 1.0 - std::pow(beta1, step_d);
    bias_correction2 = 1.0 - std::pow(beta2, step_d);
  }
  c.bias_correction2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));
  c.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  return c;
}

}  // namespace interleaf
