// Input checks of pcdeq_C::forward_solve / adjoint_solve shared by the CPU (csrc/cpu/solver.cpp) and
// CUDA (csrc/cuda/) kernels, so that every compiled backend rejects a bad call with the same message,
// and the dispatch state the kernels run in. Host code only (ATen). Each check names the op, the
// argument and the fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

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

// The input `name` (u or v) and the weight: both on `device_type` (`backend` names the backend in the
// message), one of the four solver dtypes, the same dtype.
inline void check_device_and_dtype(const char* op, const char* backend, c10::DeviceType device_type, const char* name,
                                   const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(
      x.device().type() == device_type && weight.device().type() == device_type,
      op, ": the ", backend, " backend needs ", c10::DeviceTypeName(device_type), " tensors; got ", name, " on ",
      x.device(), " and weight on ", weight.device());
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

// Dense: x (B, d) and weight (d, d).
inline void check_dense_shapes(const char* op, const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(
      x.dim() == 2 && weight.dim() == 2 && weight.size(0) == weight.size(1) && x.size(1) == weight.size(0),
      op, ": dense pcDEQ needs ", name, " of shape (B, d) and weight (d, d); got ", name, " ", x.sizes(),
      ", weight ", weight.sizes());
}

// Convolutional: x (B, C, H, W) and weight (C, C, 3, 3).
inline void check_conv_shapes(const char* op, const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(
      weight.dim() == 4 && weight.size(0) == weight.size(1) && weight.size(2) == 3 && weight.size(3) == 3 &&
          x.dim() == 4 && x.size(1) == weight.size(0),
      op, ": convolutional pcDEQ needs ", name, " of shape (B, C, H, W) and weight (C, C, 3, 3) with the same C; got ",
      name, " ", x.sizes(), ", weight ", weight.sizes());
}

inline void check_options(const char* op, double tol, int64_t max_iter) {
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK(!std::isnan(tol), op, ": tol must be a number, got NaN");
}

inline void check_activation(const char* op, int64_t activation) {
  TORCH_CHECK(
      is_valid_activation(static_cast<int>(activation)),
      op, ": unknown activation id ", activation, " (0 tanh, 1 softsign, 2 relu6, 3 sigmoid)");
}

// `t` (z0 or D) has the shape, dtype and device of `x` (u or v).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(
      t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.sizes() == x.sizes(),
      op, ": ", name, " must match ", x_name, " (shape ", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
      "); got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
}

}  // namespace pcdeq
