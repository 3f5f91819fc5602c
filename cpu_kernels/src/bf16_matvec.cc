// out[m, n] = sum_k x[m, k] * w[k, n] for a few rows x (f32 [M, K], M <= 8) and a bf16 matrix w
// stored [K, N] (the attention projections), f32 out, as an XLA FFI handler with AVX-512.
//
// Decode's projections are memory-bound matrix-vector products; XLA:CPU runs them at a third of
// the memory bandwidth (a bf16 dot on 1 row falls to a scalar path, padded to 8 rows it is a
// small GEMM). Here each task owns a slice of columns and streams w down the rows once,
// widening bf16 to f32 in registers (a 16-bit shift) and accumulating every row of x.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 8;

inline __m512 Widen(const uint16_t* p) {  // 16 bf16 -> 16 f32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// R rows against columns [n0, n0 + 16 * A) (A accumulators a row; all full vectors).
template <int R, int A>
void Slice(const float* x, const uint16_t* w, int64_t k, int64_t n, int64_t n0, float* out) {
  __m512 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const uint16_t* row = w + i * n + n0;
    __m512 wv[A];
    for (int a = 0; a < A; ++a) wv[a] = Widen(row + 16 * a);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * k + i]);
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_fmadd_ps(xv, wv[a], acc[r][a]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) _mm512_storeu_ps(out + r * n + n0 + 16 * a, acc[r][a]);
}

// Columns [n0, n1) for R rows, any width: full slices of 16 * A, then single vectors, then a
// scalar tail.
template <int R>
void Columns(const float* x, const uint16_t* w, int64_t k, int64_t n, int64_t n0, int64_t n1,
             float* out) {
  constexpr int A = R == 1 ? 16 : (R == 2 ? 8 : (R <= 4 ? 4 : 2));
  int64_t c = n0;
  for (; c + 16 * A <= n1; c += 16 * A) Slice<R, A>(x, w, k, n, c, out);
  for (; c + 16 <= n1; c += 16) Slice<R, 1>(x, w, k, n, c, out);
  for (; c < n1; ++c) {
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) {
        const uint32_t bits = static_cast<uint32_t>(w[i * n + c]) << 16;
        float f;
        __builtin_memcpy(&f, &bits, 4);
        s += x[r * k + i] * f;
      }
      out[r * n + c] = s;
    }
  }
}

using ColumnsFn = void (*)(const float*, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                           float*);
constexpr ColumnsFn kColumns[kMaxRows + 1] = {nullptr,    Columns<1>, Columns<2>,
                                              Columns<3>, Columns<4>, Columns<5>,
                                              Columns<6>, Columns<7>, Columns<8>};

ffi::Error Bf16MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] < 1 || xd[0] > kMaxRows) {
    return ffi::Error::InvalidArgument("bf16_matvec: expected x [M, K] (1 <= M <= 8), w [K, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  constexpr int64_t kSlice = 256;  // columns a task: 16 of them for a 4096-wide projection
  const float* xs = x.typed_data();
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* o = out->typed_data();
  gptoss_cpu::ParallelFor(pool, (n + kSlice - 1) / kSlice, [&](int64_t i) {
    kColumns[m](xs, ws, k, n, i * kSlice, std::min(n, (i + 1) * kSlice), o);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Matvec, Bf16MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]
