// Schemas of fishkern's native ops, declared once; each backend file registers its implementation
// (topk_cpu.cpp: CPU, topk_cuda_binding.cpp: CUDA) and fishkern/topk/_ops.py the fake (meta) one.
#include <torch/library.h>

TORCH_LIBRARY(fishkern, m) {
  // Exact global top-k over a list of fp32 tensors (never concatenated): for each tensor, the sorted
  // flat indices (int64) of its entries among the k largest scores of all tensors together; ties at
  // the threshold go to the lowest global flat index; NaN scores are an error.
  m.def("topk_select(Tensor[] scores, int k) -> Tensor[]");
}
