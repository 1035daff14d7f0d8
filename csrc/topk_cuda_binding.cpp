// CUDA kernel of fishkern::topk_select (the op is declared in fishkern/topk/ops.py): validates the inputs, builds
// the device table of (pointer, offset) for the kernels in topk_cuda.cu, runs the select, copies
// the per-tensor counts and the NaN result back (the one host synchronisation: the output sizes
// depend on the data), then writes each tensor's sorted indices straight into its own output.
// Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
// the c10 stream header, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit (nvcc and the runtime only, as in many containers) does not have
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "topk_cuda.h"

namespace fishkern {
namespace {

void check_cuda(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "topk_select: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

// A host int64 table copied to `device` on the current stream without blocking the host (pinned
// source; the caching host allocator keeps it alive until the copy is done).
at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

}  // namespace

std::vector<at::Tensor> topk_select_cuda(at::TensorList scores, int64_t k) {
  const int64_t n = static_cast<int64_t>(scores.size());
  TORCH_CHECK(n > 0, "topk_select: the CUDA kernel needs at least one score tensor");
  TORCH_CHECK(n < INT_MAX, "topk_select: too many score tensors (", n, ")");
  const at::Device device = scores[0].device();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = scores[i];
    TORCH_CHECK(t.is_cuda(), "topk_select: score tensor ", i, " is on ", t.device(),
                " but other scores are on CUDA; put all scores on one device");
    TORCH_CHECK(t.device() == device, "topk_select: score tensor ", i, " is on ", t.device(), " but score tensor 0 is on ",
                device, "; put all scores on one device");
    TORCH_CHECK(t.scalar_type() == at::kFloat, "topk_select: score tensor ", i, " has dtype ", t.scalar_type(),
                "; scores must be float32");
  }
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  std::vector<at::Tensor> inputs;  // contiguous views (copies only for non-contiguous scores)
  inputs.reserve(n);
  std::vector<int64_t> table(2 * n + 1);  // [0, n): data pointers; [n, 2n]: global offsets
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    inputs.push_back(scores[i].contiguous());
    table[i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(inputs.back().data_ptr<float>()));
    table[n + i] = total;
    total += scores[i].numel();
  }
  table[2 * n] = total;
  TORCH_CHECK(k >= 0 && k <= total, "topk_select: k = ", k, " must lie in [0, ", total, "] (the number of scores)");

  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);

  const at::Tensor table_d = to_device(table, device);
  const auto* d_ptrs = reinterpret_cast<const float* const*>(table_d.data_ptr<int64_t>());
  const int64_t* d_offsets = table_d.data_ptr<int64_t>() + n;

  size_t ws_bytes = 0;
  check_cuda(fishkern_topk_workspace_bytes(total, static_cast<int>(n), k, &ws_bytes), "workspace size query");
  const at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, long_opts.dtype(at::kByte));
  // meta[0..n]: per-tensor output starts (meta[n] = k); meta[n + 1]: first tensor with a NaN or -1.
  const at::Tensor meta = at::empty({n + 2}, long_opts);
  int64_t* d_meta = meta.data_ptr<int64_t>();

  check_cuda(fishkern_topk_select_cuda(d_ptrs, d_offsets, static_cast<int>(n), total, k, d_meta, d_meta + n + 1,
                                       workspace.data_ptr(), ws_bytes, stream),
             "select kernels");
  const at::Tensor meta_h = meta.to(at::kCPU);  // synchronises with the stream
  const int64_t* h = meta_h.data_ptr<int64_t>();
  TORCH_CHECK(h[n + 1] < 0, "topk_select: score tensor ", h[n + 1],
              " contains NaN; scores must be numbers (±inf are allowed)");
  TORCH_CHECK(h[0] == 0 && h[n] == k, "topk_select: internal error, selected ", h[n] - h[0], " entries instead of ", k);

  std::vector<at::Tensor> out(n);
  std::vector<int64_t> out_ptrs(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = h[i + 1] - h[i];
    TORCH_CHECK(count >= 0 && count <= scores[i].numel(), "topk_select: internal error, tensor ", i, " got ", count,
                " selected entries");
    out[i] = at::empty({count}, long_opts);
    out_ptrs[i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out[i].data_ptr<int64_t>()));
  }
  if (k > 0) {
    const at::Tensor out_ptrs_d = to_device(out_ptrs, device);
    check_cuda(fishkern_topk_write_cuda(d_ptrs, d_offsets, static_cast<int>(n), total, k, d_meta,
                                        reinterpret_cast<int64_t* const*>(out_ptrs_d.data_ptr<int64_t>()), nullptr,
                                        workspace.data_ptr(), ws_bytes, stream),
               "write kernel");
  }
  // The temporaries (inputs' contiguous copies, tables, workspace, meta) are freed on return; the
  // caching allocator reuses their memory only for work ordered after the kernels on this stream.
  return out;
}

TORCH_LIBRARY_IMPL(fishkern, CUDA, m) { m.impl("topk_select", &topk_select_cuda); }

}  // namespace fishkern
