// Input checks of pcdeq_C::forward_solve / adjoint_solve shared by the CPU (csrc/cpu/solver.cpp) and
// CUDA (csrc/cuda/ops_cuda.cu) kernels, so that every compiled backend rejects a bad call with the
// same message, the dispatch from a runtime map id to the kernels' compile-time one, and the
// dispatch state the kernels run in. Host code only (ATen). Each check names the op, the argument and
// the fix.
//
// Each op's kernel starts with one call, check_forward_args or check_adjoint_args (the op's arguments
// in the schema's order, plus the device type the kernel serves), before it touches anything else.
// Every tensor's device is checked: u/v and the weight against the kernel's device type and each
// other, z0/D against u/v. A call with any meta tensor never reaches these kernels (the dispatcher
// sends it to the fake kernel, pcdeq_kernels/backends/compiled.py), which must refuse mixed devices
// with the same words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include <pcdeq/activations.h>

namespace pcdeq {

// Held by each op's kernel for the whole solve. Autocast stays enabled inside a custom op's kernel, so
// the solvers' own tensor ops (torch's convolutions and matmuls) would be recast to float16/bfloat16
// under torch.autocast; the solvers' precision is set by their inputs' dtypes instead (as the
// reference's: half inputs are solved in float32).
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The solver's state dtype: float64 stays float64, the rest is solved in float32 (as the reference).
inline at::ScalarType state_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The problem's kind, from the weight's rank: convolutional for (C, C, 3, 3), else dense ((d, d)).
inline bool is_conv_problem(const at::Tensor& weight) {
  return weight.dim() == 4;
}

// "0 tanh, 1 softsign, ...": the activation ids, from the table (PCDEQ_FOR_EACH_ACTIVATION).
inline std::string activation_id_list() {
  std::string list;
  const auto add = [&list](int id, std::string name) {
    for (char& c : name) {
      c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    list += (list.empty() ? "" : ", ") + std::to_string(id) + " " + name;
  };
#define PCDEQ_ADD_ACTIVATION_NAME(NAME, ID) add(ID, #NAME);
  PCDEQ_FOR_EACH_ACTIVATION(PCDEQ_ADD_ACTIVATION_NAME)
#undef PCDEQ_ADD_ACTIVATION_NAME
  return list;
}

// f(std::integral_constant<int, ID>{}) for the map id `id`, f's result returned: an activation id,
// and with kWithAdjoint also kAdjoint (the adjoint map). An id that is neither is an error naming it
// (`where`: the code that dispatches); the ops' argument checks have rejected it before.
template <bool kWithAdjoint, class F>
auto dispatch_map_id(const char* where, int64_t id, F&& f) {
  std::invoke_result_t<F&, std::integral_constant<int, TANH>> out{};
  const auto call = [&](auto map) { out = f(map); };
  bool known = false;
  if constexpr (kWithAdjoint) {
    known = visit_map(id, call);
  } else {
    known = visit_activation(id, call);
  }
  TORCH_CHECK(known, where, ": unknown map id ", id, " (activations: ", activation_id_list(),
              kWithAdjoint ? "; adjoint: " + std::to_string(kAdjoint) : std::string(), ")");
  return out;
}

namespace detail {

// The input `name` (u or v) and the weight: both on `device_type` (the backend of that name), one of
// the four solver dtypes, the same dtype.
inline void check_device_and_dtype(const char* op, c10::DeviceType device_type, const char* name, const at::Tensor& x,
                                   const at::Tensor& weight) {
  TORCH_CHECK(
      x.device().type() == device_type && weight.device().type() == device_type,
      op, ": the ", c10::DeviceTypeName(device_type, /*lower_case=*/true), " backend needs ",
      c10::DeviceTypeName(device_type), " tensors; got ", name, " on ", x.device(), " and weight on ", weight.device());
  TORCH_CHECK(
      x.device() == weight.device(),
      op, ": ", name, " is on ", x.device(), " but weight is on ", weight.device(), "; move them to one device");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": ", name, " has dtype ", dtype, "; pcDEQ solves float16, bfloat16, float32 or float64");
  TORCH_CHECK(
      weight.scalar_type() == dtype,
      op, ": ", name, " is ", dtype, " but weight is ", weight.scalar_type(), "; cast them to one dtype");
}

// Dense: x (B, d) and weight (d, d). Convolutional: x (B, C, H, W) and weight (C, C, 3, 3).
inline void check_shapes(const char* op, const char* name, const at::Tensor& x, const at::Tensor& weight) {
  if (is_conv_problem(weight)) {
    TORCH_CHECK(
        weight.size(0) == weight.size(1) && weight.size(2) == 3 && weight.size(3) == 3 && x.dim() == 4 &&
            x.size(1) == weight.size(0),
        op, ": convolutional pcDEQ needs ", name,
        " of shape (B, C, H, W) and weight (C, C, 3, 3) with the same C; got ", name, " ", x.sizes(), ", weight ",
        weight.sizes());
  } else {
    TORCH_CHECK(
        x.dim() == 2 && weight.dim() == 2 && weight.size(0) == weight.size(1) && x.size(1) == weight.size(0),
        op, ": dense pcDEQ needs ", name, " of shape (B, d) and weight (d, d); got ", name, " ", x.sizes(),
        ", weight ", weight.sizes());
  }
}

// The rule of the Python options (pcdeq_kernels.spec): tol in (0, inf), at least one step.
inline void check_options(const char* op, double tol, int64_t max_iter) {
  TORCH_CHECK(std::isfinite(tol) && tol > 0.0, op, ": tol must be a positive finite number, got ", tol);
  TORCH_CHECK(max_iter >= 1, op, ": max_iter must be >= 1, got ", max_iter);
}

// `t` (z0 or D) has the shape, dtype and device of `x` (u or v).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* x_name, const at::Tensor& x) {
  TORCH_CHECK(
      t.device() == x.device(),
      op, ": ", name, " is on ", t.device(), " but ", x_name, " is on ", x.device(), "; move them to one device");
  TORCH_CHECK(
      t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes(),
      op, ": ", name, " must match ", x_name, " (shape ", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
      "); got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
}

// The one sequence of checks of both ops: the input x (u or v) and the weight (device, dtype, shapes
// of the problem's kind), tol and max_iter, the activation id (forward only: `activation` set), then
// the second tensor `other` (z0 or D, when given) against x.
inline void check_solve_args(const char* op, c10::DeviceType device_type, const char* x_name, const at::Tensor& x,
                             const at::Tensor& weight, const char* other_name, const at::Tensor* other,
                             std::optional<int64_t> activation, double tol, int64_t max_iter) {
  check_device_and_dtype(op, device_type, x_name, x, weight);
  check_shapes(op, x_name, x, weight);
  check_options(op, tol, max_iter);
  if (activation.has_value()) {
    // the int64 id as given (no narrowing: 2^32 is not 0)
    TORCH_CHECK(
        visit_activation(*activation, [](auto) {}),
        op, ": unknown activation id ", *activation, " (", activation_id_list(), ")");
  }
  if (other != nullptr) {
    check_like(op, other_name, *other, x_name, x);
  }
}

}  // namespace detail

// pcdeq_C::forward_solve(u, weight, z0, activation, tol, max_iter, batch_stop), by the kernel for
// `device_type` tensors.
inline void check_forward_args(c10::DeviceType device_type, const at::Tensor& u, const at::Tensor& weight,
                               const std::optional<at::Tensor>& z0, int64_t activation, double tol, int64_t max_iter) {
  detail::check_solve_args("pcdeq_C::forward_solve", device_type, "u", u, weight, "z0", z0 ? &*z0 : nullptr,
                           activation, tol, max_iter);
}

// pcdeq_C::adjoint_solve(v, weight, D, tol, max_iter, batch_stop), by the kernel for `device_type`
// tensors.
inline void check_adjoint_args(c10::DeviceType device_type, const at::Tensor& v, const at::Tensor& weight,
                               const at::Tensor& D, double tol, int64_t max_iter) {
  detail::check_solve_args("pcdeq_C::adjoint_solve", device_type, "v", v, weight, "D", &D, std::nullopt, tol,
                           max_iter);
}

}  // namespace pcdeq
