#include "cusolver_common.h"

#include <mutex>
#include <unordered_map>

namespace tsv {

const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "CUSOLVER_STATUS_<other>";
  }
}

namespace {

// Free handles per device. Guarded by one mutex: acquiring a handle is rare next to a solve.
std::mutex& pool_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<int, std::vector<cusolverDnHandle_t>>& free_handles() {
  // Intentionally leaked: see HandleLease.
  static auto* pool = new std::unordered_map<int, std::vector<cusolverDnHandle_t>>();
  return *pool;
}

}  // namespace

HandleLease::HandleLease() : device_(c10::cuda::current_device()), handle_(nullptr) {
  {
    std::lock_guard<std::mutex> lock(pool_mutex());
    auto& list = free_handles()[device_];
    if (!list.empty()) {
      handle_ = list.back();
      list.pop_back();
    }
  }
  if (handle_ == nullptr) {
    TSV_CUSOLVER_CHECK(cusolverDnCreate(&handle_));
  }
  // Every call enqueues on torch's current stream, so results are ordered with torch ops.
  TSV_CUSOLVER_CHECK(cusolverDnSetStream(handle_, c10::cuda::getCurrentCUDAStream(device_).stream()));
}

HandleLease::~HandleLease() {
  std::lock_guard<std::mutex> lock(pool_mutex());
  free_handles()[device_].push_back(handle_);
}

SyevjParams::SyevjParams() { TSV_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&p)); }
SyevjParams::~SyevjParams() {
  if (p) cusolverDnDestroySyevjInfo(p);
}
GesvdjParams::GesvdjParams() { TSV_CUSOLVER_CHECK(cusolverDnCreateGesvdjInfo(&p)); }
GesvdjParams::~GesvdjParams() {
  if (p) cusolverDnDestroyGesvdjInfo(p);
}
DnParams::DnParams() { TSV_CUSOLVER_CHECK(cusolverDnCreateParams(&p)); }
DnParams::~DnParams() {
  if (p) cusolverDnDestroyParams(p);
}

void check_infos(const at::Tensor& info, const char* routine, int64_t fail_from) {
  // One reduction and one host read for the common all-good case.
  if (info.numel() == 0) return;
  const at::Tensor bad_mask = info.lt(0).logical_or(info.ge(fail_from));
  if (!bad_mask.any().item<bool>()) return;
  const at::Tensor host = info.to(at::kCPU);
  const int* v = host.data_ptr<int>();
  int64_t bad = 0;
  int64_t first = -1;
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (v[i] < 0 || v[i] >= fail_from) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  const int code = v[first];
  std::string what = code < 0 ? "argument " + std::to_string(-code) + " was invalid"
                              : "did not converge (info = " + std::to_string(code) + ")";
  TORCH_CHECK(false, "tsv_fast._C: ", routine, " failed for matrix ", first,
              " of the batch: ", what, "; ", bad, " of ", host.numel(),
              " matrices failed. Non-finite input (NaN/Inf) is the usual cause of non-convergence.");
}

void check_batched_input(const at::Tensor& A, const char* fn) {
  TORCH_CHECK(A.defined(), fn, ": input is undefined");
  TORCH_CHECK(A.dim() == 3, fn, ": expected a batch of matrices [B, m, n], got shape ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, fn,
              ": expected float32 or float64, got ", A.scalar_type(),
              " (cast bf16/fp16 inputs to float32 first)");
  TORCH_CHECK(A.size(1) >= 1 && A.size(2) >= 1, fn, ": matrices must be non-empty, got shape ",
              A.sizes());
}

void check_cuda_input(const at::Tensor& A, const char* fn) {
  TORCH_CHECK(A.is_cuda(), fn, ": expected a CUDA tensor, got one on ", A.device());
}

}  // namespace tsv
