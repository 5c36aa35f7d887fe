// The convolutional CUDA solves (conv_solve.cu): pcdeq_C::forward_solve / adjoint_solve for a 3x3
// kernel of shape (C, C, 3, 3) and states of shape (B, C, H, W). ops_cuda.cu routes every call whose
// weight has 4 dimensions here, once it has checked the arguments (pcdeq/op_checks.h, and the GPU's
// compute capability) and made the input's device current.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "dense_solve.cuh"  // SolveOutputs

namespace pcdeq::cuda {

// z = act(conv2d(z, W, padding=1) + u) from z0 (zeros if absent).
SolveOutputs conv_forward_solve(
    const at::Tensor& u,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& z0,
    int64_t activation,
    double tol,
    int64_t max_iter,
    bool batch_stop);

// h = D * (conv_transpose2d(h, W, padding=1) + v) from h_0 = D * v.
SolveOutputs conv_adjoint_solve(
    const at::Tensor& v,
    const at::Tensor& weight,
    const at::Tensor& D,
    double tol,
    int64_t max_iter,
    bool batch_stop);

}  // namespace pcdeq::cuda
