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
#define INTERLEAF_CHUNK_ENTRY adam_chunk_avx2
#include "cpu_adam_simd.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif  // x86-64
