// Dense solvers, fp32 on CUDA cores (torch's "highest" matmul precision). One file per engine so that builds compile them in parallel.
#include "dense_solve_impl.cuh"

namespace pcdeq::cuda {

SolveOutputs solve_dense_simt_f32(const DenseProblem& problem) {
  return solve_dense<SimtEngine<float>>(problem);
}

}  // namespace pcdeq::cuda
