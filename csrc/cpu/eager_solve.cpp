// See eager_solve.h.
#include "eager_solve.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <pcdeq/activations.h>
#include <pcdeq/op_checks.h>

#include <cmath>

#include "solve_checks.h"
#include "solver.h"
#include "vec_activations.h"

namespace pcdeq::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kResidualEps = 1e-5;  // the stopping rule's guard (pcdeq_kernels/reference.py RESIDUAL_EPS)

// In place: x <- act'(x) over a dense (contiguous or channels-last) float or double tensor.
void apply_derivative_(at::Tensor& x, int64_t activation) {
  TORCH_INTERNAL_ASSERT(x.is_non_overlapping_and_dense());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pcdeq_activation_derivative", [&] {
    using V = Vec<scalar_t>;
    scalar_t* data = x.mutable_data_ptr<scalar_t>();
    const bool known = visit_activation(activation, [&](auto act) {
      constexpr int ACT = decltype(act)::value;
      at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
        int64_t i = begin;
        for (; i + V::size() <= end; i += V::size()) {
          activation_derivative_vec<ACT, scalar_t>(V::loadu(data + i)).store(data + i);
        }
        for (; i < end; ++i) {
          data[i] = activation_derivative<ACT, scalar_t>(data[i]);
        }
      });
    });
    TORCH_CHECK(known, "pcdeq_C::eager_solve: unknown activation id ", activation);
  });
}

// L^T-side weight gradient: h^T z (dense) or the correlation of h with z (conv, as conv2d's own backward).
at::Tensor weight_grad(const at::Tensor& h, const at::Tensor& z, const at::Tensor& weight) {
  if (weight.dim() == 2) {
    return h.t().mm(z);
  }
  return std::get<1>(at::convolution_backward(h, z, weight, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                              {false, true, false}));
}

// The solver's dtype: float64 stays float64, everything else is solved in float32 (reference.solver_dtype).
at::ScalarType solver_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The message of functional._FixedPoint.backward for the same refusal (tests/test_gradients.py checks
// that the two paths agree).
constexpr const char* kFirstOrderOnly =
    "pcDEQ layers give first-order gradients only: this backward was asked to build a graph "
    "(torch.autograd.grad(..., create_graph=True), a double backward, a gradient penalty or a "
    "Hessian-vector product through z*), and the implicit gradient is a fixed-point solve that is "
    "not differentiated itself. Compute such terms without create_graph through the pcDEQ layer";

void report_nonconvergence(const at::Tensor& state, const at::Tensor& converged, const at::Tensor& residual,
                           const std::string& spec) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pcdeq::report_nonconvergence", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                         c10::string_view)>();
  op.call(state, converged, residual, "backward", spec);
}

// The backward statistics before a backward has run: 0 iterations, residual NaN (as SolverStats's).
std::tuple<at::Tensor, at::Tensor> unset_backward_stats(const at::Tensor& iterations, const at::Tensor& residual) {
  return {at::zeros_like(iterations), at::full_like(residual, NAN)};
}

}  // namespace

// The autograd node's type (named, not anonymous: torch shows it as z.grad_fn's name).
struct FixedPoint : public torch::autograd::Function<FixedPoint> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& weight,
                               const std::optional<at::Tensor>& z0, int64_t activation, double tol, int64_t max_iter,
                               bool batch_stop, double backward_tol, int64_t backward_max_iter, bool jfb,
                               c10::string_view spec) {
    auto [z, iterations, residual, converged] = forward_solve(u, weight, z0, activation, tol, max_iter, batch_stop);
    auto [backward_iterations, backward_residual] = unset_backward_stats(iterations, residual);
    ctx->save_for_backward({u, weight, z});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["backward_tol"] = backward_tol;
    ctx->saved_data["backward_max_iter"] = backward_max_iter;
    ctx->saved_data["batch_stop"] = batch_stop;
    ctx->saved_data["jfb"] = jfb;
    ctx->saved_data["spec"] = std::string(spec);
    ctx->saved_data["backward_iterations"] = backward_iterations;
    ctx->saved_data["backward_residual"] = backward_residual;
    ctx->mark_non_differentiable({iterations, residual, converged, backward_iterations, backward_residual});
    ctx->set_materialize_grads(false);  // (no zero tensors made for the statistics' gradients)
    return {z, iterations, residual, converged, backward_iterations, backward_residual};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const size_t num_inputs = 11;
    variable_list out(num_inputs);
    at::Tensor grad_z = grads[0];
    if (!grad_z.defined()) {
      return out;  // z* was not used: nothing flows back
    }
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor u = saved[0], weight = saved[1], z = saved[2];
    TORCH_CHECK(!(at::GradMode::is_enabled() &&
                  (grad_z.requires_grad() || u.requires_grad() || weight.requires_grad() || z.requires_grad())),
                kFirstOrderOnly);
    // The solve runs in its inputs' precision, never autocast's (as functional._without_autocast).
    const NoAutocastGuard no_autocast;
    auto& data = ctx->saved_data;
    if (z.dim() == 4) {  // conv: the solvers' layout (channels-last), converted once
      u = u.contiguous(at::MemoryFormat::ChannelsLast);
      z = z.contiguous(at::MemoryFormat::ChannelsLast);
      grad_z = grad_z.contiguous(at::MemoryFormat::ChannelsLast);
    }
    const at::ScalarType dtype = solver_dtype(u.scalar_type());
    const at::Tensor weight_ = weight.to(dtype);
    const at::Tensor z_ = z.to(dtype);
    const at::Tensor D = activation_derivative_at(z_, u.to(dtype), weight_, data["activation"].toInt());
    const at::Tensor v = grad_z.to(dtype);
    at::Tensor h;
    if (data["jfb"].toBool()) {
      h = D * v;
    } else {
      const double tol = data["backward_tol"].toDouble();
      auto [state, iterations, residual, converged] =
          adjoint_solve(v, weight_, D, tol, data["backward_max_iter"].toInt(), data["batch_stop"].toBool());
      data["backward_iterations"].toTensor().copy_(iterations);
      data["backward_residual"].toTensor().copy_(residual);
      if (solve_report(state, converged, residual, tol, kResidualEps) != 0) {
        report_nonconvergence(state, converged, residual, data["spec"].toStringRef());
      }
      h = state;
    }
    if (ctx->needs_input_grad(0)) {
      out[0] = h.to(u.scalar_type());
    }
    if (ctx->needs_input_grad(1)) {
      out[1] = weight_grad(h, z_, weight_).to(weight.scalar_type());
    }
    return out;
  }
};

at::Tensor activation_derivative_at(const at::Tensor& z, const at::Tensor& u, const at::Tensor& weight,
                                    int64_t activation) {
  // pre = L(z) + u, made in a new buffer that then becomes D in place
  at::Tensor pre = weight.dim() == 2 ? at::addmm(u, z, weight.t()) : at::conv2d(z, weight, {}, 1, 1).add_(u);
  if (!pre.is_non_overlapping_and_dense()) {
    pre = pre.contiguous();
  }
  apply_derivative_(pre, activation);
  return pre;
}

EagerSolveOutputs eager_solve(const at::Tensor& u, const at::Tensor& weight, const std::optional<at::Tensor>& z0,
                              int64_t activation, double tol, int64_t max_iter, bool batch_stop, double backward_tol,
                              int64_t backward_max_iter, bool jfb, c10::string_view spec) {
  // (forward_solve checks these again; the backward's options are checked here, not at backward time)
  check_forward_args(c10::DeviceType::CPU, u, weight, z0, activation, tol, max_iter);
  detail::check_options("pcdeq_C::eager_solve (the backward's options)", backward_tol, backward_max_iter);
  TORCH_CHECK(u.size(0) > 0, "pcdeq_C::eager_solve: an empty batch is the op layer's to answer");
  bool zero_at_zero = false;  // act(0) = 0: then a sample whose u is all 0 is refused (solve_checks.h)
  visit_activation(activation, [&](auto act) {
    zero_at_zero = pcdeq::activation<decltype(act)::value, float>(0.0f) == 0.0f;
  });
  if (!inputs_are_valid(u, weight, z0, zero_at_zero)) {
    return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), kInvalidInputs};
  }
  const NoAutocastGuard no_autocast;
  variable_list out;
  if (at::GradMode::is_enabled() && (u.requires_grad() || weight.requires_grad())) {
    out = FixedPoint::apply(u, weight, z0, activation, tol, max_iter, batch_stop, backward_tol,
                                     backward_max_iter, jfb, spec);
  } else {  // nothing to differentiate: the solve alone (Function::apply would still build its context)
    auto [z, iterations, residual, converged] = forward_solve(u, weight, z0, activation, tol, max_iter, batch_stop);
    auto [backward_iterations, backward_residual] = unset_backward_stats(iterations, residual);
    out = {z, iterations, residual, converged, backward_iterations, backward_residual};
  }
  const int64_t report = solve_report(out[0], out[3], out[2], tol, kResidualEps);
  return {out[0], out[1], out[2], out[3], out[4], out[5], report};
}

}  // namespace pcdeq::cpu
