// Schemas of fishkern's native ops, declared once; each backend file registers its implementation
// (topk_cpu.cpp, masked_copy_cpu.cpp: CPU; topk_cuda_binding.cpp: CUDA) and the Python wrappers the
// fake (meta) ones (fishkern/topk/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fishkern, m) {
  // Exact global top-k over a list of fp32 tensors (never concatenated): for each tensor, the sorted
  // flat indices (int64) of its entries among the k largest scores of all tensors together; ties at
  // the threshold go to the lowest global flat index; NaN scores are an error.
  m.def("topk_select(Tensor[] scores, int k) -> Tensor[]");
  // Masked optimizers' data movement: for each tensor i and each e in [begins[i], ends[i]),
  // out[e] = srcs[i].flat[index[e]] (gather) / dsts[i].flat[index[e]] = values[e] (scatter), where
  // index holds offsets into each tensor's dense memory and out / values are flat fp32/fp64 buffers.
  m.def("gather_masked(Tensor[] srcs, Tensor index, int[] begins, int[] ends, Tensor(a!) out) -> ()");
  m.def("scatter_masked_(Tensor(a!)[] dsts, Tensor index, int[] begins, int[] ends, Tensor values) -> ()");
}
