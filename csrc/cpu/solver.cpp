// The CPU solve loops (see solver.h for the mathematics and the stopping rule).
//
// One iteration is two passes over the active rows:
//   1. acc = x @ M through torch's BLAS (at::mm_out into a preallocated buffer; M = W^T forward,
//      W adjoint), and
//   2. one fused pass that forms the next state (act(acc + u), or D * (acc + v)), overwrites x with
//      it, and reduces the row's ||x_next - x||^2 and ||x_next||^2.
// Threads: the active rows are cut into one block per thread (at::parallel_for over blocks) and
// each thread runs both passes on its block: its own single-threaded BLAS call, then the fused pass
// while its block of acc is still in its cache. That is one fork/join per iteration instead of
// BLAS's plus the pass's, worth ~20% at the paper's size (B=64, d=80) and neutral at large sizes.
// Matmuls too small to be worth splitting stay in one block, where BLAS may thread internally.
//
// Samples are independent, so with the per-sample rule a converged row leaves the computation: its
// state is written to its original index in the result and the last active row is moved into its
// slot (a copy of one row per finished sample). The active rows thus stay packed at the top of
// every buffer and the matmul shrinks with them, so early exits save real work. Nothing is
// allocated inside the loop except, when the active count drops, the blocks' narrowed views.
#include "solver.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <pcdeq/activations.h>

#include "vec_activations.h"

namespace pcdeq::cpu {
namespace {

// The official code's denominator guard (pcdeq_kernels.reference.RESIDUAL_EPS).
constexpr double kResidualEps = 1e-5;
// A row block's matmul must be at least this many flops (about 2 microseconds of one core) for the
// rows to be split across threads: below it a fork/join costs as much as it saves.
constexpr int64_t kMinBlockFlops = 200000;

// The two maps as epilogues of the matmul. `rows` holds the per-row side inputs, packed alongside x.
template <int ACT>
struct ForwardStep {  // x_next = act(acc + u)
  static constexpr int kInputs = 1;  // u
  template <typename T>
  static Vec<T> vec(const Vec<T>& acc, const T* const* rows, int64_t j) {
    return activation_vec<ACT, T>(acc + Vec<T>::loadu(rows[0] + j));
  }
  template <typename T>
  static T scalar(T acc, const T* const* rows, int64_t j) {
    return activation<ACT, T>(acc + rows[0][j]);
  }
};

struct AdjointStep {  // x_next = D * (acc + v)
  static constexpr int kInputs = 2;  // v, D
  template <typename T>
  static Vec<T> vec(const Vec<T>& acc, const T* const* rows, int64_t j) {
    return Vec<T>::loadu(rows[1] + j) * (acc + Vec<T>::loadu(rows[0] + j));
  }
  template <typename T>
  static T scalar(T acc, const T* const* rows, int64_t j) {
    return rows[1][j] * (acc + rows[0][j]);
  }
};

template <typename T>
double sum_lanes(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  double total = 0;
  for (int l = 0; l < Vec<T>::size(); ++l) {
    total += lanes[l];
  }
  return total;
}

// The fused pass on one row of length d: x <- Step(acc, rows); returns ||x_next - x||^2 and
// ||x_next||^2 through the last two arguments. The difference is taken in T, as the reference does;
// the squares accumulate per SIMD lane in T and across lanes in double.
template <class Step, typename T>
inline void update_row(const T* acc, T* x, const T* const* rows, int64_t d, double* sq_diff, double* sq_norm) {
  using V = Vec<T>;
  V lane_diff(T(0));
  V lane_norm(T(0));
  int64_t j = 0;
  for (; j + V::size() <= d; j += V::size()) {
    const V next = Step::template vec<T>(V::loadu(acc + j), rows, j);
    const V diff = next - V::loadu(x + j);
    lane_diff = at::vec::fmadd(diff, diff, lane_diff);
    lane_norm = at::vec::fmadd(next, next, lane_norm);
    next.store(x + j);
  }
  double sd = sum_lanes(lane_diff);
  double sn = sum_lanes(lane_norm);
  for (; j < d; ++j) {  // the row's tail, shorter than one vector: the shared scalar math
    const T next = Step::template scalar<T>(acc[j], rows, j);
    const double diff = static_cast<double>(next - x[j]);
    sd += diff * diff;
    sn += static_cast<double>(next) * static_cast<double>(next);
    x[j] = next;
  }
  *sq_diff = sd;
  *sq_norm = sn;
}

// ||x_next - x|| / (||x_next|| + 1e-5), rounded to the state dtype as the reference computes it.
template <typename T>
T relative_residual(double sq_diff, double sq_norm) {
  return static_cast<T>(std::sqrt(sq_diff) / (std::sqrt(sq_norm) + kResidualEps));
}

// Iterate x <- Step(x @ matrix, inputs) with the stopping rule of solver.h.
//   x:       (B, d) initial state, contiguous, owned: overwritten (and reordered) in place.
//   inputs:  (B, d) side inputs, contiguous; reordered in place with x unless batch_stop (then
//            they may alias the caller's tensors, which are only read).
//   matrix:  (d, d), W^T (a transposed view: BLAS reads it in place) or W.
template <typename T, class Step>
SolveOutputs iterate(
    at::Tensor x,
    std::array<at::Tensor, Step::kInputs> inputs,
    const at::Tensor& matrix,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const int64_t batch = x.size(0);
  const int64_t d = x.size(1);
  const auto options = x.options();
  const T tol_t = static_cast<T>(tol);  // the reference compares r < tol in the residual's dtype

  at::Tensor acc = at::empty({batch, d}, options);
  at::Tensor iterations = at::zeros({batch}, options.dtype(at::kInt));
  at::Tensor residual = at::full({batch}, std::numeric_limits<double>::infinity(), options);
  at::Tensor converged = at::zeros({batch}, options.dtype(at::kBool));
  // batch_stop keeps every row in place, so x itself ends as the result; otherwise rows are
  // written here, to their original index, as they finish.
  at::Tensor result = batch_stop ? x : at::empty_like(x);

  T* x_data = x.data_ptr<T>();
  const T* acc_data = acc.const_data_ptr<T>();
  T* result_data = result.data_ptr<T>();
  int32_t* iterations_data = iterations.data_ptr<int32_t>();
  T* residual_data = residual.data_ptr<T>();
  bool* converged_data = converged.data_ptr<bool>();
  std::array<T*, Step::kInputs> input_data;
  for (int k = 0; k < Step::kInputs; ++k) {
    input_data[k] = inputs[k].template data_ptr<T>();
  }

  // Per packed row: its sample index, and the squared norms of its last step.
  std::vector<int64_t> origin(batch);
  std::iota(origin.begin(), origin.end(), int64_t{0});
  std::vector<double> sq_diff(batch, 0.0);
  std::vector<double> sq_norm(batch, 0.0);
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(T);

  int64_t active = batch;  // rows [0, active) of x and inputs are the unfinished samples

  // Row blocks of the active rows, one per thread at most; recut when the active count changes.
  struct Block {
    at::Tensor x, acc;  // views of rows [begin, end)
    int64_t begin, end;
  };
  std::vector<Block> blocks;
  const int64_t min_block_rows = std::max<int64_t>(1, kMinBlockFlops / std::max<int64_t>(1, 2 * d * d));
  auto cut_blocks = [&]() {
    const int64_t worth = (active + min_block_rows - 1) / min_block_rows;
    const int64_t count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), worth));
    const int64_t rows = (active + count - 1) / count;
    blocks.clear();
    for (int64_t begin = 0; begin < active; begin += rows) {
      const int64_t end = std::min(begin + rows, active);
      blocks.push_back({x.narrow(0, begin, end - begin), acc.narrow(0, begin, end - begin), begin, end});
    }
  };
  cut_blocks();

  // The worker threads call at::mm_out, a dispatcher op: they must see this thread's dispatch state
  // (autograd keys already excluded by the caller, grad and inference mode), not their own defaults,
  // or mm_out would e.g. refuse a weight that requires grad.
  const at::ThreadLocalState caller_state;

  int64_t steps = 0;
  bool batch_converged = false;
  while (steps < max_iter && active > 0) {
    ++steps;
    // grain 1: every block is worth a thread (a single block runs inline, without a fork)
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      for (int64_t k = first; k < last; ++k) {
        Block& block = blocks[k];
        at::mm_out(block.acc, block.x, matrix);
        for (int64_t i = block.begin; i < block.end; ++i) {
          std::array<const T*, Step::kInputs> rows;
          for (int m = 0; m < Step::kInputs; ++m) {
            rows[m] = input_data[m] + i * d;
          }
          update_row<Step, T>(acc_data + i * d, x_data + i * d, rows.data(), d, &sq_diff[i], &sq_norm[i]);
        }
      }
    });

    if (batch_stop) {  // the whole-batch ratio (Frobenius norms): all rows go on or stop together
      const double total_diff = std::accumulate(sq_diff.begin(), sq_diff.end(), 0.0);
      const double total_norm = std::accumulate(sq_norm.begin(), sq_norm.end(), 0.0);
      if (relative_residual<T>(total_diff, total_norm) < tol_t) {  // NaN compares false
        batch_converged = true;
        break;
      }
      continue;
    }

    // Per sample: retire the rows that met the rule; the last active row takes each one's slot.
    const int64_t active_before = active;
    int64_t i = 0;
    while (i < active) {
      const T r = relative_residual<T>(sq_diff[i], sq_norm[i]);
      if (!(r < tol_t)) {  // a NaN residual never counts as converged
        ++i;
        continue;
      }
      const int64_t b = origin[i];
      residual_data[b] = r;
      iterations_data[b] = static_cast<int32_t>(steps);
      converged_data[b] = true;
      std::memcpy(result_data + b * d, x_data + i * d, row_bytes);
      --active;
      if (i != active) {  // move the last active row here; it is examined next, at index i
        std::memcpy(x_data + i * d, x_data + active * d, row_bytes);
        for (int k = 0; k < Step::kInputs; ++k) {
          std::memcpy(input_data[k] + i * d, input_data[k] + active * d, row_bytes);
        }
        origin[i] = origin[active];
        sq_diff[i] = sq_diff[active];
        sq_norm[i] = sq_norm[active];
      }
    }
    if (active != active_before && active > 0) {
      cut_blocks();
    }
  }

  // Rows still active ran all `steps` iterations (all rows, under batch_stop); their residual is
  // that of their last step. Under the per-sample rule their state still has to go home.
  for (int64_t i = 0; i < active; ++i) {
    const int64_t b = origin[i];
    iterations_data[b] = static_cast<int32_t>(steps);
    if (steps > 0) {
      residual_data[b] = relative_residual<T>(sq_diff[i], sq_norm[i]);
    }
    if (!batch_stop) {
      std::memcpy(result_data + b * d, x_data + i * d, row_bytes);
    }
  }
  if (batch_converged) {
    converged.fill_(true);
  }
  return {result, iterations, residual, converged};
}

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_dense(const char* op, const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(
      x.device().is_cpu() && weight.device().is_cpu(),
      op, ": the cpu backend needs CPU tensors; got ", name, " on ", x.device(), " and weight on ",
      weight.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": ", name, " has dtype ", dtype, "; pcDEQ solves float16, bfloat16, float32 or float64");
  TORCH_CHECK(
      weight.scalar_type() == dtype,
      op, ": ", name, " is ", dtype, " but weight is ", weight.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(
      x.dim() == 2 && weight.dim() == 2 && weight.size(0) == weight.size(1) && x.size(1) == weight.size(0),
      op, ": dense pcDEQ needs ", name, " of shape (B, d) and weight (d, d); got ", name, " ", x.sizes(),
      ", weight ", weight.sizes());
}

void check_options(const char* op, double tol, int64_t max_iter) {
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK(!std::isnan(tol), op, ": tol must be a number, got NaN");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(
      t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes(),
      op, ": ", name, " must match ", x_name, " (shape ", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
      "); got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
}

// A contiguous copy in the compute dtype that the solver may reorder (needed unless batch_stop).
at::Tensor working_copy(const at::Tensor& t, at::ScalarType dtype, bool batch_stop) {
  at::Tensor c = t.to(dtype).contiguous();
  if (!batch_stop && c.is_alias_of(t)) {
    c = c.clone();
  }
  return c;
}

template <typename T>
SolveOutputs forward_dispatch(int64_t activation, at::Tensor x, at::Tensor u, const at::Tensor& w_t, double tol,
                              int64_t max_iter, bool batch_stop) {
  switch (activation) {
    case TANH: return iterate<T, ForwardStep<TANH>>(x, {u}, w_t, tol, max_iter, batch_stop);
    case SOFTSIGN: return iterate<T, ForwardStep<SOFTSIGN>>(x, {u}, w_t, tol, max_iter, batch_stop);
    case RELU6: return iterate<T, ForwardStep<RELU6>>(x, {u}, w_t, tol, max_iter, batch_stop);
    default: return iterate<T, ForwardStep<SIGMOID>>(x, {u}, w_t, tol, max_iter, batch_stop);
  }
}

SolveOutputs cast_state(SolveOutputs out, at::ScalarType dtype) {
  std::get<0>(out) = std::get<0>(out).to(dtype);
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
  constexpr const char* op = "pcdeq_C::forward_solve";
  check_dense(op, "u", u, weight);
  check_options(op, tol, max_iter);
  TORCH_CHECK(
      is_valid_activation(static_cast<int>(activation)),
      op, ": unknown activation id ", activation, " (0 tanh, 1 softsign, 2 relu6, 3 sigmoid)");
  if (z0.has_value()) {
    check_like(op, "z0", *z0, u, "u");
  }
  const auto dtype = compute_dtype(u.scalar_type());
  at::Tensor u_c = working_copy(u, dtype, batch_stop);
  // z @ W^T: a transposed view of a contiguous W, which BLAS reads without a copy.
  at::Tensor w_t = weight.to(dtype).contiguous().t();
  at::Tensor x = at::empty_like(u_c);  // the state is always our own buffer: it is overwritten
  if (z0.has_value()) {
    x.copy_(*z0);
  } else {
    x.zero_();
  }
  SolveOutputs out = dtype == at::kDouble
      ? forward_dispatch<double>(activation, x, u_c, w_t, tol, max_iter, batch_stop)
      : forward_dispatch<float>(activation, x, u_c, w_t, tol, max_iter, batch_stop);
  return cast_state(std::move(out), u.scalar_type());
}

SolveOutputs adjoint_solve(
    const at::Tensor& v,
    const at::Tensor& weight,
    const at::Tensor& D,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  constexpr const char* op = "pcdeq_C::adjoint_solve";
  check_dense(op, "v", v, weight);
  check_options(op, tol, max_iter);
  check_like(op, "D", D, v, "v");
  const auto dtype = compute_dtype(v.scalar_type());
  at::Tensor v_c = working_copy(v, dtype, batch_stop);
  at::Tensor d_c = working_copy(D, dtype, batch_stop);
  at::Tensor w = weight.to(dtype).contiguous();  // h @ W
  at::Tensor x = at::mul(d_c, v_c);               // h_0 = D * v, a fresh buffer
  SolveOutputs out = dtype == at::kDouble
      ? iterate<double, AdjointStep>(x, {v_c, d_c}, w, tol, max_iter, batch_stop)
      : iterate<float, AdjointStep>(x, {v_c, d_c}, w, tol, max_iter, batch_stop);
  return cast_state(std::move(out), v.scalar_type());
}

}  // namespace pcdeq::cpu
