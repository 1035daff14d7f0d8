// C API of the CUDA global top-k behind fishkern::topk_select (implemented in topk_cuda.cu).
//
// Plain C/C++ with the CUDA runtime only -- no torch headers -- so that topk_cuda.cu compiles with
// `nvcc -c` on machines whose torch has no CUDA (scripts/check_cuda_compile.sh). The torch binding
// is topk_cuda_binding.cpp.
//
// Semantics (the same as the CPU op and fishkern/topk/reference.py): the scores are n fp32 tensors,
// each read as a contiguous flat array; tensor t covers the global indices
// [offsets[t], offsets[t+1]) of their virtual concatenation (never materialised). Exactly k entries
// are selected: every entry whose score is above the k-th largest, plus, among the entries equal to
// it, those with the lowest global indices. -0.0 equals +0.0; +-inf order as numbers. NaN is an
// error: it is reported, and the selection is then unspecified (but still exactly k entries,
// written in bounds).
//
// Algorithm (AIR top-k, Zhang et al., "Parallel Top-K Algorithms on GPU: A Comprehensive Study and
// New Methods", SC'23, adapted to many tensors and to a stable, sorted output):
//   * each float maps to an order-preserving uint32 key (negatives: all bits flipped; others: sign
//     bit set; -0.0 first made +0.0);
//   * a radix select finds the key of the k-th largest entry with 11 + 11 + 10 bit digits. Each
//     pass histograms one digit over the entries whose higher bits equal the prefix found so far
//     ("candidates"), and the bucket holding the k-th largest extends the prefix. A pass stops the
//     search early when its whole bucket is selected;
//   * filtering: once the candidates fit in a buffer (at most max(2^16, total/32) entries), the next
//     pass over the scores also writes them (key, tile) to that buffer and counts, per tile of 8192
//     entries, the entries already known to be selected; later passes read only the buffer;
//   * a stable compaction writes each selected entry's local flat index at its rank in global index
//     order: per-tile counts -> exclusive scan (CUB) -> one more read of the scores writing in order.
//
// Reads of the scores (each a full read of all n tensors; "pass d" below is hist_kernel<d-1>):
//   typical (the top-11-bit bucket of the threshold holds <= max(2^16, total/32) entries): 3
//     pass 1 (top digit histogram + NaN check), pass 2 (second digit histogram + filtering),
//     the writing pass; the third digit is resolved on the buffer alone;
//   top bucket too big but the top-22-bit one fits the buffer: 4 (passes 1, 2, 3 + write);
//   early stop after pass 1 (its whole bucket selected): 3 (pass 1, count, write; 2 when
//     k = total, where every tile is written without reading it);
//   worst case (more than max(2^16, total/32) entries share the threshold's top 22 bits, e.g. a
//   mass of exact ties such as zeros at the threshold): 5 (passes 1-3, a counting pass, write).
//   The writing pass skips tiles with nothing selected and does not read tiles selected whole.
//
// Every function is asynchronous on `stream` (no host synchronisation, no allocation) and returns
// a cudaError_t value: 0 (cudaSuccess) or the first error met (cudaErrorInvalidValue for bad
// arguments). All pointers named d_* are device pointers on the current device.
#ifndef FISHKERN_TOPK_CUDA_H_
#define FISHKERN_TOPK_CUDA_H_

#include <cuda_runtime_api.h>

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Workspace bytes needed for `total` scores in `n_tensors` tensors (k does not change it today).
// The size includes CUB's scan storage, so call it with the device that will run the select
// current. Stores the size in *bytes; returns a cudaError_t value.
int fishkern_topk_workspace_bytes(int64_t total, int n_tensors, int64_t k, size_t* bytes);

// Phase 1: radix select + per-tile counts + scans. Reads the scores 2 times typically (4 at worst).
//   d_ptrs[t]          device array of n_tensors pointers to the contiguous fp32 scores of tensor t
//                      (any alignment; 16-byte aligned tensors are read with vector loads);
//   d_offsets[0..n]    device array, offsets[0] = 0, offsets[t+1] - offsets[t] = numel of tensor t
//                      (0 allowed), offsets[n] = total;
//   k                  0 <= k <= total;
//   d_tensor_starts    out, n_tensors + 1 int64: tensor t owns the selected positions
//                      [starts[t], starts[t+1]) of the global ascending order; starts[n] = k;
//   d_nan_tensor       out, 1 int64: the lowest index of a tensor holding a NaN, or -1 if none
//                      (checked even when k = 0);
//   d_workspace        at least fishkern_topk_workspace_bytes(total, n_tensors, k) bytes, 256-byte
//                      aligned; it carries the state that phase 2 needs.
int fishkern_topk_select_cuda(const float* const* d_ptrs, const int64_t* d_offsets, int n_tensors, int64_t total,
                              int64_t k, int64_t* d_tensor_starts, int64_t* d_nan_tensor, void* d_workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// Phase 2: writes the selected local flat indices, ascending per tensor. One read of the scores.
// Call it after phase 1 on the same stream with the same scores (unchanged), k, workspace and
// d_tensor_starts. Exactly one of the two destinations is non-null:
//   d_out_ptrs         device array of n_tensors int64 pointers; tensor t's selected indices go to
//                      d_out_ptrs[t][0 .. starts[t+1]-starts[t]) (the host learns the sizes by
//                      copying d_tensor_starts back; entries of tensors with nothing selected are
//                      never read);
//   d_out_concat       k int64: all tensors' local indices in tensor order, tensor t's at
//                      [starts[t], starts[t+1]) (no host round trip needed).
int fishkern_topk_write_cuda(const float* const* d_ptrs, const int64_t* d_offsets, int n_tensors, int64_t total,
                             int64_t k, const int64_t* d_tensor_starts, int64_t* const* d_out_ptrs,
                             int64_t* d_out_concat, void* d_workspace, size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // FISHKERN_TOPK_CUDA_H_
