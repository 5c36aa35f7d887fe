// A whole eager CPU solve in one op: the input checks, the forward solve, its implicit gradient
// attached in C++, and the non-convergence report. The cpu backend's path for eager calls.
//
//     pcdeq_C::eager_solve(u, weight, z0, activation, tol, max_iter, batch_stop,
//                          backward_tol, backward_max_iter, jfb, spec)
//       -> (z*, iterations, residual, converged, backward_iterations, backward_residual, status)
//
// status: kInvalidInputs when inputs_are_valid (solve_checks.h) refuses u, weight or z0 (nothing is
// solved and the tensors are undefined: the caller words the error), else solve_report's bits for
// the forward solve (0: nothing to report).
//
// Forward: forward_solve (solver.h). When u or weight requires grad (and grad mode is on), an
// autograd node is attached whose backward, for the incoming gradient g = dLoss/dz*, is
//
//     D = act'(L(z*) + u)                       (activation_derivative_at below)
//     h* = D * (L^T(h*) + g)                    (adjoint_solve; jfb: h = D * g)
//     dLoss/du = h*      dLoss/dW = h*^T z*     (dense; the matching correlation for conv)
//
// exactly what pcdeq_kernels/functional.py's _FixedPoint does in Python, which stays the path of every
// other backend and of traced calls (torch.compile, export): this op is eager-only and registered for
// the Autograd key alone. It exists because, at the paper's size (B = 64, d = 80, about 0.3 ms a
// training step on one core), a Python autograd.Function and the Python calls between the kernels
// cost a third of the step.
//
// The two backward statistics are outputs of the forward (zeros and NaN) that the backward fills in,
// as SolverStats expects. After the adjoint solve, when solve_report finds something to report, the
// backward calls the Python op pcdeq::report_nonconvergence(state, converged, residual, "backward",
// spec) (pcdeq_kernels/ops.py), where the non-convergence policy and its messages live; `spec` is the
// SolveSpec key, passed through for it. The forward's report is returned (status) for the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace pcdeq::cpu {

constexpr int64_t kInvalidInputs = 4;  // beside solve_report's bits (1, 2)

using EagerSolveOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t>;

EagerSolveOutputs eager_solve(
    const at::Tensor& u,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& z0,
    int64_t activation,
    double tol,
    int64_t max_iter,
    bool batch_stop,
    double backward_tol,
    int64_t backward_max_iter,
    bool jfb,
    c10::string_view spec);

// D = act'(L(z) + u), in z's dtype (float or double), the layout of u. As the reference's
// activation_derivative_at, with the SIMD formulas of vec_activations.h.
at::Tensor activation_derivative_at(const at::Tensor& z, const at::Tensor& u, const at::Tensor& weight,
                                    int64_t activation);

}  // namespace pcdeq::cpu
