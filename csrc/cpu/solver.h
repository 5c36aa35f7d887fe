// The CPU fixed-point solvers for dense pcDEQ problems (u, v of shape (B, d), weight (d, d)).
//
//     forward   z_{k+1} = act(z_k @ W^T + u)       z_0 = z0, or 0
//     adjoint   h_{k+1} = D * (h_k @ W + v)        h_0 = D * v
//
// with the stopping rule of pcdeq_kernels/reference.py (the specification): per sample b,
// r_b = ||x_{k+1,b} - x_{k,b}|| / (||x_{k+1,b}|| + 1e-5); with batch_stop = false each sample stops
// (state and count freeze) once r_b < tol, with batch_stop = true all stop together once the same
// ratio over the whole batch is < tol; at most max_iter steps.
//
// Both return (state in the input dtype, iterations int32 (B,), residual (B,) float32 or float64,
// converged bool (B,)). float16/bfloat16 inputs are solved in float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace pcdeq::cpu {

using SolveOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SolveOutputs forward_solve(
    const at::Tensor& u,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& z0,
    int64_t activation,
    double tol,
    int64_t max_iter,
    bool batch_stop);

SolveOutputs adjoint_solve(
    const at::Tensor& v,
    const at::Tensor& weight,
    const at::Tensor& D,
    double tol,
    int64_t max_iter,
    bool batch_stop);

}  // namespace pcdeq::cpu
