// AVX-512F CPU AdamW chunk (16 floats per vector; fp16 via the AVX-512F vcvtph2ps/vcvtps2ph forms). The target
// is set for this whole translation unit (before any include); cpu_adam.cpp calls this only after checking at
// run time that the CPU and OS support AVX-512F.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,avx512f"))), apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c,avx512f")
#endif
#define INTERLEAF_SIMD_AVX512 1
// GCC 12 flags its own intrinsics headers (`__m512 __Y = __Y;` placeholders) under -Wmaybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define INTERLEAF_CHUNK_ENTRY adam_chunk_avx512
#include "cpu_adam_simd.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif  // x86-64
