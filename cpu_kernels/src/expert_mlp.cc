// The expert MLP on packed MXFP4 experts in one XLA FFI call:
//
//   y[t] = sum_j w[t, j] * (W_down[e] a + b_down[e]),   a = swiglu(W_gate_up[e] x[t] + b_gate_up[e]),
//   e = idx[t, j];  swiglu(h) = min(g, L) * sigmoid(alpha * min(g, L)) * (clip(u, -L, L) + 1) on
//   gate g = h[0::2], up u = h[1::2] (gpt-oss's clamped SwiGLU), a rounded to bf16
//
// for bf16 tokens, a decode step's few or a prefill's many. The XLA path sorts the (token, slot)
// pairs by expert, gathers rows, runs the two grouped matmuls with the biases, the SwiGLU, the
// routing weights and the sum over slots as some twenty separate ops a layer; on the bench
// config those cost about as much as the matmuls themselves at decode, and its expand-then-GEMM
// loop runs well below the machine's dot-product rate at prefill. Here the pairs are grouped by
// expert on the host side of the call, and one ParallelFor on the caller and XLA's pool runs
// gate_up, each task ending with its slice's bias + SwiGLU, then down, a down task waiting only
// for its own expert's gate_up tasks rather than for a barrier across all experts; the weighted
// sum per token in slot order follows on the caller. An expert with few pairs runs in chunks
// of up to 4 rows against slices of its weight decoded in registers (mxfp4_rows.h); one with
// at least `gemm_rows` pairs (prefill) runs as one group against panels of 64 output columns,
// each decoded once to bf16 and met by all of its rows in a register-blocked GEMM
// (mxfp4_panel_gemm.h). Ids outside [0, E) (expert-parallel padding) belong to no expert.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mxfp4_panel_gemm.h"
#include "mxfp4_rows.h"
#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

// exp(x), ~1 ulp (Cephes' expf polynomial on the reduced argument), 0 below -87, clamped at 88.
inline __m256 Exp(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), live);
}

// 8 bf16 bit patterns -> f32.
inline __m256 Bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// f32 -> bf16 bit patterns, rounded to nearest even (as XLA's convert), 8 at a time.
inline void StoreBf16x8(__m256 v, uint16_t* out) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
}

inline uint16_t RoundBf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

inline float Swiglu(float g, float u, float limit, float alpha) {
  g = std::min(g, limit);
  u = std::min(std::max(u, -limit), limit);
  return g / (1.0f + std::exp(-alpha * g)) * (u + 1.0f);
}

// a[0, f) = swiglu(h + bias) for one pair: h, bias interleaved [2f] (gate even, up odd).
void SwigluRow(const float* h, const uint16_t* bias, int64_t f, float limit, float alpha,
               uint16_t* a) {
  const __m256 lim = _mm256_set1_ps(limit), neg = _mm256_set1_ps(-limit);
  const __m256 one = _mm256_set1_ps(1.0f), minus_alpha = _mm256_set1_ps(-alpha);
  int64_t i = 0;
  for (; i + 8 <= f; i += 8) {
    const __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(h + 2 * i), Bf16x8(bias + 2 * i));
    const __m256 v1 = _mm256_add_ps(_mm256_loadu_ps(h + 2 * i + 8), Bf16x8(bias + 2 * i + 8));
    // lanes [g0 u0 g1 u1 | g2 u2 g3 u3], [g4 u4 ...] -> gates, ups in order
    __m256 g = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
    __m256 u = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
    g = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(g), _MM_SHUFFLE(3, 1, 2, 0)));
    u = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(u), _MM_SHUFFLE(3, 1, 2, 0)));
    g = _mm256_min_ps(g, lim);
    u = _mm256_min_ps(_mm256_max_ps(u, neg), lim);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, Exp(_mm256_mul_ps(minus_alpha, g))));
    StoreBf16x8(_mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_add_ps(u, one)), a + i);
  }
  for (; i < f; ++i) {
    const float g = h[2 * i] + gptoss_cpu::Bf16ToF32(bias[2 * i]);
    const float u = h[2 * i + 1] + gptoss_cpu::Bf16ToF32(bias[2 * i + 1]);
    a[i] = RoundBf16(Swiglu(g, u, limit, alpha));
  }
}

// y += w * (o + bias) over d.
void AddWeighted(const float* o, const uint16_t* bias, float w, int64_t d, float* y) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(o + i), Bf16x8(bias + i));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, v, _mm256_loadu_ps(y + i)));
  }
  for (; i < d; ++i) y[i] += w * (o[i] + gptoss_cpu::Bf16ToF32(bias[i]));
}

}  // namespace
#pragma GCC pop_options

namespace {

namespace mxfp4 = gptoss_cpu::mxfp4;

struct Pair {
  int64_t token, slot, expert;
};

// Sorted pairs [p0, p0 + rows) of one expert: up to kMaxRows of them (rows kernel; their rows
// of in, h and act from h0), or all of the expert's (gemm: panel GEMM; their rows of act_gemm
// from h0).
struct Chunk {
  int64_t p0, rows, expert, h0;
  bool gemm;
};

// One task: output columns [n0, n1) of chunk c's gate_up (down = false) or down weight.
struct Task {
  int64_t c, n0, n1;
  bool down;
};

// The rows of a phase's input in the layout of the branch: quad (AVX-512 BF16) or split (the
// others), mxfp4_rows.h.
struct Rows {
  std::vector<uint16_t> xp;
  std::vector<float> xs;
  void Size(int64_t isa, int64_t m, int64_t k) {
    xp.resize(isa == gptoss_cpu::kAvx512Bf16 ? m * k : 0);
    xs.resize(isa == gptoss_cpu::kAvx512Bf16 ? 0 : m * k);
  }
  // elements [i0, i1) of row r (of k), given in natural order in v
  void Put(int64_t r, int64_t k, int64_t i0, int64_t i1, const uint16_t* v) {
    if (!xp.empty())
      mxfp4::PutQuad(xp.data() + r * k, k, i0, i1, v);
    else
      mxfp4::PutSplit(xs.data() + r * k, i0, i1, v);
  }
  const uint16_t* Xp(int64_t off) const { return xp.empty() ? nullptr : xp.data() + off; }
  const float* Xs(int64_t off) const { return xs.empty() ? nullptr : xs.data() + off; }
};

// A call's working memory, kept by each calling thread from call to call (resized, never freed):
// a decode step calls the kernel once a layer, and the allocations were a few us a call.
struct Scratch {
  std::vector<Pair> pairs;
  std::vector<Chunk> chunks;
  std::vector<Task> tasks;
  Rows in, act;
  std::vector<float> h, o;
  std::vector<uint16_t> act_gemm;            // the gemm chunks' activations, [pairs, F] bf16
  std::vector<const uint16_t*> x_of, a_of;   // per pair: its gate_up and down input rows
  std::vector<int64_t> where;
  std::unique_ptr<std::atomic<int64_t>[]> ready;
  int64_t ready_n = 0;
};

// Expert `expert`'s packed weight of n rows by k.
mxfp4::Expert ExpertOf(int64_t expert, int64_t k, const uint8_t* blocks, const uint8_t* scales,
                       int64_t n) {
  const int64_t kb = k / mxfp4::kBlock;
  return {blocks + expert * n * kb * mxfp4::kBlockBytes, scales + expert * n * kb, n, kb};
}

// One pass of a chunk's rows over output rows [n0, n1) of its expert's weight, into out (the
// chunk's first row; rows of n).
void RowsTask(int64_t isa, const Chunk& c, const Rows& in, int64_t k, const uint8_t* blocks,
              const uint8_t* scales, int64_t n, int64_t n0, int64_t n1, float* out) {
  const int64_t off = c.h0 * k;
  mxfp4::RunRowsN(c.rows, isa, in.Xp(off), in.Xs(off), k, ExpertOf(c.expert, k, blocks, scales, n),
                  n0, n1, out, n);
}

// The gemm chunk's gate_up panel [n0, n1) (whole (gate, up) pairs) with its bias and SwiGLU:
// activations [n0 / 2, n1 / 2) of each of its rows, bf16, into act (the chunk's first row; rows
// of f).
void GemmGateUpTask(int64_t isa, const Chunk& c, const uint16_t* const* x_of, int64_t d,
                    const uint8_t* blocks, const uint8_t* scales, const uint16_t* bias, int64_t f2,
                    int64_t n0, int64_t n1, float limit, float alpha, uint16_t* act) {
  thread_local std::vector<float> h;  // [rows, kPanelCols]: the panel's outputs
  if (static_cast<int64_t>(h.size()) < c.rows * gptoss_cpu::panel::kPanelCols)
    h.resize(c.rows * gptoss_cpu::panel::kPanelCols);
  gptoss_cpu::panel::PanelProduct(isa, x_of + c.p0, c.rows, d,
                                  ExpertOf(c.expert, d, blocks, scales, f2), n0, n1, h.data(),
                                  gptoss_cpu::panel::kPanelCols);
  const int64_t f = f2 / 2;
  for (int64_t r = 0; r < c.rows; ++r)
    SwigluRow(h.data() + r * gptoss_cpu::panel::kPanelCols, bias + c.expert * f2 + n0,
              (n1 - n0) / 2, limit, alpha, act + r * f + n0 / 2);
}

bool Dims(ffi::Span<const int64_t> got, std::initializer_list<int64_t> want) {
  return got.size() == want.size() && std::equal(want.begin(), want.end(), got.begin());
}

ffi::Error ExpertMlpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::U8> gu_blocks,
                         ffi::Buffer<ffi::U8> gu_scales, ffi::Buffer<ffi::BF16> gu_bias,
                         ffi::Buffer<ffi::U8> dn_blocks, ffi::Buffer<ffi::U8> dn_scales,
                         ffi::Buffer<ffi::BF16> dn_bias, ffi::ResultBuffer<ffi::F32> y,
                         int64_t isa, float limit, float alpha, int64_t slice_rows,
                         int64_t gemm_rows) {
  const auto xd = x.dimensions(), id = idx.dimensions(), gb = gu_blocks.dimensions();
  if (xd.size() != 2 || id.size() != 2 || id[0] != xd[0] || !Dims(weights.dimensions(), {id[0], id[1]}) ||
      gb.size() != 4 || gb[3] != 16 || gb[2] * 32 != xd[1] || gb[1] % 2 != 0) {
    return ffi::Error::InvalidArgument(
        "expert_mlp: expected x [T, D], idx and weights [T, K], gate_up blocks [E, 2F, D/32, 16]");
  }
  const int64_t t_n = xd[0], d = xd[1], k_n = id[1], e_n = gb[0], f2 = gb[1], f = f2 / 2;
  if (!Dims(gu_scales.dimensions(), {e_n, f2, d / 32}) || !Dims(gu_bias.dimensions(), {e_n, f2}) ||
      !Dims(dn_blocks.dimensions(), {e_n, d, f / 32, 16}) ||
      !Dims(dn_scales.dimensions(), {e_n, d, f / 32}) || !Dims(dn_bias.dimensions(), {e_n, d}) ||
      f % 32 != 0) {
    return ffi::Error::InvalidArgument(
        "expert_mlp: expected gate_up scales [E, 2F, D/32], bias [E, 2F], down blocks "
        "[E, D, F/32, 16], scales [E, D, F/32], bias [E, D], F a multiple of 32");
  }
  if (!gptoss_cpu::CpuHas(isa)) {
    return ffi::Error::InvalidArgument("expert_mlp: this CPU lacks the instructions of branch " +
                                       std::to_string(isa));
  }
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const int32_t* ids = idx.typed_data();
  const float* ws = weights.typed_data();
  const uint16_t* gub = reinterpret_cast<const uint16_t*>(gu_bias.untyped_data());
  const uint16_t* dnb = reinterpret_cast<const uint16_t*>(dn_bias.untyped_data());
  float* out = y->typed_data();

  // pairs sorted by expert (stable: slot order within an expert), by counting
  thread_local Scratch scratch;
  std::vector<Pair>& pairs = scratch.pairs;
  std::vector<int64_t>& where = scratch.where;  // first: each expert's count, then its start
  where.assign(e_n + 1, 0);
  for (int64_t i = 0; i < t_n * k_n; ++i)
    if (ids[i] >= 0 && ids[i] < e_n) ++where[ids[i] + 1];
  for (int64_t e = 0; e < e_n; ++e) where[e + 1] += where[e];
  const int64_t p_n = where[e_n];
  pairs.resize(p_n);
  for (int64_t i = 0; i < t_n * k_n; ++i)
    if (ids[i] >= 0 && ids[i] < e_n) pairs[where[ids[i]]++] = {i / k_n, i % k_n, ids[i]};
  // chunks: an expert of at least gemm_rows pairs whole, the others in chunks of <= 4
  std::vector<Chunk>& chunks = scratch.chunks;
  chunks.clear();
  int64_t h_n = 0, g_n = 0;  // rows of the rows-kernel chunks, of the gemm ones
  for (int64_t p = 0; p < p_n;) {
    int64_t q = p;
    while (q < p_n && pairs[q].expert == pairs[p].expert) ++q;
    if (gemm_rows > 0 && q - p >= gemm_rows) {
      chunks.push_back({p, q - p, pairs[p].expert, g_n, true});
      g_n += q - p;
    } else {
      for (int64_t r = p; r < q; r += mxfp4::kMaxRows) {
        const int64_t rows = std::min<int64_t>(mxfp4::kMaxRows, q - r);
        chunks.push_back({r, rows, pairs[p].expert, h_n, false});
        h_n += rows;
      }
    }
    p = q;
  }
  std::fill(out, out + t_n * d, 0.0f);
  if (p_n == 0) return ffi::Error::Success();
  // rows per task: a multiple of 16 (whole row groups, and whole (gate, up) pairs)
  const int64_t slice = std::min<int64_t>(1024, std::max<int64_t>(16, slice_rows / 16 * 16));
  const int64_t panel = gptoss_cpu::panel::kPanelCols;

  // One ParallelFor over two runs of tasks: gate_up per (chunk, slice of 2F), each finishing its
  // slice with the bias and the SwiGLU (its rows are whole (gate, up) pairs) and writing the
  // activations in the down pass's layouts; then down per (chunk, slice of D). A slice is
  // `slice` rows of the weight for a rows-kernel chunk, a panel for a gemm one. A down task
  // waits (spinning) until its chunk's gate_up slices are all done; tasks are taken in order, so
  // by the time one is taken every gate_up task has been, and the wait is at most the tail of
  // the chunk's last slices, not a barrier across all experts.
  const int64_t c_n = static_cast<int64_t>(chunks.size());
  std::vector<Task>& tasks = scratch.tasks;
  tasks.clear();
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t n = pass == 0 ? f2 : d;
    for (int64_t c = 0; c < c_n; ++c) {
      const int64_t step = chunks[c].gemm ? panel : slice;
      for (int64_t n0 = 0; n0 < n; n0 += step)
        tasks.push_back({c, n0, std::min(n, n0 + step), pass == 1});
    }
  }
  Rows& in = scratch.in;  // gate_up of the rows-kernel chunks: the pairs' tokens
  in.Size(isa, h_n, d);
  Rows& act = scratch.act;  // their down: the SwiGLU of each pair, bf16
  act.Size(isa, h_n, f);
  std::vector<float>& h = scratch.h;  // h and o: every element written before it is read
  std::vector<float>& o = scratch.o;
  h.resize(h_n * f2);
  o.resize(p_n * d);
  std::vector<const uint16_t*>& x_of = scratch.x_of;  // the gemm chunks' rows, in place
  std::vector<const uint16_t*>& a_of = scratch.a_of;
  x_of.resize(p_n);
  a_of.resize(p_n);
  std::vector<uint16_t>& act_gemm = scratch.act_gemm;
  act_gemm.resize(g_n * f);
  for (const Chunk& c : chunks) {
    for (int64_t r = 0; r < c.rows; ++r) {
      const int64_t p = c.p0 + r;
      if (c.gemm) {
        x_of[p] = xs + pairs[p].token * d;
        a_of[p] = act_gemm.data() + (c.h0 + r) * f;
      } else {
        in.Put(c.h0 + r, d, 0, d, xs + pairs[p].token * d);
      }
    }
  }
  if (scratch.ready_n < c_n) {
    scratch.ready.reset(new std::atomic<int64_t>[c_n]);
    scratch.ready_n = c_n;
  }
  std::atomic<int64_t>* ready = scratch.ready.get();
  for (int64_t c = 0; c < c_n; ++c) ready[c].store(0, std::memory_order_relaxed);
  const int64_t gu_slices = (f2 + slice - 1) / slice, gu_panels = (f2 + panel - 1) / panel;
  const uint8_t *gbk = gu_blocks.typed_data(), *gsc = gu_scales.typed_data();
  const uint8_t *dbk = dn_blocks.typed_data(), *dsc = dn_scales.typed_data();
  gptoss_cpu::ParallelFor(pool, static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& task = tasks[i];
    const Chunk& c = chunks[task.c];
    const int64_t n0 = task.n0, n1 = task.n1;
    if (!task.down) {
      if (c.gemm) {
        GemmGateUpTask(isa, c, x_of.data(), d, gbk, gsc, gub, f2, n0, n1, limit, alpha,
                       act_gemm.data() + c.h0 * f);
      } else {
        float* hc = h.data() + c.h0 * f2;
        RowsTask(isa, c, in, d, gbk, gsc, f2, n0, n1, hc);
        uint16_t a[512];  // the slice's activations (n1 - n0 <= 2 * 512 rows: slice is capped)
        for (int64_t r = 0; r < c.rows; ++r) {
          SwigluRow(hc + r * f2 + n0, gub + c.expert * f2 + n0, (n1 - n0) / 2, limit, alpha, a);
          act.Put(c.h0 + r, f, n0 / 2, n1 / 2, a);
        }
      }
      ready[task.c].fetch_add(1, std::memory_order_release);
      return;
    }
    const int64_t need = c.gemm ? gu_panels : gu_slices;
    for (int spins = 0; ready[task.c].load(std::memory_order_acquire) < need; ++spins) {
      if (spins < 64) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    if (c.gemm) {
      gptoss_cpu::panel::PanelProduct(isa, a_of.data() + c.p0, c.rows, f,
                                      ExpertOf(c.expert, f, dbk, dsc, d), n0, n1,
                                      o.data() + c.p0 * d + n0, d);
    } else {
      RowsTask(isa, c, act, f, dbk, dsc, d, n0, n1, o.data() + c.p0 * d);
    }
  });

  where.assign(t_n * k_n, -1);  // now: the sorted index of each (token, slot)
  for (int64_t p = 0; p < p_n; ++p) where[pairs[p].token * k_n + pairs[p].slot] = p;
  // in slot order, as the XLA path sums; kSumTokens tokens a task (a decode step's on the
  // caller alone, a prefill's shared)
  constexpr int64_t kSumTokens = 32;
  gptoss_cpu::ParallelFor(pool, (t_n + kSumTokens - 1) / kSumTokens, [&](int64_t i) {
    for (int64_t t = i * kSumTokens; t < std::min(t_n, (i + 1) * kSumTokens); ++t)
      for (int64_t j = 0; j < k_n; ++j)
        if (const int64_t p = where[t * k_n + j]; p >= 0)
          AddWeighted(o.data() + p * d, dnb + pairs[p].expert * d, ws[t * k_n + j], d,
                      out + t * d);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossExpertMlp, ExpertMlpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [T, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // gate_up blocks [E, 2F, D/32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // gate_up scales [E, 2F, D/32]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // gate_up bias [E, 2F]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // down blocks [E, D, F/32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // down scales [E, D, F/32]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // down bias [E, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [T, D]
                                  .Attr<int64_t>("isa")
                                  .Attr<float>("limit")
                                  .Attr<float>("alpha")
                                  .Attr<int64_t>("slice_rows")
                                  .Attr<int64_t>("gemm_rows"));
