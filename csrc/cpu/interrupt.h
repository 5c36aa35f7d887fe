// Ctrl-C for the CPU solve loops.
//
// The ops run without the GIL, so Python's SIGINT handler (which only sets a flag that the interpreter
// acts on between bytecodes) cannot stop a solve: with max_iter = 10**9 on a problem that never
// converges, Ctrl-C would wait for the end. The loops therefore call poll() once per step on the
// thread that called the op; about every kPollInterval of wall time it takes the GIL and runs
// PyErr_CheckSignals(). When a handler raises (Ctrl-C: KeyboardInterrupt), the exception is kept,
// every thread of the solve stops at its next step (stopped() is an atomic flag), and after the loops
// have left their parallel regions the calling thread calls rethrow_if_interrupted(), which throws
// it on as torch's python_error: the op's caller sees the KeyboardInterrupt itself.
//
// The clock (20 ns a read) is read every step, or for tiny steps every `stride` steps, the stride set
// from the loop's estimate of a step's work (set_step_work) so that a read comes about every 5 us of
// work. Fixed, not adapted to measured times: when the steps slow down (another process takes the
// cores, and a fork/join per step waits for a descheduled thread), a stride grown on fast steps would
// delay the next read by as many slow steps (seen: 1 s).
//
// Python runs signal handlers on its main thread only: a solve called from another thread is not
// interrupted (PyErr_CheckSignals does nothing there); without a Python interpreter (the library
// loaded by a C++ program) the check never runs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

namespace pcdeq::cpu {

class Interrupt {
 public:
  Interrupt();  // on the thread that called the op
  ~Interrupt();
  Interrupt(const Interrupt&) = delete;
  Interrupt& operator=(const Interrupt&) = delete;

  // Whether the calling thread is the one that polls (the op's caller).
  bool polls_here() const { return std::this_thread::get_id() == owner_; }

  // The work of one step, in the units of solver.cpp's thread model (about 4 ps each on one core).
  void set_step_work(int64_t work);

  // Once per step, on the thread that polls: whether the solve must stop (a signal handler raised).
  bool poll() {
    if (++calls_ < stride_) {
      return stopped();
    }
    calls_ = 0;
    return poll_clock();
  }

  // On any thread: whether the solve was interrupted.
  bool stopped() const { return stopped_.load(std::memory_order_relaxed); }

  // On the polling thread, once no other thread of the solve works on it any more: throws the
  // Python exception a signal handler raised, if any.
  void rethrow_if_interrupted();

  // The polling thread, done with its own share of a parallel solve, waits until `done()` (checked
  // under the lock; the other threads call notify() when they change it), polling meanwhile.
  template <class Done>
  void wait_polling(const Done& done) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!done()) {
      lock.unlock();
      const bool stop = poll_clock();
      lock.lock();
      if (stop) {
        return;
      }
      wake_.wait_for(lock, kPollInterval, done);
    }
  }
  void notify() {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr auto kPollInterval = std::chrono::milliseconds(50);

  bool poll_clock();     // reads the clock; checks for signals once kPollInterval has passed
  bool check_signals();  // takes the GIL, runs PyErr_CheckSignals(), keeps what a handler raised

  struct PendingError;                    // the Python exception (interrupt.cpp: Python headers)
  std::unique_ptr<PendingError> error_;
  const std::thread::id owner_;
  const bool enabled_;                    // a Python interpreter is running
  std::atomic<bool> stopped_{false};
  int64_t calls_ = 0, stride_ = 1;        // polls since the last clock read, and between reads
  Clock::time_point last_check_;
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace pcdeq::cpu
