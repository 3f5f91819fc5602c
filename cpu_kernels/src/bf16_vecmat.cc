// out[m, n] = sum_k x[m, k] * w[k, n] for a few rows x (bf16 [M, K]; up to eight a pass over w on
// the AVX-512 BF16 branch, four on the others) and a bf16 matrix w stored [K, N] (decode's
// attention projections), f32 out, as an XLA FFI handler.
//
// Memory-bound matrix-vector products. w is read in panels of whole rows, so the stream is
// sequential: within a panel, groups of 16 rows are walked one column chunk at a time (16
// streams, each moving forward a chunk at a time, which every CPU's stream prefetchers follow;
// a column slice down all rows instead is a page-sized stride that some do not), a narrow w
// (the k and v projections) in one chunk, row after row, and the next group's lines are
// prefetched while a group is summed. Up to kInlineBytes of w (parallel_for.h) the caller does
// it all; above, the caller and XLA's pool threads take panels from a shared counter. Each panel
// sums into its own f32 row of partial sums, added in panel order at the end (the same bits
// either way).
// The instruction-set branches (simd.h):
//   AVX-512 BF16  two rows' 32-column pieces interleaved into bf16 pairs (vpunpck{l,h}wd) and
//                 multiplied with the broadcast pair (x[k], x[k+1]) by vdpbf16ps: 4 instructions
//                 for 64 weights
//   AVX-512       bf16 widened by a shift (even columns) and a mask (odd columns): 4 for 32
//   AVX2          the same on 16 columns
// The partial sums are kept in each branch's column order (a permutation within each piece)
// and put back in order by the final reduction.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 8;      // rows of x a pass on the AVX-512 BF16 branch (4 on the others)
constexpr int kGroupRows = 16;   // rows of w walked together (streams)
constexpr int64_t kPanelBytes = 1 << 20;
constexpr int64_t kMinPanels = 8;  // enough for a late helper to still find work

struct Problem {
  const uint16_t* x;  // [m, k] bf16
  const uint16_t* w;  // [k, n] bf16
  int64_t m, k, n;
  int64_t width;  // columns of a piece: 32 (AVX-512), 16 (AVX2)
  int64_t pieces;  // ceil(n / width)
};

// Pieces of a chunk: accumulators for R rows of x in 16 vector registers (two per piece; from 5
// rows on, AVX-512 BF16 only, one piece and 2 R registers).
constexpr int ChunkPieces(int rows) {
  return rows == 1 ? 8 : (rows == 2 ? 4 : (rows <= 4 ? 2 : 1));
}
constexpr int Avx2ChunkPieces(int rows) {  // 12 of 16 ymm registers
  return rows == 1 ? 6 : (rows == 2 ? 3 : (rows == 3 ? 2 : 1));
}

}  // namespace

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace gptoss_cpu::isa_avx512bf16 {

// Rows [g, g1) of w (at most a group) times rows [r0, r0 + R) of x, for the NA pieces from piece
// c, added to part ([R, pieces, 2, 16]: per piece the sums of columns {0-3, 8-11, 16-19, 24-27},
// then {4-7, 12-15, 20-23, 28-31}). NA is static so the accumulators stay in registers; `tail`
// masks the columns of the last of the NA pieces.
template <int R, int NA>
void Chunk(const Problem& p, const __m512bh (*xv)[kGroupRows / 2], int64_t g, int64_t g1,
           int64_t c, __mmask32 tail, float* part) {
  const int64_t n = p.n, stride = p.pieces * 32;
  __m512 lo[R][NA], hi[R][NA];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) {
      lo[r][a] = _mm512_loadu_ps(part + r * stride + (c + a) * 32);
      hi[r][a] = _mm512_loadu_ps(part + r * stride + (c + a) * 32 + 16);
    }
  auto load = [&](const uint16_t* q, int a) {
    return a == NA - 1 ? _mm512_maskz_loadu_epi16(tail, q + 32 * a) : _mm512_loadu_si512(q + 32 * a);
  };
  // the same columns of the next group's rows, a group ahead: the lines are in flight while
  // this group is summed, so a cold w is not read one memory latency a pass
  const bool fetch = g1 + kGroupRows <= p.k;
  int64_t i = g;
  for (; i + 2 <= g1; i += 2) {
    const uint16_t* w0 = p.w + i * n + c * 32;
    if (fetch)
      for (int a = 0; a < NA; ++a) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + kGroupRows * n + 32 * a), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (kGroupRows + 1) * n + 32 * a), _MM_HINT_T0);
      }
    for (int a = 0; a < NA; ++a) {
      const __m512i v0 = load(w0, a), v1 = load(w0 + n, a);
      const __m512bh pl = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(v0, v1));
      const __m512bh ph = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(v0, v1));
      for (int r = 0; r < R; ++r) {
        lo[r][a] = _mm512_dpbf16_ps(lo[r][a], xv[r][(i - g) / 2], pl);
        hi[r][a] = _mm512_dpbf16_ps(hi[r][a], xv[r][(i - g) / 2], ph);
      }
    }
  }
  if (i < g1) {  // an odd last row, paired with zeros
    const uint16_t* w0 = p.w + i * n + c * 32;
    for (int a = 0; a < NA; ++a) {
      const __m512i v0 = load(w0, a), z = _mm512_setzero_si512();
      const __m512bh pl = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(v0, z));
      const __m512bh ph = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(v0, z));
      for (int r = 0; r < R; ++r) {
        lo[r][a] = _mm512_dpbf16_ps(lo[r][a], xv[r][(i - g) / 2], pl);
        hi[r][a] = _mm512_dpbf16_ps(hi[r][a], xv[r][(i - g) / 2], ph);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) {
      _mm512_storeu_ps(part + r * stride + (c + a) * 32, lo[r][a]);
      _mm512_storeu_ps(part + r * stride + (c + a) * 32 + 16, hi[r][a]);
    }
}

// The last `left` (< NA) pieces from piece c as one Chunk, so that a narrow w (fewer columns than
// a chunk: the k and v projections) is still walked row after row, one sequential stream, not
// once per piece down the rows (a stride each pass of which waits a memory latency).
template <int R, int NA, typename X>
void Rest(const Problem& p, const X* xv, int64_t g, int64_t g1, int64_t c, int64_t left,
          __mmask32 ragged, float* part) {
  if constexpr (NA > 0) {
    if (left == NA) return Chunk<R, NA>(p, xv, g, g1, c, ragged, part);
    return Rest<R, NA - 1>(p, xv, g, g1, c, left, ragged, part);
  }
}

// Rows [k0, k1) of w times rows [r0, r0 + R) of x, added to part: groups of 16 rows walked a
// chunk of pieces at a time.
template <int R>
void Panel(const Problem& p, int64_t r0, int64_t k0, int64_t k1, float* part) {
  constexpr int A = ChunkPieces(R);
  const int64_t k = p.k, last = p.n - 32 * (p.pieces - 1);  // columns of the last piece
  const __mmask32 ragged = static_cast<__mmask32>(last == 32 ? ~0u : (1u << last) - 1);
  for (int64_t g = k0; g < k1; g += kGroupRows) {
    const int64_t g1 = std::min(k1, g + kGroupRows);
    __m512bh xv[R][kGroupRows / 2];
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = p.x + (r0 + r) * k;
      for (int64_t i = g; i < g1; i += 2) {
        const uint32_t hi = i + 1 < g1 ? xr[i + 1] : 0;
        xv[r][(i - g) / 2] = reinterpret_cast<__m512bh>(
            _mm512_set1_epi32(static_cast<int32_t>(xr[i] | hi << 16)));  // (x[i], x[i+1])
      }
    }
    int64_t c = 0;
    for (; c + A <= p.pieces; c += A)
      Chunk<R, A>(p, xv, g, g1, c, c + A == p.pieces ? ragged : ~0u, part);
    if (c < p.pieces) Rest<R, A - 1>(p, xv, g, g1, c, p.pieces - c, ragged, part);
  }
}

// Sum of `count` partial rows (spaced `step` floats) for pieces [a0, a1) of one row of x, in
// column order, into out.
inline void Reduce(const float* part, int64_t count, int64_t step, int64_t a0, int64_t a1,
                   int64_t n, float* out) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t a = a0; a < a1; ++a) {
    __m512 lo = _mm512_setzero_ps(), hi = lo;
    for (int64_t t = 0; t < count; ++t) {
      lo = _mm512_add_ps(lo, _mm512_loadu_ps(part + t * step + a * 32));
      hi = _mm512_add_ps(hi, _mm512_loadu_ps(part + t * step + a * 32 + 16));
    }
    const int64_t cols = std::min<int64_t>(32, n - a * 32);
    _mm512_mask_storeu_ps(out + a * 32, static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1),
                          _mm512_permutex2var_ps(lo, first, hi));
    if (cols > 16)
      _mm512_mask_storeu_ps(out + a * 32 + 16,
                            static_cast<__mmask16>(cols == 32 ? 0xFFFF : (1u << (cols - 16)) - 1),
                            _mm512_permutex2var_ps(lo, second, hi));
  }
}

}  // namespace gptoss_cpu::isa_avx512bf16
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {

// As the BF16 branch; part per piece: the 16 even columns' sums, then the 16 odd ones'.
template <int R, int NA>
void Chunk(const Problem& p, const __m512 (*xv)[kGroupRows], int64_t g, int64_t g1, int64_t c,
           __mmask32 tail, float* part) {
  const int64_t n = p.n, stride = p.pieces * 32;
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 ev[R][NA], od[R][NA];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) {
      ev[r][a] = _mm512_loadu_ps(part + r * stride + (c + a) * 32);
      od[r][a] = _mm512_loadu_ps(part + r * stride + (c + a) * 32 + 16);
    }
  const bool fetch = g1 + kGroupRows <= p.k;  // as the BF16 branch
  for (int64_t i = g; i < g1; ++i) {
    const uint16_t* row = p.w + i * n + c * 32;
    if (fetch)
      for (int a = 0; a < NA; ++a)
        _mm_prefetch(reinterpret_cast<const char*>(row + kGroupRows * n + 32 * a), _MM_HINT_T0);
    for (int a = 0; a < NA; ++a) {
      const __m512i wv = a == NA - 1 ? _mm512_maskz_loadu_epi16(tail, row + 32 * a)
                                     : _mm512_loadu_si512(row + 32 * a);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
      for (int r = 0; r < R; ++r) {
        ev[r][a] = _mm512_fmadd_ps(xv[r][i - g], we, ev[r][a]);
        od[r][a] = _mm512_fmadd_ps(xv[r][i - g], wo, od[r][a]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) {
      _mm512_storeu_ps(part + r * stride + (c + a) * 32, ev[r][a]);
      _mm512_storeu_ps(part + r * stride + (c + a) * 32 + 16, od[r][a]);
    }
}

template <int R, int NA, typename X>
void Rest(const Problem& p, const X* xv, int64_t g, int64_t g1, int64_t c, int64_t left,
          __mmask32 ragged, float* part) {
  if constexpr (NA > 0) {
    if (left == NA) return Chunk<R, NA>(p, xv, g, g1, c, ragged, part);
    return Rest<R, NA - 1>(p, xv, g, g1, c, left, ragged, part);
  }
}

template <int R>
void Panel(const Problem& p, int64_t r0, int64_t k0, int64_t k1, float* part) {
  constexpr int A = ChunkPieces(R);
  const int64_t k = p.k, last = p.n - 32 * (p.pieces - 1);
  const __mmask32 ragged = static_cast<__mmask32>(last == 32 ? ~0u : (1u << last) - 1);
  for (int64_t g = k0; g < k1; g += kGroupRows) {
    const int64_t g1 = std::min(k1, g + kGroupRows);
    __m512 xv[R][kGroupRows];
    for (int r = 0; r < R; ++r)
      for (int64_t i = g; i < g1; ++i) xv[r][i - g] = _mm512_set1_ps(Bf16ToF32(p.x[(r0 + r) * k + i]));
    int64_t c = 0;
    for (; c + A <= p.pieces; c += A)
      Chunk<R, A>(p, xv, g, g1, c, c + A == p.pieces ? ragged : ~0u, part);
    if (c < p.pieces) Rest<R, A - 1>(p, xv, g, g1, c, p.pieces - c, ragged, part);
  }
}

inline void Reduce(const float* part, int64_t count, int64_t step, int64_t a0, int64_t a1,
                   int64_t n, float* out) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t a = a0; a < a1; ++a) {
    __m512 ev = _mm512_setzero_ps(), od = ev;
    for (int64_t t = 0; t < count; ++t) {
      ev = _mm512_add_ps(ev, _mm512_loadu_ps(part + t * step + a * 32));
      od = _mm512_add_ps(od, _mm512_loadu_ps(part + t * step + a * 32 + 16));
    }
    const int64_t cols = std::min<int64_t>(32, n - a * 32);
    _mm512_mask_storeu_ps(out + a * 32, static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1),
                          _mm512_permutex2var_ps(ev, first, od));
    if (cols > 16)
      _mm512_mask_storeu_ps(out + a * 32 + 16,
                            static_cast<__mmask16>(cols == 32 ? 0xFFFF : (1u << (cols - 16)) - 1),
                            _mm512_permutex2var_ps(ev, second, od));
  }
}

}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {

// 16-column pieces; part per piece: 8 even columns' sums, then 8 odd. A ragged last piece
// (n % 16 columns) is summed in scalars, in column order.
template <int R, int NA>
void Chunk(const Problem& p, const __m256 (*xv)[kGroupRows], int64_t g, int64_t g1, int64_t c,
           float* part) {
  const int64_t n = p.n, stride = p.pieces * 16;
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 ev[R][NA], od[R][NA];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) {
      ev[r][a] = _mm256_loadu_ps(part + r * stride + (c + a) * 16);
      od[r][a] = _mm256_loadu_ps(part + r * stride + (c + a) * 16 + 8);
    }
  const bool fetch = g1 + kGroupRows <= p.k;  // as the BF16 branch (a line: 2 pieces)
  for (int64_t i = g; i < g1; ++i) {
    const uint16_t* row = p.w + i * n + c * 16;
    if (fetch)
      for (int a = 0; a < NA; a += 2)
        _mm_prefetch(reinterpret_cast<const char*>(row + kGroupRows * n + 16 * a), _MM_HINT_T0);
    for (int a = 0; a < NA; ++a) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * a));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      for (int r = 0; r < R; ++r) {
        ev[r][a] = _mm256_fmadd_ps(xv[r][i - g], we, ev[r][a]);
        od[r][a] = _mm256_fmadd_ps(xv[r][i - g], wo, od[r][a]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NA; ++a) {
      _mm256_storeu_ps(part + r * stride + (c + a) * 16, ev[r][a]);
      _mm256_storeu_ps(part + r * stride + (c + a) * 16 + 8, od[r][a]);
    }
}

template <int R, int NA>
void Rest(const Problem& p, const __m256 (*xv)[kGroupRows], int64_t g, int64_t g1, int64_t c,
          int64_t left, float* part) {
  if constexpr (NA > 0) {
    if (left == NA) return Chunk<R, NA>(p, xv, g, g1, c, part);
    return Rest<R, NA - 1>(p, xv, g, g1, c, left, part);
  }
}

template <int R>
void Panel(const Problem& p, int64_t r0, int64_t k0, int64_t k1, float* part) {
  constexpr int A = Avx2ChunkPieces(R);
  const int64_t n = p.n, k = p.k, stride = p.pieces * 16, full = n / 16;
  for (int64_t g = k0; g < k1; g += kGroupRows) {
    const int64_t g1 = std::min(k1, g + kGroupRows);
    __m256 xv[R][kGroupRows];
    for (int r = 0; r < R; ++r)
      for (int64_t i = g; i < g1; ++i) xv[r][i - g] = _mm256_set1_ps(Bf16ToF32(p.x[(r0 + r) * k + i]));
    int64_t c = 0;
    for (; c + A <= full; c += A) Chunk<R, A>(p, xv, g, g1, c, part);
    if (c < full) Rest<R, A - 1>(p, xv, g, g1, c, full - c, part);
    for (int r = 0; r < R; ++r)  // the ragged piece
      for (int64_t col = full * 16; col < n; ++col) {
        float s = part[r * stride + col];
        for (int64_t i = g; i < g1; ++i)
          s += Bf16ToF32(p.x[(r0 + r) * k + i]) * Bf16ToF32(p.w[i * n + col]);
        part[r * stride + col] = s;
      }
  }
}

inline void Reduce(const float* part, int64_t count, int64_t step, int64_t a0, int64_t a1,
                   int64_t n, float* out) {
  const int64_t full = n / 16;
  for (int64_t a = a0; a < a1; ++a) {
    if (a >= full) {  // the ragged piece, in column order
      for (int64_t col = a * 16; col < n; ++col) {
        float s = 0.0f;
        for (int64_t t = 0; t < count; ++t) s += part[t * step + col];
        out[col] = s;
      }
      continue;
    }
    __m256 ev = _mm256_setzero_ps(), od = ev;
    for (int64_t t = 0; t < count; ++t) {
      ev = _mm256_add_ps(ev, _mm256_loadu_ps(part + t * step + a * 16));
      od = _mm256_add_ps(od, _mm256_loadu_ps(part + t * step + a * 16 + 8));
    }
    const __m256 u0 = _mm256_unpacklo_ps(ev, od);  // columns 0-3 | 8-11
    const __m256 u1 = _mm256_unpackhi_ps(ev, od);  // columns 4-7 | 12-15
    _mm256_storeu_ps(out + a * 16, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + a * 16 + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
  }
}

}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
namespace {

template <int R>
void RunPanel(int64_t isa, const Problem& p, int64_t r0, int64_t k0, int64_t k1, float* part) {
  if constexpr (R > 4) {  // only the BF16 branch takes more than four rows a pass
    return gptoss_cpu::isa_avx512bf16::Panel<R>(p, r0, k0, k1, part);
  }
  switch (isa) {
    case gptoss_cpu::kAvx512Bf16:
      return gptoss_cpu::isa_avx512bf16::Panel<R>(p, r0, k0, k1, part);
    case gptoss_cpu::kAvx512:
      return gptoss_cpu::isa_avx512::Panel<R>(p, r0, k0, k1, part);
    default:
      return gptoss_cpu::isa_avx2::Panel<R>(p, r0, k0, k1, part);
  }
}

void RunReduce(int64_t isa, const float* part, int64_t count, int64_t step, int64_t a0,
               int64_t a1, int64_t n, float* out) {
  switch (isa) {
    case gptoss_cpu::kAvx512Bf16:
      return gptoss_cpu::isa_avx512bf16::Reduce(part, count, step, a0, a1, n, out);
    case gptoss_cpu::kAvx512:
      return gptoss_cpu::isa_avx512::Reduce(part, count, step, a0, a1, n, out);
    default:
      return gptoss_cpu::isa_avx2::Reduce(part, count, step, a0, a1, n, out);
  }
}

// Rows [r0, r0 + R) of x: panels of w, each summed into its own partial row, then the partial
// rows added in panel order. The panels depend on the shape alone, so the result is the same
// bits whichever thread takes which panel, and whether the call runs inline or on the pool.
template <int R>
void Pass(ffi::ThreadPool& pool, int64_t isa, const Problem& p, int64_t r0, float* out) {
  const int64_t row_bytes = 2 * p.n, bytes = row_bytes * p.k;
  // panels of whole row groups, ~kPanelBytes each, at least kMinPanels when w allows
  int64_t rows = std::max<int64_t>(kGroupRows, kPanelBytes / row_bytes);
  rows = std::min(rows, (p.k + kMinPanels - 1) / kMinPanels);
  rows = std::max<int64_t>(kGroupRows, (rows + kGroupRows - 1) / kGroupRows * kGroupRows);
  const int64_t panels = (p.k + rows - 1) / rows;
  const int64_t stride = p.pieces * p.width, step = R * stride;  // floats of a partial row
  std::unique_ptr<float[]> part(new float[panels * step]());
  auto panel = [&](int64_t t) {
    RunPanel<R>(isa, p, r0, t * rows, std::min(p.k, (t + 1) * rows), part.get() + t * step);
  };
  if (bytes <= gptoss_cpu::kInlineBytes) {  // the caller alone
    for (int64_t t = 0; t < panels; ++t) panel(t);
  } else {
    gptoss_cpu::ParallelFor(pool, panels, panel);
  }
  for (int r = 0; r < R; ++r)
    RunReduce(isa, part.get() + r * stride, panels, step, 0, p.pieces, p.n, out + (r0 + r) * p.n);
}

ffi::Error Bf16VecmatImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                          ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out,
                          int64_t isa) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] < 1 || wd[0] < 1 ||
      wd[1] < 1) {
    return ffi::Error::InvalidArgument("bf16_vecmat: expected x [M, K], w [K, N]");
  }
  if (!gptoss_cpu::CpuHas(isa)) {
    return ffi::Error::InvalidArgument("bf16_vecmat: this CPU lacks the instructions of branch " +
                                       std::to_string(isa));
  }
  const int64_t width = isa == gptoss_cpu::kAvx2 ? 16 : 32;
  const Problem p{reinterpret_cast<const uint16_t*>(x.untyped_data()),
                  reinterpret_cast<const uint16_t*>(w.untyped_data()),
                  xd[0], xd[1], wd[1], width, (wd[1] + width - 1) / width};
  float* o = out->typed_data();
  const int64_t per_pass = isa == gptoss_cpu::kAvx512Bf16 ? kMaxRows : 4;
  for (int64_t r0 = 0; r0 < p.m; r0 += per_pass) {
    switch (std::min<int64_t>(per_pass, p.m - r0)) {
      case 1: Pass<1>(pool, isa, p, r0, o); break;
      case 2: Pass<2>(pool, isa, p, r0, o); break;
      case 3: Pass<3>(pool, isa, p, r0, o); break;
      case 4: Pass<4>(pool, isa, p, r0, o); break;
      case 5: Pass<5>(pool, isa, p, r0, o); break;
      case 6: Pass<6>(pool, isa, p, r0, o); break;
      case 7: Pass<7>(pool, isa, p, r0, o); break;
      default: Pass<8>(pool, isa, p, r0, o);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Vecmat, Bf16VecmatImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [M, N]
                                  .Attr<int64_t>("isa"));
