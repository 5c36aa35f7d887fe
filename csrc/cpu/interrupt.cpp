// Ctrl-C for the CPU solve loops (see interrupt.h). The only file of the CPU backend that includes
// Python's and torch's Python headers.
#include "interrupt.h"

#include <Python.h>
#include <torch/csrc/Exceptions.h>

#include <algorithm>

namespace pcdeq::cpu {

// torch's carrier for a Python exception through C++: the dispatcher and pybind11 let it pass, and
// torch's exception translation restores it as the Python exception it holds (KeyboardInterrupt stays
// KeyboardInterrupt, where a c10::Error would become a RuntimeError).
struct Interrupt::PendingError {
  python_error error;
};

namespace {
// A clock read about every this much work (5 us at 4 ps a unit), and at least every kMaxStride steps.
constexpr int64_t kWorkPerClockRead = 1250000;
constexpr int64_t kMaxStride = 256;
}  // namespace

Interrupt::Interrupt()
    : owner_(std::this_thread::get_id()), enabled_(Py_IsInitialized() != 0), last_check_(Clock::now()) {}

Interrupt::~Interrupt() = default;

void Interrupt::set_step_work(int64_t work) {
  stride_ = std::clamp<int64_t>(kWorkPerClockRead / std::max<int64_t>(work, 1), 1, kMaxStride);
}

bool Interrupt::poll_clock() {
  if (!enabled_) {
    return false;
  }
  const auto now = Clock::now();
  if (now - last_check_ < kPollInterval) {
    return stopped();
  }
  last_check_ = now;
  return check_signals();
}

bool Interrupt::check_signals() {
  if (stopped()) {
    return true;
  }
  const PyGILState_STATE gil = PyGILState_Ensure();
  if (PyErr_CheckSignals() != 0) {
    error_ = std::make_unique<PendingError>();
    error_->error.persist();  // takes the exception out of the thread state, to be thrown later
    stopped_.store(true, std::memory_order_relaxed);
  }
  PyGILState_Release(gil);
  return stopped();
}

void Interrupt::rethrow_if_interrupted() {
  if (error_ != nullptr) {
    python_error error = std::move(error_->error);
    error_.reset();
    throw error;
  }
}

}  // namespace pcdeq::cpu
