// The interface between the op layer (ops_cuda.cu: checks, dtype and engine choice, operand
// preparation) and the per-engine solvers (dense_<engine>.cu, built from dense_solve_impl.cuh).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace pcdeq::cuda {

using SolveOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Which loop runs a solve. kAuto: the single-launch kernel when its shared memory fits and W is small
// enough to stream from L2 every step (and, for the batch rule, the batch is one CTA); else stepwise.
// PCDEQ_CUDA_PATH=single|stepwise forces one (single falls back, with a warning, when it cannot run).
enum class DensePath { kAuto, kSingleLaunch, kStepwise };

// One prepared problem. Every tensor is contiguous and on one CUDA device.
struct DenseProblem {
  at::Tensor m;      // (dp, dp) in the engine's operand dtype, dp = d rounded up to 16, zero padded:
                     // W^T (forward) or W (adjoint), so that the step is x_next = epilogue(x @ m)
  at::Tensor side0;  // (B, d) state dtype: u (forward) or v (adjoint)
  at::Tensor side1;  // (B, d) state dtype: D (adjoint); undefined for the forward map
  at::Tensor x0;     // (B, d) state dtype: the initial state
  int mode = 0;      // the map id (pcdeq/map_ids.h): an activation id (forward), or kAdjoint (< 0)
  double tol = 1e-4;
  int64_t max_iter = 0;
  bool batch_stop = false;
  DensePath path = DensePath::kAuto;
};

// (state (B, d) in the state dtype, iterations int32 (B,), residual (B,) state dtype, converged bool (B,))
SolveOutputs solve_dense_tf32(const DenseProblem& problem);       // float32 state, tf32 tensor cores
SolveOutputs solve_dense_f16(const DenseProblem& problem);        // float32 state, fp16 operands
SolveOutputs solve_dense_bf16(const DenseProblem& problem);       // float32 state, bf16 operands
SolveOutputs solve_dense_simt_f32(const DenseProblem& problem);   // float32 on CUDA cores (exact fp32)
SolveOutputs solve_dense_simt_f64(const DenseProblem& problem);   // float64 on CUDA cores

}  // namespace pcdeq::cuda
