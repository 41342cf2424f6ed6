// The CPU loops of cpu_kernels.h for AVX-512 (F, BW, VL, DQ): 16 floats per vector, bfloat16 widened
// to float32 in registers, rounded back to nearest-even on store. Only the functions between
// push_options and pop_options are compiled for AVX-512; they run only where the CPU has it
// (simd_dispatch.cpp checks before handing out this table).
// Built by GCC on x86 (its `#pragma GCC target` regions); elsewhere the table is absent and the
// dispatcher falls back to the next one.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "alphagrpo/cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
// a * b + c stays two roundings unless written as fmadd (GCC contracts by default in C++)
#pragma GCC optimize("fp-contract=off")
// GCC 12's conversion intrinsics pass _mm512_undefined_*() as a pass-through operand, which its
// flow analysis reports as "may be used uninitialized"; nothing of ours is.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace alphagrpo {
namespace {

struct Isa {
  using vf = __m512;
  static constexpr int W = 16;
  static constexpr int kUnroll = 8;  // 8 of 32 zmm registers hold a block of the row
  static inline vf set1(float x) { return _mm512_set1_ps(x); }
  static inline vf zero() { return _mm512_setzero_ps(); }
  static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
  static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vf fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
  static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
  static inline vf round_nearest(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline vf pow2n(vf p, vf n) { return _mm512_scalef_ps(p, n); }
  // folded by hand: GCC 12's _mm512_reduce_*_ps trip -Wmaybe-uninitialized in its own headers
  static inline float hmax(vf a) {
    a = _mm512_max_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm512_max_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 m = _mm512_castps512_ps128(a);
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static inline float hsum(vf a) {
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 s = _mm512_castps512_ps128(a);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static inline float first(vf a) { return _mm512_cvtss_f32(a); }
  static inline vf load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store_f32(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vf load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // round to nearest even, NaN -> 0x7fc0 (the rounding of c10::BFloat16 and of store_acc)
  static inline void store_bf16(uint16_t* p, vf v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline vf load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void store_f16(uint16_t* p, vf v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace alphagrpo

#include "alphagrpo/cpu_simd_body.h"

namespace alphagrpo {
namespace {
// Constant-initialised: no code of this region runs before the dispatcher has checked the CPU.
const CpuKernels kTable = {
    "avx512",
    {row_norm_kF32, row_grad_kF32},
    {row_norm_kBF16, row_grad_kBF16},
    {row_norm_kF16, row_grad_kF16},
    {sde_step_kF32, sde_sq_kF32, sde_bwd_kF32},
    {sde_step_kBF16, sde_sq_kBF16, sde_bwd_kBF16},
    {sde_step_kF16, sde_sq_kF16, sde_bwd_kF16},
};
}  // namespace
}  // namespace alphagrpo

#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace alphagrpo {
const CpuKernels* cpu_kernels_avx512() { return &kTable; }
}  // namespace alphagrpo

#else
#include "alphagrpo/cpu_kernels.h"
namespace alphagrpo {
const CpuKernels* cpu_kernels_avx512() { return nullptr; }
}  // namespace alphagrpo
#endif
