// logits[m, v] = sum_d x[m, d] * w[v, d] for a few rows x (bf16 [M, D]) against a large
// bf16 matrix w stored [V, D] (the unembedding), f32 out, and each row's argmax (the first index
// of its maximum, as jnp.argmax) in the same pass, as an XLA FFI handler.
//
// Batch-1 decode reads ~90% of its bytes here on a small model (and a third on gpt-oss-20b), so
// this is a streaming kernel: each weight row is read once per pass (up to 8 rows of x on the
// AVX-512 BF16 branch, where 5-8 rows read an interleaved copy of x in blocks of D that stay in
// L1 (SliceBlocked); 4 on the others), slices of V are shared between the caller and XLA's pool
// (XLA's own fused loop runs on one core, which is half the memory bandwidth on most Intel
// parts), and the argmax is taken from each slice's logits while they are still in L1, so the
// 0.8 MB of logits are not read again by a later reduction.
//
// Three branches (simd.h), picked by the caller from the CPU's features; each may software-
// prefetch the stream `prefetch` bytes ahead (0 = rely on the hardware prefetchers), with a
// temporal or a non-temporal hint (`nta`: keep the stream out of the outer caches, so that the
// rest of a step's weights can stay there):
//   AVX-512 BF16  vdpbf16ps: 32 products a instruction, x taken as bf16 (it is: hidden states)
//   AVX-512       bf16 widened to f32 by a shift (even elements) and a mask (odd ones), so x is
//                 split once into its even and odd halves and each half meets its own FMA
//   AVX2          as AVX-512, 8 lanes
// stream_read.cc reads a buffer with the same slicing and prefetch and nothing else: the
// bandwidth bound this kernel is measured against.
//
// GptossBf16GemvMasked takes a token bitmask as well (int32 [M, ceil(V / 32)], llguidance's
// layout: bit j of word i allows token 32 i + j): disallowed logits are written as -inf and
// the argmax is of the allowed ones, each slice masked while its logits are in L1 (constrained
// decoding without a second pass over the logits). A row whose mask allows nothing is left
// unmasked, as the engine's XLA path (apply_token_mask) leaves it.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gptoss_cpu::Best;

constexpr int kMaxRows = 8;  // rows of x per pass over w (AVX-512 BF16; 4 on the other branches)
constexpr int64_t kSliceBytes = gptoss_cpu::kSliceBytes;  // weight bytes a task (whole groups)

using gptoss_cpu::Fetch;
using gptoss_cpu::kNone;
using gptoss_cpu::kNta;
using gptoss_cpu::kT0;
using gptoss_cpu::Prefetch;

struct Problem {
  const uint16_t* x;  // [m, d] bf16
  const uint16_t* w;  // [v, d] bf16
  int64_t m, d, v;
  int64_t prefetch;  // bytes ahead
  float* logits;     // [m, v]
  // [m] each row's mask (ceil(v / 32) words; nullptr: the row is unmasked), or nullptr: no masks
  const uint32_t* const* masks = nullptr;
};

// Bits [t, t + count) of a mask row (count <= 16), bit k of the result = token t + k. The next
// word is read only when the run crosses into it, i.e. when it holds tokens below v.
inline uint32_t MaskBits(const uint32_t* mask, int64_t t, int count) {
  const int64_t word = t >> 5;
  const int shift = static_cast<int>(t & 31);
  uint64_t bits = mask[word] >> shift;
  if (shift + count > 32) bits |= static_cast<uint64_t>(mask[word + 1]) << (32 - shift);
  return static_cast<uint32_t>(bits) & ((1u << count) - 1);
}

}  // namespace

// -------------------------------------------------------------------------------------------
// AVX-512 BF16
// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
namespace gptoss_cpu::isa_avx512bf16 {

inline __m512bh Load32(const uint16_t* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}
inline __m512bh Load32(const uint16_t* p, __mmask32 live) {
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(live, p));
}

// Rows [0, R) of x against weight rows [v0, v1) (v0 a multiple of 16): logits and each row's
// best of the slice.
template <int R, Prefetch P>
void Slice(const Problem& p, const uint16_t* x, int64_t v0, int64_t v1, float* logits,
           Best* best) {
  const int64_t d = p.d, full = d / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (d - full)) - 1);
  for (int64_t g = v0; g < v1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, v1 - g));
    __m512 acc[R][16];
    for (int j = 0; j < 16; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_setzero_ps();
      if (j >= rows) continue;
      const uint16_t* wr = p.w + (g + j) * d;
      const char* ahead = reinterpret_cast<const char*>(wr) + p.prefetch;
      // one row of x: two chains, so a long row is not bound by the dot's latency
      __m512 odd[R];
      for (int r = 0; r < R; ++r) odd[r] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 64 <= full; k += 64) {
        Fetch<P>(ahead + 2 * k);
        Fetch<P>(ahead + 2 * k + 64);
        const __m512bh w0 = Load32(wr + k), w1 = Load32(wr + k + 32);
        for (int r = 0; r < R; ++r) {
          acc[r][j] = _mm512_dpbf16_ps(acc[r][j], Load32(x + r * d + k), w0);
          odd[r] = _mm512_dpbf16_ps(odd[r], Load32(x + r * d + k + 32), w1);
        }
      }
      if (k < full) {
        Fetch<P>(ahead + 2 * k);
        const __m512bh w0 = Load32(wr + k);
        for (int r = 0; r < R; ++r)
          acc[r][j] = _mm512_dpbf16_ps(acc[r][j], Load32(x + r * d + k), w0);
        k += 32;
      }
      if (tail) {
        const __m512bh w0 = Load32(wr + k, tail);
        for (int r = 0; r < R; ++r)
          odd[r] = _mm512_dpbf16_ps(odd[r], Load32(x + r * d + k, tail), w0);
      }
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_add_ps(acc[r][j], odd[r]);
    }
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(logits + r * p.v + g, live, isa_avx512::Sum16(acc[r]));
  }
  for (int r = 0; r < R; ++r)
    best[r] = isa_avx512::Argmax(logits + r * p.v + v0, v1 - v0, v0);
}

// Five to eight rows of x. Each x load feeds two weight rows (16 accumulators in registers, as
// the dot products, not the weight stream, would bound a row-by-row walk), and x is read from
// `xi`, its copy interleaved per 32-element chunk ([chunks, R, 32], zero-padded, 64-byte
// aligned: InterleaveX), so one step's x loads are R whole adjacent lines. Long rows are walked
// in blocks of kBlockChunks chunks (the 16-row group's accumulators kept in L1 between blocks),
// so the x a block reads (R KB for R rows) stays in L1 instead of streaming from L2 with the weight
// (gpt-oss-20b's D = 2880 is 45 KB of x at 8 rows). The stream order is block-major within a
// group (rows g..g+15 of block 0, then of block 1, ...), and the prefetch runs `lead` row pairs
// ahead in that order (p.prefetch bytes of the stream, whole pairs), not a fixed distance
// along one row.
constexpr int64_t kBlockChunks = 16;  // 512 elements: 1 KB of a weight row, R KB of x

template <int R, Prefetch P>
void SliceBlocked(const Problem& p, const uint16_t* xi, int64_t v0, int64_t v1, float* logits,
                  Best* best) {
  const int64_t d = p.d, chunks = (d + 31) / 32, full = d / 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (d - full * 32)) - 1);
  const int64_t blocks = (chunks + kBlockChunks - 1) / kBlockChunks;
  const int64_t pair_bytes = 2 * 2 * std::min<int64_t>(d, kBlockChunks * 32);
  const int64_t lead = std::max<int64_t>(1, p.prefetch / pair_bytes), steps = 8 * blocks;
  alignas(64) __m512 acc[R][16];
  for (int64_t g = v0; g < v1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, v1 - g));
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kBlockChunks, c1 = std::min(chunks, c0 + kBlockChunks);
      for (int j = 0; j < rows; j += 2) {
        __m512 a0[R], a1[R];
        for (int r = 0; r < R; ++r) {
          a0[r] = b == 0 ? _mm512_setzero_ps() : acc[r][j];
          a1[r] = b == 0 ? _mm512_setzero_ps() : acc[r][j + 1];
        }
        const uint16_t* w0 = p.w + (g + j) * d;
        const uint16_t* w1 = j + 1 < rows ? w0 + d : w0;  // a lone last row: its lanes unused
        // the pair `lead` steps ahead in stream order (past v1 or w's end: prefetches never fault)
        const int64_t ahead = b * 8 + j / 2 + lead;
        const int64_t row = g + 16 * (ahead / steps) + 2 * (ahead % 8);
        const char* f0 = reinterpret_cast<const char*>(
            p.w + row * d + (ahead % steps) / 8 * kBlockChunks * 32);
        const char* f1 = f0 + 2 * d;
        int64_t c = c0;
        for (; c < std::min(c1, full); ++c) {
          Fetch<P>(f0 + 64 * (c - c0));
          Fetch<P>(f1 + 64 * (c - c0));
          const __m512bh b0 = Load32(w0 + 32 * c), b1 = Load32(w1 + 32 * c);
          const uint16_t* xc = xi + c * R * 32;
          for (int r = 0; r < R; ++r) {
            const __m512bh xv = Load32(xc + 32 * r);
            a0[r] = _mm512_dpbf16_ps(a0[r], xv, b0);
            a1[r] = _mm512_dpbf16_ps(a1[r], xv, b1);
          }
        }
        if (c < c1) {  // the ragged last chunk (d % 32 elements; x is zero past d)
          const __m512bh b0 = Load32(w0 + 32 * c, tail), b1 = Load32(w1 + 32 * c, tail);
          const uint16_t* xc = xi + c * R * 32;
          for (int r = 0; r < R; ++r) {
            const __m512bh xv = Load32(xc + 32 * r);
            a0[r] = _mm512_dpbf16_ps(a0[r], xv, b0);
            a1[r] = _mm512_dpbf16_ps(a1[r], xv, b1);
          }
        }
        for (int r = 0; r < R; ++r) acc[r][j] = a0[r], acc[r][j + 1] = a1[r];
      }
    }
    for (int r = 0; r < R; ++r) {  // a short last group: the lanes past it summed from zeros
      for (int j = (rows + 1) / 2 * 2; j < 16; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(logits + r * p.v + g, live, isa_avx512::Sum16(acc[r]));
  }
  for (int r = 0; r < R; ++r)
    best[r] = isa_avx512::Argmax(logits + r * p.v + v0, v1 - v0, v0);
}

}  // namespace gptoss_cpu::isa_avx512bf16
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
// AVX-512 without BF16
// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace gptoss_cpu::isa_avx512 {

// xs: x split per 32-element chunk into its 16 even then 16 odd elements, as f32, zero-padded
// to whole chunks: [R, chunks, 2, 16].
template <int R, Prefetch P>
void Slice(const Problem& p, const float* xs, int64_t v0, int64_t v1, float* logits,
           Best* best) {
  const int64_t d = p.d, chunks = (d + 31) / 32, full = d / 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (d - full * 32)) - 1);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t g = v0; g < v1; g += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, v1 - g));
    __m512 acc[R][16];
    for (int j = 0; j < 16; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_setzero_ps();
      if (j >= rows) continue;
      const uint16_t* wr = p.w + (g + j) * d;
      const char* ahead = reinterpret_cast<const char*>(wr) + p.prefetch;
      __m512 odd[R];
      for (int r = 0; r < R; ++r) odd[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        Fetch<P>(ahead + 64 * c);
        const __m512i wv = c < full ? _mm512_loadu_si512(wr + 32 * c)
                                    : _mm512_maskz_loadu_epi16(tail, wr + 32 * c);
        const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
        const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
        for (int r = 0; r < R; ++r) {
          const float* xc = xs + (r * chunks + c) * 32;
          acc[r][j] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xc), acc[r][j]);
          odd[r] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xc + 16), odd[r]);
        }
      }
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_add_ps(acc[r][j], odd[r]);
    }
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(logits + r * p.v + g, live, Sum16(acc[r]));
  }
  for (int r = 0; r < R; ++r) best[r] = Argmax(logits + r * p.v + v0, v1 - v0, v0);
}

// Logits p[0, n) of tokens base.. set to -inf where `mask` disallows them; their first maximum.
inline Best MaskedArgmax(float* p, int64_t n, int64_t base, const uint32_t* mask) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, n - i));
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    const __mmask16 allowed = static_cast<__mmask16>(MaskBits(mask, base + i, count));
    _mm512_mask_storeu_ps(p + i, live & ~allowed, neg_inf);
  }
  return Argmax(p, n, base);
}

}  // namespace gptoss_cpu::isa_avx512
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
// AVX2
// -------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gptoss_cpu::isa_avx2 {

// xs: x split per 16-element chunk into its 8 even then 8 odd elements, as f32, zero-padded to
// whole chunks: [R, chunks, 2, 8]. A ragged tail of a weight row (d % 16) is summed in scalars.
template <int R, Prefetch P>
void Slice(const Problem& p, const float* xs, int64_t v0, int64_t v1, float* logits,
           Best* best) {
  const int64_t d = p.d, chunks = (d + 15) / 16, full = d / 16;
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t g = v0; g < v1; g += 8) {
    const int rows = static_cast<int>(std::min<int64_t>(8, v1 - g));
    __m256 acc[R][8];
    float ragged[R][8] = {};
    for (int j = 0; j < 8; ++j) {
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_setzero_ps();
      if (j >= rows) continue;
      const uint16_t* wr = p.w + (g + j) * d;
      const char* ahead = reinterpret_cast<const char*>(wr) + p.prefetch;
      __m256 odd[R];
      for (int r = 0; r < R; ++r) odd[r] = _mm256_setzero_ps();
      for (int64_t c = 0; c < full; ++c) {
        if (c % 2 == 0) Fetch<P>(ahead + 32 * c);  // one prefetch a 64-byte line
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 16 * c));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
        for (int r = 0; r < R; ++r) {
          const float* xc = xs + (r * chunks + c) * 16;
          acc[r][j] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xc), acc[r][j]);
          odd[r] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xc + 8), odd[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        acc[r][j] = _mm256_add_ps(acc[r][j], odd[r]);
        const float* xc = xs + (r * chunks + full) * 16;
        for (int64_t k = full * 16; k < d; ++k) {
          const int64_t e = k - full * 16;  // element of the last chunk: even -> e/2, odd -> 8 + e/2
          ragged[r][j] += Bf16ToF32(wr[k]) * xc[(e % 2) * 8 + e / 2];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sums = _mm256_add_ps(Sum8(acc[r]), _mm256_loadu_ps(ragged[r]));
      if (rows == 8) {
        _mm256_storeu_ps(logits + r * p.v + g, sums);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, sums);
        std::copy(tmp, tmp + rows, logits + r * p.v + g);
      }
    }
  }
  for (int r = 0; r < R; ++r) best[r] = Argmax(logits + r * p.v + v0, v1 - v0, v0);
}

// As isa_avx512::MaskedArgmax, 8 lanes.
inline Best MaskedArgmax(float* p, int64_t n, int64_t base, const uint32_t* mask) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_set1_epi32(static_cast<int32_t>(MaskBits(mask, base + i, 8)));
    const __m256i banned =  // all ones in the lanes whose bit is clear
        _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane_bit), _mm256_setzero_si256());
    _mm256_maskstore_ps(p + i, banned, neg_inf);
  }
  for (; i < n; ++i) {
    if (!MaskBits(mask, base + i, 1)) p[i] = -std::numeric_limits<float>::infinity();
  }
  return Argmax(p, n, base);
}

}  // namespace gptoss_cpu::isa_avx2
#pragma GCC pop_options

// -------------------------------------------------------------------------------------------
// Dispatch
// -------------------------------------------------------------------------------------------
namespace {

// x split into even/odd f32 halves per chunk of `width` elements, zero-padded ([R, chunks, 2,
// width / 2]); the widening branches multiply each half with its own FMA.
std::vector<float> SplitX(const uint16_t* x, int64_t rows, int64_t d, int64_t width) {
  const int64_t chunks = (d + width - 1) / width, half = width / 2;
  std::vector<float> xs(rows * chunks * width, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < d; ++k) {
      const int64_t c = k / width, e = k % width;
      xs[(r * chunks + c) * width + (e % 2) * half + e / 2] = gptoss_cpu::Bf16ToF32(x[r * d + k]);
    }
  }
  return xs;
}

// x [rows, d] as [ceil(d / 32), rows, 32], zero-padded, in `buf`, 64-byte aligned: the layout
// the 5-8-row pass reads (isa_avx512bf16::SliceBlocked).
const uint16_t* InterleaveX(const uint16_t* x, int64_t rows, int64_t d,
                            std::vector<uint16_t>& buf) {
  const int64_t chunks = (d + 31) / 32;
  buf.assign(chunks * rows * 32 + 32, 0);  // + 32: room to align to 64 bytes
  uint16_t* xi = buf.data() + (-reinterpret_cast<uintptr_t>(buf.data()) / 2 & 31);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < d; ++k) xi[(k / 32 * rows + r) * 32 + k % 32] = x[r * d + k];
  }
  return xi;
}

// Runs rows [r0, r0 + R) of x over all of w with branch `isa`, one task a slice of V; returns
// the best of each slice, [slices, R].
template <int R, Prefetch P>
void Pass(ffi::ThreadPool& pool, const Problem& p, int64_t isa, int64_t r0, Best* best_out) {
  const int64_t group = isa == gptoss_cpu::kAvx2 ? 8 : 16;
  const int64_t slice = std::max<int64_t>(group, kSliceBytes / (2 * p.d) / group * group);
  const int64_t slices = (p.v + slice - 1) / slice;
  std::vector<Best> best(slices * R);
  const uint16_t* x = p.x + r0 * p.d;
  float* logits = p.logits + r0 * p.v;
  const uint32_t* const* masks = p.masks == nullptr ? nullptr : p.masks + r0;
  std::vector<float> xs;
  std::vector<uint16_t> xi_buf;
  const uint16_t* xi = nullptr;
  if (R > 4) xi = InterleaveX(x, R, p.d, xi_buf);
  if (R <= 4 && isa == gptoss_cpu::kAvx512) xs = SplitX(x, R, p.d, 32);
  if (R <= 4 && isa == gptoss_cpu::kAvx2) xs = SplitX(x, R, p.d, 16);
  gptoss_cpu::ParallelFor(pool, slices, [&](int64_t i) {
    const int64_t v0 = i * slice, v1 = std::min(p.v, v0 + slice);
    Best* b = best.data() + i * R;
    if constexpr (R > 4) {  // only the BF16 branch takes more than four rows a pass
      gptoss_cpu::isa_avx512bf16::SliceBlocked<R, P>(p, xi, v0, v1, logits, b);
    } else {
      switch (isa) {
        case gptoss_cpu::kAvx512Bf16:
          gptoss_cpu::isa_avx512bf16::Slice<R, P>(p, x, v0, v1, logits, b);
          break;
        case gptoss_cpu::kAvx512:
          gptoss_cpu::isa_avx512::Slice<R, P>(p, xs.data(), v0, v1, logits, b);
          break;
        default:
          gptoss_cpu::isa_avx2::Slice<R, P>(p, xs.data(), v0, v1, logits, b);
      }
    }
    // masked rows: the slice's logits (still in L1) masked and their argmax taken again
    for (int r = 0; masks != nullptr && r < R; ++r) {
      if (masks[r] == nullptr) continue;
      float* row = logits + r * p.v + v0;
      b[r] = isa == gptoss_cpu::kAvx2
                 ? gptoss_cpu::isa_avx2::MaskedArgmax(row, v1 - v0, v0, masks[r])
                 : gptoss_cpu::isa_avx512::MaskedArgmax(row, v1 - v0, v0, masks[r]);
    }
  });
  for (int r = 0; r < R; ++r) {
    Best b;
    for (int64_t i = 0; i < slices; ++i) b = gptoss_cpu::Better(b, best[i * R + r]);
    best_out[r] = b;
  }
}

template <Prefetch P>
void Rows(ffi::ThreadPool& pool, const Problem& p, int64_t isa, int64_t r0, int64_t rows,
          Best* best) {
  switch (rows) {
    case 1: return Pass<1, P>(pool, p, isa, r0, best);
    case 2: return Pass<2, P>(pool, p, isa, r0, best);
    case 3: return Pass<3, P>(pool, p, isa, r0, best);
    case 4: return Pass<4, P>(pool, p, isa, r0, best);
    case 5: return Pass<5, P>(pool, p, isa, r0, best);
    case 6: return Pass<6, P>(pool, p, isa, r0, best);
    case 7: return Pass<7, P>(pool, p, isa, r0, best);
    default: return Pass<8, P>(pool, p, isa, r0, best);
  }
}

// `mask`: int32 [M, W] or nullptr.
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
               const ffi::Buffer<ffi::S32>* mask, ffi::ResultBuffer<ffi::F32>& logits,
               ffi::ResultBuffer<ffi::S32>& argmax, int64_t isa, int64_t prefetch, bool nta) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[1] < 1 || wd[0] < 1 ||
      wd[0] > INT32_MAX) {
    return ffi::Error::InvalidArgument("bf16_gemv: expected x [M, D], w [V, D], 1 <= V < 2^31");
  }
  if (!gptoss_cpu::CpuHas(isa)) {
    return ffi::Error::InvalidArgument("bf16_gemv: this CPU lacks the instructions of branch " +
                                       std::to_string(isa));
  }
  Problem p{reinterpret_cast<const uint16_t*>(x.untyped_data()),
            reinterpret_cast<const uint16_t*>(w.untyped_data()),
            xd[0], xd[1], wd[0], std::max<int64_t>(prefetch, 0), logits->typed_data()};
  std::vector<const uint32_t*> rows;  // each row's mask; nullptr where it allows nothing
  if (mask != nullptr) {
    const auto md = mask->dimensions();
    const int64_t words = (p.v + 31) / 32;
    if (md.size() != 2 || md[0] != p.m || md[1] != words) {
      return ffi::Error::InvalidArgument("bf16_gemv: expected a mask [M, ceil(V / 32)]");
    }
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(mask->untyped_data());
    for (int64_t r = 0; r < p.m; ++r) {
      const uint32_t* row = bits + r * words;
      rows.push_back(std::any_of(row, row + words, [](uint32_t b) { return b != 0; }) ? row
                                                                                     : nullptr);
    }
    p.masks = rows.data();
  }
  int32_t* am = argmax->typed_data();
  const int64_t per_pass = isa == gptoss_cpu::kAvx512Bf16 ? kMaxRows : 4;
  for (int64_t r0 = 0; r0 < p.m; r0 += per_pass) {
    const int64_t rows = std::min<int64_t>(per_pass, p.m - r0);
    Best best[kMaxRows];
    if (p.prefetch == 0) {
      Rows<kNone>(pool, p, isa, r0, rows, best);
    } else if (nta) {
      Rows<kNta>(pool, p, isa, r0, rows, best);
    } else {
      Rows<kT0>(pool, p, isa, r0, rows, best);
    }
    for (int64_t r = 0; r < rows; ++r) am[r0 + r] = static_cast<int32_t>(best[r].index);
  }
  return ffi::Error::Success();
}

ffi::Error Bf16GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> logits, ffi::ResultBuffer<ffi::S32> argmax,
                        int64_t isa, int64_t prefetch, bool nta) {
  return Run(pool, x, w, nullptr, logits, argmax, isa, prefetch, nta);
}

ffi::Error Bf16GemvMaskedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                              ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> mask,
                              ffi::ResultBuffer<ffi::F32> logits,
                              ffi::ResultBuffer<ffi::S32> argmax, int64_t isa, int64_t prefetch,
                              bool nta) {
  return Run(pool, x, w, &mask, logits, argmax, isa, prefetch, nta);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Gemv, Bf16GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, D]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [V, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // logits [M, V]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // argmax [M]
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<bool>("nta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16GemvMasked, Bf16GemvMaskedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, D]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [V, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // mask [M, ceil(V / 32)]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // logits [M, V]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // argmax [M]
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("prefetch")
                                  .Attr<bool>("nta"));
