// AVX2 + FMA + F16C CPU AdamW chunk. The target is set for this whole translation unit (before any include),
// so the build needs no per-file -mavx2 flags and never uses -march=native; cpu_adam.cpp calls this only after
// checking at run time that the CPU has these extensions.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c")
#endif
#define INTERLEAF_SIMD_AVX2 1
#include "cpu_adam_simd.h"

namespace interleaf {

void adam_chunk_avx2(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                     float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n) {
  adam_chunk_dispatch(coeffs, param, grad, grad_type, exp_avg, exp_avg_sq, lowp, lowp_type, n);
}

}  // namespace interleaf

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif  // x86-64
