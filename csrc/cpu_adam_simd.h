// The AdamW chunk loop, written once over a small SIMD layer, plus the scalar element update used for tails and
// for the scalar path. Included only by the per-ISA translation units, each of which sets its target (pragma)
// BEFORE including this file and defines INTERLEAF_SIMD_AVX2 or INTERLEAF_SIMD_AVX512 (or neither: scalar).
//
// Everything here has internal linkage (anonymous namespace, compiler builtins instead of std:: inline
// functions): an AVX-512 copy of a helper can never be shared with the scalar TU through the linker.
//
// Arithmetic, per element, in float32 with round-to-nearest after every operation (the build passes
// -ffp-contract=off so no multiply-add is fused behind our back; the fmas below are explicit):
//   g  = fma(p, wd, g)                             (Adam L2 mode, torch: grad.add(param, alpha=wd))
//   p  = p * (1 - lr*wd)                           (AdamW mode, torch: param.mul_(1 - lr*wd))
//   m  = fma(w', g - m, base)                      (torch: exp_avg.lerp_(grad, 1 - beta1), vectorized form)
//   v  = fma((1 - beta2) * g, g, v * beta2)        (torch: exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2))
//   d  = sqrt(v) / sqrt(bias_correction2) + eps    (torch: (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps))
//   p  = p + (-(lr / bias_correction1) * m) / d    (torch: param.addcdiv_(exp_avg, denom, value=-step_size))
//   lowp = round_to_nearest_even(p)                (torch: param.to(bfloat16 / float16))
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_adam_kernel.h"

#if defined(INTERLEAF_SIMD_AVX2) || defined(INTERLEAF_SIMD_AVX512)
#include <immintrin.h>
#endif

namespace interleaf {
namespace {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN -> 0x7FC0 (what c10::BFloat16 produces).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, like F16C's vcvtps2ph with imm 0 (overflow -> inf, NaN stays NaN and turns quiet).
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) {
    const uint16_t nan_bits = magnitude > 0x7F800000u ? static_cast<uint16_t>(0x200u | ((magnitude >> 13) & 0x3FFu)) : 0;
    return static_cast<uint16_t>(sign | 0x7C00u | nan_bits);
  }
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {
    // below 2^-14: the half is subnormal (or zero). Adding 0.5 puts the half's ulp (2^-24) at the float's ulp,
    // so the FPU's own round-to-nearest-even does the rounding.
    const float shifted = bits_float(magnitude) + 0.5f;
    return static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3F000000u));
  }
  const uint32_t mantissa_odd = (magnitude >> 13) & 1u;
  const uint32_t rebased = magnitude + 0xC8000FFFu + mantissa_odd;  // exponent -= 112, round on bit 13
  return static_cast<uint16_t>(sign | (rebased >> 13));
}

template <GradType G>
inline float load_grad_scalar(const void* grad, int64_t i) {
  if constexpr (G == GradType::kFloat32) {
    return static_cast<const float*>(grad)[i];
  } else if constexpr (G == GradType::kBFloat16) {
    return bf16_to_float(static_cast<const uint16_t*>(grad)[i]);
  } else {
    return half_to_float(static_cast<const uint16_t*>(grad)[i]);
  }
}

template <LowpType L>
inline void store_lowp_scalar(void* lowp, int64_t i, float value) {
  if constexpr (L == LowpType::kBFloat16) {
    static_cast<uint16_t*>(lowp)[i] = float_to_bf16(value);
  } else if constexpr (L == LowpType::kFloat16) {
    static_cast<uint16_t*>(lowp)[i] = float_to_half(value);
  }
}

template <GradType G, LowpType L>
void adam_scalar_range(const AdamCoeffs& c, float* param, const void* grad, float* exp_avg, float* exp_avg_sq,
                       void* lowp, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float g = load_grad_scalar<G>(grad, i);
    float p = param[i];
    if (c.apply_l2) g = __builtin_fmaf(p, c.l2_weight_decay, g);
    if (c.apply_decoupled_decay) p = p * c.decoupled_decay;
    const float m_old = exp_avg[i];
    const float m = __builtin_fmaf(c.lerp_coeff, g - m_old, c.lerp_base_is_grad ? g : m_old);
    const float v = __builtin_fmaf(c.one_minus_beta2 * g, g, exp_avg_sq[i] * c.beta2);
    const float denom = __builtin_sqrtf(v) / c.bias_correction2_sqrt + c.eps;
    p = p + (c.neg_step_size * m) / denom;
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    store_lowp_scalar<L>(lowp, i, p);
  }
}

#if defined(INTERLEAF_SIMD_AVX512)
struct Simd {
  using Reg = __m512;
  static constexpr int64_t kWidth = 16;
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Reg load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  using Half = __m256i;  // kWidth 16-bit values
  static constexpr uintptr_t kHalfAlign = 32;
  static Half to_bf16(Reg x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(is_nan, rounded, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
  }
  static Half to_f16(Reg x) { return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT); }
  static void store_half(uint16_t* p, Half h) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h); }
  static void stream_half(uint16_t* p, Half h) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  static Reg sqrt(Reg a) { return _mm512_sqrt_ps(a); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
};
#elif defined(INTERLEAF_SIMD_AVX2)
struct Simd {
  using Reg = __m256;
  static constexpr int64_t kWidth = 8;
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Reg load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  using Half = __m128i;  // kWidth 16-bit values
  static constexpr uintptr_t kHalfAlign = 16;
  static Half to_bf16(Reg x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  }
  static Half to_f16(Reg x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT); }
  static void store_half(uint16_t* p, Half h) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h); }
  static void stream_half(uint16_t* p, Half h) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), h); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
  static Reg sqrt(Reg a) { return _mm256_sqrt_ps(a); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
};
#endif

#if defined(INTERLEAF_SIMD_AVX2) || defined(INTERLEAF_SIMD_AVX512)
template <GradType G>
inline Simd::Reg load_grad_simd(const void* grad, int64_t i) {
  if constexpr (G == GradType::kFloat32) {
    return Simd::load(static_cast<const float*>(grad) + i);
  } else if constexpr (G == GradType::kBFloat16) {
    return Simd::load_bf16(static_cast<const uint16_t*>(grad) + i);
  } else {
    return Simd::load_f16(static_cast<const uint16_t*>(grad) + i);
  }
}

template <GradType G, LowpType L>
void adam_range(const AdamCoeffs& c, float* param, const void* grad, float* exp_avg, float* exp_avg_sq,
                void* lowp, int64_t n) {
  const Simd::Reg l2_weight_decay = Simd::set1(c.l2_weight_decay);
  const Simd::Reg decoupled_decay = Simd::set1(c.decoupled_decay);
  const Simd::Reg lerp_coeff = Simd::set1(c.lerp_coeff);
  const Simd::Reg beta2 = Simd::set1(c.beta2);
  const Simd::Reg one_minus_beta2 = Simd::set1(c.one_minus_beta2);
  const Simd::Reg bias_correction2_sqrt = Simd::set1(c.bias_correction2_sqrt);
  const Simd::Reg eps = Simd::set1(c.eps);
  const Simd::Reg neg_step_size = Simd::set1(c.neg_step_size);
  // The low-precision copy is written once and read only by the host-to-device copy later: stream it past the
  // caches (no read-for-ownership, ~2 of ~32 bytes per element) when the buffer is aligned for it.
  const bool stream_lowp =
      L != LowpType::kNone && reinterpret_cast<uintptr_t>(lowp) % Simd::kHalfAlign == 0;
  int64_t i = 0;
  for (; i + Simd::kWidth <= n; i += Simd::kWidth) {
    Simd::Reg g = load_grad_simd<G>(grad, i);
    Simd::Reg p = Simd::load(param + i);
    if (c.apply_l2) g = Simd::fma(p, l2_weight_decay, g);
    if (c.apply_decoupled_decay) p = Simd::mul(p, decoupled_decay);
    const Simd::Reg m_old = Simd::load(exp_avg + i);
    const Simd::Reg m = Simd::fma(lerp_coeff, Simd::sub(g, m_old), c.lerp_base_is_grad ? g : m_old);
    const Simd::Reg v = Simd::fma(Simd::mul(one_minus_beta2, g), g, Simd::mul(Simd::load(exp_avg_sq + i), beta2));
    const Simd::Reg denom = Simd::add(Simd::div(Simd::sqrt(v), bias_correction2_sqrt), eps);
    p = Simd::add(p, Simd::div(Simd::mul(neg_step_size, m), denom));
    Simd::store(param + i, p);
    Simd::store(exp_avg + i, m);
    Simd::store(exp_avg_sq + i, v);
    if constexpr (L != LowpType::kNone) {
      const Simd::Half h = L == LowpType::kBFloat16 ? Simd::to_bf16(p) : Simd::to_f16(p);
      uint16_t* out = static_cast<uint16_t*>(lowp) + i;
      if (stream_lowp) {
        Simd::stream_half(out, h);
      } else {
        Simd::store_half(out, h);
      }
    }
  }
  if (stream_lowp) _mm_sfence();  // order the streaming stores before the caller reads or copies lowp
  adam_scalar_range<G, L>(c, param, grad, exp_avg, exp_avg_sq, lowp, i, n);
}
#else
template <GradType G, LowpType L>
void adam_range(const AdamCoeffs& c, float* param, const void* grad, float* exp_avg, float* exp_avg_sq,
                void* lowp, int64_t n) {
  adam_scalar_range<G, L>(c, param, grad, exp_avg, exp_avg_sq, lowp, 0, n);
}
#endif

template <GradType G>
void adam_range_for_lowp(const AdamCoeffs& c, float* param, const void* grad, float* exp_avg, float* exp_avg_sq,
                         void* lowp, LowpType lowp_type, int64_t n) {
  switch (lowp_type) {
    case LowpType::kNone:
      return adam_range<G, LowpType::kNone>(c, param, grad, exp_avg, exp_avg_sq, lowp, n);
    case LowpType::kBFloat16:
      return adam_range<G, LowpType::kBFloat16>(c, param, grad, exp_avg, exp_avg_sq, lowp, n);
    case LowpType::kFloat16:
      return adam_range<G, LowpType::kFloat16>(c, param, grad, exp_avg, exp_avg_sq, lowp, n);
  }
}

inline void adam_chunk_dispatch(const AdamCoeffs& c, float* param, const void* grad, GradType grad_type,
                                float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n) {
  switch (grad_type) {
    case GradType::kFloat32:
      return adam_range_for_lowp<GradType::kFloat32>(c, param, grad, exp_avg, exp_avg_sq, lowp, lowp_type, n);
    case GradType::kBFloat16:
      return adam_range_for_lowp<GradType::kBFloat16>(c, param, grad, exp_avg, exp_avg_sq, lowp, lowp_type, n);
    case GradType::kFloat16:
      return adam_range_for_lowp<GradType::kFloat16>(c, param, grad, exp_avg, exp_avg_sq, lowp, lowp_type, n);
  }
}

}  // namespace

// The TU's entry point (declared in cpu_adam_kernel.h), named by the including TU.
void INTERLEAF_CHUNK_ENTRY(const AdamCoeffs& coeffs, float* param, const void* grad, GradType grad_type,
                           float* exp_avg, float* exp_avg_sq, void* lowp, LowpType lowp_type, int64_t n) {
  adam_chunk_dispatch(coeffs, param, grad, grad_type, exp_avg, exp_avg_sq, lowp, lowp_type, n);
}

}  // namespace interleaf
