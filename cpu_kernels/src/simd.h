// SIMD pieces shared by the ISA-dispatched kernels (bf16_gemv.cc, ...), one namespace per
// instruction set, each compiled for its own target with `#pragma GCC target`: a library built
// for baseline x86-64 carries all branches, and the caller picks one at run time (a branch is
// only ever called on a CPU that has its instructions).
//
//   isa_avx512bf16  AVX-512 F/BW/VL/DQ + BF16 (vdpbf16ps): Cooper Lake, Sapphire Rapids, Zen 4/5
//   isa_avx512      AVX-512 F/BW/VL/DQ: Skylake-SP .. Ice Lake (bf16 widened by a shift)
//   isa_avx2        AVX2 + FMA: Haswell .. Alder Lake, Zen 1-3 (bf16 widened by a shift)

#ifndef GPTOSS_JAX_CPU_SIMD_H_
#define GPTOSS_JAX_CPU_SIMD_H_

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace gptoss_cpu {

// Branch numbers, as the Python side passes them (cpu_kernels.isa.BRANCHES).
enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

// Whether this CPU runs branch `isa` (checked before every call: a wrong request is an error,
// never an illegal instruction).
inline bool CpuHas(int64_t isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case kAvx2: return avx2;
    case kAvx512: return avx512;
    case kAvx512Bf16: return avx512 && __builtin_cpu_supports("avx512bf16");
    default: return false;
  }
}

// Software prefetch of a weight stream: none (the hardware prefetchers alone), into all cache
// levels (T0), or non-temporal (NTA: the lines are kept out of the outer caches where the CPU
// supports it, so a stream read once does not evict data that is read again).
enum Prefetch { kNone, kT0, kNta };

template <Prefetch P>
inline void Fetch(const void* p) {
  if constexpr (P == kT0) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
  if constexpr (P == kNta) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA);
}

// Bytes of a weight stream per task of a streaming kernel: large enough that the hardware
// prefetchers ramp up inside a task, small enough that two cores stay balanced on a busy machine.
constexpr int64_t kSliceBytes = 256 << 10;

// The first index of the maximum of a run of values, as jnp.argmax: a NaN counts as the
// maximum (the first NaN wins); index -1 = an empty run.
struct Best {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
};

// `a` covers earlier indices than `b`.
inline Best Better(const Best& a, const Best& b) {
  if (a.index < 0) return b;
  if (b.index < 0 || std::isnan(a.value)) return a;
  if (std::isnan(b.value) || b.value > a.value) return b;
  return a;
}

inline float Bf16ToF32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace gptoss_cpu

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {

// The 8 lane sums of a[0..7] as one vector (lane i = sum of a[i]).
inline __m256 Sum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// First maximum of p[0, n) (indices from `base`).
inline Best Argmax(const float* p, int64_t n, int64_t base) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = neg_inf;
  __m256i vidx = _mm256_set1_epi32(-1);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8, iota = _mm256_add_epi32(iota, step)) {
    const __m256 v = _mm256_loadu_ps(p + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
      for (int j = 0;; ++j) {
        if (std::isnan(p[i + j])) return {p[i + j], base + i + j};
      }
    }
    const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
    vmax = _mm256_blendv_ps(vmax, v, gt);
    vidx = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(iota), gt));
  }
  alignas(32) float m[8];
  alignas(32) int32_t idx[8];
  _mm256_store_ps(m, vmax);
  _mm256_store_si256(reinterpret_cast<__m256i*>(idx), vidx);
  Best best;
  for (int j = 0; j < 8; ++j) {  // lane j saw indices j, j + 8, ...: keep the lowest index on ties
    if (idx[j] < 0) continue;
    if (best.index < 0 || m[j] > best.value || (m[j] == best.value && idx[j] < best.index)) {
      best = {m[j], idx[j]};
    }
  }
  if (best.index < 0 && i > 0) best = {p[0], 0};  // all -inf so far: the first
  for (; i < n; ++i) best = Better(best, {p[i], i});
  if (best.index >= 0) best.index += base;
  return best;
}

}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {

// The 16 lane sums of a[0..15] as one vector (lane i = sum of a[i]): a transposing tree of
// shuffles and adds, ~3 instructions a sum instead of ~10 for a reduction each.
inline __m512 Sum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: partial sums of a[4j .. 4j+3]
    const __m512d x = _mm512_castps_pd(t[2 * j]), y = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// First maximum of p[0, n) (indices from `base`).
inline Best Argmax(const float* p, int64_t n, int64_t base) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  __m512i vidx = _mm512_set1_epi32(-1);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = 0; i < n; i += 16, iota = _mm512_add_epi32(iota, step)) {
    const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(neg_inf, live, p + i);
    if (const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) {
      const int64_t j = i + __builtin_ctz(nan);
      return {p[j], base + j};
    }
    const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
    vmax = _mm512_mask_mov_ps(vmax, gt, v);
    vidx = _mm512_mask_mov_epi32(vidx, gt, iota);
  }
  const float m = _mm512_reduce_max_ps(vmax);
  if (n == 0) return {};
  if (m == -std::numeric_limits<float>::infinity()) return {m, base};  // all -inf
  const __mmask16 at = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(m), _CMP_EQ_OQ);
  return {m, base + _mm512_mask_reduce_min_epi32(at, vidx)};
}

}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

#endif  // GPTOSS_JAX_CPU_SIMD_H_
