// Decode attention with sinks straight from a bf16 KV cache, as an XLA FFI handler: one query
// position per row, every query head of a KV head at once.
//
//   s[g, j]  = (q[g] . k[j]) / sqrt(h)        for the keys j the query may see (k_pos[j] >= 0,
//                                             k_pos[j] <= q_pos, q_pos - k_pos[j] < window)
//   p[g, j]  = exp(s[g, j] - m) / (sum_j exp(s[g, j] - m) + exp(sink[g] - m)),
//              m = max(max_j s[g, j], sink[g]);  p rounded to bf16, as the XLA path does
//   out[g]   = sum_j p[g, j] v[j]
//
// GptossPagedDecodeAttention reads a pool of pages [pages, kv_heads, page_size, h] (bf16 bit
// patterns, uint16) through each row's page table, only the positions its query sees (0 .. q_pos,
// or the window's), so a short context reads only its own pages. Each (row, kv head) is one task
// that reads its keys and values once (XLA pads the query heads to 8 rows and runs two batched
// matmuls plus the masked softmax as separate passes). Scores for 16 keys are summed together
// (simd.h: Sum16). AVX-512 only (the BF16 branch adds nothing here); on other CPUs the XLA
// path runs.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace {

constexpr float kMasked = -1e30f;  // the XLA path's masked score (finite: no NaN when all masked)

inline __m512 WidenBf16(const uint16_t* p, __mmask16 live) {  // 16 bf16 -> f32 (masked: 0)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}

// exp(x) for x <= 0 (scores minus their maximum), ~1 ulp: 2^(x log2 e) split into an integer
// power (added to the exponent) and a degree-6 polynomial on [-1/2, 1/2] (Cephes' expf
// coefficients). Below -87 (2^-125.5) it is 0, as a masked score's must be.
inline __m512 Exp(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n),
                                                       _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(live, y, _mm512_castsi512_ps(e));
}

// f32 -> the nearest bf16 (ties to even) -> f32: the XLA path casts probabilities to bf16.
inline __m512 RoundBf16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(
      _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

struct Problem {
  const uint16_t* q;  // [b, kh, g, h] bf16
  const uint16_t* k;  // the pool [pages, kh, s, h], bf16 bits
  const uint16_t* v;
  const int32_t* q_pos;  // [b]
  const int32_t* table;  // [b, cols] page ids
  const float* sinks;    // [kh, g]
  int64_t b, kh, g, s, h, window;
  float* out;  // [b, kh, g, h]
  int64_t pages = 0, cols = 0;  // pool pages and table columns (s: the page size)
};

// A task's keys through a page table: key j is position first + j (those the query sees:
// first = max(0, q_pos - window + 1) .. q_pos), in page table[p / s] at slot p % s. The offsets
// are worked out once per task (no division per key); a page id outside the pool reads page 0
// rather than past the buffer.
struct PagedKeys {
  const int64_t* offsets;  // [n] element offsets into the pool, relative to the head's page 0
  int64_t first, n;
  int64_t count() const { return n; }
  __m512i Positions(int64_t j0, __mmask16) const {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first + j0)),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                              15));
  }
  int64_t Offset(int64_t j) const { return offsets[j]; }
};

constexpr int kMaxG = 16;     // query heads per KV head
constexpr int kMaxPieces = 8;  // h <= 128

// One (row, kv head) over its keys ``keys_at`` (PagedKeys; kc/vc: where key offset
// 0 is); P = pieces of 16 in h (static, so a key's pieces and the value accumulators stay in
// registers).
template <int P, class Keys>
void Task(const Problem& p, int64_t row, int64_t head, const Keys& keys_at, const uint16_t* kc,
          const uint16_t* vc, std::vector<float>& scores) {
  constexpr int64_t pieces = P;
  const int64_t g_n = p.g, h = p.h, s_n = keys_at.count();
  const __mmask16 tail = static_cast<__mmask16>(h % 16 == 0 ? 0xFFFF : (1u << (h % 16)) - 1);
  auto live = [&](int64_t c) { return c == pieces - 1 ? tail : static_cast<__mmask16>(0xFFFF); };
  const int32_t qp = p.q_pos[row];
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  __m512 q[kMaxG][P];
  for (int64_t g = 0; g < g_n; ++g)
    for (int c = 0; c < P; ++c)
      q[g][c] = WidenBf16(p.q + ((row * p.kh + head) * g_n + g) * h + 16 * c, live(c));
  scores.assign(g_n * s_n, kMasked);

  // scores, 16 keys at a time: the block's keys widened once into kw (L1), then per query head
  // 16 dot products in registers and one Sum16 (the same sums, in the same order, as one
  // accumulator per key and head)
  // Rows are read kAhead keys after their prefetch (pages scatter them, so the hardware
  // prefetcher loses the stream at each page): ~100 ns of memory latency at a few ns a key.
  constexpr int64_t kAhead = 32;
  auto prefetch = [&](const uint16_t* base, int64_t j) {
    if (j >= s_n) return;
    const char* row = reinterpret_cast<const char*>(base + keys_at.Offset(j));
    for (int c = 0; c < P; c += 2) _mm_prefetch(row + 32 * c, _MM_HINT_T0);  // 64 B lines
  };
  for (int64_t j = 0; j < kAhead; ++j) prefetch(kc, j);
  alignas(64) __m512 kw[16][P];
  for (int64_t j0 = 0; j0 < s_n; j0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, s_n - j0));
    const __mmask16 keys = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
    const __m512i pos = keys_at.Positions(j0, keys);
    __mmask16 ok = keys & _mm512_cmpge_epi32_mask(pos, _mm512_setzero_si512()) &
                   _mm512_cmple_epi32_mask(pos, _mm512_set1_epi32(qp));
    if (p.window > 0)
      ok &= _mm512_cmplt_epi32_mask(_mm512_sub_epi32(_mm512_set1_epi32(qp), pos),
                                    _mm512_set1_epi32(static_cast<int32_t>(p.window)));
    if (ok == 0) continue;
    for (int j = 0; j < 16; ++j) {
      prefetch(kc, j0 + kAhead + j);
      if (!((ok >> j) & 1)) {
#pragma GCC unroll 8
        for (int c = 0; c < P; ++c) kw[j][c] = _mm512_setzero_ps();
        continue;
      }
      const uint16_t* kr = kc + keys_at.Offset(j0 + j);
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c) kw[j][c] = WidenBf16(kr + 16 * c, live(c));
    }
    for (int64_t g = 0; g < g_n; ++g) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        __m512 t = _mm512_mul_ps(q[g][0], kw[j][0]);
#pragma GCC unroll 8
        for (int c = 1; c < P; ++c) t = _mm512_fmadd_ps(q[g][c], kw[j][c], t);
        acc[j] = t;
      }
      const __m512 sc = _mm512_mul_ps(gptoss_cpu::isa_avx512::Sum16(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores.data() + g * s_n + j0, ok, sc);
    }
  }

  for (int64_t j = 0; j < kAhead; ++j) prefetch(vc, j);  // in flight during the softmax

  // softmax with the sink, probabilities rounded to bf16
  float* out = p.out + (row * p.kh + head) * g_n * h;
  for (int64_t g = 0; g < g_n; ++g) {
    float* sg = scores.data() + g * s_n;
    const float sink = p.sinks[head * g_n + g];
    __m512 mx = _mm512_set1_ps(sink);
    for (int64_t j = 0; j < s_n; j += 16) {
      const __mmask16 m = static_cast<__mmask16>(s_n - j >= 16 ? 0xFFFF : (1u << (s_n - j)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(kMasked), m, sg + j));
    }
    const float top = _mm512_reduce_max_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < s_n; j += 16) {
      const __mmask16 m = static_cast<__mmask16>(s_n - j >= 16 ? 0xFFFF : (1u << (s_n - j)) - 1);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + j), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(sg + j, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const float denom = _mm512_reduce_add_ps(sum) + std::exp(sink - top);
    const __m512 dv = _mm512_set1_ps(denom);
    for (int64_t j = 0; j < s_n; j += 16) {
      const __mmask16 m = static_cast<__mmask16>(s_n - j >= 16 ? 0xFFFF : (1u << (s_n - j)) - 1);
      const __m512 e = _mm512_maskz_loadu_ps(m, sg + j);
      _mm512_mask_storeu_ps(sg + j, m, RoundBf16(_mm512_div_ps(e, dv)));
    }
  }

  // out = p @ v, kGroup query heads at a time. One array of P accumulators per head (GCC keeps
  // small arrays in registers; one [kGroup][P] array, 1 KB, lived on the stack).
  constexpr int kGroup = P <= 4 ? 4 : 2;
  for (int64_t g0 = 0; g0 < g_n; g0 += kGroup) {
    const int64_t gs = std::min<int64_t>(kGroup, g_n - g0);
    const float* pg[kGroup];
    for (int g = 0; g < kGroup; ++g)
      pg[g] = scores.data() + (g0 + std::min<int64_t>(g, gs - 1)) * s_n;
    __m512 a0[P], a1[P], a2[P], a3[P];
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c) a0[c] = a1[c] = a2[c] = a3[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < s_n; ++j) {
      prefetch(vc, j + kAhead);
      float pj[kGroup];
      bool any = false;
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) {
        pj[g] = g < gs ? pg[g][j] : 0.0f;  // heads past gs have p = 0
        any |= pj[g] != 0.0f;
      }
      if (!any) continue;  // masked (or underflowed) for every head here: no need to read v
      const uint16_t* vr = vc + keys_at.Offset(j);
      const __m512 p0 = _mm512_set1_ps(pj[0]), p1 = _mm512_set1_ps(pj[1]);
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c) {
        const __m512 vv = WidenBf16(vr + 16 * c, live(c));
        a0[c] = _mm512_fmadd_ps(p0, vv, a0[c]);
        a1[c] = _mm512_fmadd_ps(p1, vv, a1[c]);
        if constexpr (kGroup > 2) {
          a2[c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[2 % kGroup]), vv, a2[c]);
          a3[c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[3 % kGroup]), vv, a3[c]);
        }
      }
    }
    for (int c = 0; c < P; ++c) {
      float* o = out + g0 * h + 16 * c;
      _mm512_mask_storeu_ps(o, live(c), a0[c]);
      if (gs > 1) _mm512_mask_storeu_ps(o + h, live(c), a1[c]);
      if (gs > 2) _mm512_mask_storeu_ps(o + 2 * h, live(c), a2[c]);
      if (gs > 3) _mm512_mask_storeu_ps(o + 3 * h, live(c), a3[c]);
    }
  }
}

// The paged task: the positions the row's query sees, through its table.
template <int P>
void PagedTask(const Problem& p, int64_t row, int64_t head, std::vector<float>& scores,
               std::vector<int64_t>& offsets) {
  const int64_t qp = p.q_pos[row], size = p.s, h = p.h;
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, qp - p.window + 1) : 0;
  const int64_t n = qp < 0 ? 0 : qp - first + 1;
  offsets.resize(n);
  const int32_t* table = p.table + row * p.cols;
  const int64_t page_elems = p.kh * size * h;  // one page of the pool, every head
  for (int64_t j = 0; j < n;) {
    const int64_t pos = first + j, col = std::min(pos / size, p.cols - 1);
    const int64_t page = static_cast<uint32_t>(table[col]) < static_cast<uint64_t>(p.pages)
                             ? table[col] : 0;
    const int64_t base = page * page_elems;
    for (int64_t slot = pos % size; slot < size && j < n; ++slot, ++j)
      offsets[j] = base + slot * h;
  }
  const int64_t head_base = head * size * h;
  Task<P>(p, row, head, PagedKeys{offsets.data(), first, n}, p.k + head_base, p.v + head_base,
          scores);
}

}  // namespace
#pragma GCC pop_options

namespace {

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

using TaskFn = void (*)(const Problem&, int64_t, int64_t, std::vector<float>&,
                        std::vector<int64_t>&);

// Runs every (row, kv head) task of ``p``, of the kind in ``kinds`` (by pieces of 16 in h).
void RunTasks(ffi::ThreadPool& pool, const Problem& p, const TaskFn (&kinds)[kMaxPieces + 1]) {
  const TaskFn task = kinds[(p.h + 15) / 16];
  auto body = [&](int64_t t) {
    thread_local std::vector<float> scores;
    thread_local std::vector<int64_t> offsets;
    task(p, t / p.kh, t % p.kh, scores, offsets);
  };
  const int64_t tasks = p.b * p.kh;
  int64_t bytes = 0;  // keys and values read (decode at batch 1 and a short context: a few KB)
  for (int64_t row = 0; row < p.b; ++row) {
    const int64_t qp = p.q_pos[row];
    if (qp >= 0) bytes += (p.window > 0 ? std::min(qp + 1, p.window) : qp + 1) * p.kh * p.h * 4;
  }
  if (tasks == 1 || bytes <= gptoss_cpu::kInlineBytes) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
  } else {
    gptoss_cpu::ParallelFor(pool, tasks, body);
  }
}

constexpr TaskFn kPaged[kMaxPieces + 1] = {nullptr, PagedTask<1>, PagedTask<2>, PagedTask<3>,
                                           PagedTask<4>, PagedTask<5>, PagedTask<6>,
                                           PagedTask<7>, PagedTask<8>};

ffi::Error PagedDecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q,
                                    ffi::Buffer<ffi::U16> k_pool, ffi::Buffer<ffi::U16> v_pool,
                                    ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> q_pos,
                                    ffi::Buffer<ffi::F32> sinks, ffi::ResultBuffer<ffi::F32> out,
                                    int64_t window) {
  const auto qd = q.dimensions(), kd = k_pool.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || !SameDims(v_pool.dimensions(), kd) ||
      kd[1] != qd[1] || kd[3] != qd[3] || td[0] != qd[0] || td[1] < 1 || kd[0] < 1 ||
      q_pos.element_count() != static_cast<size_t>(qd[0]) ||
      sinks.element_count() != static_cast<size_t>(qd[1] * qd[2]) || qd[2] > kMaxG ||
      qd[3] > 16 * kMaxPieces) {
    return ffi::Error::InvalidArgument(
        "paged_decode_attention: expected q [B, K, G, H], k/v pools [P, K, S, H], table [B, C], "
        "q_pos [B], sinks [K, G], G <= 16, H <= 128");
  }
  if (!gptoss_cpu::CpuHas(gptoss_cpu::kAvx512)) {
    return ffi::Error::InvalidArgument("paged_decode_attention: this CPU lacks AVX-512");
  }
  Problem p{reinterpret_cast<const uint16_t*>(q.untyped_data()), k_pool.typed_data(),
            v_pool.typed_data(), q_pos.typed_data(), table.typed_data(),
            sinks.typed_data(), qd[0], qd[1], qd[2], kd[2], qd[3], window, out->typed_data()};
  p.pages = kd[0];
  p.cols = td[1];
  RunTasks(pool, p, kPaged);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossPagedDecodeAttention, PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q [B, K, G, H]
                                  .Arg<ffi::Buffer<ffi::U16>>()   // k pool [P, K, S, H] (bf16 bits)
                                  .Arg<ffi::Buffer<ffi::U16>>()   // v pool
                                  .Arg<ffi::Buffer<ffi::S32>>()   // table [B, C] page ids
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos [B], -1 = padding
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sinks [K, G]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, K, G, H]
                                  .Attr<int64_t>("window"));       // 0 = no window
