// ParallelFor: the calling thread and XLA's intra-op thread pool share tasks [0, n).
//
// Every participant takes the next task from one atomic counter, so the call never waits on a
// helper that has not started (a late helper finds nothing left and returns); the caller only
// waits for tasks other threads are already running.

#ifndef GPTOSS_JAX_CPU_PARALLEL_FOR_H_
#define GPTOSS_JAX_CPU_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace gptoss_cpu {

template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F body) {
  struct State {
    explicit State(F f, int64_t n) : body(std::move(f)), n(n) {}
    F body;
    const int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Run() {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(body), n);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace gptoss_cpu

#endif  // GPTOSS_JAX_CPU_PARALLEL_FOR_H_
