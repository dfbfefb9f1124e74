"""Launch the persistent decode kernel: buffers, the single launch, the hang check.

Every per-step input (token ids, positions) lives in a device buffer the kernel reads, and
the kernel leaves its queue and counters at zero when it ends, so `launch()` takes no
per-step scalars and is safe to capture in a CUDA graph and replay.
"""

from __future__ import annotations

import os
import sys

import torch

from flashformer_triton.config import ModelConfig
from flashformer_triton.plan import OFFSET_SUM_COLS, Op, Plan
from flashformer_triton.weights import PackedWeights

# Control block slots and the error encoding (kernels/decode.py CTRL_*, ERR_BASE).
CTRL_QUEUE, CTRL_DONE, CTRL_ERR_TASK, CTRL_ERR_SEEN = range(4)
CTRL_SIZE = 8
ERR_BASE = 1 << 30

# Spin iterations before a wait is declared hung. On a GPU one iteration is an L2 round trip
# (~1 us): 2^22 is seconds, far beyond any legitimate wait within one step.
DEFAULT_MAX_SPIN = 1 << 22


def resident_programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, props) -> int:
    """How many programs of a compiled kernel one SM holds at once: registers (allocated per
    warp in units of 256), threads and shared memory (plus the 1 KiB the driver reserves per
    block) each bound it; `props` is torch.cuda.get_device_properties (H100 values where an
    older torch lacks a field)."""
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(1, regs_per_warp * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem // (shared_bytes + 1024)
    return min(by_regs, by_threads, by_smem, 32)


class KernelHangError(RuntimeError):
    """A task waited longer than the spin bound for a counter that never reached its target."""


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_interpreter_possible() -> None:
    """On the CPU the kernel runs in the Triton interpreter, which must be on before triton
    is first imported (``triton.jit`` decides at decoration time, and triton.language's own
    helpers such as ``tl.zeros`` are jit functions). Refuse clearly when this process has
    triton, or the kernel, in compiled mode: the interpreter would fail deep in the kernel."""
    kernel = sys.modules.get("flashformer_triton.kernels.decode")
    if kernel is not None:
        compiled = type(kernel.decode_step_kernel).__name__ != "InterpretedFunction"
    else:
        tl = sys.modules.get("triton.language")
        compiled = tl is not None and type(getattr(tl, "zeros", None)).__name__ == "JITFunction"
    if compiled:
        raise RuntimeError(
            "device='cpu' runs the decode kernel in the Triton interpreter, which has to be "
            "switched on before triton is first imported, and this process imported triton "
            "(transformers, torch.compile or a GPU model do) before that. Import "
            "flashformer_triton first (without CUDA that switches the interpreter on), or set "
            "TRITON_INTERPRET=1 in the environment (`TRITON_INTERPRET=1 python ...`, or "
            "`os.environ['TRITON_INTERPRET'] = '1'` at the very top of the script or notebook)"
        )


def kernel_module(device: torch.device):
    """Import the kernels, switching Triton to its interpreter for CPU tensors."""
    if device.type == "cpu":
        check_interpreter_possible()
        os.environ["TRITON_INTERPRET"] = "1"
    elif device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available; use 'cpu'")
    from flashformer_triton.kernels import decode

    return decode


class DecodeRuntime:
    """Owns the kernel's workspaces and runs one decode step per `launch()`."""

    def __init__(
        self,
        config: ModelConfig,
        weights: PackedWeights,
        plan: Plan,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        max_spin: int = DEFAULT_MAX_SPIN,
    ) -> None:
        self.config, self.weights, self.plan = config, weights, plan
        self.device = weights.arena.device
        if plan.quant != weights.scheme:  # the kernel would read the codes with the wrong maths
            def name(scheme):
                return scheme.describe() if scheme else "unquantized"

            raise ValueError(
                f"the plan is for {name(plan.quant)} weights but the packed weights are "
                f"{name(weights.scheme)}: build the plan with make_plan(..., "
                f"quant=weights.scheme)"
            )
        self.kernel = kernel_module(self.device).decode_step_kernel
        expected = (config.num_layers, plan.batch, config.num_kv_heads, plan.max_seq_len,
                    config.head_dim)
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if tuple(cache.shape) != expected or cache.dtype != weights.dtype:
                raise ValueError(
                    f"{name} has shape {tuple(cache.shape)} and dtype {cache.dtype}; the plan "
                    f"needs {expected} in {weights.dtype}"
                )
        self.k_cache, self.v_cache = k_cache, v_cache
        self.max_spin = int(max_spin)

        c, B, dev = config, plan.batch, self.device
        f32 = dict(dtype=torch.float32, device=dev)
        splits = plan.tiles.kv_splits
        self.tasks = plan.table(dev)
        self.ctrl = torch.zeros(CTRL_SIZE, dtype=torch.int32, device=dev)
        self.counters = torch.zeros(max(1, plan.num_counters), dtype=torch.int32, device=dev)
        self.ids = torch.zeros(B, dtype=torch.int32, device=dev)
        self.pos = torch.zeros(B, dtype=torch.int32, device=dev)
        acts = dict(dtype=plan.activation_dtype, device=dev)  # the GEMVs' inputs
        parts_o, parts_down = plan.norm_parts()
        self.h = torch.empty(B, c.hidden_size, **f32)
        # h published for the next norm: times its weights, and its sums of squares.
        self.xn_mlp = torch.empty(B, c.hidden_size, **acts)
        self.ss_mlp = torch.empty(B, parts_down, **f32)
        self.xn_attn = torch.empty(B, c.hidden_size, **acts)
        self.ss_attn = torch.empty(B, parts_o, **f32)
        self.q = torch.empty(B, c.q_size, **f32)
        # Query and key rows before Qwen3's qk-norm (the last chunk of a head norms them).
        self.qk_raw = torch.empty(B, c.q_size + c.kv_size if c.qk_norm else 1, **f32)
        self.attn = torch.empty(B, c.q_size, **acts)
        self.act = torch.empty(B, c.intermediate_size, **acts)
        self.logits = torch.empty(B, c.vocab_size, **f32)
        # With offset-sum int4 GEMVs (tile offset_sums), each GEMV input's sums per
        # OFFSET_SUM_COLS columns times its codes' operand offsets, written by its producers
        # (kernels/decode.py); without them a placeholder the kernel never reads.
        def offset_sums(width: int) -> torch.Tensor:
            if not plan.tiles.offset_sums:
                return torch.empty(1, 1, **f32)
            return torch.empty(B, width // OFFSET_SUM_COLS, **f32)

        self.osum_xn_mlp = offset_sums(c.hidden_size)
        self.osum_xn_attn = offset_sums(c.hidden_size)
        self.osum_attn = offset_sums(c.q_size)
        self.osum_act = offset_sums(c.intermediate_size)
        self.part_m = torch.empty(B, c.num_heads, splits, **f32)
        self.part_l = torch.empty(B, c.num_heads, splits, **f32)
        self.part_o = torch.empty(B, c.num_heads, splits, c.head_dim, **f32)
        down_splits = plan.tiles.down_splits
        self.partial = torch.empty(down_splits, B, c.hidden_size if down_splits > 1 else 1, **f32)
        # Timeline records [program, SM, start, ready, end] per task (plan tile `profile`).
        if plan.tiles.profile and dev.type != "cuda":
            raise ValueError("the timeline profile reads GPU timers: it needs a CUDA device")
        rows = plan.num_tasks if plan.tiles.profile else 1
        self.timeline = torch.zeros(rows, 5, dtype=torch.int64, device=dev)
        self._constexprs = plan.constexprs()
        self.compiled = None  # the compiled kernel of the last launch (registers, spills)
        self._grid: int | None = None
        cap = plan.tiles.max_registers
        self._launch_options = {"maxnreg": cap} if cap and self.device.type == "cuda" else {}
        if self.device.type == "cpu" and weights.dtype != torch.float32:
            self._constexprs["DOT_PREC"] = "upcast"  # the interpreter's bf16/fp16 dot is wrong

    def workspaces(self) -> dict[str, torch.Tensor]:
        """The kernel's scratch and output buffers (tests poison them with NaN)."""
        return {"h": self.h, "xn_mlp": self.xn_mlp, "ss_mlp": self.ss_mlp,
                "xn_attn": self.xn_attn, "ss_attn": self.ss_attn, "q": self.q,
                "qk_raw": self.qk_raw, "attn": self.attn, "act": self.act,
                "osum_xn_mlp": self.osum_xn_mlp, "osum_xn_attn": self.osum_xn_attn,
                "osum_attn": self.osum_attn, "osum_act": self.osum_act, "logits": self.logits,
                "part_m": self.part_m, "part_l": self.part_l, "part_o": self.part_o,
                "partial": self.partial}

    def _arguments(self) -> tuple:
        w = self.weights
        return (
            self.tasks, self.plan.num_tasks, self.ctrl, self.counters, self.plan.num_counters,
            self.max_spin, self.ids, self.pos,
            w.arena, w.scales, w.zeros, w.norms, w.qkv_bias, w.embed, w.lm_head, w.lm_scales,
            w.lm_zeros, w.inv_freq,
            self.k_cache, self.v_cache,
            self.h, self.xn_mlp, self.ss_mlp, self.xn_attn, self.ss_attn, self.q, self.qk_raw,
            self.attn,
            self.act, self.osum_xn_mlp, self.osum_xn_attn, self.osum_attn, self.osum_act,
            self.logits,
            self.part_m, self.part_l, self.part_o, self.partial, self.timeline,
        )

    @property
    def grid(self) -> int:
        """Programs per launch: the plan's grid, cut to what the compiled kernel can keep
        resident at once on a GPU (compiles it on first use). A static schedule needs every
        program resident (a waiting one would hold up tasks nobody else may take), and with
        the queue more programs than fit would only start once the queue is empty."""
        if self._grid is None:
            self._grid = self.plan.grid
            if self.device.type == "cuda":
                compiled = self.kernel.warmup(*self._arguments(), grid=(self.plan.grid,),
                                              num_warps=self.plan.tiles.num_warps,
                                              **self._launch_options, **self._constexprs)
                compiled._init_handles()  # loads the binary: n_regs is known from here
                props = torch.cuda.get_device_properties(self.device)
                regs, shared = compiled.n_regs, compiled.metadata.shared
                per_sm = resident_programs_per_sm(regs, shared, self.plan.tiles.num_warps, props)
                if per_sm < 1:
                    raise RuntimeError(
                        f"the decode kernel needs {regs} registers per thread and {shared} "
                        f"bytes of shared memory, more than one SM of {props.name} has for a "
                        f"program of {self.plan.tiles.num_warps} warps: use smaller tiles "
                        f"(block_k, pipeline_stages) or fewer warps"
                    )
                self._grid = min(self.plan.grid, per_sm * props.multi_processor_count)
        return self._grid

    def launch(self) -> None:
        """One decode step from the ids/pos buffers: exactly one kernel launch."""
        self.compiled = self.kernel[(self.grid,)](
            *self._arguments(),
            num_warps=self.plan.tiles.num_warps,
            **self._launch_options,
            **self._constexprs,
        )

    def step(self, ids: torch.Tensor, pos: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode one token per sequence: ids [B], positions [B] -> logits [B, vocab] (fp32).

        The returned tensor is the runtime's own logits buffer (overwritten next step)."""
        self.ids.copy_(ids.reshape(-1), non_blocking=True)
        self.pos.copy_(pos.reshape(-1), non_blocking=True)
        self.launch()
        if check:
            self.check()
        return self.logits

    def check(self) -> None:
        """Raise KernelHangError if a spin-wait of the last launch timed out (syncs)."""
        code, seen = self.ctrl[CTRL_ERR_TASK:CTRL_ERR_SEEN + 1].tolist()
        if code == 0:
            return
        self.ctrl.zero_()
        self.counters.zero_()
        index = ERR_BASE - code
        # The table on the device is what ran (a test may have edited it): read the task there.
        op, layer, a, b, c, counter, target, _, _ = self.tasks[index].tolist()
        name = self.plan.counter_names[counter] if 0 <= counter < self.plan.num_counters else "?"
        raise KernelHangError(
            f"decode kernel gave up waiting: task {index} ({Op(op).name}, layer {layer}, "
            f"tile {a},{b},{c}) waited on counter {counter} '{name}' for {target} signals but "
            f"saw {seen} after {self.max_spin} spins (the earliest task in the table that gave "
            f"up). The task table is not topologically ordered or a producer failed; the KV "
            f"cache of this step is invalid."
        )
