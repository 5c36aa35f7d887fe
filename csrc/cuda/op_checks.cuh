// Checks and small helpers shared by the CUDA kernels of pcdeq_C::forward_solve / adjoint_solve: the
// dense solves (ops_cuda.cu, dense_solve_impl.cuh) and the convolutional ones (conv_solve.cu). The
// argument checks of every compiled backend are in pcdeq/op_checks.h; the CUDA-only ones (compute
// capability, graph capture) and the trivial-solve outputs are here.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <pcdeq/activations.h>
#include <pcdeq/op_checks.h>

#include "dense_solve.cuh"  // SolveOutputs

namespace pcdeq::cuda {

// The loops that read convergence flags on the host every few steps (the dense stepwise loop, the
// conv loop) cannot be captured in a CUDA graph: say so instead of failing inside the capture.
inline void check_not_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(
      status == cudaStreamCaptureStatusNone,
      "pcdeq cuda: this solve reads convergence flags on the host every few steps and cannot be captured in a "
      "CUDA graph (torch.cuda.graph); run the pcDEQ layer outside the captured region");
}

inline void check_capability(const char* op, const at::Device& device) {
  int major = 0;
  int minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()));
  TORCH_CHECK(
      major >= 8,
      op, ": the cuda backend needs a GPU of compute capability 8.0 or newer (tf32/bf16 tensor cores); ",
      device, " is ", major, ".", minor, ": use backend=\"triton\" or backend=\"reference\"");
}

// Outputs of a solve that has nothing to iterate: an empty batch, or a sample of no elements (every
// step has residual 0 / (0 + 1e-5) = 0, as the CPU backend computes it; max_iter >= 1 is checked).
// x0 (B, ...) is the initial state in the state dtype.
inline SolveOutputs trivial_solve(const at::Tensor& x0, double tol, int64_t max_iter, at::ScalarType out_dtype) {
  const int64_t batch = x0.size(0);
  const auto options = x0.options();
  // the reference compares r < tol in the state dtype (a positive tol may round to 0 in float32)
  const bool stops = x0.scalar_type() == at::kDouble ? 0.0 < tol : 0.0f < static_cast<float>(tol);
  return {
      x0.to(out_dtype, /*non_blocking=*/false, /*copy=*/true),  // never z0 itself: an op's outputs must not alias its inputs
      at::full({batch}, stops ? int64_t{1} : max_iter, options.dtype(at::kInt)),
      at::full({batch}, 0.0, options),
      at::full({batch}, stops, options.dtype(at::kBool)),
  };
}

}  // namespace pcdeq::cuda
