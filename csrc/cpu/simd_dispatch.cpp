// Chooses the table of CPU loops (cpu_kernels.h) once: AVX-512 where the CPU and OS support it,
// else AVX2 + FMA + F16C, else portable C++. ALPHAGRPO_CPU_ISA=avx512|avx2|scalar in the
// environment, or set_cpu_isa() (exposed as alphagrpo_serve._C.set_cpu_isa), picks another one
// that this CPU runs; an unsupported name in the environment is ignored with a warning.
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include <c10/util/Exception.h>

#include "alphagrpo/cpu_kernels.h"

namespace alphagrpo {
namespace {

bool runs(const CpuKernels* k) {
  if (k == nullptr) return false;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const std::string name = k->name;
  if (name == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // F16C comes with both
  return name == "scalar";
#else
  return std::string(k->name) == "scalar";
#endif
}

std::vector<const CpuKernels*> candidates() {
  return {cpu_kernels_avx512(), cpu_kernels_avx2(), cpu_kernels_scalar()};  // absent tables are null
}

const CpuKernels* find(const std::string& name) {
  for (const CpuKernels* k : candidates()) {
    if (k && name == k->name && runs(k)) return k;
  }
  return nullptr;
}

const CpuKernels* initial() {
  if (const char* env = std::getenv("ALPHAGRPO_CPU_ISA"); env && *env) {
    if (const CpuKernels* k = find(env)) return k;
    std::fprintf(stderr, "alphagrpo: ALPHAGRPO_CPU_ISA=%s is not one this CPU runs; using the best one\n", env);
  }
  for (const CpuKernels* k : candidates()) {
    if (runs(k)) return k;
  }
  return cpu_kernels_scalar();
}

std::atomic<const CpuKernels*>& active() {
  static std::atomic<const CpuKernels*> a{initial()};
  return a;
}

}  // namespace

const CpuKernels& cpu_kernels() { return *active().load(std::memory_order_relaxed); }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const CpuKernels* k : candidates()) {
    if (runs(k)) out.emplace_back(k->name);
  }
  return out;
}

std::string set_cpu_isa(const std::string& name) {
  const CpuKernels* k = find(name);
  std::string valid;
  for (const std::string& n : cpu_isas()) valid += (valid.empty() ? "" : ", ") + n;
  TORCH_CHECK_VALUE(k != nullptr, "isa must be one this CPU runs {", valid, "}, got '", name, "'");
  return active().exchange(k)->name;
}

}  // namespace alphagrpo
