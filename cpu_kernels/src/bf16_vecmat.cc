// out[m, n] = sum_k x[m, k] * w[k, n] for one to four rows x (bf16 [M, K]) and a bf16 matrix w
// stored [K, N] (decode's attention projections), f32 out, as an XLA FFI handler.
//
// Memory-bound matrix-vector products; each task owns a slice of columns and streams w down
// the rows once, software-prefetching the slice `prefetch_rows` rows ahead (the slice is a few
// hundred bytes of each row, rows a full row apart: a stride the hardware prefetchers of some
// CPUs do not follow). The instruction-set branches (simd.h):
//   AVX-512 BF16  two rows' 32-column pieces interleaved into bf16 pairs (vpunpck{l,h}wd) and
//                 multiplied with the broadcast pair (x[k], x[k+1]) by vdpbf16ps: 3 instructions
//                 for 64 weights
//   AVX-512       bf16 widened by a shift (even columns) and a mask (odd columns): 4 for 32
//   AVX2          the same on 16 columns
// Each branch accumulates its columns in a permuted order and puts them back once a slice.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 4;  // rows of x a pass

struct Problem {
  const uint16_t* x;  // [m, k] bf16
  const uint16_t* w;  // [k, n] bf16
  int64_t m, k, n;
  int64_t prefetch_rows;
  float* out;  // [m, n]
};

// Columns a task, so that a task's accumulators fit the registers: 16 of 32 zmm (AVX-512: 256
// columns for one row), 12 of 16 ymm (AVX2: 96 columns for one row).
constexpr int64_t SliceColumns(int rows) { return rows == 1 ? 256 : (rows == 2 ? 128 : 64); }
constexpr int Avx2Pieces(int rows) { return rows == 1 ? 6 : (rows == 2 ? 3 : (rows == 3 ? 2 : 1)); }
inline int64_t SliceColumns(int64_t isa, int rows) {
  return isa == gptoss_cpu::kAvx2 ? 16 * Avx2Pieces(rows) : SliceColumns(rows);
}

}  // namespace

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace gptoss_cpu::isa_avx512bf16 {

// Rows [r0, r0 + R) of x against columns [c0, c1) of w (c1 - c0 <= SliceColumns(R)).
template <int R, bool kPrefetch>
void Columns(const Problem& p, int64_t r0, int64_t c0, int64_t c1) {
  constexpr int A = static_cast<int>(SliceColumns(R) / 32);  // 32-column pieces
  const int64_t k = p.k, n = p.n;
  const int pieces = static_cast<int>((c1 - c0 + 31) / 32);
  const int64_t last = c1 - c0 - 32 * (pieces - 1);  // columns of the last piece (1..32)
  const __mmask32 tail = static_cast<__mmask32>(last == 32 ? ~0u : (1u << last) - 1);
  __m512 lo[R][A], hi[R][A];  // lo: columns {0-3, 8-11, 16-19, 24-27} of a piece; hi: the rest
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) lo[r][a] = hi[r][a] = _mm512_setzero_ps();
  auto load = [&](int64_t row, int a) {
    const uint16_t* q = p.w + row * n + c0 + 32 * a;
    return a == pieces - 1 ? _mm512_maskz_loadu_epi16(tail, q) : _mm512_loadu_si512(q);
  };
  int64_t i = 0;
  for (; i + 2 <= k; i += 2) {
    if constexpr (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(p.w + (i + p.prefetch_rows) * n + c0);
      for (int a = 0; a < pieces; ++a) {
        _mm_prefetch(ahead + 64 * a, _MM_HINT_T0);
        _mm_prefetch(ahead + 2 * n + 64 * a, _MM_HINT_T0);
      }
    }
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = p.x + (r0 + r) * k + i;
      xv[r] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(
          static_cast<int32_t>(xr[0] | static_cast<uint32_t>(xr[1]) << 16)));  // (x[i], x[i+1])
    }
    for (int a = 0; a < A && a < pieces; ++a) {
      const __m512i w0 = load(i, a), w1 = load(i + 1, a);
      const __m512bh pl = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(w0, w1));
      const __m512bh ph = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(w0, w1));
      for (int r = 0; r < R; ++r) {
        lo[r][a] = _mm512_dpbf16_ps(lo[r][a], xv[r], pl);
        hi[r][a] = _mm512_dpbf16_ps(hi[r][a], xv[r], ph);
      }
    }
  }
  if (i < k) {  // an odd last row, paired with zeros
    for (int a = 0; a < A && a < pieces; ++a) {
      const __m512i w0 = load(i, a), z = _mm512_setzero_si512();
      const __m512bh pl = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(w0, z));
      const __m512bh ph = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(w0, z));
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = reinterpret_cast<__m512bh>(
            _mm512_set1_epi32(p.x[(r0 + r) * k + i]));  // (x[k], 0)
        lo[r][a] = _mm512_dpbf16_ps(lo[r][a], xv, pl);
        hi[r][a] = _mm512_dpbf16_ps(hi[r][a], xv, ph);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int r = 0; r < R; ++r) {
    float* o = p.out + (r0 + r) * n + c0;
    for (int a = 0; a < A && a < pieces; ++a) {
      const __m512 v0 = _mm512_permutex2var_ps(lo[r][a], first, hi[r][a]);
      const __m512 v1 = _mm512_permutex2var_ps(lo[r][a], second, hi[r][a]);
      const int64_t cols = a == pieces - 1 ? last : 32;
      _mm512_mask_storeu_ps(o + 32 * a, static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1), v0);
      if (cols > 16)
        _mm512_mask_storeu_ps(o + 32 * a + 16,
                              static_cast<__mmask16>(cols == 32 ? 0xFFFF : (1u << (cols - 16)) - 1), v1);
    }
  }
}

}  // namespace gptoss_cpu::isa_avx512bf16
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {

template <int R, bool kPrefetch>
void Columns(const Problem& p, int64_t r0, int64_t c0, int64_t c1) {
  constexpr int A = static_cast<int>(SliceColumns(R) / 32);
  const int64_t k = p.k, n = p.n;
  const int pieces = static_cast<int>((c1 - c0 + 31) / 32);
  const int64_t last = c1 - c0 - 32 * (pieces - 1);
  const __mmask32 tail = static_cast<__mmask32>(last == 32 ? ~0u : (1u << last) - 1);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 ev[R][A], od[R][A];  // even and odd columns of a piece
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) ev[r][a] = od[r][a] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const uint16_t* row = p.w + i * n + c0;
    if constexpr (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(row + p.prefetch_rows * n);
      for (int a = 0; a < pieces; ++a) _mm_prefetch(ahead + 64 * a, _MM_HINT_T0);
    }
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_set1_ps(Bf16ToF32(p.x[(r0 + r) * k + i]));
    for (int a = 0; a < A && a < pieces; ++a) {
      const __m512i wv = a == pieces - 1 ? _mm512_maskz_loadu_epi16(tail, row + 32 * a)
                                         : _mm512_loadu_si512(row + 32 * a);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
      for (int r = 0; r < R; ++r) {
        ev[r][a] = _mm512_fmadd_ps(xv[r], we, ev[r][a]);
        od[r][a] = _mm512_fmadd_ps(xv[r], wo, od[r][a]);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int r = 0; r < R; ++r) {
    float* o = p.out + (r0 + r) * n + c0;
    for (int a = 0; a < A && a < pieces; ++a) {
      const __m512 v0 = _mm512_permutex2var_ps(ev[r][a], first, od[r][a]);
      const __m512 v1 = _mm512_permutex2var_ps(ev[r][a], second, od[r][a]);
      const int64_t cols = a == pieces - 1 ? last : 32;
      _mm512_mask_storeu_ps(o + 32 * a, static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1), v0);
      if (cols > 16)
        _mm512_mask_storeu_ps(o + 32 * a + 16,
                              static_cast<__mmask16>(cols == 32 ? 0xFFFF : (1u << (cols - 16)) - 1), v1);
    }
  }
}

}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {

// 16-column pieces; a ragged last piece (N % 16) is summed in scalars.
template <int R, bool kPrefetch>
void Columns(const Problem& p, int64_t r0, int64_t c0, int64_t c1) {
  constexpr int P = Avx2Pieces(R);  // 16-column pieces
  const int64_t k = p.k, n = p.n;
  const int pieces = static_cast<int>((c1 - c0) / 16);
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 ev[R][P], od[R][P];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < P; ++a) ev[r][a] = od[r][a] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const uint16_t* row = p.w + i * n + c0;
    if constexpr (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(row + p.prefetch_rows * n);
      for (int a = 0; a < pieces; a += 2) _mm_prefetch(ahead + 32 * a, _MM_HINT_T0);
    }
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_set1_ps(Bf16ToF32(p.x[(r0 + r) * k + i]));
    for (int a = 0; a < P && a < pieces; ++a) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * a));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
      for (int r = 0; r < R; ++r) {
        ev[r][a] = _mm256_fmadd_ps(xv[r], we, ev[r][a]);
        od[r][a] = _mm256_fmadd_ps(xv[r], wo, od[r][a]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = p.out + (r0 + r) * n + c0;
    for (int a = 0; a < P && a < pieces; ++a) {
      const __m256 u0 = _mm256_unpacklo_ps(ev[r][a], od[r][a]);  // columns 0-3 | 8-11
      const __m256 u1 = _mm256_unpackhi_ps(ev[r][a], od[r][a]);  // columns 4-7 | 12-15
      _mm256_storeu_ps(o + 16 * a, _mm256_permute2f128_ps(u0, u1, 0x20));
      _mm256_storeu_ps(o + 16 * a + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
    }
    for (int64_t c = c0 + 16 * pieces; c < c1; ++c) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) s += Bf16ToF32(p.x[(r0 + r) * k + i]) * Bf16ToF32(p.w[i * n + c]);
      p.out[(r0 + r) * n + c] = s;
    }
  }
}

}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
namespace {

template <int R, bool kPrefetch>
void Slice(int64_t isa, const Problem& p, int64_t r0, int64_t c0, int64_t c1) {
  switch (isa) {
    case gptoss_cpu::kAvx512Bf16:
      return gptoss_cpu::isa_avx512bf16::Columns<R, kPrefetch>(p, r0, c0, c1);
    case gptoss_cpu::kAvx512:
      return gptoss_cpu::isa_avx512::Columns<R, kPrefetch>(p, r0, c0, c1);
    default:
      return gptoss_cpu::isa_avx2::Columns<R, kPrefetch>(p, r0, c0, c1);
  }
}

template <int R>
void Pass(ffi::ThreadPool& pool, int64_t isa, const Problem& p, int64_t r0) {
  const int64_t cols = SliceColumns(isa, R);
  const int64_t slices = (p.n + cols - 1) / cols;
  auto body = [&](int64_t s) {
    const int64_t c0 = s * cols, c1 = std::min(p.n, c0 + cols);
    if (p.prefetch_rows > 0) {
      Slice<R, true>(isa, p, r0, c0, c1);
    } else {
      Slice<R, false>(isa, p, r0, c0, c1);
    }
  };
  if (slices == 1) {  // one task: no helper to wake
    body(0);
  } else {
    gptoss_cpu::ParallelFor(pool, slices, body);
  }
}

ffi::Error Bf16VecmatImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                          ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out, int64_t isa,
                          int64_t prefetch_rows) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] < 1 || wd[0] < 1) {
    return ffi::Error::InvalidArgument("bf16_vecmat: expected x [M, K], w [K, N]");
  }
  if (!gptoss_cpu::CpuHas(isa)) {
    return ffi::Error::InvalidArgument("bf16_vecmat: this CPU lacks the instructions of branch " +
                                       std::to_string(isa));
  }
  const Problem p{reinterpret_cast<const uint16_t*>(x.untyped_data()),
                  reinterpret_cast<const uint16_t*>(w.untyped_data()),
                  xd[0], xd[1], wd[1], std::max<int64_t>(prefetch_rows, 0),
                  out->typed_data()};
  for (int64_t r0 = 0; r0 < p.m; r0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, p.m - r0)) {
      case 1: Pass<1>(pool, isa, p, r0); break;
      case 2: Pass<2>(pool, isa, p, r0); break;
      case 3: Pass<3>(pool, isa, p, r0); break;
      default: Pass<4>(pool, isa, p, r0);
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
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("prefetch_rows"));
