// The CPU fixed-point loops for convolutional pcDEQ problems (u, v of shape (B, C, H, W), weight
// (C, C, 3, 3)), called by the entry points in solver.cpp once the inputs are checked:
//
//     forward   z_{k+1} = act(conv3x3(z_k, W) + u)                  conv2d(z, W, padding=1)
//     adjoint   h_{k+1} = D * (conv_transpose3x3(h_k, W) + v)       conv_transpose2d(h, W, padding=1)
//
// with the stopping rule of solver.h, per image. Every tensor here is already in the compute dtype
// (float or double) and channels-last contiguous; `x` is the initial state, owned by the loop, which
// updates it in place and returns it as the result.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "solver.h"

namespace pcdeq::cpu {

SolveOutputs conv_forward_iterate(
    at::Tensor x, at::Tensor u, const at::Tensor& weight, int64_t activation, double tol, int64_t max_iter,
    bool batch_stop);

SolveOutputs conv_adjoint_iterate(
    at::Tensor x, at::Tensor v, at::Tensor D, const at::Tensor& weight, double tol, int64_t max_iter,
    bool batch_stop);

}  // namespace pcdeq::cpu
