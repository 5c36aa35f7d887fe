// Registration of the compiled solvers as the torch ops pcdeq_C::forward_solve / adjoint_solve.
//
// The schemas are defined once here; each device adds its kernels under the same names with its own
// TORCH_LIBRARY_IMPL block (CPU below; a CUDA build adds `TORCH_LIBRARY_IMPL(pcdeq_C, CUDA, m)` in
// csrc/cuda/). pcdeq_kernels/backends/compiled.py registers the fake (meta) kernels and calls the ops.
// Every kernel checks its arguments with pcdeq/op_checks.h (check_forward_args, check_adjoint_args).
#include <Python.h>
#include <torch/library.h>

#include "cpu/eager_solve.h"
#include "cpu/solve_checks.h"
#include "cpu/solver.h"
#include "cpu/thread_budget.h"

// `import pcdeq_kernels._C` loads this library, which runs the registrations below. The Python
// module itself is empty: the ops live under torch.ops.pcdeq_C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // doc
      -1,       // per-interpreter state size: none
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pcdeq_C, m) {
  // activation: an activation id, pcdeq_kernels.activations kernel_id (the list: pcdeq/map_ids.h).
  // tol: positive and finite; max_iter: >= 1 (as the Python options).
  // batch_stop: false for the per-sample rule ("sample"), true for the whole-batch one ("batch").
  // Returns (z*, iterations int32 (B,), residual (B,), converged bool (B,)).
  m.def(
      "forward_solve(Tensor u, Tensor weight, Tensor? z0, int activation, float tol, int max_iter, "
      "bool batch_stop) -> (Tensor, Tensor, Tensor, Tensor)");
  // Solves h = D * (h @ W + v) from h_0 = D * v. Returns (h*, iterations, residual, converged).
  m.def(
      "adjoint_solve(Tensor v, Tensor weight, Tensor D, float tol, int max_iter, bool batch_stop) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The op layer's checks around a CPU solve (cpu/solve_checks.h): whether u, weight and z0 are finite
  // and >= 0 (and, with nonzero_rows, every sample of u has a positive entry); and what the
  // non-convergence policy must report after a solve, as bits (1: a sample did not converge, 2: the
  // stopping rule's guard decided a converged sample), 0 for nothing.
  m.def("inputs_are_valid(Tensor u, Tensor weight, Tensor? z0, bool nonzero_rows) -> bool");
  m.def("solve_report(Tensor state, Tensor converged, Tensor residual, float tol, float eps) -> int");
  // A whole eager CPU solve in one call (cpu/eager_solve.h): the checks of inputs_are_valid, forward_solve
  // with the implicit gradient attached in C++, and the forward's report. jfb: Jacobian-free backward;
  // spec: the SolveSpec key, for the backward's non-convergence report. Returns forward_solve's four
  // outputs, the backward's iterations and residual (which the backward fills in) and a status (4:
  // invalid inputs, nothing solved; else solve_report's bits). Eager only: no fake kernel.
  // Seconds left of the cpu backend's single-thread backoff after contended solves (cpu/thread_budget.h).
  m.def("thread_backoff_seconds() -> float", [] { return pcdeq::cpu::ThreadBudget::backoff_seconds_left(); });
  m.def(
      "eager_solve(Tensor u, Tensor weight, Tensor? z0, int activation, float tol, int max_iter, "
      "bool batch_stop, float backward_tol, int backward_max_iter, bool jfb, str spec) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int)");
}

TORCH_LIBRARY_IMPL(pcdeq_C, CPU, m) {
  m.impl("forward_solve", &pcdeq::cpu::forward_solve);
  m.impl("adjoint_solve", &pcdeq::cpu::adjoint_solve);
  m.impl("inputs_are_valid", &pcdeq::cpu::inputs_are_valid);
  m.impl("solve_report", &pcdeq::cpu::solve_report);
  m.impl("eager_solve", &pcdeq::cpu::eager_solve);  // (reached below autograd: inference-mode tensors)
}

// eager_solve attaches its own autograd node (a torch::autograd::Function), so it is its own Autograd kernel.
TORCH_LIBRARY_IMPL(pcdeq_C, Autograd, m) {
  m.impl("eager_solve", &pcdeq::cpu::eager_solve);
}
