// See thread_budget.h.
#include "thread_budget.h"

#include <time.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>

namespace pcdeq::cpu {
namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

std::atomic<int64_t> single_threaded_until_ns{0};  // solves run on one thread until then (steady clock)
std::atomic<int64_t> backoff_ns{0};                // the length of the last backoff (0: none)

}  // namespace

ThreadBudget::Scope::Scope() {
  if (now_ns() < single_threaded_until_ns.load(std::memory_order_relaxed)) {
#if defined(_OPENMP)
    previous_threads_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
}

ThreadBudget::Scope::~Scope() {
#if defined(_OPENMP)
  if (previous_threads_ > 0) {
    omp_set_num_threads(previous_threads_);
  }
#endif
}

double ThreadBudget::backoff_seconds_left() {
  return std::max<int64_t>(single_threaded_until_ns.load(std::memory_order_relaxed) - now_ns(), 0) * 1e-9;
}

void ThreadBudget::record(double wall_seconds, double idle_seconds) {
  const bool contended = idle_seconds > kContendedFraction * wall_seconds && idle_seconds > kMinIdleSeconds;
  if (!contended) {
    backoff_ns.store(0, std::memory_order_relaxed);
    return;
  }
  const int64_t next = std::clamp<int64_t>(2 * backoff_ns.load(std::memory_order_relaxed),
                                           static_cast<int64_t>(kMinBackoffSeconds * 1e9),
                                           static_cast<int64_t>(kMaxBackoffSeconds * 1e9));
  backoff_ns.store(next, std::memory_order_relaxed);
  single_threaded_until_ns.store(now_ns() + next, std::memory_order_relaxed);
}

double thread_cpu_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) {
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
#endif
  return -1.0;
}

}  // namespace pcdeq::cpu
