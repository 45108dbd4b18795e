// Shared plumbing for the cuSOLVER wrappers of tsv_fast._C: error checks, a pooled handle per
// device bound to torch's current stream, RAII for cuSOLVER's parameter objects, and the type
// traits that map float/double onto the S/D entry points.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h): that header pulls in cuBLAS-Lt,
// cuSPARSE and cuDSS headers, which a compile check would then also have to fetch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

// cusolverDnXsyevBatched appeared in cuSOLVER 11.7.1 (CUDA 12.6 update 2).
#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
#define TSV_HAVE_XSYEV_BATCHED 1
#else
#define TSV_HAVE_XSYEV_BATCHED 0
#endif

namespace tsv {

const char* cusolver_status_name(cusolverStatus_t status);

#define TSV_CUSOLVER_CHECK(expr)                                                          \
  do {                                                                                    \
    cusolverStatus_t _tsv_status = (expr);                                                \
    TORCH_CHECK(_tsv_status == CUSOLVER_STATUS_SUCCESS, "tsv_fast._C: ", #expr,          \
                " failed with ", ::tsv::cusolver_status_name(_tsv_status), " (",         \
                static_cast<int>(_tsv_status), ")");                                      \
  } while (0)

#define TSV_CUDA_CHECK(expr)                                                              \
  do {                                                                                    \
    cudaError_t _tsv_err = (expr);                                                        \
    TORCH_CHECK(_tsv_err == cudaSuccess, "tsv_fast._C: ", #expr, " failed: ",            \
                cudaGetErrorString(_tsv_err));                                            \
  } while (0)

// A cuSOLVER handle borrowed from a per-device pool and bound to the current torch stream.
// Handles are not thread-safe, so each live lease owns one exclusively; released handles are
// reused, never destroyed (destroying them at process exit races with CUDA's own teardown).
class HandleLease {
 public:
  HandleLease();  // for the current device, bound to the current stream
  ~HandleLease();
  HandleLease(const HandleLease&) = delete;
  HandleLease& operator=(const HandleLease&) = delete;
  cusolverDnHandle_t get() const { return handle_; }

 private:
  int device_;
  cusolverDnHandle_t handle_;
};

// RAII wrappers for cuSOLVER's small parameter objects.
struct SyevjParams {
  syevjInfo_t p = nullptr;
  SyevjParams();
  ~SyevjParams();
};
struct GesvdjParams {
  gesvdjInfo_t p = nullptr;
  GesvdjParams();
  ~GesvdjParams();
};
struct DnParams {
  cusolverDnParams_t p = nullptr;
  DnParams();
  ~DnParams();
};

// A device workspace from torch's caching allocator: stream-ordered on the current stream, so it
// may be released as soon as the last kernel that uses it is enqueued.
inline at::Tensor device_workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}

// Turn the per-matrix `info` array into a readable error naming the first failing matrix.
// info < 0: argument -info was invalid; info >= fail_from: the routine failed (did not converge);
// 0 < info < fail_from: a partial result the routine documents as usable (gesvda only), left to
// the caller, who gets `info` back. Synchronises the stream once (a device-to-host read); callers
// that must stay asynchronous pass check=false and inspect the returned `info` themselves.
void check_infos(const at::Tensor& info, const char* routine, int64_t fail_from = 1);

// Shape and dtype checks shared by both entry points (no device needed, so they run first).
void check_batched_input(const at::Tensor& A, const char* fn);
// The device check, after every argument check.
void check_cuda_input(const at::Tensor& A, const char* fn);

// int32 arguments of the legacy cuSOLVER API: refuse sizes that would overflow them.
inline int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "tsv_fast._C: ", what, " = ", v,
              " exceeds the 32-bit range of this cuSOLVER routine");
  return static_cast<int>(v);
}

// A workspace size from a 32-bit *_bufferSize query: a negative value is an overflow inside
// cuSOLVER, never something to round up.
inline int checked_lwork(int lwork, const char* routine) {
  TORCH_CHECK(lwork >= 0, "tsv_fast._C: ", routine, "_bufferSize returned a negative workspace size (",
              lwork, "): the problem is too large for this 32-bit routine");
  return lwork;
}

// Matrices per call so that `per_matrix` elements times the batch stay within `limit` (the
// documented 32-bit bounds, e.g. gesvda batch*strideA <= INT32_MAX); one matrix must fit.
inline int64_t batch_chunk(int64_t per_matrix, int64_t batch, int64_t limit, const char* routine) {
  TORCH_CHECK(per_matrix <= limit, "tsv_fast._C: ", routine, ": one matrix needs ", per_matrix,
              " elements, more than the ", limit, " this routine can address");
  return std::max<int64_t>(1, std::min<int64_t>(batch, limit / std::max<int64_t>(per_matrix, 1)));
}

constexpr int64_t kInt32Max = std::numeric_limits<int>::max();

template <typename T>
struct CudaType;
template <>
struct CudaType<float> {
  static constexpr cudaDataType value = CUDA_R_32F;
};
template <>
struct CudaType<double> {
  static constexpr cudaDataType value = CUDA_R_64F;
};

}  // namespace tsv
