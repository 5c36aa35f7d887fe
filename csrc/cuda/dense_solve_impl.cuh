// Host side of the dense solvers: picks the single-launch or the stepwise loop and launches the
// kernels of dense_kernels.cuh for one engine. Included by one dense_<engine>.cu per engine (so the
// engines compile in parallel); see dense_solve.cuh for the interface.
//
// Single launch (dense_solve_block_kernel): ceil(B / 16) CTAs, each iterating its 16 rows to the end in
// shared memory; no host synchronisation at all. Used when the CTA's shared memory fits the device
// (checked here, raising the dynamic limit with cudaFuncSetAttribute above 48 KB) and W is at most
// kSingleLaunchMaxWeightBytes (every CTA streams all of W from L2 at every step, so for large W a grid
// of 64 x 64 tiles, where each CTA reads only its slice of W, is faster). The batch rule needs a
// reduction over the whole batch after every step, so it runs here only when the batch is one CTA.
//
// Stepwise: per step, dense_step_kernel over (B/64) x (dp/64) tiles (per-row squared norms summed in
// double), then dense_finalize_kernel (one CTA) updates the per-row counts, residuals and stop flags
// and the number of active rows, all on the device. The host reads that number back every kHostCheckEvery steps only (one 4-byte copy and a
// stream sync); launches after the end are no-ops (the kernels read the count first). A row's state
// ping-pongs between two buffers and stays put once it stops, so the final state of row b is in
// buffer iterations[b] & 1 (dense_gather_kernel); stopped rows cost nothing but their share of the
// matmul tiles that still hold an active row.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <limits>

#include "dense_kernels.cuh"
#include "dense_solve.cuh"
#include "op_checks.cuh"

namespace pcdeq::cuda {

// Stepwise loop: read the device's active-row count every this many steps.
constexpr int kHostCheckEvery = 8;
// Auto path: single launch only if W (in the operand dtype, padded) is at most this large.
constexpr size_t kSingleLaunchMaxWeightBytes = size_t{1} << 20;
constexpr size_t kDefaultSmemLimit = 48 * 1024;

template <class E, int MODE>
SolveOutputs run_dense(const DenseProblem& pr) {
  using S = typename E::State;
  using Op = typename E::Operand;
  const int64_t batch = pr.x0.size(0);
  const int64_t d = pr.x0.size(1);
  const int64_t dp = pr.m.size(0);
  TORCH_INTERNAL_ASSERT(dp % kPad == 0 && dp >= d && batch > 0 && d > 0);
  TORCH_CHECK(batch <= INT_MAX && dp <= INT_MAX / 2, "pcdeq cuda: problem too large (B = ", batch, ", d = ", d, ")");
  const auto options = pr.x0.options();
  at::Tensor out = at::empty({batch, d}, options);
  at::Tensor iterations = at::zeros({batch}, options.dtype(at::kInt));
  at::Tensor residual = at::full({batch}, std::numeric_limits<double>::infinity(), options);
  at::Tensor converged = at::zeros({batch}, options.dtype(at::kBool));
  const int max_iter = static_cast<int>(std::min<int64_t>(pr.max_iter, INT_MAX));
  const S tol = static_cast<S>(pr.tol);  // the reference compares r < tol in the state dtype
  const int device = pr.x0.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const Op* m = reinterpret_cast<const Op*>(pr.m.const_data_ptr());
  const S* side0 = pr.side0.const_data_ptr<S>();
  const S* side1 = pr.side1.defined() ? pr.side1.const_data_ptr<S>() : nullptr;

  // --- single launch ---
  const int64_t row_blocks = (batch + kBlockRows - 1) / kBlockRows;
  if (pr.path != DensePath::kStepwise && (!pr.batch_stop || row_blocks == 1)) {
    const int tiles = static_cast<int>(dp / 16);
    const int rounds = (tiles + kMaxBlockWarps - 1) / kMaxBlockWarps;  // tiles per warp, balanced
    const int warps = (tiles + rounds - 1) / rounds;
    const BlockLayout<E> layout(static_cast<int>(dp), warps);
    int smem_limit = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const bool fits = layout.bytes <= static_cast<size_t>(smem_limit);
    const bool worth = pr.path == DensePath::kSingleLaunch ||
        static_cast<size_t>(dp * dp) * sizeof(Op) <= kSingleLaunchMaxWeightBytes;
    if (fits && worth) {
      auto kernel = dense_solve_block_kernel<E, MODE>;
      if (layout.bytes > kDefaultSmemLimit) {
        // The attribute (per kernel and device) is a cap, not a reservation: raise it to the device's
        // opt-in maximum once. Raising it to each launch's size would let two host threads with
        // different d lower it under each other's launch.
        static std::array<std::atomic<bool>, 64> raised{};
        if (device >= static_cast<int>(raised.size()) || !raised[device].load()) {
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
          if (device < static_cast<int>(raised.size())) {
            raised[device].store(true);
          }
        }
      }
      BlockParams<E> p{};
      p.batch = static_cast<int>(batch);
      p.d = static_cast<int>(d);
      p.dp = static_cast<int>(dp);
      p.m = m;
      p.side0 = side0;
      p.side1 = side1;
      p.x0 = pr.x0.const_data_ptr<S>();
      p.out = out.data_ptr<S>();
      p.iterations = iterations.data_ptr<int>();
      p.residual = residual.data_ptr<S>();
      p.converged = converged.data_ptr<bool>();
      p.tol = tol;
      p.max_iter = max_iter;
      p.batch_stop = pr.batch_stop;
      kernel<<<static_cast<unsigned>(row_blocks), warps * 32, layout.bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return {out, iterations, residual, converged};
    }
    if (pr.path == DensePath::kSingleLaunch) {
      TORCH_WARN("PCDEQ_CUDA_PATH=single: a 16-row block of this problem (d = ", d, ") needs ", layout.bytes,
                 " bytes of shared memory, more than the device's ", smem_limit,
                 "; running the stepwise loop instead");
    }
  } else if (pr.path == DensePath::kSingleLaunch) {
    TORCH_WARN("PCDEQ_CUDA_PATH=single: stop='batch' over more than one 16-row block needs a whole-batch ",
               "reduction every step, which one launch cannot make; running the stepwise loop instead");
  }

  // --- stepwise ---
  check_not_capturing(stream);
  at::Tensor x = at::zeros({2, batch, dp}, options);  // padding columns stay 0 forever
  x[0].narrow(1, 0, d).copy_(pr.x0);
  at::Tensor ops;  // the operand copies (HalfEngine)
  if constexpr (E::kSeparateOperand) {
    ops = at::zeros({2, batch, dp}, options.dtype(pr.m.scalar_type()));
    ops[0].copy_(x[0]);  // round to nearest, as the kernels' conversions
  }
  at::Tensor active = at::ones({batch}, options.dtype(at::kByte));
  at::Tensor sums = at::zeros({batch, 2}, options.dtype(at::kDouble));  // squared norms, summed in double
  at::Tensor num_active = at::full({1}, batch, options.dtype(at::kInt));

  S* xb[2] = {x[0].data_ptr<S>(), x[1].data_ptr<S>()};
  Op* ob[2] = {nullptr, nullptr};
  if constexpr (E::kSeparateOperand) {
    ob[0] = reinterpret_cast<Op*>(ops[0].data_ptr());
    ob[1] = reinterpret_cast<Op*>(ops[1].data_ptr());
  }
  StepParams<E> p{};
  p.batch = static_cast<int>(batch);
  p.d = static_cast<int>(d);
  p.dp = static_cast<int>(dp);
  p.m = m;
  p.side0 = side0;
  p.side1 = side1;
  p.active = active.const_data_ptr<uint8_t>();
  p.sums = sums.data_ptr<double>();
  p.num_active = num_active.const_data_ptr<int>();
  const dim3 grid(static_cast<unsigned>((batch + kStepBM - 1) / kStepBM), static_cast<unsigned>((dp + kStepBN - 1) / kStepBN));
  int* iterations_ptr = iterations.data_ptr<int>();
  S* residual_ptr = residual.data_ptr<S>();
  bool* converged_ptr = converged.data_ptr<bool>();
  uint8_t* active_ptr = active.data_ptr<uint8_t>();
  int* num_active_ptr = num_active.data_ptr<int>();

  for (int step = 0; step < max_iter; ++step) {
    const int cur = step & 1;
    p.x_cur = xb[cur];
    p.x_next = xb[cur ^ 1];
    if constexpr (E::kSeparateOperand) {
      p.a = ob[cur];
      p.op_next = ob[cur ^ 1];
    } else {
      p.a = reinterpret_cast<const Op*>(xb[cur]);
      p.op_next = nullptr;
    }
    dense_step_kernel<E, MODE><<<grid, kStepThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dense_finalize_kernel<S><<<1, kFinalizeThreads, 0, stream>>>(
        p.batch, p.sums, active_ptr, iterations_ptr, residual_ptr, converged_ptr, tol, pr.batch_stop, num_active_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if ((step + 1) % kHostCheckEvery == 0 && step + 1 < max_iter) {
      int host_active = 0;
      C10_CUDA_CHECK(cudaMemcpyAsync(&host_active, num_active_ptr, sizeof(int), cudaMemcpyDeviceToHost, stream));
      C10_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (host_active == 0) {
        break;
      }
    }
  }
  const int64_t total = batch * d;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 4096));
  dense_gather_kernel<S><<<blocks, threads, 0, stream>>>(
      p.batch, p.d, p.dp, xb[0], xb[1], iterations.const_data_ptr<int>(), out.data_ptr<S>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, iterations, residual, converged};
}

// One instantiation per map id (every activation of the table, and the adjoint).
template <class E>
SolveOutputs solve_dense(const DenseProblem& pr) {
  return dispatch_map_id</*kWithAdjoint=*/true>(
      "pcdeq cuda", pr.mode, [&](auto map) { return run_dense<E, decltype(map)::value>(pr); });
}

}  // namespace pcdeq::cuda
