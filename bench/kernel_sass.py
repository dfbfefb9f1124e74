"""Compile the decode kernel for a Hopper GPU on any machine (no GPU needed) and print the
instruction mix of its loops: read the GEMV loops before spending device time on them.

    python bench/kernel_sass.py --shape llama-3.1-8b --weights int8 [--tiles block_k=256]
        [--sass out.sass]

Uses the installed triton's compiler, ptxas and nvdisasm for sm_90a. The pip triton on a CPU
machine may be newer than the GPU's, so its code is close to, not identical with, what runs
there. Prints registers, spills and, per loop (a backward branch) of at least --min-len
instructions, the most frequent opcodes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Compiled mode even without CUDA (flashformer_triton would switch the interpreter on).
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from bench_quant import SCHEMES  # noqa: E402
from flashformer_triton.kernels import decode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashformer_triton.config import preset  # noqa: E402
from flashformer_triton.plan import GpuSpec, make_plan, triton_ptx_version  # noqa: E402
from flashformer_triton.quantize import QuantScheme  # noqa: E402

H100 = GpuSpec(name="NVIDIA H100 80GB HBM3", num_sms=132, arch=90,
               ptx_version=triton_ptx_version())
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def pointer_types(scheme: QuantScheme | None, dtype: torch.dtype,
                  acts: torch.dtype) -> dict[str, torch.dtype]:
    """The element type of every pointer argument, as DecodeRuntime passes them (acts: the
    plan's activation dtype)."""
    f32, i32 = torch.float32, torch.int32
    codes = scheme.storage_dtype if scheme else dtype
    lm = codes if scheme and scheme.lm_head else dtype
    return dict(tasks_ptr=i32, ctrl_ptr=i32, counters_ptr=i32, ids_ptr=i32, pos_ptr=i32,
                arena_ptr=codes, scales_ptr=torch.float16, zeros_ptr=torch.uint8, norms_ptr=f32,
                bias_ptr=f32, embed_ptr=dtype, lm_head_ptr=lm, lm_scales_ptr=torch.float16,
                lm_zeros_ptr=torch.uint8, inv_freq_ptr=f32, k_cache_ptr=dtype,
                v_cache_ptr=dtype, h_ptr=f32, xn_mlp_ptr=acts, ss_mlp_ptr=f32,
                xn_attn_ptr=acts, ss_attn_ptr=f32, q_ptr=f32, qk_raw_ptr=f32, attn_ptr=acts,
                act_ptr=acts, osum_xn_mlp_ptr=f32, osum_xn_attn_ptr=f32, osum_attn_ptr=f32,
                osum_act_ptr=f32, logits_ptr=f32, part_m_ptr=f32, part_l_ptr=f32, part_o_ptr=f32,
                partial_ptr=f32, prof_ptr=torch.int64)


def compile_kernel(plan, scheme, dtype=torch.bfloat16):
    fn = decode.decode_step_kernel
    pointers = pointer_types(scheme, dtype, plan.activation_dtype)
    constexprs = plan.constexprs()
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + TRITON_TYPE[pointers[name]]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
        elif name.endswith("_ptr"):
            raise KeyError(f"pointer_types() has no element type for the kernel's {name}")
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": plan.tiles.num_warps}
    if plan.tiles.max_registers:
        options["maxnreg"] = plan.tiles.max_registers
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _version(ptxas: Path) -> tuple[int, ...]:
    out = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def assemble(ptx: str, max_registers: int = 0) -> tuple[str, str]:
    """(ptxas -v report, SASS listing) of the PTX for sm_90a, with triton's own tools."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        cap = [f"--maxrregcount={max_registers}"] if max_registers else []
        # The newest of triton's ptxas builds reads the PTX version triton writes.
        ptxas = max(tools.glob("ptxas*"), key=lambda p: _version(p))
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", *cap, str(src),
                                 "-o", str(cubin)], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    return report.stderr + report.stdout, sass


def loops(sass: str, min_len: int) -> list[tuple[str, int, collections.Counter]]:
    """(label, length, opcode counts) of every loop body closed by a backward branch."""
    labels, insts = {}, []
    for line in sass.splitlines():
        if m := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(insts)
        elif m := re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?);", line):
            text = re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip())
            insts.append(text)
    found = []
    for i, text in enumerate(insts):
        target = re.search(r"\((\.L_x_\d+)\)", text) if text.startswith("BRA") else None
        if target and labels.get(target.group(1), i + 1) <= i:
            body = insts[labels[target.group(1)]:i + 1]
            if len(body) >= min_len:
                mix = collections.Counter(t.split()[0].split(".")[0] for t in body)
                found.append((target.group(1), len(body), mix))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--weights", default="bf16", choices=list(SCHEMES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiles", default="", help="plan tile overrides, e.g. block_k=256")
    parser.add_argument("--min-len", type=int, default=60)
    parser.add_argument("--sass", type=Path, default=None, help="write the listing there")
    args = parser.parse_args(argv)
    tiles = {k: int(v) for k, v in (kv.split("=") for kv in args.tiles.split(",") if kv)}
    scheme = SCHEMES[args.weights]
    plan = make_plan(preset(args.shape), batch=args.batch, max_seq_len=1024, gpu=H100,
                     quant=scheme, **tiles)
    kernel = compile_kernel(plan, scheme)
    report, sass = assemble(kernel.asm["ptx"], plan.tiles.max_registers)
    if args.sass:
        args.sass.write_text(sass)
    usage = " ".join(line.split(": ", 1)[-1].strip() for line in report.splitlines()
                     if "registers" in line or "spill" in line)
    print(f"{args.shape} {args.weights} b{args.batch} {args.tiles or 'defaults'} "
          f"(triton {triton.__version__}): {usage}")
    for label, length, mix in loops(sass, args.min_len):
        top = " ".join(f"{op}:{n}" for op, n in mix.most_common(14))
        print(f"  loop {label:<8} {length:5d} insts  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
