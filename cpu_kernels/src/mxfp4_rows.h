// MXFP4 rows against decode-sized row counts: the per-ISA inner loops shared by mxfp4_gemv.cc
// (grouped products) and expert_mlp.cc (the whole expert MLP of a decode step).
//
// Mxfp4Rows<R> multiplies R rows (R <= 4) with output rows [n0, n1) of one expert's packed
// weight, decoding each 32-element block in registers with as few instructions as the branch
// allows (simd.h names the branches):
//   AVX-512 BF16  four blocks at a time: their 64 code bytes, taken as 32 words of four nibbles,
//                 become four vectors of 32 bf16 values by one vpermw each on a 16-entry table
//                 held twice (vpermw reads five index bits, so no mask is needed: only three
//                 shifts), and meet x in quad layout (QuadRows) in four vdpbf16ps; one FMA
//                 applies the four blocks' scales (four lanes each). Per four blocks that is 5
//                 shuffles and 5 FMA-pipe ops (pairs of blocks widened to words took 8 and 6):
//                 a core decodes ~2x faster, fast enough for two to reach memory bandwidth
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
// Weight rows a pass prefetches ahead of the row it sums (software prefetch: one core's
// hardware prefetchers alone left a cold weight at ~22 GB/s, half what a core can stream).
constexpr int64_t kAheadRows = 16;

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

// e2m1 code -> value, and as bf16 bits (value exactly representable).
inline constexpr float kFp4[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
inline constexpr uint16_t kFp4Bf16[16] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040,
                                          0x4080, 0x40C0, 0x8000, 0xBF00, 0xBF80, 0xBFC0,
                                          0xC000, 0xC040, 0xC080, 0xC0C0};

// x as the widening branches take it: per 32-block the 16 even then the 16 odd elements, f32.
// PutSplit: elements [i0, i1) of one such row (of k), given in natural order in v.
inline void PutSplit(float* row, int64_t i0, int64_t i1, const uint16_t* v) {
  for (int64_t i = i0; i < i1; ++i)
    row[i / kBlock * kBlock + (i % 2) * 16 + (i % kBlock) / 2] = Bf16ToF32(v[i - i0]);
}

inline std::vector<float> SplitRows(const uint16_t* x, int64_t m, int64_t k) {
  std::vector<float> xs(m * k);
  for (int64_t r = 0; r < m; ++r) PutSplit(xs.data() + r * k, 0, k, x + r * k);
  return xs;
}

// Where element i of a row of k goes in quad layout, the AVX-512 BF16 branch's: per four blocks
// (128 elements) four vectors of 32 words, word w of vector o holding element 4w + o (the
// nibble o of code word w: the elements are dealt out four ways); a last 1-3 blocks likewise,
// in four vectors of 8 words a block. The row keeps its length k.
inline int64_t QuadIndex(int64_t i, int64_t k) {
  const int64_t q = i / 128, within = i % 128, full = k / 128;
  const int64_t words = q < full ? 32 : (k - 128 * full) / 4;  // words of each vector
  return q * 128 + (within % 4) * words + within / 4;
}

// Elements [i0, i1) of one row (of k) in quad layout, given in natural order in v: whole quads
// by a plain 4-way deal (the per-element index was ~2 us of an expert_mlp call), the rest by
// QuadIndex.
inline void PutQuad(uint16_t* row, int64_t k, int64_t i0, int64_t i1, const uint16_t* v) {
  int64_t i = i0;
  for (; i % 128 != 0 && i < i1; ++i) row[QuadIndex(i, k)] = v[i - i0];
  for (; i + 128 <= i1 && i + 128 <= k / 128 * 128; i += 128)
    for (int o = 0; o < 4; ++o)
      for (int w = 0; w < 32; ++w) row[i + 32 * o + w] = v[i - i0 + 4 * w + o];
  for (; i < i1; ++i) row[QuadIndex(i, k)] = v[i - i0];
}

inline std::vector<uint16_t> QuadRows(const uint16_t* x, int64_t m, int64_t k) {
  std::vector<uint16_t> xq(m * k);
  for (int64_t r = 0; r < m; ++r) PutQuad(xq.data() + r * k, k, 0, k, x + r * k);
  return xq;
}

}  // namespace gptoss_cpu::mxfp4


// RowScales: the scales of one weight row as f32 (times `mul`, a power of two: exact), 16
// (AVX-512) or 8 (AVX2) at a time: one by one they were a third of a decode row's instructions
// (kb = 16: 16 scales against 8 block pairs).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {
inline void RowScales(const uint8_t* s, int64_t kb, float* out) {
  const __m512i zero_scale = _mm512_set1_epi32(0x00400000);  // ScaleValue(0): 2^-127
  for (int64_t i = 0; i < kb; i += 16) {
    const __mmask16 live = kb - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (kb - i)) - 1);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, s + i));
    const __m512i bits = _mm512_mask_blend_epi32(_mm512_testn_epi32_mask(v, v),
                                                 _mm512_slli_epi32(v, 23), zero_scale);
    _mm512_mask_storeu_ps(out + i, live, _mm512_castsi512_ps(bits));
  }
}
}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {
inline void RowScales(const uint8_t* s, int64_t kb, float mul, float* out) {
  const __m256i zero_scale = _mm256_set1_epi32(0x00400000);
  const __m256 m = _mm256_set1_ps(mul);
  int64_t i = 0;
  for (; i + 8 <= kb; i += 8) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i)));
    const __m256i bits = _mm256_blendv_epi8(_mm256_slli_epi32(v, 23), zero_scale,
                                            _mm256_cmpeq_epi32(v, _mm256_setzero_si256()));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_castsi256_ps(bits), m));
  }
  for (; i < kb; ++i) out[i] = mxfp4::ScaleValue(s[i]) * mul;
}
}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace gptoss_cpu::isa_avx512bf16 {
using namespace gptoss_cpu::mxfp4;  // NOLINT: the format's constants

// R rows of x (xq: quad layout, rows of k) against weight rows [n0, n1) of one expert (n0 a
// multiple of 16). Lanes 4b..4b+3 of a quad's sum belong to its block b, so one FMA applies the
// four scales; a last 1-3 blocks go the same way with masked loads (the missing lanes zero).
template <int R>
void Mxfp4Rows(const uint16_t* xq, int64_t k, const Expert& e, int64_t n0, int64_t n1,
               float* out, int64_t out_stride) {
  constexpr int C = R == 1 ? 4 : (R == 2 ? 2 : 1);  // independent chains a row
  alignas(64) uint16_t table_words[32];
  std::memcpy(table_words, kFp4Bf16, sizeof(kFp4Bf16));
  std::memcpy(table_words + 16, kFp4Bf16, sizeof(kFp4Bf16));  // index bit 4 is the next nibble's
  const __m512i table = _mm512_load_si512(table_words);
  const __m512i quarters = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const int64_t kb = e.kb, full = kb / 4, rest = kb - 4 * full;
  // the row's scales (the last quad's missing ones stay 0), on the stack up to K = 8192
  float sc_stack[260] = {};
  std::vector<float> sc_heap(4 * full + 4 > 260 ? 4 * full + 4 : 0, 0.0f);
  float* const sc = sc_heap.empty() ? sc_stack : sc_heap.data();
  // the task's first kAheadRows rows at once (the loop below fetches a row kAheadRows on)
  for (int64_t r = n0; r < std::min(n1, n0 + kAheadRows); ++r) {
    const char* row = reinterpret_cast<const char*>(e.blocks + r * kb * kBlockBytes);
    for (int64_t off = 0; off < kb * kBlockBytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(e.scales + r * kb), _MM_HINT_T0);
  }
  // the ragged quad: its code bytes, and the words of each of its x vectors
  const __mmask64 rest_bytes = rest == 0 ? 0 : (~0ull >> (64 - 16 * rest));
  const __mmask32 rest_words = rest == 0 ? 0 : static_cast<__mmask32>((1u << (8 * rest)) - 1);
  for (int64_t g = n0; g < n1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, n1 - g));
    __m512 acc[R][16];
    for (int j = 0; j < 16; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_setzero_ps();
      if (j >= rows) continue;
      const uint8_t* b = e.blocks + (g + j) * kb * kBlockBytes;
      if (g + j + kAheadRows < n1) {  // the row kAheadRows on: in flight while these are summed
        const char* ahead = reinterpret_cast<const char*>(b + kAheadRows * kb * kBlockBytes);
        for (int64_t off = 0; off < kb * kBlockBytes; off += 64)
          _mm_prefetch(ahead + off, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(e.scales + (g + j + kAheadRows) * kb),
                     _MM_HINT_T0);
      }
      isa_avx512::RowScales(e.scales + (g + j) * kb, kb, sc);
      __m512 a[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
      // quad q into chain c; `ragged`: the last 1-3 blocks, by masked loads
      auto quad = [&](int64_t q, int c, bool ragged) {
        const __m512i w = ragged ? _mm512_maskz_loadu_epi8(rest_bytes, b + q * 64)
                                 : _mm512_loadu_si512(b + q * 64);
        const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(w, table));
        const __m512bh w1 = reinterpret_cast<__m512bh>(
            _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table));
        const __m512bh w2 = reinterpret_cast<__m512bh>(
            _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), table));
        const __m512bh w3 = reinterpret_cast<__m512bh>(
            _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), table));
        const __m512 s =
            _mm512_permutexvar_ps(quarters, _mm512_castps128_ps512(_mm_loadu_ps(sc + 4 * q)));
        for (int r = 0; r < R; ++r) {
          const uint16_t* xr = xq + r * k + q * 128;
          __m512i xv[4];
          for (int o = 0; o < 4; ++o)
            xv[o] = ragged ? _mm512_maskz_loadu_epi16(rest_words, xr + 8 * rest * o)
                           : _mm512_loadu_si512(xr + 32 * o);
          __m512 d0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(xv[0]), w0);
          __m512 d1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(xv[1]), w1);
          d0 = _mm512_dpbf16_ps(d0, reinterpret_cast<__m512bh>(xv[2]), w2);
          d1 = _mm512_dpbf16_ps(d1, reinterpret_cast<__m512bh>(xv[3]), w3);
          a[r][c] = _mm512_fmadd_ps(_mm512_add_ps(d0, d1), s, a[r][c]);
        }
      };
      int64_t q = 0;  // C quads a step into C accumulators (a static index: registers)
      for (; q + C <= full; q += C) {
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) quad(q + c, c, false);
      }
      for (; q < full; ++q) quad(q, 0, false);
      if (rest) quad(full, 0, true);
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
      isa_avx512::RowScales(e.scales + (g + j) * e.kb, e.kb, sc.data());
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
      isa_avx2::RowScales(e.scales + (g + j) * e.kb, e.kb, 0.5f, sc.data());
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

// R rows (xp in quad layout, bf16, for the AVX-512 BF16 branch; xs split f32 for the others;
// each a row pointer of stride k) against output rows [n0, n1) of expert e, into out (row stride
// out_stride).
template <int R>
void RunRows(int64_t isa, const uint16_t* xp, const float* xs, int64_t k, const Expert& e,
             int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  switch (isa) {
    case kAvx512Bf16: return isa_avx512bf16::Mxfp4Rows<R>(xp, k, e, n0, n1, out, out_stride);
    case kAvx512: return isa_avx512::Mxfp4Rows<R>(xs, k, e, n0, n1, out, out_stride);
    default: return isa_avx2::Mxfp4Rows<R>(xs, k, e, n0, n1, out, out_stride);
  }
}

// RunRows for a runtime row count (1..kMaxRows).
inline void RunRowsN(int64_t rows, int64_t isa, const uint16_t* xp, const float* xs, int64_t k,
                     const Expert& e, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  switch (rows) {
    case 1: return RunRows<1>(isa, xp, xs, k, e, n0, n1, out, out_stride);
    case 2: return RunRows<2>(isa, xp, xs, k, e, n0, n1, out, out_stride);
    case 3: return RunRows<3>(isa, xp, xs, k, e, n0, n1, out, out_stride);
    default: return RunRows<4>(isa, xp, xs, k, e, n0, n1, out, out_stride);
  }
}

}  // namespace gptoss_cpu::mxfp4

#endif  // GPTOSS_JAX_CPU_MXFP4_ROWS_H_
