// ParallelFor: the calling thread and XLA's intra-op thread pool share tasks [0, n).
//
// Every participant takes the next task from one atomic counter, so the call never waits on a
// helper that has not started (a late helper finds nothing left and returns); the caller only
// waits for tasks other threads are already running.
//
// Helpers are capped at the CPUs this process may run on, less the caller's: XLA's pool has a
// thread per CPU and runs beside the thread that executes the program, so with every pool thread
// scheduled there is one more busy thread than CPUs, and a helper preempted in the middle of a
// task holds up the whole call for a scheduler tick. (On a 2-CPU EPYC a 512 KB projection on
// the pool went from a median of 30-60 us, 14 at best, to 16-19.)

#ifndef GPTOSS_JAX_CPU_PARALLEL_FOR_H_
#define GPTOSS_JAX_CPU_PARALLEL_FOR_H_

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace gptoss_cpu {

// Bytes of memory traffic below which a call runs on the caller alone: waking a pool thread and
// handing it work costs more than it saves (on a 2-core EPYC, ~5 us for a 128 KB projection
// alone against 10-14 us for 512 KB on two threads when the helper wakes in time).
constexpr int64_t kInlineBytes = 256 << 10;

// CPUs this process may run on (its affinity mask; at least 1), read once.
inline int64_t UsableCpus() {
  static const int64_t cpus = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max<int64_t>(1, CPU_COUNT(&set));
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return cpus;
}

// Threads that may work on one call: the caller and at most one pool thread per other CPU.
inline int64_t Participants(xla::ffi::ThreadPool& pool) {
  return 1 + std::min<int64_t>(pool.num_threads(), UsableCpus() - 1);
}

template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F body) {
  if (n <= 0) return;
  const int64_t helpers = std::min<int64_t>(Participants(pool) - 1, n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
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
  // shared with the helpers: one that starts after the call has returned still finds it alive
  auto state = std::make_shared<State>(std::move(body), n);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace gptoss_cpu

#endif  // GPTOSS_JAX_CPU_PARALLEL_FOR_H_
