// Batched symmetric eigendecomposition [B, n, n] through cuSOLVER.
//
// Layout: a row-major symmetric matrix is its own column-major transpose, so the input bytes go
// to cuSOLVER as they are (after the one copy the solver needs, since it overwrites A with the
// eigenvectors). Reading the row-major *lower* triangle, like torch.linalg.eigh's default,
// means asking cuSOLVER for the column-major *upper* one. The eigenvectors come back
// column-major and are returned as a transposed view.
#include "cusolver_common.h"

#include <algorithm>
#include <type_traits>

namespace tsv {
namespace {

template <typename T>
void eigh_syevj_batched(cusolverDnHandle_t h, at::Tensor& Z, at::Tensor& W, int64_t B, int64_t n,
                        cublasFillMode_t uplo, const at::Tensor& info) {
  const int nn = to_int(n, "n"), batch = to_int(B, "batch size");
  SyevjParams params;
  TSV_CUSOLVER_CHECK(cusolverDnXsyevjSetSortEig(params.p, 1));  // ascending, like LAPACK
  const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
  T *z = Z.data_ptr<T>(), *w = W.data_ptr<T>();
  int lwork = 0;
  if constexpr (std::is_same_v<T, float>) {
    TSV_CUSOLVER_CHECK(
        cusolverDnSsyevjBatched_bufferSize(h, jobz, uplo, nn, z, nn, w, &lwork, params.p, batch));
  } else {
    TSV_CUSOLVER_CHECK(
        cusolverDnDsyevjBatched_bufferSize(h, jobz, uplo, nn, z, nn, w, &lwork, params.p, batch));
  }
  at::Tensor work = at::empty({checked_lwork(lwork, "syevjBatched")}, Z.options());
  if constexpr (std::is_same_v<T, float>) {
    TSV_CUSOLVER_CHECK(cusolverDnSsyevjBatched(h, jobz, uplo, nn, z, nn, w, work.data_ptr<T>(),
                                               lwork, info.data_ptr<int>(), params.p, batch));
  } else {
    TSV_CUSOLVER_CHECK(cusolverDnDsyevjBatched(h, jobz, uplo, nn, z, nn, w, work.data_ptr<T>(),
                                               lwork, info.data_ptr<int>(), params.p, batch));
  }
}

#if TSV_HAVE_XSYEV_BATCHED
template <typename T>
void eigh_xsyev_batched(cusolverDnHandle_t h, at::Tensor& Z, at::Tensor& W, int64_t B, int64_t n,
                        cublasFillMode_t uplo, const at::Tensor& info) {
  DnParams params;
  // The default algorithm may switch between methods by size; ALG_1 is the one consistent method.
  TSV_CUSOLVER_CHECK(cusolverDnSetAdvOptions(params.p, CUSOLVERDN_SYEVBATCHED, CUSOLVER_ALG_1));
  const cudaDataType dt = CudaType<T>::value;
  const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
  size_t dev_bytes = 0, host_bytes = 0;
  TSV_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(h, params.p, jobz, uplo, n, dt,
                                                       Z.data_ptr(), n, dt, W.data_ptr(), dt,
                                                       &dev_bytes, &host_bytes, B));
  at::Tensor work = device_workspace(static_cast<int64_t>(dev_bytes), Z);
  std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
  TSV_CUSOLVER_CHECK(cusolverDnXsyevBatched(h, params.p, jobz, uplo, n, dt, Z.data_ptr(), n, dt,
                                            W.data_ptr(), dt, work.data_ptr(), dev_bytes,
                                            host_work.data(), host_bytes, info.data_ptr<int>(),
                                            B));
}
#endif

// One Xsyevd (divide and conquer) per matrix, one workspace reused on the same stream.
template <typename T>
void eigh_syevd_loop(cusolverDnHandle_t h, at::Tensor& Z, at::Tensor& W, int64_t B, int64_t n,
                     cublasFillMode_t uplo, const at::Tensor& info) {
  DnParams params;
  const cudaDataType dt = CudaType<T>::value;
  const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
  T *z = Z.data_ptr<T>(), *w = W.data_ptr<T>();
  size_t dev_bytes = 0, host_bytes = 0;
  TSV_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(h, params.p, jobz, uplo, n, dt, z, n, dt, w, dt,
                                                 &dev_bytes, &host_bytes));
  at::Tensor work = device_workspace(static_cast<int64_t>(dev_bytes), Z);
  std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
  int* inf = info.data_ptr<int>();
  for (int64_t b = 0; b < B; ++b) {
    TSV_CUSOLVER_CHECK(cusolverDnXsyevd(h, params.p, jobz, uplo, n, dt, z + b * n * n, n, dt,
                                        w + b * n, dt, work.data_ptr(), dev_bytes,
                                        host_work.data(), host_bytes, inf + b));
  }
}

}  // namespace

bool has_xsyev_batched() { return TSV_HAVE_XSYEV_BATCHED != 0; }

// Returns [eigenvalues (B, n) ascending, eigenvectors (B, n, n) as columns, info (B,) int32].
// Only the lower triangle (or the upper one, with lower=false) of each matrix is read.
// `max_batch_elements` caps n * lda * batch per batched call (default and maximum INT32_MAX, the
// documented bound of XsyevBatched; smaller values only serve tests of the chunking).
std::vector<at::Tensor> batched_eigh(const at::Tensor& A, const std::string& method_in, bool lower,
                                     bool check, int64_t max_batch_elements) {
  constexpr const char* fn = "tsv_fast._C.batched_eigh";
  check_batched_input(A, fn);
  const int64_t B = A.size(0), n = A.size(1);
  TORCH_CHECK(A.size(2) == n, fn, ": expected square matrices [B, n, n], got shape ", A.sizes());
  std::string method = method_in;
  if (method == "auto") {
    method = n <= 32 ? "syevj_batched" : (has_xsyev_batched() ? "syev_batched" : "syevd");
  }
  TORCH_CHECK(method == "syevj_batched" || method == "syev_batched" || method == "syevd", fn,
              ": unknown method '", method_in,
              "'; expected one of 'auto', 'syevj_batched', 'syev_batched', 'syevd'");
  TORCH_CHECK(method != "syevj_batched" || n <= 32, fn,
              ": method 'syevj_batched' supports matrices up to 32 x 32, got ", n, " x ", n);
  TORCH_CHECK(method != "syev_batched" || has_xsyev_batched(), fn,
              ": method 'syev_batched' needs cusolverDnXsyevBatched (cuSOLVER >= 11.7.1, CUDA "
              ">= 12.6 update 2); this extension was built against cuSOLVER ",
              CUSOLVER_VERSION);
  TORCH_CHECK(max_batch_elements >= 1 && max_batch_elements <= kInt32Max, fn,
              ": max_batch_elements must be in [1, ", kInt32Max, "], got ", max_batch_elements);
  check_cuda_input(A, fn);

  c10::cuda::CUDAGuard guard(A.device());
  auto info = at::zeros({B}, A.options().dtype(at::kInt));
  at::Tensor W = at::empty({B, n}, A.options());
  // The solver overwrites its input with the eigenvectors: this copy is the output buffer.
  at::Tensor Z = A.clone(at::MemoryFormat::Contiguous);
  if (B == 0) return {W, Z, info};
  const cublasFillMode_t uplo = lower ? CUBLAS_FILL_MODE_UPPER : CUBLAS_FILL_MODE_LOWER;

  HandleLease handle;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "tsv_batched_eigh", [&] {
    if (method == "syevd") {
      eigh_syevd_loop<scalar_t>(handle.get(), Z, W, B, n, uplo, info);
      return;
    }
    // The batched routines address n * lda * batch elements with 32-bit offsets: split batches.
    const int64_t chunk = batch_chunk(n * n, B, max_batch_elements,
                                      method == "syevj_batched" ? "syevjBatched" : "XsyevBatched");
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t nb = std::min(chunk, B - b0);
      at::Tensor z = Z.narrow(0, b0, nb), w = W.narrow(0, b0, nb);
      const at::Tensor inf = info.narrow(0, b0, nb);
      if (method == "syevj_batched") {
        eigh_syevj_batched<scalar_t>(handle.get(), z, w, nb, n, uplo, inf);
      } else {
#if TSV_HAVE_XSYEV_BATCHED
        eigh_xsyev_batched<scalar_t>(handle.get(), z, w, nb, n, uplo, inf);
#endif
      }
    }
  });
  if (check) check_infos(info, method.c_str());
  // Column-major eigenvectors: the row-major view holds them as rows, so transpose the view.
  return {W, Z.mT(), info};
}

}  // namespace tsv
