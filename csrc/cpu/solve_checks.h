// The two whole-tensor checks the op layer (pcdeq_kernels/ops.py) makes around every CPU solve, as one
// pass each with no allocation: in eager PyTorch each is half a dozen reductions, their dispatch and a
// host read, about 20 us a call, which at the paper's size (B=64, d=80) is a sixth of the solve.
// They answer yes or no; the op layer words the error or the warning (on its slower path, only when
// something is wrong), so that the messages exist once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pcdeq::cpu {

// Whether a forward solve's inputs are acceptable: every entry of u, weight and z0 finite and >= 0,
// and, with `nonzero_rows` (activations with act(0) = 0), every sample of u with a positive entry.
// (A NaN fails every comparison, so it counts as "not >= 0".)
bool inputs_are_valid(const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& z0,
                      bool nonzero_rows);

// What the non-convergence policy must look at after a solve, as bits: kSomeUnconverged (a sample's
// flag is false) and kGuardDecided (under the per-sample rule, a converged sample with residual r > 0
// whose state norm n satisfies n * (tol - r) <= r * eps: the stopping rule's +eps guard, not the
// state, decided its convergence). 0: nothing to report.
constexpr int64_t kSomeUnconverged = 1;
constexpr int64_t kGuardDecided = 2;
int64_t solve_report(const at::Tensor& state, const at::Tensor& converged, const at::Tensor& residual, double tol,
                     double eps);

}  // namespace pcdeq::cpu
