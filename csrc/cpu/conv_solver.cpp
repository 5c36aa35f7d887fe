// The CPU solve loops for convolutional problems (see conv_solver.h for the mathematics).
//
// One step of the unfinished images is one convolution on all of them (torch's: oneDNN for float,
// which at these sizes runs close to the cores' FMA peak) followed by one fused, multithreaded pass
// (row_update.h) that forms the next state, writes it over the old one and reduces each image's
// ||x_next - x||^2 and ||x_next||^2 while the data is in cache. Against the plain loop (conv, add,
// activation, subtract, two norms: six passes over the batch and two host reads) that leaves the
// convolution and one pass.
//
// Layout: channels-last (NHWC). oneDNN convolves NHWC tensors directly, while NCHW tensors are
// reordered into its blocked layout and back on every call (measured on the 2-core benchmark
// machine at B=64, C=82, 28x28: 15.5 ms per convolution in NHWC against 31 ms in NCHW). Each image is
// one contiguous run of C*H*W entries in either layout, so the fused pass treats an image exactly as
// the dense loop treats a row.
//
// Per-image early exit: under the per-sample rule an image that stops (converged, or its residual not
// finite) leaves the working set: its state is written to the result and the unfinished images are
// moved down (one copy per image, only when some image has finished), so the next convolution runs
// on the unfinished ones only. Until the first image finishes, the working set is the result itself
// (no copy); after that it lives in buffers of our own, since the inputs may be the caller's tensors.
//
// Ctrl-C: the loop runs on the calling thread, which polls for Python signals once per step
// (interrupt.h) and raises what a handler raised.
#include "conv_solver.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "interrupt.h"
#include "row_update.h"

namespace pcdeq::cpu {
namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// The fused pass cuts each image into runs of at least this many entries when there are fewer
// images than threads (a run costs a task's overhead, ~1 us, against ~2 ns per entry).
constexpr int64_t kMinRun = 16384;

template <typename T, class Step>
class ConvIteration {
 public:
  ConvIteration(at::Tensor x, std::array<at::Tensor, Step::kInputs> inputs, const at::Tensor& weight, bool transpose,
                double tol, int64_t max_iter, bool batch_stop)
      : result_(x),
        work_(std::move(x)),
        inputs_(std::move(inputs)),
        weight_(weight.contiguous(kChannelsLast)),
        transpose_(transpose),
        batch_(result_.size(0)),
        image_(result_.numel() / std::max<int64_t>(batch_, 1)),
        tol_(static_cast<T>(tol)),  // the reference compares r < tol in the residual's dtype
        max_iter_(max_iter),
        batch_stop_(batch_stop),
        ids_(batch_),
        sq_diff_(batch_, 0.0),
        sq_norm_(batch_, 0.0) {
    const auto options = result_.options();
    iterations_ = at::empty({batch_}, options.dtype(at::kInt));
    residual_ = at::full({batch_}, std::numeric_limits<T>::infinity(), options);
    converged_ = at::zeros({batch_}, options.dtype(at::kBool));
    std::iota(ids_.begin(), ids_.end(), int64_t{0});
  }

  SolveOutputs run() {
    int64_t steps = 0;
    Verdict batch = Verdict::kGoOn;  // the whole-batch rule's, of the last step
    while (steps < max_iter_ && !ids_.empty() && batch == Verdict::kGoOn && !interrupt_.poll()) {
      ++steps;
      step();
      if (batch_stop_) {
        const double diff = std::accumulate(sq_diff_.begin(), sq_diff_.end(), 0.0);
        const double norm = std::accumulate(sq_norm_.begin(), sq_norm_.end(), 0.0);
        batch = verdict(relative_residual<T>(diff, norm), tol_);
      } else {
        retire_stopped(steps);
      }
    }
    interrupt_.rethrow_if_interrupted();
    // The unfinished images (every image under the whole-batch rule) ran all `steps` steps.
    for (int64_t slot = 0; slot < static_cast<int64_t>(ids_.size()); ++slot) {
      finish(slot, steps, batch == Verdict::kConverged);
    }
    return {result_, iterations_, residual_, converged_};
  }

 private:
  // One map application to the working set: work <- Step(L(work), inputs), and per image the squared
  // sums of the fused pass.
  void step() {
    at::Tensor acc = transpose_ ? at::conv_transpose2d(work_, weight_, {}, 1, 1) : at::conv2d(work_, weight_, {}, 1, 1);
    acc = acc.contiguous(kChannelsLast);  // a no-op for oneDNN; the float64 path may return NCHW
    const T* acc_data = acc.template const_data_ptr<T>();
    T* x_data = work_.template data_ptr<T>();
    std::array<const T*, Step::kInputs> in_data;
    for (int k = 0; k < Step::kInputs; ++k) {
      in_data[k] = inputs_[k].template const_data_ptr<T>();
    }
    const int64_t images = static_cast<int64_t>(ids_.size());
    // Runs per image: one, unless there are fewer images than threads.
    const int64_t threads = at::get_num_threads();
    const int64_t runs = images >= threads ? 1 : std::clamp<int64_t>(image_ / kMinRun, 1, (threads + images - 1) / images);
    const int64_t width = Vec<T>::size();
    const int64_t run_len = (image_ / runs + width - 1) / width * width;  // whole vectors, but the last
    run_diff_.assign(images * runs, 0.0);
    run_norm_.assign(images * runs, 0.0);
    at::parallel_for(0, images * runs, 1, [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t begin = (task / runs) * image_ + (task % runs) * run_len;
        const int64_t len = std::min(run_len, image_ - (task % runs) * run_len);
        if (len <= 0) {
          continue;
        }
        std::array<const T*, Step::kInputs> rows;
        for (int k = 0; k < Step::kInputs; ++k) {
          rows[k] = in_data[k] + begin;
        }
        update_row<Step, T>(acc_data + begin, x_data + begin, rows.data(), len, &run_diff_[task], &run_norm_[task]);
      }
    });
    for (int64_t slot = 0; slot < images; ++slot) {
      sq_diff_[slot] = std::accumulate(run_diff_.begin() + slot * runs, run_diff_.begin() + (slot + 1) * runs, 0.0);
      sq_norm_[slot] = std::accumulate(run_norm_.begin() + slot * runs, run_norm_.begin() + (slot + 1) * runs, 0.0);
    }
  }

  // The per-sample rule: images that converge, or whose residual is not finite (unconverged), are
  // written out and leave the working set.
  void retire_stopped(int64_t steps) {
    std::vector<int64_t> keep;
    keep.reserve(ids_.size());
    for (int64_t slot = 0; slot < static_cast<int64_t>(ids_.size()); ++slot) {
      const Verdict v = verdict(relative_residual<T>(sq_diff_[slot], sq_norm_[slot]), tol_);
      if (v == Verdict::kGoOn) {
        keep.push_back(slot);
      } else {
        finish(slot, steps, v == Verdict::kConverged);
      }
    }
    if (keep.size() < ids_.size()) {
      compact(keep);
    }
  }

  // Records an image's count, residual and flag, and puts its state in the result.
  void finish(int64_t slot, int64_t steps, bool converged) {
    const int64_t b = ids_[slot];
    iterations_.template data_ptr<int32_t>()[b] = static_cast<int32_t>(steps);
    if (steps > 0) {
      residual_.template data_ptr<T>()[b] = relative_residual<T>(sq_diff_[slot], sq_norm_[slot]);
    }
    converged_.template data_ptr<bool>()[b] = converged;
    if (owns_work_) {
      copy_image(result_, b, work_, slot);
    }  // else the working set is the result and the image is already at b
  }

  // Keeps only the working-set slots `keep` (increasing), moved down to 0, 1, ...
  void compact(const std::vector<int64_t>& keep) {
    const int64_t n = static_cast<int64_t>(keep.size());
    std::array<at::Tensor, 1 + Step::kInputs> from = {work_};
    for (int k = 0; k < Step::kInputs; ++k) {
      from[k + 1] = inputs_[k];
    }
    for (auto& t : from) {
      // The first time, into buffers of our own (the working set is the result, the inputs may be the
      // caller's); after that in place: slot keep[j] >= j, so each move reads a slot not yet written.
      at::Tensor to = owns_work_ ? t : at::empty_like(t, t.options(), kChannelsLast);
      for (int64_t j = 0; j < n; ++j) {
        if (owns_work_ && keep[j] == j) {
          continue;
        }
        copy_image(to, j, t, keep[j]);
      }
      t = to.narrow(0, 0, n);
    }
    work_ = from[0];
    for (int k = 0; k < Step::kInputs; ++k) {
      inputs_[k] = from[k + 1];
    }
    owns_work_ = true;
    for (int64_t j = 0; j < n; ++j) {
      ids_[j] = ids_[keep[j]];
      sq_diff_[j] = sq_diff_[keep[j]];
      sq_norm_[j] = sq_norm_[keep[j]];
    }
    ids_.resize(n);
  }

  void copy_image(at::Tensor& to, int64_t to_slot, const at::Tensor& from, int64_t from_slot) const {
    std::memmove(to.template data_ptr<T>() + to_slot * image_, from.template const_data_ptr<T>() + from_slot * image_,
                 static_cast<size_t>(image_) * sizeof(T));
  }

  at::Tensor result_;  // (B, C, H, W): image b's final state at b
  at::Tensor work_;    // the unfinished images, slot by slot (the result itself until one finishes)
  std::array<at::Tensor, Step::kInputs> inputs_;  // u, or v and D, slot by slot like work_
  const at::Tensor weight_;
  const bool transpose_;
  const int64_t batch_, image_;
  const T tol_;
  const int64_t max_iter_;
  const bool batch_stop_;
  bool owns_work_ = false;

  std::vector<int64_t> ids_;                // the image in each working-set slot
  std::vector<double> sq_diff_, sq_norm_;   // per slot, of the last step
  std::vector<double> run_diff_, run_norm_;  // per run of the fused pass
  at::Tensor iterations_, residual_, converged_;
  Interrupt interrupt_;  // made on the op's calling thread, which polls
};

template <typename T, class Step>
SolveOutputs iterate(at::Tensor x, std::array<at::Tensor, Step::kInputs> inputs, const at::Tensor& weight,
                     bool transpose, double tol, int64_t max_iter, bool batch_stop) {
  return ConvIteration<T, Step>(std::move(x), std::move(inputs), weight, transpose, tol, max_iter, batch_stop).run();
}

}  // namespace

SolveOutputs conv_forward_iterate(
    at::Tensor x, at::Tensor u, const at::Tensor& weight, int64_t activation, double tol, int64_t max_iter,
    bool batch_stop) {
  return with_forward_step(activation, [&](auto step) {
    using Step = decltype(step);
    return x.scalar_type() == at::kDouble
        ? iterate<double, Step>(x, {u}, weight, false, tol, max_iter, batch_stop)
        : iterate<float, Step>(x, {u}, weight, false, tol, max_iter, batch_stop);
  });
}

SolveOutputs conv_adjoint_iterate(
    at::Tensor x, at::Tensor v, at::Tensor D, const at::Tensor& weight, double tol, int64_t max_iter,
    bool batch_stop) {
  return x.scalar_type() == at::kDouble
      ? iterate<double, AdjointStep>(x, {v, D}, weight, true, tol, max_iter, batch_stop)
      : iterate<float, AdjointStep>(x, {v, D}, weight, true, tol, max_iter, batch_stop);
}

}  // namespace pcdeq::cpu
