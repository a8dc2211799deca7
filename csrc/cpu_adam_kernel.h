// Interface between the torch-facing CPU op (cpu_adam.cpp) and the per-ISA kernel translation units.
//
// Each ISA TU (cpu_adam_scalar.cpp, cpu_adam_avx2.cpp, cpu_adam_avx512.cpp) defines one entry point that
// updates one contiguous chunk serially; the op splits tensors into chunks and runs them in parallel. The ISA
// TUs include no torch headers: everything they instantiate lives in an anonymous namespace, so no inline
// function compiled for AVX-512 can be picked by the linker for the scalar path (the usual ODR trap of
// per-file ISA flags).
#pragma once

#include <cstdint>

#include "adam_coeffs.h"

namespace interleaf {

// One contiguous run of `n` elements. `grad` holds GradType elements, `lowp` (may be null when
// lowp_type == kNone) receives the updated parameters rounded to nearest even in LowpType.
using AdamChunkFn = void (*)(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                             float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n);

void adam_chunk_scalar(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                       float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n);

#if defined(__x86_64__) || defined(_M_X64)
#define INTERLEAF_X86 1
void adam_chunk_avx2(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                     float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n);
void adam_chunk_avx512(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                       float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n);
#endif

}  // namespace interleaf
