// Scalar CPU AdamW chunk: the portable path (any CPU) and the reference the SIMD paths must match bit for bit.
#include "cpu_adam_simd.h"

namespace interleaf {

void adam_chunk_scalar(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                       float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n) {
  adam_chunk_dispatch(coeffs, param, grad, grad_type, exp_avg, exp_avg_sq, lowp, lowp_type, n);
}

}  // namespace interleaf
