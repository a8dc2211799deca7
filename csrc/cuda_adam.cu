// interleaf::adamw_step_ on CUDA: stateless multi-tensor Adam/AdamW over many tensors in few launches, with the
// bf16/fp16 copy of the updated weights written in the same pass. The CPU library (cpu_adam.cpp) defines the
// schema; this file registers the CUDA kernel for it.
//
// Launch scheme: tensors are cut into fixed chunks; one thread block updates one chunk. A launch carries, as a
// kernel argument (< 4 KiB), the pointers of up to kMaxTensors tensors and the first block of each; a block finds
// its tensor by binary search over those prefix offsets, so a launch covers its tensors whole, however large (no
// block table, no tensor split across launches). Tensors are grouped by (grad dtype, lowp dtype) so each kernel is
// specialised. The arithmetic uses the *_rn intrinsics (never contracted into FMAs) in the same order as the CPU
// kernel (csrc/cpu_adam_simd.h), so CPU and CUDA give identical bits.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "adam_checks.h"

namespace interleaf {
namespace {

constexpr int kMaxTensors = 64;
constexpr int kThreads = 512;
constexpr int kIlp = 4;
constexpr int64_t kChunkElements = 65536;

struct LaunchTable {
  float* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  void* lowp[kMaxTensors];
  int64_t numel[kMaxTensors];
  int first_block[kMaxTensors];  // tensor t owns blocks [first_block[t], first_block[t + 1]) (or up to gridDim.x)
  int tensors;
};
static_assert(sizeof(LaunchTable) + sizeof(AdamCoeffs) < 4000, "kernel arguments must stay under 4 KiB");

template <GradType G>
__device__ __forceinline__ float load_grad(const void* grad, int64_t i) {
  if constexpr (G == GradType::kFloat32) {
    return static_cast<const float*>(grad)[i];
  } else if constexpr (G == GradType::kBFloat16) {
    return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(grad)[i]) << 16);
  } else {
    return __half2float(static_cast<const __half*>(grad)[i]);
  }
}

// Round to nearest even; NaN -> 0x7FC0, as on the CPU path and in c10::BFloat16.
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// One element, in the order of csrc/cpu_adam_simd.h (see there for the torch operation each line mirrors).
__device__ __forceinline__ void adam_update(const AdamCoeffs& c, float& p, float g, float& m, float& v) {
  if (c.apply_l2) g = __fmaf_rn(p, c.l2_weight_decay, g);
  if (c.apply_decoupled_decay) p = __fmul_rn(p, c.decoupled_decay);
  m = __fmaf_rn(c.lerp_coeff, __fsub_rn(g, m), c.lerp_base_is_grad ? g : m);
  v = __fmaf_rn(__fmul_rn(c.one_minus_beta2, g), g, __fmul_rn(v, c.beta2));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.bias_correction2_sqrt), c.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(c.neg_step_size, m), denom));
}

__device__ __forceinline__ bool aligned_to(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Four grads starting at element i (i a multiple of 4, the pointer aligned for a 16/8-byte load).
template <GradType G>
__device__ __forceinline__ void load_grad4(const void* grad, int64_t i, float (&g)[4]) {
  if constexpr (G == GradType::kFloat32) {
    const float4 x = *reinterpret_cast<const float4*>(static_cast<const float*>(grad) + i);
    g[0] = x.x, g[1] = x.y, g[2] = x.z, g[3] = x.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(grad) + i);
    const uint32_t halves[4] = {raw.x & 0xFFFFu, raw.x >> 16, raw.y & 0xFFFFu, raw.y >> 16};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (G == GradType::kBFloat16) {
        g[j] = __uint_as_float(halves[j] << 16);
      } else {
        g[j] = __half2float(__ushort_as_half(static_cast<unsigned short>(halves[j])));
      }
    }
  }
}

template <LowpType L>
__device__ __forceinline__ uint32_t lowp_bits(float value) {
  if constexpr (L == LowpType::kBFloat16) {
    return float_to_bf16(value);
  } else {
    return __half_as_ushort(__float2half_rn(value));
  }
}

template <LowpType L>
__device__ __forceinline__ void store_lowp(void* lowp, int64_t i, float value) {
  if constexpr (L != LowpType::kNone) static_cast<uint16_t*>(lowp)[i] = static_cast<uint16_t>(lowp_bits<L>(value));
}

template <GradType G, LowpType L>
__global__ void __launch_bounds__(kThreads)
    adam_multi_tensor_kernel(const __grid_constant__ LaunchTable table, const AdamCoeffs c) {
  int tensor = 0;  // the last tensor whose first block is <= blockIdx.x (uniform across the block)
  for (int lo = 0, hi = table.tensors - 1; lo <= hi;) {
    const int mid = (lo + hi) / 2;
    if (table.first_block[mid] <= static_cast<int>(blockIdx.x)) {
      tensor = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.x - table.first_block[tensor]) * kChunkElements;
  const int64_t end = min(table.numel[tensor], begin + kChunkElements);
  float* __restrict__ param = table.param[tensor];
  const void* __restrict__ grad = table.grad[tensor];
  float* __restrict__ exp_avg = table.exp_avg[tensor];
  float* __restrict__ exp_avg_sq = table.exp_avg_sq[tensor];
  void* __restrict__ lowp = table.lowp[tensor];

  // Vector part: 16-byte loads/stores of p, m, v (8 or 16 bytes of grads, 8 of lowp) when every pointer allows it
  // (chunk starts are multiples of 64K elements, so the base pointers decide).
  int64_t scalar_begin = begin;
  const bool vectorize = aligned_to(param, 16) && aligned_to(exp_avg, 16) && aligned_to(exp_avg_sq, 16) &&
                         aligned_to(grad, G == GradType::kFloat32 ? 16 : 8) &&
                         (L == LowpType::kNone || aligned_to(lowp, 8));
  if (vectorize) {
    const int64_t vector_end = begin + (end - begin) / 4 * 4;
    for (int64_t i = begin + 4 * static_cast<int64_t>(threadIdx.x); i < vector_end; i += 4 * kThreads) {
      float4 p4 = *reinterpret_cast<const float4*>(param + i);
      float4 m4 = *reinterpret_cast<const float4*>(exp_avg + i);
      float4 v4 = *reinterpret_cast<const float4*>(exp_avg_sq + i);
      float g[4];
      load_grad4<G>(grad, i, g);
      adam_update(c, p4.x, g[0], m4.x, v4.x);
      adam_update(c, p4.y, g[1], m4.y, v4.y);
      adam_update(c, p4.z, g[2], m4.z, v4.z);
      adam_update(c, p4.w, g[3], m4.w, v4.w);
      *reinterpret_cast<float4*>(param + i) = p4;
      *reinterpret_cast<float4*>(exp_avg + i) = m4;
      *reinterpret_cast<float4*>(exp_avg_sq + i) = v4;
      if constexpr (L != LowpType::kNone) {
        const uint2 packed = make_uint2(lowp_bits<L>(p4.x) | (lowp_bits<L>(p4.y) << 16),
                                        lowp_bits<L>(p4.z) | (lowp_bits<L>(p4.w) << 16));
        *reinterpret_cast<uint2*>(static_cast<uint16_t*>(lowp) + i) = packed;
      }
    }
    scalar_begin = vector_end;
  }

  // Scalar part: everything when unaligned, else the tensor's last < 4 elements.
  for (int64_t base = scalar_begin + threadIdx.x; base < end; base += static_cast<int64_t>(kThreads) * kIlp) {
    float p[kIlp], g[kIlp], m[kIlp], v[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + static_cast<int64_t>(j) * kThreads;
      if (i < end) {
        p[j] = param[i];
        g[j] = load_grad<G>(grad, i);
        m[j] = exp_avg[i];
        v[j] = exp_avg_sq[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + static_cast<int64_t>(j) * kThreads;
      if (i < end) {
        adam_update(c, p[j], g[j], m[j], v[j]);
        param[i] = p[j];
        exp_avg[i] = m[j];
        exp_avg_sq[i] = v[j];
        store_lowp<L>(lowp, i, p[j]);
      }
    }
  }
}

template <GradType G, LowpType L>
void launch_group(const std::vector<size_t>& members, at::TensorList params, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList lowp_out,
                  const AdamCoeffs& coeffs, cudaStream_t stream) {
  LaunchTable table;
  int tensors = 0;
  int64_t blocks = 0;
  auto launch = [&]() {
    table.tensors = tensors;
    TORCH_CHECK(blocks <= 0x7FFFFFFF, "interleaf::adamw_step_: too many blocks in one launch");
    adam_multi_tensor_kernel<G, L><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tensors = 0;
    blocks = 0;
  };
  for (const size_t i : members) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;  // every listed tensor owns at least one block
    table.param[tensors] = params[i].data_ptr<float>();
    table.grad[tensors] = grads[i].const_data_ptr();
    table.exp_avg[tensors] = exp_avgs[i].data_ptr<float>();
    table.exp_avg_sq[tensors] = exp_avg_sqs[i].data_ptr<float>();
    table.lowp[tensors] = lowp_out.empty() ? nullptr : lowp_out[i].data_ptr();
    table.numel[tensors] = numel;
    table.first_block[tensors] = static_cast<int>(blocks);
    ++tensors;
    blocks += (numel + kChunkElements - 1) / kChunkElements;
    if (tensors == kMaxTensors) launch();
  }
  if (tensors > 0) launch();
}

template <GradType G>
void launch_for_lowp(LowpType lowp_type, const std::vector<size_t>& members, at::TensorList params,
                     at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList lowp_out, const AdamCoeffs& coeffs, cudaStream_t stream) {
  switch (lowp_type) {
    case LowpType::kNone:
      return launch_group<G, LowpType::kNone>(members, params, grads, exp_avgs, exp_avg_sqs, lowp_out, coeffs, stream);
    case LowpType::kBFloat16:
      return launch_group<G, LowpType::kBFloat16>(members, params, grads, exp_avgs, exp_avg_sqs, lowp_out, coeffs,
                                                  stream);
    case LowpType::kFloat16:
      return launch_group<G, LowpType::kFloat16>(members, params, grads, exp_avgs, exp_avg_sqs, lowp_out, coeffs,
                                                 stream);
  }
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList lowp_out, double lr, double beta1, double beta2,
                     double eps, double weight_decay, int64_t step, bool adamw_mode, bool bias_correction) {
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, lowp_out, c10::kCUDA, lr, beta1, beta2, eps, weight_decay,
                  step, bias_correction);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const AdamCoeffs coeffs =
      make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction);

  // Group by (grad dtype, lowp dtype): 3 x 3 specialisations.
  std::vector<size_t> groups[3][3];
  for (size_t i = 0; i < params.size(); ++i) {
    const int g = static_cast<int>(grad_type_of(grads[i], i));
    const int l = lowp_out.empty() ? 0 : static_cast<int>(lowp_type_of(lowp_out[i], i));
    groups[g][l].push_back(i);
  }
  for (int l = 0; l < 3; ++l) {
    const auto lowp_type = static_cast<LowpType>(l);
    if (!groups[0][l].empty())
      launch_for_lowp<GradType::kFloat32>(lowp_type, groups[0][l], params, grads, exp_avgs, exp_avg_sqs, lowp_out,
                                          coeffs, stream);
    if (!groups[1][l].empty())
      launch_for_lowp<GradType::kBFloat16>(lowp_type, groups[1][l], params, grads, exp_avgs, exp_avg_sqs, lowp_out,
                                           coeffs, stream);
    if (!groups[2][l].empty())
      launch_for_lowp<GradType::kFloat16>(lowp_type, groups[2][l], params, grads, exp_avgs, exp_avg_sqs, lowp_out,
                                          coeffs, stream);
  }
}

}  // namespace
}  // namespace interleaf

TORCH_LIBRARY_IMPL(interleaf, CUDA, m) { m.impl("adamw_step_", &interleaf::adamw_step_cuda); }
