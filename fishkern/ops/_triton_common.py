"""Device-side helpers shared by the masked-optimizer Triton kernels (imports triton)."""
import triton
import triton.language as tl


@triton.jit
def block_entries(block_tensor_ptr, block_start_ptr, seg_end_ptr, block_base, BLOCK: tl.constexpr):
    """This program's block: (tensor number, flat entry offsets, in-bounds mask)."""
    b = block_base + tl.program_id(0)
    t = tl.load(block_tensor_ptr + b)
    start = tl.load(block_start_ptr + b)
    end = tl.load(seg_end_ptr + t)
    e = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, e, e < end


@triton.jit
def load_grad(grad_flat_ptr, grad_addr_ptr, t, e, mem_idx, in_bounds, GRAD_DT: tl.constexpr,
              GRAD_FLAT: tl.constexpr, COMPUTE_DT: tl.constexpr):
    """The block's gradient entries: from the gathered flat buffer, or straight from the dense
    .grad of tensor t through the address table."""
    if GRAD_FLAT:
        g = tl.load(grad_flat_ptr + e, mask=in_bounds, other=0.0)
    else:
        gp = tl.load(grad_addr_ptr + t).to(tl.pointer_type(GRAD_DT))
        g = tl.load(gp + mem_idx, mask=in_bounds, other=0.0)
    return g.to(COMPUTE_DT)
