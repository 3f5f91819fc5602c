// Decode-sized grouped products on packed MXFP4 experts, as an XLA FFI handler:
//
//   out[r, n] = sum_k W[e(r), n, k] * lhs[r, k]     rows r sorted by expert, group_sizes[e] each
//
// for bf16 rows in their natural order and few rows per expert (decode: one at batch 1). Each
// weight row is streamed once per pass of up to four rows of its expert, its 32-element blocks
// decoded in registers (mxfp4_rows.h: the per-branch inner loops); rows past sum(group_sizes)
// come out as zeros. At one row a core is bound by the instructions per block more than by the
// bytes (17 a block). Tasks (expert, slice of N) are shared between the caller and XLA's pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mxfp4_rows.h"
#include "parallel_for.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

namespace mxfp4 = gptoss_cpu::mxfp4;
using mxfp4::kBlock;
using mxfp4::kBlockBytes;
using mxfp4::kMaxRows;

struct Task {
  int64_t row0, rows, expert, n0, n1;  // rows [row0, row0 + rows) of one expert, outputs [n0, n1)
};

ffi::Error Mxfp4GemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> lhs,
                         ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales,
                         ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out,
                         int64_t isa, int64_t slice_rows) {
  const auto ld = lhs.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  if (ld.size() != 2 || bd.size() != 4 || sd.size() != 3 || bd[3] != kBlockBytes ||
      sd[0] != bd[0] || sd[1] != bd[1] || sd[2] != bd[2] || ld[1] != bd[2] * kBlock ||
      group_sizes.dimensions().size() != 1 || group_sizes.dimensions()[0] != bd[0]) {
    return ffi::Error::InvalidArgument(
        "mxfp4_gemv: expected lhs [M, K], blocks [E, N, K/32, 16], scales [E, N, K/32], "
        "group_sizes [E]");
  }
  if (!gptoss_cpu::CpuHas(isa)) {
    return ffi::Error::InvalidArgument("mxfp4_gemv: this CPU lacks the instructions of branch " +
                                       std::to_string(isa));
  }
  const int64_t m = ld[0], k = ld[1], e_count = bd[0], n = bd[1];
  const uint16_t* x = reinterpret_cast<const uint16_t*>(lhs.untyped_data());
  const int32_t* gs = group_sizes.typed_data();
  float* o = out->typed_data();
  const int64_t kb = k / kBlock;
  // slices of whole row groups (16), about `slice_rows` rows each
  const int64_t slice = std::max<int64_t>(16, slice_rows / 16 * 16);

  std::vector<Task> tasks;
  int64_t row = 0;
  for (int64_t e = 0; e < e_count && row < m; ++e) {
    const int64_t rows = std::min<int64_t>(std::max<int32_t>(gs[e], 0), m - row);
    for (int64_t r = 0; r < rows; r += kMaxRows) {
      for (int64_t n0 = 0; n0 < n; n0 += slice)
        tasks.push_back({row + r, std::min<int64_t>(kMaxRows, rows - r), e, n0,
                         std::min(n, n0 + slice)});
    }
    row += rows;
  }
  if (row < m) std::memset(o + row * n, 0, sizeof(float) * (m - row) * n);
  std::vector<float> xs;
  std::vector<uint16_t> xp;
  if (isa == gptoss_cpu::kAvx512Bf16) {
    xp = mxfp4::QuadRows(x, row, k);
  } else {
    xs = mxfp4::SplitRows(x, row, k);
  }

  gptoss_cpu::ParallelFor(pool, static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& t = tasks[i];
    const mxfp4::Expert e{blocks.typed_data() + t.expert * n * kb * kBlockBytes,
                   scales.typed_data() + t.expert * n * kb, n, kb};
    const int64_t r = t.row0 * k;
    mxfp4::RunRowsN(t.rows, isa, xp.data() + (xp.empty() ? 0 : r),
                    xs.data() + (xs.empty() ? 0 : r), k, e, t.n0, t.n1, o + t.row0 * n, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4Gemv, Mxfp4GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // lhs [M, K], natural order
                                  .Arg<ffi::Buffer<ffi::U8>>()    // blocks [E, N, K/32, 16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // scales [E, N, K/32]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_sizes [E]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [M, N]
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("slice_rows"));
