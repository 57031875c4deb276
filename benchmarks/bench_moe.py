"""A Mixture-of-Experts layer on the CPU: the fused cpp kernel vs the reference loop, the torch backend and a dense
GatedMLP of the same active size, timed in one process.

    python benchmarks/bench_moe.py [--threads 2] [--batch 1,16,64] [--repeats 20] [--budget-mb 640]

Shape (Mixtral 8x7B's proportions scaled by 1/4 in hidden and intermediate size): H = 1024, I = 3584 / 4 = 896,
E = 8 experts, top-2, bf16. One expert is 3 H I bf16 = 5.5 MB, the layer 44 MB. Each variant cycles through enough
distinct copies of its weights (--budget-mb, default 640 MB, over twice this VM's 300 MB L3) that every call
reads its weights from memory, as in a many-layer model. Rows:

- ``fused``: ``cpp_backend.fused_moe`` (csrc/cpu/fused_moe.cpp, tokens grouped by expert);
- ``fused-int8`` / ``fused-int4``: the same kernel on weight-only quantized experts (int8 per channel: 1 byte a
  weight; int4 group 32 with fp32 scales and mins: 0.75 bytes), dequantized in registers;
- ``reference``: ``ops.reference.fused_moe`` (the spec: a Python loop over experts, fp32 copies of the weights);
- ``torch``: ``torch_backend.fused_moe`` (static shapes: per-slot gathered weights or every expert on every token);
- ``dense``: a ``GatedMLP(H, 2 I)`` on the cpp op set (two experts' worth of weights, bf16 ``F.linear``).

``weight_mb`` = bytes of the distinct experts the batch chose, in the row's format (what a kernel that reads only
those must read; for ``dense``, its own two experts' worth); ``gb_s`` = weight_mb per second of the row;
``of_bw`` = that against the bandwidth measured here first (a 1 GiB fp32 ``sum``, read only, and a 1 GiB
``copy_``, read + write). Medians of --repeats calls.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_line, median_time, memory_bandwidth, table  # noqa: E402

from fastinfer.layers.mlp import GatedMLP  # noqa: E402
from fastinfer.ops import OpSet, reference, torch_backend  # noqa: E402
from fastinfer.ops import cpp_backend as cpp  # noqa: E402
from fastinfer.quantization.format import QuantizedExperts  # noqa: E402
from fastinfer.quantization.rtn import quantize_int4, quantize_int8  # noqa: E402

H, INTER, E, K = 1024, 3584 // 4, 8, 2
DTYPE = torch.bfloat16


def cycled(fn: Callable[[tuple], object], items: list, repeats: int) -> float:
    """Median seconds of fn(item) over ``repeats`` calls (at least one pass over all items), cycling items."""
    it = itertools.cycle(items)
    for _ in range(min(3, len(items))):  # warm-up
        fn(next(it))
    return median_time(lambda: fn(next(it)), max(repeats, len(items)))


def moe_layers(n: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n distinct (w13 [E, 2 I, H], w2 [E, H, I]) copies."""
    return [((torch.randn(E, 2 * INTER, H, generator=gen) / H ** 0.5).to(DTYPE),
             (torch.randn(E, H, INTER, generator=gen) / INTER ** 0.5).to(DTYPE)) for _ in range(n)]


QLayer = tuple[QuantizedExperts, QuantizedExperts]


def quantized_layers(floats: list[tuple[torch.Tensor, torch.Tensor]], bits: int, n: int) -> list[QLayer]:
    """n quantized (w13, w2) copies (int8 per channel or int4 group 32), cycling through the float copies."""
    def q(w: torch.Tensor) -> QuantizedExperts:
        return QuantizedExperts.stack([quantize_int8(w[e].float()) if bits == 8 else
                                       quantize_int4(w[e].float(), 32, search=False) for e in range(w.shape[0])])

    return [(q(floats[i % len(floats)][0]), q(floats[i % len(floats)][1])) for i in range(n)]


def qmoe_call(x: torch.Tensor, wts: torch.Tensor, ids: torch.Tensor) -> Callable[[QLayer], torch.Tensor]:
    return lambda w: cpp.fused_moe(x, w[0].qweight, w[1].qweight, wts, ids, w[0].scales, w[0].mins, w[1].scales,
                                   w[1].mins)


def dense_layers(n: int, ops: OpSet, gen: torch.Generator) -> list[GatedMLP]:
    out = []
    for _ in range(n):
        mlp = GatedMLP(H, K * INTER, ops, DTYPE)
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        out.append(mlp)
    return out


def moe_call(fn: Callable[..., torch.Tensor], x: torch.Tensor, wts: torch.Tensor, ids: torch.Tensor,
             ) -> Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    return lambda w: fn(x, w[0], w[1], wts, ids)


def dense_call(x: torch.Tensor) -> Callable[[GatedMLP], torch.Tensor]:
    return lambda m: m(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget-mb", type=int, default=640)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"# kernel ISA {cpp.cpu_isa()}; {args.threads} threads; H={H} I={INTER} E={E} top-{K} {DTYPE}")
    bw_read, bw_copy = memory_bandwidth(5)
    print(f"# measured bandwidth: {bw_read:.1f} GB/s read (fp32 sum), {bw_copy:.1f} GB/s read+write (copy)")

    gen = torch.Generator().manual_seed(0)
    expert_bytes = 3 * H * INTER * 2
    layers = moe_layers(max(1, -(-args.budget_mb * 2 ** 20 // (E * expert_bytes))), gen)
    ops = OpSet("cpu")
    dense = dense_layers(max(1, -(-args.budget_mb * 2 ** 20 // (K * expert_bytes))), ops, gen)
    qlayers: dict[str, list[QLayer]] = {}
    qexpert_bytes: dict[str, float] = {}
    for name, bits in (("fused-int8", 8), ("fused-int4", 4)):
        one = quantized_layers(layers[:1], bits, 1)[0]
        qexpert_bytes[name] = (one[0].nbytes + one[1].nbytes) / E
        qlayers[name] = quantized_layers(layers, bits, max(1, -(-args.budget_mb * 2 ** 20 // int(
            E * qexpert_bytes[name]))))
    rows: list[dict] = []
    for t in (int(b) for b in args.batch.split(",")):
        x = torch.randn(t, H, generator=gen).to(DTYPE)
        vals, ids = torch.randn(t, E, generator=gen).topk(K, dim=1)
        wts = vals.softmax(dim=1)
        active_mb = ids.unique().numel() * expert_bytes / 1e6
        ref = reference.fused_moe(x, *layers[0], wts, ids)
        err = (cpp.fused_moe(x, *layers[0], wts, ids).float() - ref.float()).abs().max().item()
        variants: dict[str, tuple[Callable[[Any], object], list, int]] = {
            "fused": (moe_call(cpp.fused_moe, x, wts, ids), layers, args.repeats),
            "reference": (moe_call(reference.fused_moe, x, wts, ids), layers, 3),
            "torch": (moe_call(torch_backend.fused_moe, x, wts, ids), layers, max(3, args.repeats // 4)),
            "dense": (dense_call(x), dense, args.repeats),
            **{name: (qmoe_call(x, wts, ids), qs, args.repeats) for name, qs in qlayers.items()},
        }
        times = {}
        with torch.inference_mode():
            for name, (fn, items, reps) in variants.items():
                times[name] = cycled(fn, items, reps)
        for name, s in times.items():
            mb = (K * expert_bytes / 1e6 if name == "dense"  # the dense layer reads its own weights
                  else active_mb * qexpert_bytes[name] / expert_bytes if name in qexpert_bytes else active_mb)
            gb_s = mb / 1e3 / s
            row = {"batch": t, "variant": name, "ms": round(s * 1e3, 3),
                   "vs_fused": round(s / times["fused"], 2), "weight_mb": round(mb, 1),
                   "gb_s": round(gb_s, 1), "of_bw": round(gb_s / bw_read, 2)}
            if name == "fused":
                row["max_err_vs_ref"] = err
            if name in qlayers:  # against the reference over the same quantized experts
                qw = qlayers[name][0]
                args_q = (qw[0].qweight, qw[1].qweight, wts, ids, qw[0].scales, qw[0].mins, qw[1].scales, qw[1].mins)
                row["max_err_vs_ref"] = (cpp.fused_moe(x, *args_q).float()
                                         - reference.fused_moe(x, *args_q).float()).abs().max().item()
            emit(row, rows)
    print(table(rows, ["batch", "variant", "ms", "vs_fused", "weight_mb", "gb_s", "of_bw"]))


if __name__ == "__main__":
    main()
