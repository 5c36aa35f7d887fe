// Dense solvers, fp64 on CUDA cores. One file per engine so that builds compile them in parallel.
#include "dense_solve_impl.cuh"

namespace pcdeq::cuda {

SolveOutputs solve_dense_simt_f64(const DenseProblem& problem) {
  return solve_dense<SimtEngine<double>>(problem);
}

}  // namespace pcdeq::cuda
