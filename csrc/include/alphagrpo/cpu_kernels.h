// The CPU inner loops (rows of logits, SDE element ranges) behind one table of plain function
// pointers, one table per instruction set: AVX-512 (csrc/cpu/simd_avx512.cpp), AVX2 + FMA + F16C
// (csrc/cpu/simd_avx2.cpp) and portable C++ (csrc/cpu/simd_scalar.cpp). The best table the CPU
// supports is chosen once at load time (csrc/cpu/simd_dispatch.cpp); tests can force another.
// No torch types here: the ISA files are compiled with `#pragma GCC target` and must not
// instantiate torch's inline code under it. 16-bit element types travel as raw uint16_t bits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace alphagrpo {

// One row of logits x[V] at temperature 1 / inv_temp, z = x * inv_temp:
//   row_norm: *shift = max_v z_v, *log_sum = log sum_v exp(z_v - shift), in one pass over the row
//             (online max and sum of exponentials). A row with a NaN or +inf, or with no value
//             above -FLT_MAX, gives a non-finite shift + log_sum.
//   row_grad: out[v] = k * (exp((z_v - shift) - log_sum) - [v == token]) with k = -coef * inv_temp,
//             i.e. coef * d logp_token / d x_v. `out` may be `row` itself (the gradient is then
//             written in place over the logits).
template <typename S>
struct RowFns {
  void (*norm)(const S* row, int64_t V, float inv_temp, float* shift, float* log_sum);
  void (*grad)(const S* row, int64_t V, float inv_temp, float shift, float log_sum, int64_t token, float coef,
               S* out);
};

// The SDE step over n elements of one sample with mean = a x + b vel, x_next = mean + scale * noise,
// vel = v, or vu + g (v - vu) when vu is non-null (CFG). Each returns the float sum of
// (x_next - mean)^2 over the range (computed before x_next and mean are rounded to S).
//   step:    writes x_next and mean.
//   sq:      x_next given; sum of (x_next - (a x + b v))^2.
//   bwd:     d = x_next - (a x + b v); grad_v = kv d; grad_x = kx d (grad_x may be null). Returns 0.
template <typename S>
struct SdeFns {
  float (*step)(const S* x, const S* v, const S* vu, float g, const S* noise, float a, float b, float scale,
                S* x_next, S* mean, int64_t n);
  float (*sq)(const S* x, const S* v, const S* x_next, float a, float b, int64_t n);
  float (*bwd)(const S* x, const S* v, const S* x_next, float a, float b, float kv, float kx, S* grad_v, S* grad_x,
               int64_t n);
};

struct CpuKernels {
  const char* name;  // "avx512", "avx2" or "scalar"
  RowFns<float> row_f32;
  RowFns<uint16_t> row_bf16;
  RowFns<uint16_t> row_f16;
  SdeFns<float> sde_f32;
  SdeFns<uint16_t> sde_bf16;
  SdeFns<uint16_t> sde_f16;
};

const CpuKernels* cpu_kernels_avx512();  // nullptr when the compiler could not build it
const CpuKernels* cpu_kernels_avx2();
const CpuKernels* cpu_kernels_scalar();

// The active table (the best one this CPU runs, unless set_cpu_isa chose another).
const CpuKernels& cpu_kernels();
// Names of the tables this CPU can run, best first.
std::vector<std::string> cpu_isas();
// Selects a table by name (one of cpu_isas()); returns the previous name. Throws on an unknown or
// unsupported name. Meant for tests and benchmarks that compare the paths.
std::string set_cpu_isa(const std::string& name);

}  // namespace alphagrpo
