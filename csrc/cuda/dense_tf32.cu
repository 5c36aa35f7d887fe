// Dense solvers, tf32 tensor cores (fp32 state). One file per engine so that builds compile them in parallel.
#include "dense_solve_impl.cuh"

namespace pcdeq::cuda {

SolveOutputs solve_dense_tf32(const DenseProblem& problem) {
  return solve_dense<Tf32Engine>(problem);
}

}  // namespace pcdeq::cuda
