"""Where the time of one decode step goes, from the kernel's own timeline.

With the plan tile `profile=1` (GPU only), every task records [program, SM, start, ready,
end] in ns of the GPU's global timer: `ready` is when its wait on the producer counter
returned, so `ready - start` is time spent waiting (weights of the first chunk already in
flight) and `end - ready` is the work. `summarize` turns the records into per-op totals and
the busy fraction; `gantt_png` draws one row per program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from flashformer_triton.plan import Op, Plan


@dataclass(frozen=True)
class OpTime:
    op: str
    tasks: int
    wait_us: float  # summed over tasks
    work_us: float
    mean_wait_us: float
    mean_work_us: float


@dataclass(frozen=True)
class Summary:
    span_us: float  # first task start to last task end
    programs: int
    busy_fraction: float  # work / (programs x span)
    wait_fraction: float  # waiting / (programs x span)
    per_op: list[OpTime]
    per_layer_us: float  # mean span of one layer (first QKV start to last DOWN end)

    def format(self) -> str:
        lines = [
            f"step span {self.span_us:.1f} us on {self.programs} programs: "
            f"{100 * self.busy_fraction:.1f}% working, {100 * self.wait_fraction:.1f}% waiting "
            f"on counters, the rest popping tasks or idle; {self.per_layer_us:.1f} us per layer",
            f"{'op':<8}{'tasks':>7}{'wait us':>11}{'work us':>11}{'mean wait':>11}"
            f"{'mean work':>11}",
        ]
        for t in self.per_op:
            lines.append(f"{t.op:<8}{t.tasks:>7}{t.wait_us:>11.0f}{t.work_us:>11.0f}"
                         f"{t.mean_wait_us:>11.2f}{t.mean_work_us:>11.2f}")
        return "\n".join(lines)


def times_us(records: torch.Tensor) -> torch.Tensor:
    """[start, ready, end] per task in us since the first start (float64). Subtracted in
    int64 first: the global timer counts ns since an epoch (~1.8e18), where a float64 only
    resolves 256 ns."""
    stamps = records.detach().to("cpu", torch.int64)[:, 2:5]
    return (stamps - stamps[:, 0].min()).double() / 1e3


class _Tasks(NamedTuple):
    """A checked timeline as per-task columns (times in us since the first start)."""

    program: torch.Tensor
    start: torch.Tensor
    ready: torch.Tensor
    end: torch.Tensor
    op: torch.Tensor
    layer: torch.Tensor
    weight_bytes: torch.Tensor  # the op's streamed weight bytes split evenly over its tasks


def _tasks(plan: Plan, records: torch.Tensor) -> _Tasks:
    """Check the records of a profiled step ([num_tasks, 5] int64 from
    `DecodeRuntime.timeline`) against the plan and split them into per-task columns."""
    if records.shape != (plan.num_tasks, 5):
        raise ValueError(
            f"timeline has shape {tuple(records.shape)}; a profiled step of this plan writes "
            f"({plan.num_tasks}, 5): build the plan with profile=1 and run one step"
        )
    rec = records.detach().to("cpu", torch.int64)
    if bool((rec[:, 4] < rec[:, 3]).any() or (rec[:, 3] < rec[:, 2]).any()
            or (rec[:, 2] <= 0).any()):
        raise ValueError("timeline records are incomplete or out of order: was the step run?")
    start, ready, end = times_us(rec).unbind(1)
    ops = torch.tensor([int(t.op) for t in plan.tasks])
    counts = torch.bincount(ops, minlength=len(Op))
    per_op = torch.tensor([plan.weight_bytes_by_op.get(op, 0) for op in Op], dtype=torch.float64)
    return _Tasks(program=rec[:, 0], start=start, ready=ready, end=end, op=ops,
                  layer=torch.tensor([t.layer for t in plan.tasks]),
                  weight_bytes=(per_op / counts.clamp(min=1).double())[ops])


def summarize(plan: Plan, records: torch.Tensor) -> Summary:
    """records: [num_tasks, 5] int64 from `DecodeRuntime.timeline` after a profiled step."""
    tasks = _tasks(plan, records)
    start, ready, end, ops, layers = tasks.start, tasks.ready, tasks.end, tasks.op, tasks.layer
    span = float(end.max())
    wait, work = ready - start, end - ready
    per_op = []
    for op in Op:
        sel = ops == int(op)
        n = int(sel.sum())
        if n:
            per_op.append(OpTime(op.name, n, float(wait[sel].sum()), float(work[sel].sum()),
                                 float(wait[sel].mean()), float(work[sel].mean())))
    in_layers = (ops != int(Op.EMBED)) & (ops != int(Op.LMHEAD))
    layer_spans = [
        float(end[sel].max()) - float(start[sel].min())
        for layer in range(plan.config.num_layers)
        if (sel := in_layers & (layers == layer)).any()
    ]
    programs = int(tasks.program.max()) + 1
    capacity = programs * span
    return Summary(
        span_us=span,
        programs=programs,
        busy_fraction=float(work.sum()) / capacity,
        wait_fraction=float(wait.sum()) / capacity,
        per_op=per_op,
        per_layer_us=sum(layer_spans) / max(1, len(layer_spans)),
    )


# The ops of a transformer layer, in the order they run.
LAYER_OPS = (Op.QKV, Op.ATTN, Op.OPROJ, Op.GATEUP, Op.DOWN)


def _layer_start(tasks: _Tasks, layer: int) -> float:
    """The layer's first QKV task start (us): where its stage windows and profile begin."""
    return float(tasks.start[(tasks.op == int(Op.QKV)) & (tasks.layer == layer)].min())


@dataclass(frozen=True)
class StageWindow:
    """When one op's tasks of a layer ran, in us from the layer's first QKV task start
    (averaged over layers), and the weight bytes they streamed over their window."""

    op: str
    tasks: int  # per layer
    first_start_us: float
    first_ready_us: float
    last_ready_us: float
    last_end_us: float
    mean_work_us: float
    weight_tbs: float  # the stage's weight bytes / (last end - first ready), TB/s

    HEADER = (f"{'op':<8}{'tasks':>6}{'1st start':>11}{'1st ready':>11}{'last ready':>12}"
              f"{'last end':>10}{'mean work':>11}{'TB/s':>7}")

    def format(self) -> str:
        return (f"{self.op:<8}{self.tasks:>6}{self.first_start_us:>11.2f}"
                f"{self.first_ready_us:>11.2f}{self.last_ready_us:>12.2f}"
                f"{self.last_end_us:>10.2f}{self.mean_work_us:>11.2f}{self.weight_tbs:>7.2f}")


def stage_windows(plan: Plan, records: torch.Tensor,
                  layers: list[int] | None = None) -> list[StageWindow]:
    """Each op's window in a layer (see StageWindow), averaged over `layers` (default: the
    middle half of the model, away from the embedding and the LM head)."""
    tasks = _tasks(plan, records)
    start, ready, end, ops, task_layer = tasks.start, tasks.ready, tasks.end, tasks.op, tasks.layer
    n = plan.config.num_layers
    layers = list(layers if layers is not None else range(n // 4, max(n // 4 + 1, 3 * n // 4)))
    bases = [(layer, _layer_start(tasks, layer)) for layer in layers]
    windows = []
    for op in LAYER_OPS:
        rows = []
        for layer, base in bases:
            sel = (ops == int(op)) & (task_layer == layer)
            first_ready, last_end = float(ready[sel].min()), float(end[sel].max())
            rows.append([int(sel.sum()), float(start[sel].min()) - base, first_ready - base,
                         float(ready[sel].max()) - base, last_end - base,
                         float((end[sel] - ready[sel]).mean()),
                         float(tasks.weight_bytes[sel].sum())
                         / max(last_end - first_ready, 1e-9) / 1e6])
        mean = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
        windows.append(StageWindow(op.name, round(mean[0]), *mean[1:]))
    return windows


def bandwidth_profile(plan: Plan, records: torch.Tensor, layer: int, *,
                      bin_us: float = 1.0) -> list[tuple[float, float, int, int]]:
    """From layer `layer`'s first QKV start to its last DOWN end, per `bin_us`: (time since
    that start, TB/s of weight bytes streamed, tasks working, tasks waiting on a counter),
    each task's bytes spread evenly over its work (ready -> end), any layer's tasks counted."""
    if not 0 <= layer < plan.config.num_layers:
        raise ValueError(f"layer={layer} must lie in [0, {plan.config.num_layers})")
    tasks = _tasks(plan, records)
    start, ready, end, ops, task_layer = tasks.start, tasks.ready, tasks.end, tasks.op, tasks.layer
    base = _layer_start(tasks, layer)
    stop = float(end[(ops == int(Op.DOWN)) & (task_layer == layer)].max())
    rate = tasks.weight_bytes / (end - ready).clamp(min=1e-3)  # bytes per us
    profile = []
    t = base
    while t < stop:
        t1 = t + bin_us
        overlap = (torch.minimum(end, torch.tensor(t1)) - torch.maximum(ready, torch.tensor(t)))
        streamed = float((rate * overlap.clamp(min=0)).sum())
        working = int(((ready < t1) & (end > t)).sum())
        waiting = int(((start < t1) & (ready > t)).sum())
        profile.append((t - base, streamed / bin_us / 1e6, working, waiting))
        t = t1
    return profile


def gantt_png(plan: Plan, records: torch.Tensor, path: str, *, programs: int = 64) -> None:
    """One row per program (the first `programs`), a bar per task coloured by op, its wait
    drawn pale. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise RuntimeError("gantt_png needs matplotlib: pip install matplotlib") from exc
    programs_of = records.detach().cpu()[:, 0].tolist()
    times = times_us(records).tolist()
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(14, 6))
    for i, task in enumerate(plan.tasks):
        program = int(programs_of[i])
        if program >= programs:
            continue
        start, ready, end = times[i]
        color = colors(int(task.op))
        ax.barh(program, ready - start, left=start, color=color, alpha=0.25, linewidth=0)
        ax.barh(program, end - ready, left=ready, color=color, linewidth=0)
    for op in Op:
        ax.barh(0, 0, color=colors(int(op)), label=op.name)
    ax.set_xlabel("us since the first task started")
    ax.set_ylabel("program")
    ax.set_title(f"{plan.config.summary()}: pale = waiting on a counter")
    ax.legend(loc="upper right", ncols=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_step(
    config,
    *,
    batch: int = 1,
    pos: int = 512,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    seed: int = 0,
    steps: int = 3,
    quant=None,
    tiles: dict[str, int] | None = None,
) -> tuple[Plan, torch.Tensor]:
    """Run `steps` decode steps of `config` with random weights (quantized with `quant`, a
    QuantScheme, if given) and a random KV cache, every sequence at position `pos`, with the
    timeline on (the first step compiles, the last is recorded); `tiles` overrides plan
    tiles. Returns the plan and the records of the last step ([num_tasks, 5] int64 on the
    device), ready for `summarize` and `gantt_png`. GPU only."""
    from flashformer_triton.loading import random_state_dict
    from flashformer_triton.plan import GpuSpec, make_plan
    from flashformer_triton.quantize import quantize_state
    from flashformer_triton.runtime import DecodeRuntime
    from flashformer_triton.weights import pack_weights

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("the timeline profile reads GPU timers: it needs a CUDA device")
    max_seq_len = max_seq_len or max(1024, pos + 64)
    if not 0 <= pos < max_seq_len:
        raise ValueError(f"pos={pos} must lie in [0, max_seq_len={max_seq_len})")
    state = random_state_dict(config, seed=seed, dtype=dtype, device=device)
    if quant is not None:
        state = quantize_state(config.num_layers, state, quant, tied=config.tie_word_embeddings)
    weights = pack_weights(config, state, dtype=dtype, device=device)
    del state
    plan = make_plan(config, batch=batch, max_seq_len=max_seq_len, dtype=dtype,
                     gpu=GpuSpec.current(device), quant=weights.scheme,
                     **{**(tiles or {}), "profile": 1})
    shape = (config.num_layers, batch, config.num_kv_heads, max_seq_len, config.head_dim)
    k = torch.randn(shape, dtype=dtype, device=device)
    runtime = DecodeRuntime(config, weights, plan, k, torch.randn_like(k))
    runtime.ids.random_(0, config.vocab_size)
    runtime.pos.fill_(pos)
    for _ in range(max(1, steps)):  # compile, warm up, then the recorded step
        runtime.launch()
        runtime.check()
    return plan, runtime.timeline
