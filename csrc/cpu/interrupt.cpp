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
// Bounds of the number of polls between clock reads.
constexpr int64_t kMaxStride = int64_t{1} << 20;
}  // namespace

Interrupt::Interrupt()
    : owner_(std::this_thread::get_id()), enabled_(Py_IsInitialized() != 0), last_read_(Clock::now()),
      last_check_(last_read_) {
  if (!enabled_) {
    stride_ = kMaxStride;
  }
}

Interrupt::~Interrupt() = default;

bool Interrupt::poll_clock() {
  calls_ = 0;
  if (!enabled_) {
    return false;
  }
  const auto now = Clock::now();
  const auto since_read = now - last_read_;
  last_read_ = now;
  // a clock read about every millisecond
  if (since_read < std::chrono::microseconds(500)) {
    stride_ = std::min(2 * stride_, kMaxStride);
  } else if (since_read > std::chrono::milliseconds(2) && stride_ > 1) {
    stride_ /= 2;
  }
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
