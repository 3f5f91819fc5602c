// MXFP4 experts against many rows (prefill): decode a panel of an expert's weight once, then a
// register-blocked GEMM over all of the expert's rows.
//
// PanelProduct multiplies m bf16 rows (natural order, row r at a[r]) with output columns
// [n0, n1) (at most kPanelCols) of one expert's packed weight [N, K]. The panel is decoded into
// a thread's own buffer in pair layout: 32-bit word (p, c) holds the weight's elements 2p and
// 2p + 1 of column n0 + c as two bf16 (low half the even one), kPanelCols words per pair p.
// That is the operand vdpbf16ps takes against one broadcast word of a row (its elements 2p,
// 2p + 1: a code byte's two nibbles, so a row needs no reordering), and MXFP4 -> bf16 is exact
// (an e2m1 value has one mantissa bit, the scale is a power of two). A panel is K * 128 bytes:
// 64 KB at K = 512, 360 KB at gpt-oss-20b's K = 2880, in L2 (1-2 MB a core); the expert's rows
// pass it kKPairs pairs (64 KB) at a time, a few rows at once into a block of accumulators
// (the output reloaded after the first slice):
//
//   AVX-512 BF16  vdpbf16ps, 6 rows x 4 vectors (24 accumulators): 10 loads a 24 dot products
//   AVX-512       the same panel widened in registers (a word's halves by a shift and a mask)
//                 and f32 FMAs, 4 rows x 4 vectors
//   AVX2          the same widening with 8-lane vectors, 2 rows x 4 vectors, a panel's
//                 columns 32 at a time
// vdpbf16ps takes denormal inputs as zero: a weight of scale byte 0 with a small code (below
// 2^-126) counts as 0 on that branch (no real checkpoint has such scales); the others are exact
// products summed in f32. Accumulation order differs between branches (pairs vs single
// elements), rounding only. No AMX branch: no machine here has AMX tiles to prove one on.
//
// Measured (2-core AMD EPYC Zen 5): the bench config's prefill MLP (2048 pairs, 16 experts,
// D = F = 512) ~6-7 ms a layer (~250 GMAC/s) on AVX-512 BF16, 22 ms on AVX-512, 40 ms on AVX2;
// XLA's expand-then-GEMM 14-15 ms. Whole-K panels and 128-pair slices measured the same within
// the machine's noise.

#ifndef GPTOSS_JAX_CPU_MXFP4_PANEL_GEMM_H_
#define GPTOSS_JAX_CPU_MXFP4_PANEL_GEMM_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "mxfp4_rows.h"
#include "simd.h"

namespace gptoss_cpu::panel {

constexpr int64_t kPanelCols = 64;  // output columns a panel (4 vectors of 16)
constexpr int64_t kKPairs = 256;    // pairs of the panel a pass over the rows: 64 KB

inline uint32_t Load32(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// The pair word of one code byte: two bf16 (low nibble's value in the low half), each
// fp4 * scale, exact.
inline uint32_t PairWord(uint8_t byte, float scale) {
  auto bits = [](float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b >> 16;  // exact: the value has a 1-bit mantissa
  };
  return bits(mxfp4::kFp4[byte & 15] * scale) | bits(mxfp4::kFp4[byte >> 4] * scale) << 16;
}

// Columns [n0, n1) of e into panel (pair layout, kPanelCols words a pair), one word at a time.
inline void DecodeScalar(const mxfp4::Expert& e, int64_t n0, int64_t n1, uint32_t* panel) {
  const int64_t kp = e.kb * 16;
  for (int64_t c = 0; c < n1 - n0; ++c) {
    const uint8_t* b = e.blocks + (n0 + c) * e.kb * mxfp4::kBlockBytes;
    const uint8_t* s = e.scales + (n0 + c) * e.kb;
    for (int64_t p = 0; p < kp; ++p)
      panel[p * kPanelCols + c] = PairWord(b[p], mxfp4::ScaleValue(s[p / 16]));
  }
}

}  // namespace gptoss_cpu::panel

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {

// The mask of the first n (clamped to [0, 16]) lanes.
inline __mmask16 Live16(int64_t n) {
  return static_cast<__mmask16>((1u << std::max<int64_t>(0, std::min<int64_t>(16, n))) - 1);
}

// 16 x 16 words transposed in place (w[i] lane j <- w[j] lane i).
inline void Transpose16(__m512i* w) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(w[i], w[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(w[i], w[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    w[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    w[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    w[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    w[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // now w[4a + b]'s 128-bit lane l holds column 4l + b of rows 4a .. 4a+3: gather each
  // column's four lanes (t[c] = column c)
  for (int b = 0; b < 4; ++b) {
    const __m512i r0 = w[b], r1 = w[4 + b], r2 = w[8 + b], r3 = w[12 + b];
    const __m512i s0 = _mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i s1 = _mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i s2 = _mm512_shuffle_i32x4(r2, r3, _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i s3 = _mm512_shuffle_i32x4(r2, r3, _MM_SHUFFLE(3, 1, 3, 1));
    t[b] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(2, 0, 2, 0));
    t[4 + b] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(2, 0, 2, 0));
    t[8 + b] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(3, 1, 3, 1));
    t[12 + b] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(3, 1, 3, 1));
  }
  for (int i = 0; i < 16; ++i) w[i] = t[i];
}

// Columns [n0, n1) of e into panel (pair layout; to the next 16 columns zero), 16 columns x
// one block (16 pairs) at a time: each column's 16 code bytes become 16 pair words (two vpermps
// on the code table times the block's scale), and a 16 x 16 transpose turns columns into lanes.
inline void DecodePanel(const mxfp4::Expert& e, int64_t n0, int64_t n1, uint32_t* panel) {
  using panel::kPanelCols;
  const __m512 table = _mm512_loadu_ps(mxfp4::kFp4);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t kb = e.kb;
  for (int64_t g = 0; g < kPanelCols; g += 16) {
    const int64_t cols = std::min<int64_t>(16, n1 - n0 - g);
    if (cols <= 0) break;  // columns no pass reads past its live ones (lanes are independent)
    for (int64_t b = 0; b < kb; ++b) {
      __m512i w[16];
      for (int j = 0; j < 16; ++j) {
        if (j >= cols) {
          w[j] = _mm512_setzero_si512();
          continue;
        }
        const int64_t row = n0 + g + j;
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(e.blocks + (row * kb + b) * mxfp4::kBlockBytes)));
        const __m512 ts =
            _mm512_mul_ps(table, _mm512_set1_ps(mxfp4::ScaleValue(e.scales[row * kb + b])));
        const __m512i lo = _mm512_castps_si512(_mm512_permutexvar_ps(v, ts));
        const __m512i hi = _mm512_castps_si512(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), ts));
        // (hi & 0xFFFF0000) | (lo >> 16)
        w[j] = _mm512_ternarylogic_epi32(high, hi, _mm512_srli_epi32(lo, 16), 0xEA);
      }
      Transpose16(w);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(panel + (b * 16 + i) * kPanelCols + g, w[i]);
    }
  }
}

// R rows x V vectors of 16 columns: out[r] columns [0, min(cols, 16 V)) = row r . panel, f32
// FMAs on the pair words widened (even element = word << 16, odd = word & 0xFFFF0000).
template <int R, int V>
void Micro(const uint16_t* const* a, int64_t p0, int64_t p1, const uint32_t* panel,
           float* const* out, int64_t cols, bool add) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = add ? _mm512_maskz_loadu_ps(Live16(cols - 16 * v), out[r] + 16 * v)
                      : _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    __m512 be[V], bo[V];
    for (int v = 0; v < V; ++v) {
      const __m512i w = _mm512_loadu_si512(panel + p * panel::kPanelCols + 16 * v);
      be[v] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      bo[v] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
    }
    for (int r = 0; r < R; ++r) {
      const uint32_t x = panel::Load32(a[r] + 2 * p);
      const __m512 xe = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(x << 16)));
      const __m512 xo = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(x & 0xFFFF0000u)));
      for (int v = 0; v < V; ++v) {
        acc[r][v] = _mm512_fmadd_ps(xe, be[v], acc[r][v]);
        acc[r][v] = _mm512_fmadd_ps(xo, bo[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(out[r] + 16 * v, Live16(cols - 16 * v), acc[r][v]);
}

}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace gptoss_cpu::isa_avx512bf16 {
using isa_avx512::Live16;

// R rows x V vectors of 16 columns: one vdpbf16ps per (row, vector) and pair, the row's pair
// word broadcast.
template <int R, int V>
void Micro(const uint16_t* const* a, int64_t p0, int64_t p1, const uint32_t* panel,
           float* const* out, int64_t cols, bool add) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = add ? _mm512_maskz_loadu_ps(Live16(cols - 16 * v), out[r] + 16 * v)
                      : _mm512_setzero_ps();
  const uint16_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = a[r];
  for (int64_t p = p0; p < p1; ++p) {
    __m512bh b[V];
    for (int v = 0; v < V; ++v)
      b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * panel::kPanelCols + 16 * v));
    for (int r = 0; r < R; ++r) {
      const __m512bh x = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(panel::Load32(row[r] + 2 * p))));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(out[r] + 16 * v, Live16(cols - 16 * v), acc[r][v]);
}

}  // namespace gptoss_cpu::isa_avx512bf16
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {

// R rows x V vectors of 8 columns (the panel pointer at the first one), f32 FMAs on the
// widened pair words.
template <int R, int V>
void Micro(const uint16_t* const* a, int64_t p0, int64_t p1, const uint32_t* panel,
           float* const* out, int64_t cols, bool add) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      alignas(32) float tmp[8] = {};
      const int64_t live = std::max<int64_t>(0, std::min<int64_t>(8, cols - 8 * v));
      if (add) std::copy(out[r] + 8 * v, out[r] + 8 * v + live, tmp);
      acc[r][v] = _mm256_load_ps(tmp);
    }
  for (int64_t p = p0; p < p1; ++p) {
    for (int r = 0; r < R; ++r) {
      const uint32_t x = panel::Load32(a[r] + 2 * p);
      const __m256 xe = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(x << 16)));
      const __m256 xo = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(x & 0xFFFF0000u)));
      for (int v = 0; v < V; ++v) {
        const __m256i w = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(panel + p * panel::kPanelCols + 8 * v));
        acc[r][v] = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), acc[r][v]);
        acc[r][v] = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(w, high)), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[r][v]);
      const int64_t live = std::max<int64_t>(0, std::min<int64_t>(8, cols - 8 * v));
      std::copy(tmp, tmp + live, out[r] + 8 * v);
    }
}

}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

namespace gptoss_cpu::panel {

// Micro<R, V> of a branch for a runtime row count 1..R (the rows past it not read).
#define GPTOSS_PANEL_ROWS(NS, R, V, n, ...)                                      \
  switch (n) {                                                                     \
    case 1: NS::Micro<1, V>(__VA_ARGS__); break;                                   \
    case 2: NS::Micro<2, V>(__VA_ARGS__); break;                                   \
    case 3: NS::Micro<(R < 3 ? R : 3), V>(__VA_ARGS__); break;                     \
    case 4: NS::Micro<(R < 4 ? R : 4), V>(__VA_ARGS__); break;                     \
    case 5: NS::Micro<(R < 5 ? R : 5), V>(__VA_ARGS__); break;                     \
    default: NS::Micro<R, V>(__VA_ARGS__); break;                                  \
  }

// The panel buffer of the calling thread (kept: a prefill calls this a few hundred times).
inline uint32_t* PanelBuffer(int64_t words) {
  thread_local std::vector<uint32_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < words) buffer.resize(words);
  return buffer.data();
}

// Rows [0, m) of a (bf16, natural order, k elements, row r at a[r]) times columns [n0, n1)
// (n1 - n0 <= kPanelCols, a multiple of 16) of expert e, into out (row r's column n0 + c at
// out + r * out_stride + c), on branch isa.
inline void PanelProduct(int64_t isa, const uint16_t* const* a, int64_t m, int64_t k,
                         const mxfp4::Expert& e, int64_t n0, int64_t n1, float* out,
                         int64_t out_stride) {
  const int64_t kp = k / 2, cols = n1 - n0;
  uint32_t* panel = PanelBuffer(kp * kPanelCols);
  if (isa == kAvx2) {
    DecodeScalar(e, n0, n1, panel);
  } else {
    isa_avx512::DecodePanel(e, n0, n1, panel);
  }
  // kKPairs pairs at a time: a 64 KB slice of the panel, kept near the core while every row
  // passes it
  float* rows[6];
  for (int64_t p0 = 0; p0 < kp; p0 += kKPairs) {
    const int64_t p1 = std::min(kp, p0 + kKPairs);
    const bool add = p0 > 0;
    for (int64_t r0 = 0; r0 < m;) {
      if (isa == kAvx2) {  // 2 rows x 32 columns a pass
        const int64_t n = std::min<int64_t>(2, m - r0);
        for (int64_t c0 = 0; c0 < cols; c0 += 32) {
          for (int64_t r = 0; r < n; ++r) rows[r] = out + (r0 + r) * out_stride + c0;
          const int64_t c = std::min<int64_t>(32, cols - c0);
          GPTOSS_PANEL_ROWS(isa_avx2, 2, 4, n, a + r0, p0, p1, panel + c0, rows, c, add)
        }
        r0 += n;
        continue;
      }
      const int64_t n = std::min<int64_t>(isa == kAvx512Bf16 ? 6 : 4, m - r0);
      for (int64_t r = 0; r < n; ++r) rows[r] = out + (r0 + r) * out_stride;
      if (isa == kAvx512Bf16) {
        if (cols > 32) {
          GPTOSS_PANEL_ROWS(isa_avx512bf16, 6, 4, n, a + r0, p0, p1, panel, rows, cols, add)
        } else {
          GPTOSS_PANEL_ROWS(isa_avx512bf16, 6, 2, n, a + r0, p0, p1, panel, rows, cols, add)
        }
      } else {
        if (cols > 32) {
          GPTOSS_PANEL_ROWS(isa_avx512, 4, 4, n, a + r0, p0, p1, panel, rows, cols, add)
        } else {
          GPTOSS_PANEL_ROWS(isa_avx512, 4, 2, n, a + r0, p0, p1, panel, rows, cols, add)
        }
      }
      r0 += n;
    }
  }
}

#undef GPTOSS_PANEL_ROWS

}  // namespace gptoss_cpu::panel

#endif  // GPTOSS_JAX_CPU_MXFP4_PANEL_GEMM_H_
