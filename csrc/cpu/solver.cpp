// The CPU solve loops (see solver.h for the mathematics and the stopping rule).
//
// One step of a sample is a row of x times M (M = W^T forward, W adjoint) followed by a fused pass
// that forms the next state (act(acc + u), or D * (acc + v)), writes it over the row and reduces
// the row's ||x_next - x||^2 and ||x_next||^2. The matmul is
//   - for d <= kMaxPackedDim, a register-blocked kernel (small_gemm.h) on M packed once per solve,
//     four rows at a time; each tile of rows goes through the fused pass while its output is still
//     in L1. At the paper's size (B=64, d=80) this is ~2x faster per step than a BLAS call, which
//     re-packs M and pays its dispatch every time; with MKL on the AMD machine we measure on (MKL
//     takes its AVX2 path there) it stays faster up to d = 1024;
//   - above it, one BLAS call (at::mm_out) per step on all the active rows (gathered into a
//     contiguous buffer once they are no longer consecutive), made from the calling thread so that
//     BLAS uses its own threads on the whole batch, then the fused pass over the rows in parallel.
//
// The state lives in the result tensor, row b = sample b, from start to end. Under the per-sample
// rule a sample that stops (converged, or its residual not finite) just leaves its group's list of
// active rows: its state is already in place and the matmul shrinks with the active set.
//
// Ctrl-C (interrupt.h): the calling thread polls for Python signals once per step of the rows it
// iterates (and, done with its groups, while it waits for the other threads'); every thread stops at
// its next step once a handler raised, and the exception is thrown after the parallel region.
//
// Threads for the packed kernel (at::parallel_for, i.e. torch's OpenMP pool and its thread count),
// only when the batch gives each one a full tile of rows and enough work per step. (Not for BLAS:
// inside a parallel region it runs single-threaded, and each group's call would re-pack all of M for
// a fraction of the rows: 0.85x the official loop's one call at B=256, d=4096, 2 cores.)
//   - per-sample rule: samples are independent, so the rows are cut into groups and each group is
//     iterated to convergence by one thread, with no synchronisation per step. There are a few
//     groups per thread, handed out on demand, so that a thread that wakes up late or a group
//     that converges early does not leave the other thread idle at the end.
//   - whole-batch rule: every step needs the ratio over the whole batch, so the rows are cut into
//     one block per thread, joined after every step (one fork/join per step).
// A multithreaded solve reports how long its calling thread was not computing (thread_budget.h):
// when other processes contend for the cores, the solves that follow run on one thread for a while.
#include "solver.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include <pcdeq/activations.h>
#include <pcdeq/op_checks.h>

#include "conv_solver.h"
#include "interrupt.h"
#include "row_update.h"
#include "small_gemm.h"
#include "thread_budget.h"

namespace pcdeq::cpu {
namespace {

// The largest d solved with the packed register-blocked kernel; BLAS above. Measured on an AMD
// EPYC (Zen 5, AVX-512) with torch's MKL, which takes its AVX2 path there: the packed kernel is
// ~2x faster at d <= 512 and ~1.5x at 1024 (float32 and float64); BLAS wins at d = 2048, where M
// (16 MB) no longer fits in the caches the kernel streams it from. With MKL's AVX-512 path (Intel
// CPUs) the crossover is probably lower, but at the paper's sizes the per-call re-packing and
// dispatch of BLAS dominate anyway.
constexpr int64_t kMaxPackedDim = 1024;

// Threads. A row's step costs about 2 d^2 + 90 d + 2500 flops' worth (the matmul, the fused pass,
// and the per-row overhead, in units of ~4 ps: the kernel's flop rate on one core). A thread is
// worth its start-up (~1 us once per solve) and the caches it warms when it gets at least this much
// per step; under the whole-batch rule, when it pays for a fork/join every step.
constexpr int64_t kMinThreadWork = 150000;
constexpr int64_t kMinThreadWorkBatchStop = 250000;
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Groups of rows per thread under the per-sample rule (see the file comment).
constexpr int64_t kGroupsPerThread = 4;
// The BLAS path's fused pass goes parallel in chunks of at least this many elements (a few
// microseconds of work each, well above a parallel_for's cost).
constexpr int64_t kMinFusedPassWork = 16384;

// Iterate x <- Step(x @ M, inputs) with the stopping rule of solver.h.
//   x:       (B, d) initial state, contiguous, owned: updated in place and returned as the result.
//   inputs:  (B, d) side inputs, contiguous, only read.
//   weight:  (d, d) contiguous W; M = W^T if `transpose` (forward), else W (adjoint).
template <typename T, class Step>
class Iteration {
 public:
  Iteration(at::Tensor x, std::array<at::Tensor, Step::kInputs> inputs, const at::Tensor& weight, bool transpose,
            double tol, int64_t max_iter, bool batch_stop)
      : x_(std::move(x)),
        inputs_(std::move(inputs)),
        batch_(x_.size(0)),
        d_(x_.size(1)),
        tol_(static_cast<T>(tol)),  // the reference compares r < tol in the residual's dtype
        max_iter_(max_iter),
        batch_stop_(batch_stop),
        active_(batch_),
        sq_diff_(batch_, 0.0),
        sq_norm_(batch_, 0.0) {
    const auto options = x_.options();
    // Every sample's count and flag are written when it finishes; the residual once a step is taken
    // (always: max_iter >= 1 is checked; inf until then, as the reference starts).
    iterations_ = at::empty({batch_}, options.dtype(at::kInt));
    residual_ = at::empty({batch_}, options);
    converged_ = at::empty({batch_}, options.dtype(at::kBool));
    x_data_ = x_.template data_ptr<T>();
    iterations_data_ = iterations_.template data_ptr<int32_t>();
    residual_data_ = residual_.template data_ptr<T>();
    converged_data_ = converged_.template data_ptr<bool>();
    std::fill(residual_data_, residual_data_ + batch_, std::numeric_limits<T>::infinity());
    std::fill(converged_data_, converged_data_ + batch_, false);
    for (int k = 0; k < Step::kInputs; ++k) {
      input_data_[k] = inputs_[k].template const_data_ptr<T>();
    }
    std::iota(active_.begin(), active_.end(), int64_t{0});
    if (d_ <= kMaxPackedDim) {
      packed_.emplace(weight, transpose);
    } else {
      matrix_ = transpose ? weight.t() : weight;  // BLAS reads the transposed view in place
    }
    // Threads (packed kernel only): as many as give each one at least a full row tile and enough work
    // per step (torch's thread count is 1 while recent solves found the cores contended: see
    // thread_budget.h). BLAS runs on the calling thread and threads itself.
    const int64_t work_per_row = 2 * d_ * d_ + 90 * d_ + 2500;
    const int64_t min_work = batch_stop_ ? kMinThreadWorkBatchStop : kMinThreadWork;
    threads_ = 1;
    if (packed_) {
      threads_ = std::clamp<int64_t>(std::min(batch_ / kTileRows, batch_ * work_per_row / min_work), 1,
                                     at::get_num_threads());
    }
    // Groups of rows: with one thread, one group; under the whole-batch rule, one per thread; else
    // several per thread, handed out on demand (see run()).
    int64_t groups = threads_;
    if (!batch_stop_ && threads_ > 1) {
      const int64_t tiles = (batch_ + kTileRows - 1) / kTileRows;
      groups = std::min(tiles, kGroupsPerThread * threads_);
    }
    for (int64_t k = 0; k <= groups; ++k) {
      bounds_.push_back(batch_ * k / groups);
    }
    const int64_t max_rows = (batch_ + groups - 1) / groups;
    for (int64_t k = 0; k < threads_; ++k) {
      scratch_.push_back(make_scratch(max_rows));
    }
    // Ctrl-C: the polling thread's step is a group's rows, or under the whole-batch rule every row
    interrupt_.set_step_work((batch_stop_ ? batch_ : max_rows) * work_per_row);
  }

  SolveOutputs run() {
    // A multithreaded solve measures how much of its time the calling thread did not compute (see
    // thread_budget.h): its wall time minus its CPU time, plus its spinning at the per-step joins.
    const auto wall_start = std::chrono::steady_clock::now();
    const double cpu_start = threads_ > 1 ? thread_cpu_seconds() : -1.0;
    if (batch_stop_) {
      run_batch_stop();
    } else {
      // Samples are independent: each group of rows is iterated to its end by one thread, with no
      // synchronisation until the solve is over. Threads take the next group as they become free,
      // so a thread that starts late (waking up) or a group that converges fast balances out.
      std::atomic<int64_t> next_group{0};
      std::atomic<int64_t> finished{0};
      const int64_t groups = static_cast<int64_t>(bounds_.size()) - 1;
      parallel_threads([&](int64_t thread) {
        const bool polls = interrupt_.polls_here();
        for (int64_t g = next_group++; g < groups; g = next_group++) {
          run_group(g, scratch_[thread], polls);
          if (++finished == groups) {
            interrupt_.notify();
          }
        }
        // Out of groups, the calling thread keeps polling until the others have finished theirs. (Any
        // group taken is being run: a thread that runs this function after another on the same OS
        // thread finds every group taken and finished.)
        if (polls) {
          interrupt_.wait_polling([&] { return finished.load() == groups; });
        }
      });
    }
    interrupt_.rethrow_if_interrupted();
    if (cpu_start >= 0.0) {
      const double wall = seconds_since(wall_start);
      ThreadBudget::record(wall, wall - (thread_cpu_seconds() - cpu_start) + join_wait_);
    }
    return {x_, iterations_, residual_, converged_};
  }

 private:
  // A thread's working memory: the small-d kernel's output tile, or BLAS's gathered rows and output.
  struct Scratch {
    std::vector<T> tile;
    at::Tensor gathered, acc;
  };

  Scratch make_scratch(int64_t rows) const {
    Scratch s;
    if (packed_) {
      s.tile.resize(kTileRows * packed_->ld);
    } else {
      s.gathered = at::empty({rows, d_}, x_.options());
      s.acc = at::empty({rows, d_}, x_.options());
    }
    return s;
  }

  // f(thread) for thread in [0, threads_), each on its own thread (inline when there is one).
  template <class F>
  void parallel_threads(const F& f) {
    if (threads_ == 1) {
      f(0);
      return;
    }
    at::parallel_for(0, threads_, 1, [&](int64_t first, int64_t last) {
      for (int64_t thread = first; thread < last; ++thread) {
        f(thread);
      }
    });
  }

  // One map application to the samples rows[0:count): x[b] <- Step(x[b] @ M, inputs[b]) in place,
  // and each one's ||x_next - x||^2 and ||x_next||^2.
  void step(const int64_t* rows, int64_t count, Scratch& scratch) {
    if (packed_) {
      const PackedMatrix<T>& m = *packed_;
      for (int64_t i = 0; i < count; i += kTileRows) {
        const int64_t n = std::min<int64_t>(kTileRows, count - i);
        std::array<const T*, kTileRows> a;
        for (int64_t r = 0; r < n; ++r) {
          a[r] = x_data_ + rows[i + r] * d_;
        }
        gemm_rows(a.data(), n, m, scratch.tile.data());  // the tile's rows are read before any is written
        for (int64_t r = 0; r < n; ++r) {
          update(rows[i + r], scratch.tile.data() + r * m.ld);
        }
      }
      return;
    }
    // BLAS: one matmul on the rows, gathered unless they are consecutive (the list is increasing,
    // so they are until a sample of the group converges). The copy is O(count d), the matmul
    // O(count d^2).
    at::Tensor a;
    if (rows[count - 1] - rows[0] == count - 1) {
      a = x_.narrow(0, rows[0], count);
    } else {
      T* gathered = scratch.gathered.template data_ptr<T>();
      for (int64_t i = 0; i < count; ++i) {
        std::memcpy(gathered + i * d_, x_data_ + rows[i] * d_, static_cast<size_t>(d_) * sizeof(T));
      }
      a = scratch.gathered.narrow(0, 0, count);
    }
    at::Tensor acc = scratch.acc.narrow(0, 0, count);
    at::mm_out(acc, a, matrix_);
    const T* acc_data = acc.template const_data_ptr<T>();
    // Rows are independent (each writes its own state and sums): split over torch's threads.
    at::parallel_for(0, count, std::max<int64_t>(1, kMinFusedPassWork / d_), [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        update(rows[i], acc_data + i * d_);
      }
    });
  }

  void update(int64_t b, const T* acc) {
    std::array<const T*, Step::kInputs> in;
    for (int k = 0; k < Step::kInputs; ++k) {
      in[k] = input_data_[k] + b * d_;
    }
    update_row<Step, T>(acc, x_data_ + b * d_, in.data(), d_, &sq_diff_[b], &sq_norm_[b]);
  }

  // The per-sample rule on the block's samples: each one that converges, or whose residual is not
  // finite (unconverged), leaves the block's active list (its state stays where it is, in the
  // result), so the matmul shrinks with the active set. `polls`: this thread polls for Ctrl-C.
  void run_group(int64_t group, Scratch& scratch, bool polls) {
    int64_t* rows = active_.data() + bounds_[group];
    int64_t count = bounds_[group + 1] - bounds_[group];
    int64_t steps = 0;
    while (steps < max_iter_ && count > 0 && !(polls ? interrupt_.poll() : interrupt_.stopped())) {
      ++steps;
      step(rows, count, scratch);
      int64_t kept = 0;  // the list stays in increasing order: rows are read in memory order
      for (int64_t i = 0; i < count; ++i) {
        const int64_t b = rows[i];
        const T r = relative_residual<T>(sq_diff_[b], sq_norm_[b]);
        const Verdict v = verdict(r, tol_);
        if (v == Verdict::kGoOn) {
          rows[kept++] = b;
        } else {
          residual_data_[b] = r;
          iterations_data_[b] = static_cast<int32_t>(steps);
          converged_data_[b] = v == Verdict::kConverged;
        }
      }
      count = kept;
    }
    // Samples still active ran all `steps` iterations; their residual is that of their last step.
    for (int64_t i = 0; i < count; ++i) {
      finish(rows[i], steps);
    }
  }

  void finish(int64_t b, int64_t steps) {
    iterations_data_[b] = static_cast<int32_t>(steps);
    if (steps > 0) {
      residual_data_[b] = relative_residual<T>(sq_diff_[b], sq_norm_[b]);
    }
  }

  // The whole-batch rule: every step needs the ratio over all rows, so the blocks join every step.
  // The batch stops when the ratio meets tol (converged) or is not finite (unconverged).
  void run_batch_stop() {
    int64_t steps = 0;
    Verdict v = Verdict::kGoOn;
    while (steps < max_iter_ && v == Verdict::kGoOn && !interrupt_.poll()) {
      ++steps;
      std::chrono::steady_clock::time_point own_done;  // when the calling thread finished its block
      parallel_threads([&](int64_t block) {  // one group per thread
        step(active_.data() + bounds_[block], bounds_[block + 1] - bounds_[block], scratch_[block]);
        if (threads_ > 1 && interrupt_.polls_here()) {
          own_done = std::chrono::steady_clock::now();
        }
      });
      if (threads_ > 1) {
        join_wait_ += seconds_since(own_done);
      }
      const double total_diff = std::accumulate(sq_diff_.begin(), sq_diff_.end(), 0.0);
      const double total_norm = std::accumulate(sq_norm_.begin(), sq_norm_.end(), 0.0);
      v = verdict(relative_residual<T>(total_diff, total_norm), tol_);
    }
    for (int64_t b = 0; b < batch_; ++b) {
      finish(b, steps);
    }
    if (v == Verdict::kConverged) {
      std::fill(converged_data_, converged_data_ + batch_, true);
    }
  }

  at::Tensor x_;
  std::array<at::Tensor, Step::kInputs> inputs_;
  const int64_t batch_, d_;
  const T tol_;
  const int64_t max_iter_;
  const bool batch_stop_;

  std::optional<PackedMatrix<T>> packed_;  // the small-d kernel's M, or
  at::Tensor matrix_;                      // BLAS's

  at::Tensor iterations_, residual_, converged_;
  T* x_data_;
  int32_t* iterations_data_;
  T* residual_data_;
  bool* converged_data_;
  std::array<const T*, Step::kInputs> input_data_;

  std::vector<int64_t> active_;           // the unfinished samples, block by block
  std::vector<double> sq_diff_, sq_norm_;  // per sample, of its last step
  int64_t threads_;
  std::vector<int64_t> bounds_;           // group k owns active_[bounds_[k], bounds_[k + 1])
  std::vector<Scratch> scratch_;          // one per thread
  double join_wait_ = 0.0;                // the calling thread's seconds at the whole-batch rule's joins
  Interrupt interrupt_;                   // made on the op's calling thread, which polls
};

template <typename T, class Step>
SolveOutputs iterate(at::Tensor x, std::array<at::Tensor, Step::kInputs> inputs, const at::Tensor& weight,
                     bool transpose, double tol, int64_t max_iter, bool batch_stop) {
  return Iteration<T, Step>(std::move(x), std::move(inputs), weight, transpose, tol, max_iter, batch_stop).run();
}

// The loops' memory layout: row-major for dense, channels-last for conv (conv_solver.cpp says why).
at::MemoryFormat solver_layout(const at::Tensor& x) {
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// An input in the compute dtype and the solver's layout: the loops only read it.
at::Tensor as_input(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous(solver_layout(t));
}

// A fresh copy of `t` in the compute dtype and the solver's layout: the loops overwrite the state.
at::Tensor as_state(const at::Tensor& t, at::ScalarType dtype) {
  return at::empty_like(t, t.options().dtype(dtype), solver_layout(t)).copy_(t);
}

// The state back in the input's dtype and memory format (what the op's fake kernel, empty_like,
// promises).
SolveOutputs as_output(SolveOutputs out, const at::Tensor& like) {
  std::get<0>(out) = std::get<0>(out).to(like.scalar_type()).contiguous(like.suggest_memory_format());
  return out;
}

}  // namespace

SolveOutputs forward_solve(
    const at::Tensor& u,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& z0,
    int64_t activation,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const NoAutocastGuard no_autocast;
  const ThreadBudget::Scope threads;
  check_forward_args(c10::DeviceType::CPU, u, weight, z0, activation, tol, max_iter);
  const auto dtype = state_dtype(u.scalar_type());
  at::Tensor u_c = as_input(u, dtype);
  at::Tensor w = weight.to(dtype).contiguous();
  at::Tensor x = z0.has_value() ? as_state(*z0, dtype) : at::zeros_like(u_c);
  if (is_conv_problem(weight)) {
    return as_output(conv_forward_iterate(x, u_c, w, activation, tol, max_iter, batch_stop), u);
  }
  return as_output(with_forward_step(activation, [&](auto step) {  // z @ W^T
    using Step = decltype(step);
    return dtype == at::kDouble ? iterate<double, Step>(x, {u_c}, w, true, tol, max_iter, batch_stop)
                                : iterate<float, Step>(x, {u_c}, w, true, tol, max_iter, batch_stop);
  }), u);
}

SolveOutputs adjoint_solve(
    const at::Tensor& v,
    const at::Tensor& weight,
    const at::Tensor& D,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const NoAutocastGuard no_autocast;
  const ThreadBudget::Scope threads;
  check_adjoint_args(c10::DeviceType::CPU, v, weight, D, tol, max_iter);
  const auto dtype = state_dtype(v.scalar_type());
  at::Tensor v_c = as_input(v, dtype);
  at::Tensor d_c = as_input(D, dtype);
  at::Tensor w = weight.to(dtype).contiguous();
  at::Tensor x = at::mul(d_c, v_c).contiguous(solver_layout(v));  // h_0 = D * v, a fresh buffer
  if (is_conv_problem(weight)) {
    return as_output(conv_adjoint_iterate(x, v_c, d_c, w, tol, max_iter, batch_stop), v);
  }
  return as_output(dtype == at::kDouble  // h @ W
                       ? iterate<double, AdjointStep>(x, {v_c, d_c}, w, false, tol, max_iter, batch_stop)
                       : iterate<float, AdjointStep>(x, {v_c, d_c}, w, false, tol, max_iter, batch_stop),
                   v);
}

}  // namespace pcdeq::cpu
