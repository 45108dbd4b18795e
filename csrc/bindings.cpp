// Python bindings of tsv_fast._C. The only translation unit that includes torch/extension.h
// (the slow header), so the solver files stay quick to compile.
#include <torch/extension.h>

#include "cusolver_common.h"

namespace tsv {
std::vector<at::Tensor> batched_svd(const at::Tensor& A, int64_t k, const std::string& method,
                                    bool check, int64_t oversample, int64_t niters,
                                    int64_t max_batch_elements);
std::vector<at::Tensor> batched_eigh(const at::Tensor& A, const std::string& method, bool lower,
                                     bool check, int64_t max_batch_elements);
bool has_xsyev_batched();
}  // namespace tsv

namespace {
int runtime_cusolver_version() {
  int v = 0;
  TSV_CUSOLVER_CHECK(cusolverGetVersion(&v));
  return v;
}
}  // namespace

constexpr int64_t kNoLimit = std::numeric_limits<int>::max();

// The solvers release the GIL: they block on stream syncs (info checks, host outputs of gesvdp)
// and may run for seconds. Arguments are converted before and results after the release.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsv_fast._C: batched top-k SVD and symmetric eigensolvers from cuSOLVER";
  m.def("batched_svd", &tsv::batched_svd,
        "Top-k SVD of A [B, m, n] (float32/float64, CUDA). Returns [U (B, m, k), S (B, k), "
        "V (B, n, k), info (B,) int32, err_sigma (B,) float64 on the host (gesvdp's error "
        "estimates; empty for the other methods)]. method: 'auto' | 'gesvda' | 'gesvdj_batched' "
        "(<= 32 x 32) | 'gesvdj' | 'gesvd' | 'gesvdp' (polar decomposition) | 'gesvdr' "
        "(randomized, k < min(m, n): k + oversample columns, niters power iterations). check: "
        "raise on a failed info (gesvda: info = min(m, n) + 1; its partial results pass).",
        py::arg("A"), py::arg("k"), py::arg("method") = "auto", py::arg("check") = true,
        py::arg("oversample") = -1, py::arg("niters") = 10,
        py::arg("max_batch_elements") = kNoLimit, py::call_guard<py::gil_scoped_release>());
  m.def("batched_eigh", &tsv::batched_eigh,
        "Eigendecomposition of symmetric A [B, n, n] (float32/float64, CUDA). Returns "
        "[eigenvalues (B, n) ascending, eigenvectors (B, n, n), info (B,) int32]. "
        "method: 'auto' | 'syevj_batched' (n <= 32) | 'syev_batched' | 'syevd'.",
        py::arg("A"), py::arg("method") = "auto", py::arg("lower") = true,
        py::arg("check") = true, py::arg("max_batch_elements") = kNoLimit,
        py::call_guard<py::gil_scoped_release>());
  m.def("has_xsyev_batched", &tsv::has_xsyev_batched,
        "Whether cusolverDnXsyevBatched was available at build time");
  m.def("cusolver_version", &runtime_cusolver_version,
        "cuSOLVER version of the library loaded at run time (major*1000 + minor*100 + patch)");
  m.attr("CUSOLVER_BUILD_VERSION") = py::int_(CUSOLVER_VERSION);
}
