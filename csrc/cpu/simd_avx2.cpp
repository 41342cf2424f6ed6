// The CPU loops of cpu_kernels.h for AVX2 with FMA and F16C: 8 floats per vector. Same body as the
// AVX-512 file (alphagrpo/cpu_simd_body.h); used on CPUs without AVX-512 (simd_dispatch.cpp).
// Built by GCC on x86 (its `#pragma GCC target` regions); elsewhere the table is absent and the
// dispatcher falls back to the next one.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "alphagrpo/cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// a * b + c stays two roundings unless written as fmadd (GCC contracts by default in C++)
#pragma GCC optimize("fp-contract=off")

namespace alphagrpo {
namespace {

struct Isa {
  using vf = __m256;
  static constexpr int W = 8;
  static constexpr int kUnroll = 4;  // 16 ymm registers
  static inline vf set1(float x) { return _mm256_set1_ps(x); }
  static inline vf zero() { return _mm256_setzero_ps(); }
  static inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  static inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
  static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  static inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vf fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
  static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
  static inline vf round_nearest(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // n in [-126, 127] after exp's clamp: 2^n built in the exponent field.
  static inline vf pow2n(vf p, vf n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static inline float hmax(vf a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static inline float hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float first(vf a) { return _mm256_cvtss_f32(a); }
  static inline vf load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store_f32(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline vf load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline void store_bf16(uint16_t* p, vf v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // r < 2^16 in every lane, so the signed-saturating pack keeps it exactly
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static inline vf load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store_f16(uint16_t* p, vf v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace alphagrpo

#include "alphagrpo/cpu_simd_body.h"

namespace alphagrpo {
namespace {
const CpuKernels kTable = {
    "avx2",
    {row_norm_kF32, row_grad_kF32},
    {row_norm_kBF16, row_grad_kBF16},
    {row_norm_kF16, row_grad_kF16},
    {sde_step_kF32, sde_sq_kF32, sde_bwd_kF32},
    {sde_step_kBF16, sde_sq_kBF16, sde_bwd_kBF16},
    {sde_step_kF16, sde_sq_kF16, sde_bwd_kF16},
};
}  // namespace
}  // namespace alphagrpo

#pragma GCC pop_options

namespace alphagrpo {
const CpuKernels* cpu_kernels_avx2() { return &kTable; }
}  // namespace alphagrpo

#else
#include "alphagrpo/cpu_kernels.h"
namespace alphagrpo {
const CpuKernels* cpu_kernels_avx2() { return nullptr; }
}  // namespace alphagrpo
#endif
