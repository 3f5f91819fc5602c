// MXFP4 rows against decode-sized row counts: the per-ISA inner loops shared by mxfp4_gemv.cc
// (grouped products) and expert_mlp.cc (the whole expert MLP of a decode step).
//
// Mxfp4Rows<R> multiplies R rows (R <= 4) with output rows [n0, n1) of one expert's packed
// weight, decoding each 32-element block in registers with as few instructions as the branch
// allows (simd.h names the branches):
//   AVX-512 BF16  a pair of blocks: the 32 code bytes widen to words, low and high nibbles
//                 become 32 bf16 values each by one vpermw (e2m1 is exact in bf16) and meet x's
//                 even and odd elements (x in pair layout, PairRows) in one vdpbf16ps each;
//                 one FMA applies both blocks' scales
//   AVX-512       codes -> f32 by two vpermps on a 16-entry table against x's even and odd
//                 elements (x split, SplitRows)
//   AVX2          codes -> 2 * value as int8 by vpshufb, widened and converted; the 2 goes into
//                 the scale
// Products of bf16 x and e2m1 weights are exact in f32 and the block scale is a power of two,
// so every branch differs from an f32 reference only in the order of the sums.

#ifndef GPTOSS_JAX_CPU_MXFP4_ROWS_H_
#define GPTOSS_JAX_CPU_MXFP4_ROWS_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace gptoss_cpu::mxfp4 {

constexpr int kBlock = 32;       // elements per MXFP4 block
constexpr int kBlockBytes = 16;  // packed bytes per block
constexpr int kMaxRows = 4;      // rows of an expert per pass over its weight

struct Expert {
  const uint8_t* blocks;  // [N, K/32, 16]
  const uint8_t* scales;  // [N, K/32]
  int64_t n, kb;          // output rows, blocks per row
};

// e8m0 scale byte -> 2^(s - 127) as f32 bits; s == 0 is 2^-127, an f32 subnormal.
inline float ScaleValue(uint8_t s) {
  const uint32_t bits = s == 0 ? 0x00400000u : static_cast<uint32_t>(s) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The scales of one weight row as f32, times `mul` (a power of two: exact).
inline void RowScales(const uint8_t* s, int64_t kb, float mul, float* out) {
  for (int64_t i = 0; i < kb; ++i) out[i] = ScaleValue(s[i]) * mul;
}

// e2m1 code -> value, and as bf16 bits (value exactly representable).
inline constexpr float kFp4[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
inline constexpr uint16_t kFp4Bf16[16] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040,
                                          0x4080, 0x40C0, 0x8000, 0xBF00, 0xBF80, 0xBFC0,
                                          0xC000, 0xC040, 0xC080, 0xC0C0};

// x as the widening branches take it: per 32-block the 16 even then the 16 odd elements, f32.
inline std::vector<float> SplitRows(const uint16_t* x, int64_t m, int64_t k) {
  std::vector<float> xs(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i)
      xs[r * k + i / kBlock * kBlock + (i % 2) * 16 + (i % kBlock) / 2] =
          Bf16ToF32(x[r * k + i]);
  return xs;
}

// x as the AVX-512 BF16 branch takes pairs of blocks: per 64 elements the 32 even then the 32
// odd ones, bf16 (a ragged last block stays in natural order).
inline std::vector<uint16_t> PairRows(const uint16_t* x, int64_t m, int64_t k) {
  std::vector<uint16_t> xp(x, x + m * k);
  const int64_t paired = k / 64 * 64;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < paired; ++i)
      xp[r * k + i / 64 * 64 + (i % 2) * 32 + (i % 64) / 2] = x[r * k + i];
  return xp;
}

}  // namespace gptoss_cpu::mxfp4


// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace gptoss_cpu::isa_avx512bf16 {
using namespace gptoss_cpu::mxfp4;  // NOLINT: the format's constants

// R rows of x against weight rows [n0, n1) of one expert (n0 a multiple of 16). Blocks go in
// pairs: the 32 code bytes widen to 32 words, the low and the high nibbles each become 32 bf16
// values by one vpermw, and meet x's even and odd elements of the pair (xp: per 64 elements the
// 32 even then the 32 odd, bf16) in one vdpbf16ps each; lanes 0-7 of the sum belong to the first
// block, 8-15 to the second, so one FMA applies both scales. A last odd block goes alone, against
// x in natural order (bytes -> code pairs -> one vpermw).
template <int R>
void Mxfp4Rows(const uint16_t* x, const uint16_t* xp, int64_t k, const Expert& e, int64_t n0,
          int64_t n1, float* out, int64_t out_stride) {
  constexpr int C = R == 1 ? 4 : (R == 2 ? 2 : 1);  // independent chains a row
  alignas(64) uint16_t table_words[32] = {};
  std::memcpy(table_words, kFp4Bf16, sizeof(kFp4Bf16));
  const __m512i table = _mm512_load_si512(table_words);
  const __m512i low4 = _mm512_set1_epi16(15);
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  std::vector<float> sc(e.kb + 1);
  for (int64_t g = n0; g < n1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, n1 - g));
    __m512 acc[R][16];
    for (int j = 0; j < 16; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_setzero_ps();
      if (j >= rows) continue;
      const uint8_t* b = e.blocks + (g + j) * e.kb * kBlockBytes;
      RowScales(e.scales + (g + j) * e.kb, e.kb, 1.0f, sc.data());
      __m512 a[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
      auto pair = [&](int64_t kb, int c) {  // blocks kb, kb + 1
        const __m512i codes = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kb * kBlockBytes)));
        const __m512bh lo = reinterpret_cast<__m512bh>(
            _mm512_permutexvar_epi16(_mm512_and_si512(codes, low4), table));
        const __m512bh hi = reinterpret_cast<__m512bh>(
            _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), table));
        double two;  // the pair's scales, as one 64-bit broadcast spread to 8 + 8 lanes
        std::memcpy(&two, sc.data() + kb, 8);
        const __m512 s = _mm512_permutexvar_ps(halves, _mm512_castpd_ps(_mm512_set1_pd(two)));
        for (int r = 0; r < R; ++r) {
          const uint16_t* xr = xp + r * k + kb * kBlock;
          __m512 dot = _mm512_dpbf16_ps(
              _mm512_setzero_ps(), reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr)), lo);
          dot = _mm512_dpbf16_ps(dot, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr + 32)), hi);
          a[r][c] = _mm512_fmadd_ps(dot, s, a[r][c]);
        }
      };
      int64_t kb = 0;  // C pairs a step into C accumulators (a static index: registers)
      for (; kb + 2 * C <= e.kb; kb += 2 * C) {
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) pair(kb + 2 * c, c);
      }
      for (; kb + 2 <= e.kb; kb += 2) pair(kb, 0);
      if (kb < e.kb) {  // the odd block
        const __m512i codes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kb * kBlockBytes)));
        // dword j = code(2j) | code(2j + 1) << 16: the pair of words vpermw turns into values
        const __m512i idx = _mm512_ternarylogic_epi32(codes, _mm512_slli_epi32(codes, 12),
                                                      nibbles, 0xA8);  // (a | b) & c
        const __m512bh w = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(idx, table));
        const __m512 s = _mm512_set1_ps(sc[kb]);
        for (int r = 0; r < R; ++r) {
          const __m512bh xv = reinterpret_cast<__m512bh>(
              _mm512_loadu_si512(x + r * k + kb * kBlock));
          a[r][0] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xv, w), s, a[r][0]);
        }
      }
      for (int r = 0; r < R; ++r) {
        __m512 sum = a[r][0];
        for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, a[r][c]);
        acc[r][j] = sum;
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(out + r * out_stride + g, live, isa_avx512::Sum16(acc[r]));
  }
}

}  // namespace gptoss_cpu::isa_avx512bf16
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {
using namespace gptoss_cpu::mxfp4;  // NOLINT: the format's constants

// xs: x per block as its 16 even then 16 odd elements, f32 ([R, K/32, 2, 16]).
template <int R>
void Mxfp4Rows(const float* xs, int64_t k, const Expert& e, int64_t n0, int64_t n1, float* out,
          int64_t out_stride) {
  constexpr int C = R == 1 ? 4 : (R == 2 ? 2 : 1);
  const __m512 table = _mm512_loadu_ps(kFp4);
  const __m512i low4 = _mm512_set1_epi32(15);
  std::vector<float> sc(e.kb);
  for (int64_t g = n0; g < n1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, n1 - g));
    __m512 acc[R][16];
    for (int j = 0; j < 16; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_setzero_ps();
      if (j >= rows) continue;
      const uint8_t* b = e.blocks + (g + j) * e.kb * kBlockBytes;
      RowScales(e.scales + (g + j) * e.kb, e.kb, 1.0f, sc.data());
      __m512 a[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
      auto block = [&](int64_t kb, int c) {
        const __m512i codes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kb * kBlockBytes)));
        const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(codes, low4), table);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);
        const __m512 s = _mm512_set1_ps(sc[kb]);
        for (int r = 0; r < R; ++r) {
          const float* xb = xs + (r * (k / kBlock) + kb) * kBlock;
          const __m512 dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16),
                                             _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
          a[r][c] = _mm512_fmadd_ps(dot, s, a[r][c]);
        }
      };
      int64_t kb = 0;  // C blocks a step into C accumulators (a static index: registers)
      for (; kb + C <= e.kb; kb += C) {
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) block(kb + c, c);
      }
      for (; kb < e.kb; ++kb) block(kb, 0);
      for (int r = 0; r < R; ++r) {
        __m512 sum = a[r][0];
        for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, a[r][c]);
        acc[r][j] = sum;
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * out_stride + g, live, Sum16(acc[r]));
  }
}

}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {
using namespace gptoss_cpu::mxfp4;  // NOLINT: the format's constants

// xs as for the AVX-512 branch ([R, K/32, 2, 16] f32).
template <int R>
void Mxfp4Rows(const float* xs, int64_t k, const Expert& e, int64_t n0, int64_t n1, float* out,
          int64_t out_stride) {
  constexpr int C = R == 1 ? 2 : 1;
  // 2 * value, exact in int8 (the scales carry the 1/2)
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i low4 = _mm_set1_epi8(15);
  std::vector<float> sc(e.kb);
  for (int64_t g = n0; g < n1; g += 8) {
    const int rows = static_cast<int>(std::min<int64_t>(8, n1 - g));
    __m256 acc[R][8];
    for (int j = 0; j < 8; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_setzero_ps();
      if (j >= rows) continue;
      const uint8_t* b = e.blocks + (g + j) * e.kb * kBlockBytes;
      RowScales(e.scales + (g + j) * e.kb, e.kb, 0.5f, sc.data());
      __m256 a[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) a[r][c] = _mm256_setzero_ps();
      auto block = [&](int64_t kb, int c) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kb * kBlockBytes));
        const __m128i ev = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, low4));
        const __m128i od = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
        const __m256 e0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ev));
        const __m256 e1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(ev, 8)));
        const __m256 o0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(od));
        const __m256 o1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(od, 8)));
        const __m256 s = _mm256_set1_ps(sc[kb]);
        for (int r = 0; r < R; ++r) {
          const float* xb = xs + (r * (k / kBlock) + kb) * kBlock;
          __m256 dot = _mm256_mul_ps(e0, _mm256_loadu_ps(xb));
          dot = _mm256_fmadd_ps(e1, _mm256_loadu_ps(xb + 8), dot);
          dot = _mm256_fmadd_ps(o0, _mm256_loadu_ps(xb + 16), dot);
          dot = _mm256_fmadd_ps(o1, _mm256_loadu_ps(xb + 24), dot);
          a[r][c] = _mm256_fmadd_ps(dot, s, a[r][c]);
        }
      };
      int64_t kb = 0;  // C blocks a step into C accumulators (a static index: registers)
      for (; kb + C <= e.kb; kb += C) {
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) block(kb + c, c);
      }
      for (; kb < e.kb; ++kb) block(kb, 0);
      for (int r = 0; r < R; ++r) {
        __m256 sum = a[r][0];
        for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, a[r][c]);
        acc[r][j] = sum;
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, Sum8(acc[r]));
      std::copy(tmp, tmp + rows, out + r * out_stride + g);
    }
  }
}

}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

namespace gptoss_cpu::mxfp4 {

// R rows (x natural bf16, xp paired, xs split f32: the branch picks its layout; each a row
// pointer of stride k) against output rows [n0, n1) of expert e, into out (row stride
// out_stride).
template <int R>
void RunRows(int64_t isa, const uint16_t* x, const uint16_t* xp, const float* xs, int64_t k,
             const Expert& e, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  switch (isa) {
    case kAvx512Bf16: return isa_avx512bf16::Mxfp4Rows<R>(x, xp, k, e, n0, n1, out, out_stride);
    case kAvx512: return isa_avx512::Mxfp4Rows<R>(xs, k, e, n0, n1, out, out_stride);
    default: return isa_avx2::Mxfp4Rows<R>(xs, k, e, n0, n1, out, out_stride);
  }
}

// RunRows for a runtime row count (1..kMaxRows).
inline void RunRowsN(int64_t rows, int64_t isa, const uint16_t* x, const uint16_t* xp,
                     const float* xs, int64_t k, const Expert& e, int64_t n0, int64_t n1,
                     float* out, int64_t out_stride) {
  switch (rows) {
    case 1: return RunRows<1>(isa, x, xp, xs, k, e, n0, n1, out, out_stride);
    case 2: return RunRows<2>(isa, x, xp, xs, k, e, n0, n1, out, out_stride);
    case 3: return RunRows<3>(isa, x, xp, xs, k, e, n0, n1, out, out_stride);
    default: return RunRows<4>(isa, x, xp, xs, k, e, n0, n1, out, out_stride);
  }
}

}  // namespace gptoss_cpu::mxfp4

#endif  // GPTOSS_JAX_CPU_MXFP4_ROWS_H_
