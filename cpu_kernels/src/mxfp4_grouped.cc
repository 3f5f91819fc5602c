// Grouped matmul on packed MXFP4 experts for x86 CPUs with AVX-512, as an XLA FFI handler.
//
//   out[r, n] = sum_k W[e(r), n, k] * lhs[r, k]      rows r sorted by expert, group_sizes[e] each
//
// The weights are never expanded to memory: each 32-element block is decoded in registers (a
// 16-entry float table indexed by the 4-bit codes, times the block's power-of-two scale) and
// multiplied with every row of the group while it is there. That is the point on CPU: XLA can
// only expand a whole expert to memory and read it back (a bandwidth-bound write of 4x the packed
// bytes), which dominates batched decode.
//
// lhs comes in MXFP4 *split order* (pallas_kernels.mxfp4.split_order: per 32-block the 16 even
// elements, then the 16 odd ones), so a block's low nibbles multiply lhs[32b : 32b+16] and its
// high nibbles lhs[32b+16 : 32b+32]. Rows past sum(group_sizes) come out as zeros.
// The work (expert, slice of N) is shared between the calling thread and XLA's intra-op pool.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;        // elements per MXFP4 block
constexpr int kBlockBytes = 16;   // packed bytes per block
constexpr int kRowsPerPass = 8;   // rows multiplied per decoded weight row (accumulators)
constexpr int64_t kSliceN = 32;   // output columns per task

// e2m1 code -> value; bit 3 is the sign.
alignas(64) constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

inline float ScaleValue(uint8_t s) {
  // e8m0: 2**(s - 127) from the bits; s == 0 is 2**-127 (an f32 subnormal), as the reference.
  if (s == 0) return 5.877471754111438e-39f;
  uint32_t bits = static_cast<uint32_t>(s) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// `R` (<= kRowsPerPass) rows of lhs against weight rows [n0, n1) of one expert. Each row sums
// into C independent accumulators (C = 4 for one or two rows, else fewer: registers), so that a
// lone decode row is not bound by the latency of one chain of dependent FMAs.
template <int R>
void RowsTimesSlice(const float* lhs, int64_t k, const uint8_t* blocks, const uint8_t* scales,
                    int64_t n0, int64_t n1, float* out, int64_t n_total) {
  constexpr int C = R <= 2 ? 4 : (R <= 4 ? 2 : 1);
  const __m512 table = _mm512_load_ps(kFp4);
  const __m512i low4 = _mm512_set1_epi32(15);
  const int64_t kb_count = k / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* b = blocks + n * kb_count * kBlockBytes;
    const uint8_t* s = scales + n * kb_count;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    // block kb into accumulators lo_c (low nibbles) and hi_c (high nibbles)
    auto block = [&](int64_t kb, int lo_c, int hi_c) {
      const __m512i codes = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kb * kBlockBytes)));
      const __m512 scale = _mm512_set1_ps(ScaleValue(s[kb]));
      const __m512 lo = _mm512_mul_ps(
          _mm512_permutexvar_ps(_mm512_and_si512(codes, low4), table), scale);
      const __m512 hi = _mm512_mul_ps(
          _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table), scale);
      const float* x = lhs + kb * kBlock;
      for (int r = 0; r < R; ++r) {
        acc[r][lo_c] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + r * k), acc[r][lo_c]);
        acc[r][hi_c] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + r * k + 16), acc[r][hi_c]);
      }
    };
    int64_t kb = 0;
    if constexpr (C == 4) {
      for (; kb + 2 <= kb_count; kb += 2) {
        block(kb, 0, 1);
        block(kb + 1, 2, 3);
      }
    }
    for (; kb < kb_count; ++kb) block(kb, 0, C - 1);
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[r][0];
      for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, acc[r][c]);
      out[r * n_total + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

using SliceFn = void (*)(const float*, int64_t, const uint8_t*, const uint8_t*, int64_t, int64_t,
                         float*, int64_t);
constexpr SliceFn kSliceFns[kRowsPerPass + 1] = {
    nullptr, RowsTimesSlice<1>, RowsTimesSlice<2>, RowsTimesSlice<3>, RowsTimesSlice<4>,
    RowsTimesSlice<5>, RowsTimesSlice<6>, RowsTimesSlice<7>, RowsTimesSlice<8>};

struct Task {
  int64_t row0, rows, expert, n0, n1;
};

ffi::Error Mxfp4GroupedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs,
                            ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                            ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out) {
  const auto ld = lhs.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  if (ld.size() != 2 || bd.size() != 4 || sd.size() != 3 || bd[3] != kBlockBytes ||
      sd[0] != bd[0] || sd[1] != bd[1] || sd[2] != bd[2] || ld[1] != bd[2] * kBlock ||
      group_sizes.dimensions().size() != 1 || group_sizes.dimensions()[0] != bd[0]) {
    return ffi::Error::InvalidArgument(
        "mxfp4_grouped: expected lhs [M, K], blocks [E, N, K/32, 16], scales [E, N, K/32], "
        "group_sizes [E]");
  }
  const int64_t m = ld[0], k = ld[1], e_count = bd[0], n = bd[1];
  const float* x = lhs.typed_data();
  const uint8_t* b = blocks.typed_data();
  const uint8_t* s = scales.typed_data();
  float* o = out->typed_data();
  const int32_t* gs = group_sizes.typed_data();
  const int64_t expert_blocks = n * (k / kBlock) * kBlockBytes, expert_scales = n * (k / kBlock);

  std::vector<Task> tasks;  // (expert, slice of N), over the experts that have rows
  int64_t row = 0;
  for (int64_t e = 0; e < e_count && row < m; ++e) {
    const int64_t rows = std::min<int64_t>(std::max<int32_t>(gs[e], 0), m - row);
    if (rows == 0) continue;
    for (int64_t n0 = 0; n0 < n; n0 += kSliceN) {
      tasks.push_back({row, rows, e, n0, std::min(n, n0 + kSliceN)});
    }
    row += rows;
  }
  if (row < m) std::memset(o + row * n, 0, sizeof(float) * (m - row) * n);

  gptoss_cpu::ParallelFor(pool, static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& t = tasks[i];
    for (int64_t r = 0; r < t.rows; r += kRowsPerPass) {
      const int64_t rows = std::min<int64_t>(kRowsPerPass, t.rows - r);
      kSliceFns[rows](x + (t.row0 + r) * k, k, b + t.expert * expert_blocks,
                      s + t.expert * expert_scales, t.n0, t.n1, o + (t.row0 + r) * n, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Grouped, Mxfp4GroupedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lhs [M, K], split order
                                  .Arg<ffi::Buffer<ffi::U8>>()    // blocks [E, N, K/32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // scales [E, N, K/32]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_sizes [E]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]
