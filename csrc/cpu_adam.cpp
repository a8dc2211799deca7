// interleaf::adamw_step_ on CPU: stateless multi-tensor Adam/AdamW with the low-precision weight copy fused into
// the same pass. Defines the `interleaf` op library (schema with mutation marked) and its CPU kernel.
//
// The ISA (AVX-512F, AVX2+FMA+F16C, scalar) is chosen at run time from what the CPU supports, or forced with
// INTERLEAF_CPU_ISA=auto|avx512|avx2|scalar (read on every call, so tests can switch it). Work is split into
// fixed-size chunks across all tensors of the call and the chunks run in parallel on torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "adam_checks.h"
#include "cpu_adam_kernel.h"

namespace interleaf {
namespace {

struct IsaChoice {
  AdamChunkFn chunk_fn;
  const char* name;  // what ds_plugins.ops.backend() reports
};

bool cpu_has_avx2() {
#ifdef INTERLEAF_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef INTERLEAF_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

IsaChoice choose_isa() {
  const char* env = std::getenv("INTERLEAF_CPU_ISA");
  std::string wanted = env != nullptr ? env : "";
  for (char& ch : wanted) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const bool automatic = wanted.empty() || wanted == "auto";
  TORCH_CHECK_VALUE(automatic || wanted == "avx512" || wanted == "avx2" || wanted == "scalar",
                    "INTERLEAF_CPU_ISA must be one of auto, avx512, avx2, scalar; got '", wanted, "'");
#ifdef INTERLEAF_X86
  if (wanted == "avx512" || (automatic && cpu_has_avx512())) {
    TORCH_CHECK(cpu_has_avx512(), "INTERLEAF_CPU_ISA=avx512 but this CPU (or OS) does not support AVX-512F");
    return {&adam_chunk_avx512, "cpp-avx512"};
  }
  if (wanted == "avx2" || (automatic && cpu_has_avx2())) {
    TORCH_CHECK(cpu_has_avx2(), "INTERLEAF_CPU_ISA=avx2 but this CPU does not support AVX2+FMA+F16C");
    return {&adam_chunk_avx2, "cpp-avx2"};
  }
#else
  TORCH_CHECK(automatic || wanted == "scalar", "INTERLEAF_CPU_ISA=", wanted,
              " is not available: this build has only the scalar kernel (not x86-64)");
#endif
  return {&adam_chunk_scalar, "cpp-scalar"};
}

// Multiple of every SIMD width, so only the last chunk of a tensor has a scalar tail. 64K floats = 256 KiB per
// stream: large enough to amortise scheduling, small enough to balance threads.
constexpr int64_t kChunkElements = int64_t{1} << 16;

// Threads that got chunks in the most recent call (any thread's call): a diagnostic for benchmarks, read with
// torch.ops.interleaf.cpu_threads_info().
std::atomic<int64_t> last_call_threads{0};

struct TensorWork {
  float* param;
  const char* grad;
  int64_t grad_element_size;
  GradType grad_type;
  float* exp_avg;
  float* exp_avg_sq;
  char* lowp;  // null when no low-precision copy is requested
  LowpType lowp_type;
};

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList lowp_out, double lr, double beta1, double beta2,
                    double eps, double weight_decay, int64_t step, bool adamw_mode, bool bias_correction) {
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, lowp_out, c10::kCPU, lr, beta1, beta2, eps, weight_decay,
                  step, bias_correction);
  const IsaChoice isa = choose_isa();
  const AdamCoeffs coeffs =
      make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, step, adamw_mode, bias_correction);

  std::vector<TensorWork> work;
  std::vector<Chunk> chunks;
  work.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const bool has_lowp = !lowp_out.empty();
    work.push_back(TensorWork{
        params[i].data_ptr<float>(),
        static_cast<const char*>(grads[i].const_data_ptr()),
        static_cast<int64_t>(grads[i].element_size()),
        grad_type_of(grads[i], i),
        exp_avgs[i].data_ptr<float>(),
        exp_avg_sqs[i].data_ptr<float>(),
        has_lowp ? static_cast<char*>(lowp_out[i].data_ptr()) : nullptr,
        has_lowp ? lowp_type_of(lowp_out[i], i) : LowpType::kNone,
    });
    const int64_t tensor = static_cast<int64_t>(work.size()) - 1;
    for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
      chunks.push_back(Chunk{tensor, begin, std::min(numel, begin + kChunkElements)});
    }
  }

  std::atomic<int64_t> threads_used{0};
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    threads_used.fetch_add(1, std::memory_order_relaxed);  // parallel_for calls this once per working thread
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const TensorWork& w = work[chunk.tensor];
      const int64_t b = chunk.begin;
      isa.chunk_fn(coeffs, w.param + b, w.grad + b * w.grad_element_size, w.grad_type, w.exp_avg + b,
                   w.exp_avg_sq + b, w.lowp != nullptr ? w.lowp + b * 2 : nullptr, w.lowp_type, chunk.end - b);
    }
  });
  last_call_threads.store(threads_used.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

std::string cpu_isa() { return choose_isa().name; }

// [omp_get_max_threads() of the OpenMP runtime this library is bound to (0 without OpenMP),
//  at::get_num_threads(), threads that got chunks in the last adamw_step_ call (0 before any call)].
std::vector<int64_t> cpu_threads_info() {
#ifdef _OPENMP
  const int64_t omp_max = omp_get_max_threads();
#else
  const int64_t omp_max = 0;
#endif
  return {omp_max, static_cast<int64_t>(at::get_num_threads()), last_call_threads.load(std::memory_order_relaxed)};
}

}  // namespace
}  // namespace interleaf

TORCH_LIBRARY(interleaf, m) {
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] lowp_out, *, float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "bool adamw_mode, bool bias_correction) -> ()");
  m.def("cpu_isa() -> str", &interleaf::cpu_isa);
  m.def("cpu_threads_info() -> int[]", &interleaf::cpu_threads_info);
}

TORCH_LIBRARY_IMPL(interleaf, CPU, m) { m.impl("adamw_step_", &interleaf::adamw_step_cpu); }
