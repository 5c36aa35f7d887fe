// The CUDA kernels of pcdeq_C::forward_solve / adjoint_solve (schemas in csrc/ops.cpp): input checks
// (pcdeq/op_checks.h, then the GPU's compute capability) for both kinds of problem, then for dense
// problems the choice of matmul engine, operand preparation, and the registration. Convolutional
// problems (weight of shape (C, C, 3, 3)) are routed to conv_solve.cu once checked.
//
// Engines (dense_kernels.cuh), by input dtype:
//   float64             CUDA-core fp64 (no tensor-core path: fp64 here is for verification, not speed)
//   float32             tf32 tensor cores when torch's fp32 matmul precision allows tf32 (as torch's own
//                       matmuls: torch.backends.cuda.matmul.fp32_precision = "tf32", or
//                       torch.set_float32_matmul_precision("high"/"medium")); else exact fp32 on CUDA
//                       cores (torch's default, "highest")
//   float16 / bfloat16  solved in float32 as the reference does; the matmul takes the state rounded to
//                       the input dtype (W is already in it) on tensor cores, accumulating in fp32
// Semantics are those of pcdeq_kernels/reference.py and the CPU backend (csrc/cpu/solver.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <pcdeq/activations.h>

#include "conv_solve.cuh"
#include "dense_kernels.cuh"
#include "dense_solve.cuh"
#include "op_checks.cuh"

// Detecting torch's fp32-precision API without naming what an older torch lacks: qualified lookup of
// at::X finds a real at::X first and the fallbacks below only when torch does not declare X (the
// Float32Backend/Float32Op/Float32Precision enums are in torch 2.10+; 2.9 had a string form).
namespace at {
namespace pcdeq_fallback {
enum class Float32Backend { CUDA };
enum class Float32Op { MATMUL };
enum class Float32Precision { TF32 };
}  // namespace pcdeq_fallback
using namespace pcdeq_fallback;  // NOLINT: see above
}  // namespace at

namespace pcdeq::cuda {
namespace {

// Overload ranks: tf32_setting(ctx, Rank<2>{}) takes the first of the overloads below that compiles.
template <int N>
struct Rank : Rank<N - 1> {};
template <>
struct Rank<0> {};

// The newer API: what torch's own cuBLAS matmuls follow (torch.backends.cuda.matmul.fp32_precision).
// torch 2.10+: enums.
template <class Ctx, class Backend = at::Float32Backend, class Op = at::Float32Op, class Precision = at::Float32Precision>
auto tf32_setting(const Ctx& ctx, Rank<2>) -> decltype(ctx.float32Precision(Backend::CUDA, Op::MATMUL) == Precision::TF32) {
  return ctx.float32Precision(Backend::CUDA, Op::MATMUL) == Precision::TF32;
}

// torch 2.9: the same setting as strings. (Its legacy getter raises once the newer API asked for tf32
// while the legacy setting says "highest", so without this overload such a request ran in exact fp32.)
template <class Ctx>
auto tf32_setting(const Ctx& ctx, Rank<1>) -> decltype(ctx.float32Precision(std::string("cuda"), std::string("matmul")) == "tf32") {
  return ctx.float32Precision(std::string("cuda"), std::string("matmul")) == "tf32";
}

// Older torch: torch.set_float32_matmul_precision(); tf32 unless "highest".
template <class Ctx>
bool tf32_setting(const Ctx& ctx, Rank<0>) {
  return ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

bool tf32_allowed() {
  try {
    return tf32_setting(at::globalContext(), Rank<2>{});
  } catch (const c10::Error&) {
    return false;  // torch refuses to answer when its old and new settings disagree: stay exact
  }
}

enum class Engine { kTf32, kF16, kBF16, kSimtF32, kSimtF64 };

Engine choose_engine(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return Engine::kSimtF64;
    case at::kHalf: return Engine::kF16;
    case at::kBFloat16: return Engine::kBF16;
    default: return tf32_allowed() ? Engine::kTf32 : Engine::kSimtF32;
  }
}

at::ScalarType operand_dtype(Engine engine) {
  switch (engine) {
    case Engine::kF16: return at::kHalf;
    case Engine::kBF16: return at::kBFloat16;
    case Engine::kSimtF64: return at::kDouble;
    default: return at::kFloat;
  }
}

SolveOutputs run(Engine engine, const DenseProblem& problem) {
  switch (engine) {
    case Engine::kTf32: return solve_dense_tf32(problem);
    case Engine::kF16: return solve_dense_f16(problem);
    case Engine::kBF16: return solve_dense_bf16(problem);
    case Engine::kSimtF32: return solve_dense_simt_f32(problem);
    default: return solve_dense_simt_f64(problem);
  }
}

DensePath path_from_env() {
  const char* value = std::getenv("PCDEQ_CUDA_PATH");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) {
    return DensePath::kAuto;
  }
  if (std::strcmp(value, "single") == 0) {
    return DensePath::kSingleLaunch;
  }
  if (std::strcmp(value, "stepwise") == 0) {
    return DensePath::kStepwise;
  }
  TORCH_CHECK(false, "PCDEQ_CUDA_PATH=", value, ": choose auto, single or stepwise");
  return DensePath::kAuto;
}

// (dp, dp) zero-padded copy of W^T (transpose) or W in the operand dtype.
at::Tensor operand_matrix(const at::Tensor& weight, bool transpose, at::ScalarType dtype) {
  const int64_t d = weight.size(0);
  const int64_t dp = (d + kPad - 1) / kPad * kPad;
  at::Tensor m = at::zeros({dp, dp}, weight.options().dtype(dtype));
  m.narrow(0, 0, d).narrow(1, 0, d).copy_(transpose ? weight.t() : weight);
  return m;
}

SolveOutputs cast_state(SolveOutputs out, at::ScalarType dtype) {
  std::get<0>(out) = std::get<0>(out).to(dtype);
  return out;
}

SolveOutputs forward_solve(
    const at::Tensor& u,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& z0,
    int64_t activation,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const NoAutocastGuard no_autocast;  // covers the conv path's cuDNN calls too
  check_forward_args(c10::DeviceType::CUDA, u, weight, z0, activation, tol, max_iter);
  check_capability("pcdeq_C::forward_solve", u.device());
  const c10::cuda::CUDAGuard guard(u.device());
  if (is_conv_problem(weight)) {
    return conv_forward_solve(u, weight, z0, activation, tol, max_iter, batch_stop);
  }
  const auto dtype = state_dtype(u.scalar_type());
  at::Tensor x0 = z0.has_value() ? z0->to(dtype).contiguous() : at::zeros(u.sizes(), u.options().dtype(dtype));
  if (u.size(0) == 0 || u.size(1) == 0) {
    return trivial_solve(x0, tol, max_iter, u.scalar_type());
  }
  const Engine engine = choose_engine(u.scalar_type());
  DenseProblem problem;
  problem.m = operand_matrix(weight, /*transpose=*/true, operand_dtype(engine));  // z @ W^T
  problem.side0 = u.to(dtype).contiguous();
  problem.x0 = std::move(x0);
  problem.mode = static_cast<int>(activation);
  problem.tol = tol;
  problem.max_iter = max_iter;
  problem.batch_stop = batch_stop;
  problem.path = path_from_env();
  return cast_state(run(engine, problem), u.scalar_type());
}

SolveOutputs adjoint_solve(
    const at::Tensor& v,
    const at::Tensor& weight,
    const at::Tensor& D,
    double tol,
    int64_t max_iter,
    bool batch_stop) {
  const NoAutocastGuard no_autocast;  // covers the conv path's cuDNN calls too
  check_adjoint_args(c10::DeviceType::CUDA, v, weight, D, tol, max_iter);
  check_capability("pcdeq_C::adjoint_solve", v.device());
  const c10::cuda::CUDAGuard guard(v.device());
  if (is_conv_problem(weight)) {
    return conv_adjoint_solve(v, weight, D, tol, max_iter, batch_stop);
  }
  const auto dtype = state_dtype(v.scalar_type());
  at::Tensor v_c = v.to(dtype).contiguous();
  at::Tensor d_c = D.to(dtype).contiguous();
  at::Tensor x0 = at::mul(d_c, v_c);  // h_0 = D * v
  if (v.size(0) == 0 || v.size(1) == 0) {
    return trivial_solve(x0, tol, max_iter, v.scalar_type());
  }
  const Engine engine = choose_engine(v.scalar_type());
  DenseProblem problem;
  problem.m = operand_matrix(weight, /*transpose=*/false, operand_dtype(engine));  // h @ W
  problem.side0 = std::move(v_c);
  problem.side1 = std::move(d_c);
  problem.x0 = std::move(x0);
  problem.mode = kAdjoint;
  problem.tol = tol;
  problem.max_iter = max_iter;
  problem.batch_stop = batch_stop;
  problem.path = path_from_env();
  return cast_state(run(engine, problem), v.scalar_type());
}

}  // namespace
}  // namespace pcdeq::cuda

TORCH_LIBRARY_IMPL(pcdeq_C, CUDA, m) {
  m.impl("forward_solve", &pcdeq::cuda::forward_solve);
  m.impl("adjoint_solve", &pcdeq::cuda::adjoint_solve);
}
