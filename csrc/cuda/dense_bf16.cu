// Dense solvers, bf16 tensor cores (fp32 master state). One file per engine so that builds compile them in parallel.
#include "dense_solve_impl.cuh"

namespace pcdeq::cuda {

SolveOutputs solve_dense_bf16(const DenseProblem& problem) {
  return solve_dense<HalfEngine<__nv_bfloat16>>(problem);
}

}  // namespace pcdeq::cuda
