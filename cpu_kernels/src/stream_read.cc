// The sum of a byte buffer, read as the streaming kernels read their weights (bf16_gemv.cc): the
// same task slices shared with XLA's pool, the same software prefetch. It measures the read
// bandwidth those kernels can reach on this machine (bench/cpu_stream.py, bench/vs_llamacpp.py);
// the sum only keeps the reads from being optimized away.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

using gptoss_cpu::Prefetch;

template <Prefetch P>
float ReadSlices(ffi::ThreadPool& pool, const uint8_t* data, int64_t n, int64_t prefetch) {
  constexpr int64_t kSlice = gptoss_cpu::kSliceBytes;
  const int64_t slices = (n + kSlice - 1) / kSlice;
  std::vector<float> partial(slices, 0.0f);
  gptoss_cpu::ParallelFor(pool, slices, [&](int64_t i) {
    const int64_t b0 = i * kSlice, b1 = std::min(n, b0 + kSlice);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t b = b0;
    for (; b + 64 <= b1; b += 64) {  // one 64-byte line a step, as two 32-byte loads
      gptoss_cpu::Fetch<P>(data + b + prefetch);
      a0 = _mm256_add_ps(a0, _mm256_castsi256_ps(_mm256_loadu_si256(
                                 reinterpret_cast<const __m256i*>(data + b))));
      a1 = _mm256_add_ps(a1, _mm256_castsi256_ps(_mm256_loadu_si256(
                                 reinterpret_cast<const __m256i*>(data + b + 32))));
    }
    alignas(32) float s[8];
    _mm256_store_ps(s, _mm256_add_ps(a0, a1));
    float t = 0.0f;
    for (float f : s) t += f;
    for (; b < b1; ++b) t += data[b];
    partial[i] = t;
  });
  float total = 0.0f;
  for (float f : partial) total += f;
  return total;
}

ffi::Error StreamReadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> data,
                          ffi::ResultBuffer<ffi::F32> out, int64_t prefetch, bool nta) {
  if (!gptoss_cpu::CpuHas(gptoss_cpu::kAvx2)) {
    return ffi::Error::InvalidArgument("stream_read: this CPU lacks AVX2");
  }
  const uint8_t* p = data.typed_data();
  const int64_t n = static_cast<int64_t>(data.element_count());
  out->typed_data()[0] = prefetch <= 0 ? ReadSlices<gptoss_cpu::kNone>(pool, p, n, 0)
                         : nta         ? ReadSlices<gptoss_cpu::kNta>(pool, p, n, prefetch)
                                       : ReadSlices<gptoss_cpu::kT0>(pool, p, n, prefetch);
  return ffi::Error::Success();
}

}  // namespace
#pragma GCC pop_options

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossStreamRead, StreamReadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()    // data [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [1] sum (keeps the reads)
                                  .Attr<int64_t>("prefetch")
                                  .Attr<bool>("nta"));
