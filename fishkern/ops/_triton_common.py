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


@triton.jit
def to_param_dtype(x, PARAM_DT: tl.constexpr):
    """Cast fp32/fp64 values to the parameter dtype with round-to-nearest-even.

    bf16 is rounded explicitly on the fp32 bit pattern: Triton's interpreter (used for CPU tests)
    truncates fp32 -> bf16 even when RTNE is asked for, while GPUs round to nearest even. With the
    rounding done here both agree with PyTorch's ``.to(torch.bfloat16)``.
    """
    if PARAM_DT == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        return tl.where(x32 != x32, x32, rounded).to(tl.bfloat16)
    else:
        return x.to(PARAM_DT)


@triton.jit
def ieee_sqrt(x):
    """Correctly rounded square root (tl.sqrt may be approximate for fp32 on GPUs)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def ieee_div(x, y):
    """Correctly rounded division (fp32 '/' may be approximate on GPUs)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)
