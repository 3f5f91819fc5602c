// out[m, v] = sum_d x[m, d] * w[v, d] for a few rows x (bf16 [M, D]) against a large bf16 matrix
// w stored [V, D] (the unembedding), f32 out, as an XLA FFI handler using AVX-512 BF16 dot
// products (vdpbf16ps: 32 bf16 products summed pairwise into 16 f32 lanes).
//
// Batched decode's unembedding (8 rows x 201k x 512 on the bench config) is a GEMM that XLA:CPU
// runs with its compute and its memory traffic one after the other (9.8 ms). Here each weight row
// is read once for all of x and the rows a few kilobytes ahead are prefetched, so the stream
// overlaps the arithmetic (7.0 ms; without the prefetch this kernel took 11.7). D must be a
// multiple of 32. Slices of V are shared between the caller and XLA's pool.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 8;            // rows of x per pass (2 weight rows x 8 = 16 accumulators)
constexpr int64_t kPrefetchRows = 32;  // how far ahead (in weight rows) the stream is prefetched
                                       // (prefetching past the end is harmless)
constexpr int64_t kSliceV = 512;  // weight rows per task

inline __m512bh Load32(const uint16_t* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}

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

// Rows [0, R) of x against weight rows [v0, v1).
template <int R>
void Pass(const uint16_t* x, const uint16_t* w, int64_t d, int64_t v0, int64_t v1, float* out,
          int64_t v_total) {
  int64_t v = v0;
  for (; v + 2 <= v1; v += 2) {  // two weight rows share each load of x
    const uint16_t* w0 = w + v * d;
    const uint16_t* w1 = w0 + d;
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + kPrefetchRows * d + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + kPrefetchRows * d + k), _MM_HINT_T0);
      const __m512bh b0 = Load32(w0 + k), b1 = Load32(w1 + k);
      for (int r = 0; r < R; ++r) {
        const __m512bh xr = Load32(x + r * d + k);
        a0[r] = _mm512_dpbf16_ps(a0[r], xr, b0);
        a1[r] = _mm512_dpbf16_ps(a1[r], xr, b1);
      }
    }
    if constexpr (R == kMaxRows) {
      __m512 acc[16];
      for (int r = 0; r < R; ++r) acc[2 * r] = a0[r], acc[2 * r + 1] = a1[r];
      alignas(64) float sums[16];
      _mm512_store_ps(sums, Sum16(acc));
      for (int r = 0; r < R; ++r) {
        out[r * v_total + v] = sums[2 * r];
        out[r * v_total + v + 1] = sums[2 * r + 1];
      }
    } else {
      for (int r = 0; r < R; ++r) {
        out[r * v_total + v] = _mm512_reduce_add_ps(a0[r]);
        out[r * v_total + v + 1] = _mm512_reduce_add_ps(a1[r]);
      }
    }
  }
  for (; v < v1; ++v) {  // an odd last row
    const uint16_t* w0 = w + v * d;
    __m512 a0[R];
    for (int r = 0; r < R; ++r) a0[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 32) {
      const __m512bh b0 = Load32(w0 + k);
      for (int r = 0; r < R; ++r) a0[r] = _mm512_dpbf16_ps(a0[r], Load32(x + r * d + k), b0);
    }
    for (int r = 0; r < R; ++r) out[r * v_total + v] = _mm512_reduce_add_ps(a0[r]);
  }
}

using PassFn = void (*)(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float*,
                        int64_t);
constexpr PassFn kPasses[kMaxRows + 1] = {nullptr, Pass<1>, Pass<2>, Pass<3>, Pass<4>,
                                          Pass<5>,  Pass<6>, Pass<7>, Pass<8>};

ffi::Error Bf16RowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[1] % 32 != 0) {
    return ffi::Error::InvalidArgument(
        "bf16_rows: expected x [M, D], w [V, D] with D a multiple of 32");
  }
  const int64_t m = xd[0], d = xd[1], v = wd[0];
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* o = out->typed_data();
  gptoss_cpu::ParallelFor(pool, (v + kSliceV - 1) / kSliceV, [&](int64_t i) {
    const int64_t v0 = i * kSliceV, v1 = std::min(v, v0 + kSliceV);
    for (int64_t r = 0; r < m; r += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m - r);
      kPasses[rows](xs + r * d, ws, d, v0, v1, o + r * v, v);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Rows, Bf16RowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x [M, D]
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // w [V, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, V]
