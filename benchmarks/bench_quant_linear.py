"""CPU weight-only quant_linear (cpp backend) vs torch bf16 ``F.linear`` on the same shape, timed in one process.

    python benchmarks/bench_quant_linear.py [--threads 2] [--rows 1,4,16,64,256] [--repeats 20] [--hot]

Variants: int8 per channel (fp32 scales, our ``quantization="int8"``), int8 g32 (GGUF Q8_0: fp16 scales),
int4 g32 (GGUF Q4_1: fp16 scales + mins), int4 g128 (our RTN ``quantization="int4"``: fp32 scales + mins;
only where 128 divides K). Reference rows: torch's own ``torch._weight_int8pack_mm`` (per-channel int8,
bf16 x and scales) and bitsandbytes when importable. Shapes: SmolLM2-135M (576x1536 / 1536x576 / the
49152x576 tied embedding) and Llama-size 4096x4096, 14336x4096 ([N, K] = [out, in]); x is bf16.

Each variant cycles through enough distinct copies of its weights (--budget-mb each, default 96 MB, three
times the 32 MB L3) that every call reads its weight from memory, as in a many-layer model; --hot uses one
copy (cache-resident for the small shapes). Prints one JSON object per (shape, rows, variant) and a table;
``ratio`` = bf16 F.linear time / this variant's time (> 1: faster than bf16), ``gb_s`` = weight bytes read
per second.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, median_time, table  # noqa: E402

from fastinfer.ops import cpp_backend  # noqa: E402
from fastinfer.quantization import QuantizedWeight, quantize_int4, quantize_int8  # noqa: E402

SHAPES = "1536x576,576x1536,49152x576,4096x4096,14336x4096"


def nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def copies(one: int, budget: int) -> int:
    """How many copies of ``one`` bytes fill ``budget`` (at least one)."""
    return max(1, -(-budget // one))


def cycled(fn: Callable[[tuple], object], items: list[tuple], repeats: int) -> float:
    """Median seconds of fn(item) over ``repeats`` calls (at least one pass over all items), cycling items."""
    it = itertools.cycle(items)
    for _ in range(min(3, len(items))):  # warm-up
        fn(next(it))
    return median_time(lambda: fn(next(it)), max(repeats, len(items)))


def variants(w: torch.Tensor) -> dict[str, QuantizedWeight]:
    """The quantized forms of the fp32 weight ``w`` [N, K] benchmarked here."""
    k = w.shape[1]
    out = {"int8": quantize_int8(w)}
    q8 = quantize_int8(w, 32)
    out["int8_g32"] = QuantizedWeight(8, 32, q8.qweight, q8.scales.half(), None)
    q4 = quantize_int4(w, 32)
    out["int4_g32"] = QuantizedWeight(4, 32, q4.qweight, q4.scales.half(), q4.mins.half())  # type: ignore[union-attr]
    if k % 128 == 0:
        out["int4_g128"] = quantize_int4(w, 128)
    return out


def run_shape(n: int, k: int, args, rows: list[dict], bnb) -> None:
    budget = 1 if args.hot else args.budget_mb << 20
    w = torch.randn(n, k) * 0.02  # [N, K] fp32
    wb = w.bfloat16()
    bf = [(wb.clone(),) for _ in range(copies(nbytes(wb), budget))]
    quant = {}
    for name, qw in variants(w).items():
        t = (qw.qweight, qw.scales, qw.mins)
        quant[name] = (qw, [tuple(x.clone() if x is not None else None for x in t)
                            for _ in range(copies(nbytes(*t), budget))])
    q8 = quant["int8"][0]
    pack = [(q.clone(), q8.scales.view(-1).bfloat16()) for q in [q8.qweight] * copies(nbytes(q8.qweight), budget)]
    bnb_w = None
    if bnb is not None:  # pragma: no cover - bitsandbytes is not installed here
        bnb_w = [(bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False),) for _ in range(len(pack))]
    del w
    for m in args.rows:
        x = torch.randn(m, k).bfloat16()  # [M, K]
        t_bf = cycled(lambda it, x=x: F.linear(x, it[0]), bf, args.repeats)
        base = {"shape": f"{n}x{k}", "M": m, "threads": torch.get_num_threads(), "bf16_ms": round(t_bf * 1e3, 4)}
        emit({**base, "variant": "bf16 F.linear", "ms": round(t_bf * 1e3, 4), "ratio": 1.0,
              "gb_s": round(nbytes(wb) / t_bf / 1e9, 1)}, rows)
        for name, (qw, items) in quant.items():
            def ours(it, qw=qw, x=x):
                return cpp_backend.quant_linear(x, it[0], it[1], it[2], qw.bits, qw.group_size)
            t = cycled(ours, items, args.repeats)
            emit({**base, "variant": name, "ms": round(t * 1e3, 4), "ratio": round(t_bf / t, 2),
                  "gb_s": round(nbytes(*items[0]) / t / 1e9, 1)}, rows)
        t = cycled(lambda it, x=x: torch._weight_int8pack_mm(x, it[0], it[1]), pack, args.repeats)
        emit({**base, "variant": "torch int8pack_mm", "ms": round(t * 1e3, 4), "ratio": round(t_bf / t, 2),
              "gb_s": round(nbytes(*pack[0]) / t / 1e9, 1)}, rows)
        if bnb_w is not None:  # pragma: no cover
            t = cycled(lambda it, x=x: it[0](x), bnb_w, args.repeats)
            emit({**base, "variant": "bitsandbytes int8", "ms": round(t * 1e3, 4), "ratio": round(t_bf / t, 2)}, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated NxK (out x in)")
    ap.add_argument("--rows", default="1,4,16,64,256", help="batch sizes M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget-mb", type=int, default=96, help="weight bytes cycled per variant (defeats the L3)")
    ap.add_argument("--hot", action="store_true", help="one copy of each weight (cache-resident when small)")
    args = ap.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError:
        bnb = None
        print("# bitsandbytes is not installed: its row is skipped", flush=True)
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        run_shape(n, k, args, rows, bnb)
    print()
    print(table(rows, ["shape", "M", "variant", "ms", "bf16_ms", "ratio", "gb_s"]))
    print(f"(threads {torch.get_num_threads()}; kernel ISA {cpp_backend.cpu_isa()}; "
          f"{'hot: one weight copy' if args.hot else f'cold: {args.budget_mb} MB of weight copies cycled'})")


if __name__ == "__main__":
    main()
