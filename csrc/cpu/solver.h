// The CPU fixed-point solvers, dense (u, v of shape (B, d), weight (d, d)) and convolutional (u, v of
// shape (B, C, H, W), weight (C, C, 3, 3); conv_solver.h):
//
//     forward   z_{k+1} = act(L(z_k) + u)          z_0 = z0, or 0      L(z) = z @ W^T, or conv3x3(z, W)
//     adjoint   h_{k+1} = D * (L^T(h_k) + v)       h_0 = D * v
//
// with the stopping rule of pcdeq_kernels/reference.py (the specification): per sample b,
// r_b = ||x_{k+1,b} - x_{k,b}|| / (||x_{k+1,b}|| + 1e-5), its squared norms summed in double and NaN
// when a sum is not finite; with batch_stop = false each sample stops (state and count freeze) once
// r_b < tol (converged), or unconverged once r_b is not finite; with batch_stop = true all stop
// together once the same ratio over the whole batch is < tol (converged) or not finite
// (unconverged); at most max_iter steps. Ctrl-C stops a solve within about 50 ms (interrupt.h): the
// op raises the KeyboardInterrupt.
//
// Both return (state in the input dtype and memory format, iterations int32 (B,), residual (B,) float32 or float64,
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
