// How many threads a multithreaded CPU solve gets: what its work size allows, unless recent solves
// found the machine's cores contended, in which case one for a while.
//
// Why: torch's OpenMP threads wait by spinning. On a machine where another busy process shares the
// cores, a two-thread solve often loses one of its threads for a scheduler time slice: the calling
// thread descheduled while the other spins at the region's barrier (holding the core the caller
// could move to), or the other descheduled with rows in hand while the caller waits. Measured on a
// 2-core machine beside one busy process (benchmarks/results/cpu-threads-under-load-*.json): at
// B=128, d=128 two threads had a median of 0.30 ms but a mean of 1.8 ms (one thread: 0.52 ms, mean
// 0.52 ms), and at every size up to B=1024, d=256 the two-thread mean was worse than one thread's.
// Work size alone cannot choose: the same sizes gain 1.6-2x from the second thread when the cores
// are free.
//
// So each multithreaded solve measures, on the calling thread, how much of its wall time the caller
// spent not computing: off the CPU (descheduled, or asleep waiting for the other threads) plus, under
// the whole-batch rule, spinning at the per-step joins. Above kContendedFraction of the wall time
// and above kMinIdleSeconds (the stalls in question are scheduler time slices, milliseconds; a small
// solve's caller waits tens of microseconds for the last group on a free machine, or for a thread
// that wakes late) the solve counts as contended, and every solve op for the next
// `backoff` seconds runs on one thread (Scope below); `backoff` doubles with each contended probe,
// from kMinBackoffSeconds up to kMaxBackoffSeconds, and resets on an uncontended one. A backoff is a
// duration, not a number of solves, because what a contended probe costs is a scheduler time slice
// (milliseconds) whatever the solve's size: under lasting contention one probe a second costs about
// 1%. On a free machine a solve's caller waits at most for the last group of rows (about 1/8 of the
// work with 2 threads), below the threshold. The state is process-wide (contention is the machine's)
// and lock-free.
//
// The thread count does not change results: every sample's iteration is computed the same way
// whichever thread runs it.
#pragma once

#include <cstdint>

namespace pcdeq::cpu {

class ThreadBudget {
 public:
  static constexpr double kContendedFraction = 0.3;
  static constexpr double kMinIdleSeconds = 200e-6;
  static constexpr double kMinBackoffSeconds = 0.01;
  static constexpr double kMaxBackoffSeconds = 1.0;

  // Seconds left in the current backoff (0: solves get the threads their work allows).
  static double backoff_seconds_left();

  // After a solve that ran on several threads: its wall time, and how much of it the calling thread
  // spent not computing its own rows.
  static void record(double wall_seconds, double idle_seconds);

  // For the duration of one solve op (an RAII scope on the op's calling thread): during a backoff, it
  // sets torch's thread count on this thread to 1 (OpenMP's per-thread
  // setting, which at::get_num_threads reads), so that every parallel region of the op, the solver's
  // and torch's own (a zero fill, a copy), runs inline: a region would wake torch's other threads,
  // which then spin for milliseconds beside the solve.
  class Scope {
   public:
    Scope();
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    int previous_threads_ = 0;  // 0: nothing changed
  };
};

// Seconds of CPU time the calling thread has used; -1 where the platform has no per-thread clock
// (the solver then records nothing: every solve counts as uncontended).
double thread_cpu_seconds();

}  // namespace pcdeq::cpu
