"""Experiment: what the 1-swap scan's inner loop compiles to on the H100, without a GPU.

Triton compiles for sm_90 on any machine (its wheel bundles ptxas and cuobjdump), so the scan kernel's
SASS can be read offline. For each variant this counts the instructions in the body of the i loop (the
longest backward branch), the share that is the scan's own arithmetic (FMUL, FFMA, FMNMX: 3 per pair),
the barriers and shared-memory traffic, and the registers and spill stack per thread.

Variants:
- `triton`: the plain Triton kernel (`_low_kernel` in `solvers/swaps_triton.py`, the fallback) at the
  tiles its autotuner chose on the H100.
- `gluon-registers`: a Gluon kernel (Triton's explicit-layout dialect) that loads each i's G row and row
  terms from global memory straight into the accumulator's layout, so no layout conversion (shared memory
  plus two barriers per vector per i) is needed. Production from 9037815 to ec67f28; kept here.
- `gluon-async`: the production kernel (`_low_kernel_gluon`), which stages chunks of i in shared memory
  with asynchronous copies (cp.async) several chunks ahead.
`EXPLORED` holds tiles that were measured and lost.

    pip install triton==3.6.0        # the device's version; CPU-only machines can compile
    python benchmarks/experiments/scan_sass.py --out benchmarks/results/scan_sass.json
    python benchmarks/experiments/scan_sass.py --out scan_sass_h100.json --measure     # on the GPU

The counts are static; `--measure` (CUDA) also times every variant on a 4096 x 4096 layer and checks that
each gives the production kernel's output.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from sparseswaps.solvers import swaps_triton  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
SCAN_OPS = ("FMUL", "FFMA", "FMNMX")


@gluon.jit
def low_gluon_registers(gram, weight, scale_t, restore_t, prune, inv_scale, tile_val, tile_j, rows, d, slots,
                        rows_bucket, SCALED: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_J: gl.constexpr,
                        UNROLL: gl.constexpr, SPT_R: gl.constexpr, SPT_J: gl.constexpr, TPW_R: gl.constexpr,
                        WARPS: gl.constexpr):  # pragma: no cover
    """The scan with each i's values loaded from global memory into registers, i unrolled by UNROLL."""
    layout: gl.constexpr = gl.BlockedLayout([SPT_R, SPT_J], [TPW_R, 32 // TPW_R], [WARPS, 1], [1, 0])
    r = gl.program_id(0) * BLOCK_R + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
    j = gl.program_id(1) * BLOCK_J + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, layout))
    r_ok = r < rows
    j_ok = j < d
    rj_ok = gl.expand_dims(r_ok, 1) & gl.expand_dims(j_ok, 0)
    w = gl.load(weight + gl.expand_dims(r, 1) * d + gl.expand_dims(j, 0), mask=rj_ok, other=0.0)
    acc = gl.full([BLOCK_R, BLOCK_J], float("inf"), gl.float32, layout=layout)
    for start in range(0, d, UNROLL):
        for step in gl.static_range(UNROLL):
            i = start + step
            i_ok = i < d
            g = gl.load(gram + i * d + j, mask=j_ok & i_ok, other=0.0)
            s = gl.load(scale_t + i * rows + r, mask=r_ok & i_ok, other=0.0)
            a = gl.load(restore_t + i * rows + r, mask=r_ok & i_ok, other=float("inf"))
            acc = gl.minimum(acc, (w * gl.expand_dims(g, 0)) * gl.expand_dims(s, 1) + gl.expand_dims(a, 1))
    swaps_triton._store_tile_best(acc, r, j, prune, inv_scale, tile_val, tile_j, rows, d, slots,
                                  gl.program_id(1), SCALED, BLOCK_J)


def kernel_function(kind: str):
    return {"triton": swaps_triton._low_kernel.fn, "gluon-registers": low_gluon_registers,
            "gluon-async": swaps_triton._low_kernel_gluon.fn}[kind]


def signature(constexprs: dict) -> dict:
    sig = {name: "*fp32" for name in ("gram", "weight", "scale_t", "restore_t", "prune", "inv_scale", "tile_val")}
    sig.update({"tile_j": "*i32", "rows": "i32", "d": "i32", "slots": "i32", "rows_bucket": "i32"})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def compile_variant(kind: str, constexprs: dict, num_warps: int, maxnreg: int | None):
    # The launcher specialises pointers, rows and d (multiples of 16 in every LLM layer) as 16-divisible.
    attrs = {(k,): [["tt.divisibility", 16]] for k in range(10)}
    constexprs = {"SCALED": False, **constexprs}
    source = (ASTSource if kind == "triton" else GluonASTSource)(kernel_function(kind), signature(constexprs),
                                                                  constexprs, attrs)
    options = {"num_warps": num_warps, "num_stages": 1, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=H100, options=options)


def loop_body(sass: str) -> list[str]:
    """Instructions of the longest loop: from a label to the furthest backward branch to it."""
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): n for n, line in enumerate(lines) if re.fullmatch(r"\.?LBB\w*:", line.strip())}
    loops = [(labels[m.group(1)], n) for n, line in enumerate(lines)
             if (m := re.search(r"BRA (\.?LBB\w+)", line)) and labels.get(m.group(1), n) < n]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    opcodes = []
    for line in lines[start + 1:end + 1]:
        fields = line.split("\t")
        if len(fields) > 1 and fields[1].strip():
            opcodes.append(re.sub(r"^@!?U?P\w+ ", "", fields[1].strip()).split(" ")[0].split(".")[0])
    return opcodes


def resources(cubin: bytes) -> dict:
    """Registers, stack and shared memory per thread/block, from cuobjdump (bundled with Triton)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True,
                               text=True, check=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\d+)", usage)}


def analyse(kind: str, constexprs: dict, num_warps: int, maxnreg: int | None) -> dict:
    kernel = compile_variant(kind, constexprs, num_warps, maxnreg)
    ops = collections.Counter(loop_body(kernel.asm["sass"]))
    scan = sum(ops[op] for op in SCAN_OPS)
    total = sum(ops.values())
    return {"kernel": kind, "config": {**constexprs, "num_warps": num_warps, "maxnreg": maxnreg},
            "loop_instructions": total,
            "scan_instructions": scan, "scan_share": scan / total, "barriers": ops["BAR"],
            "shared_loads": ops["LDS"], "shared_stores": ops["STS"] + ops["STSM"],
            "global_loads": ops["LDG"] + ops["LDGSTS"],   # LDGSTS: asynchronous copies to shared memory
            **resources(kernel.asm["cubin"]), "opcodes": dict(ops.most_common())}


TILE_128X64 = {"BLOCK_R": 128, "BLOCK_J": 64, "SPT_R": 4, "SPT_J": 8, "TPW_R": 8, "WARPS": 4}
VARIANTS = [
    ("triton", {"BLOCK_R": 128, "BLOCK_J": 64, "UNROLL": 4}, 4, None),     # tuned for 4096x4096 and 11008x4096
    ("triton", {"BLOCK_R": 64, "BLOCK_J": 128, "UNROLL": 4}, 4, None),     # tuned for 4096x11008
    # the tiles the register kernel's autotuner had
    ("gluon-registers", {**TILE_128X64, "UNROLL": 4}, 4, None),
    ("gluon-registers", {**TILE_128X64, "UNROLL": 4, "SPT_R": 8, "TPW_R": 4}, 4, None),
    ("gluon-registers", {**TILE_128X64, "BLOCK_R": 64, "BLOCK_J": 128, "TPW_R": 4, "UNROLL": 4}, 4, None),
    ("gluon-registers", {**TILE_128X64, "BLOCK_R": 64, "TPW_R": 4, "UNROLL": 4}, 4, None),
    ("gluon-registers", {**TILE_128X64, "BLOCK_R": 32, "SPT_R": 2, "TPW_R": 4, "UNROLL": 4}, 4, None),
] + [("gluon-async", config.kwargs, config.num_warps, None) for config in swaps_triton.GLUON_CONFIGS]
# More blocks per SM through fewer registers (all slower on the H100), and a third stage at 16 per copy.
EXPLORED = [("gluon-registers", {**TILE_128X64, "UNROLL": 2}, 4, None),
            ("gluon-registers", {**TILE_128X64, "UNROLL": 2}, 4, 168),
            ("gluon-registers", {**TILE_128X64, "UNROLL": 4, "SPT_R": 2, "WARPS": 8}, 8, None),
            ("gluon-async", {**TILE_128X64, "CHUNK": 16, "STAGES": 3}, 4, None)]


def measure(rows: list[dict], width: int = 4096) -> None:
    """Time every variant on one width x width layer (half of each row pruned) and compare its output."""
    import torch
    from triton.testing import do_bench

    generator = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(width, width, device="cuda", generator=generator)
    x = torch.randn(width, 2 * width, device="cuda", generator=generator)
    gram = x @ x.T / (2 * width)
    scale_t = (-2 * w).T.contiguous()
    pruned = torch.rand(width, width, device="cuda", generator=generator) < 0.5
    restore_t = torch.where(pruned, torch.randn(width, width, device="cuda", generator=generator), float("inf"))
    prune = torch.where(pruned.T, float("inf"), torch.randn(width, width, device="cuda", generator=generator).abs())
    reference = None
    for row in rows:
        constexprs = {k: v for k, v in row["config"].items() if k not in ("num_warps", "maxnreg")}
        launch_options = {"num_warps": row["config"]["num_warps"], "num_stages": 1,
                          **({"maxnreg": row["config"]["maxnreg"]} if row["config"]["maxnreg"] else {})}
        kernel = kernel_function(row["kernel"])
        grid = (triton.cdiv(width, constexprs["BLOCK_R"]), triton.cdiv(width, constexprs["BLOCK_J"]))
        slots = width // swaps_triton.MIN_BLOCK_J
        tile_val = torch.full((width, 2 * slots), float("inf"), device="cuda")
        tile_j = torch.zeros(width, 2 * slots, dtype=torch.int32, device="cuda")

        def launch():
            kernel[grid](gram, w, scale_t, restore_t, prune, prune, tile_val, tile_j, width, width, slots, width,
                         SCALED=False, **constexprs, **launch_options)

        milliseconds = do_bench(launch)
        best = tile_val.min(1).values
        reference = best.clone() if reference is None else reference
        row.update(ms=milliseconds, pairs_per_s=width ** 3 / (milliseconds / 1e3),
                   max_abs_difference=(best - reference).abs().max().item())


def tile_description(config: dict) -> str:
    loop = (f"{config['CHUNK']} per copy x {config['STAGES']} stages" if "CHUNK" in config
            else f"unroll {config['UNROLL']}")
    cap = f", max {config['maxnreg']} registers" if config.get("maxnreg") else ""
    return f"{config['BLOCK_R']} x {config['BLOCK_J']}, {loop}, {config['num_warps']}{cap}"


COLUMNS = {
    "kernel": lambda row: row["kernel"],
    "tile (rows x j, i loop, warps)": lambda row: tile_description(row["config"]),
    "thread tile": lambda row: "{SPT_R} x {SPT_J}".format(**row["config"]) if "SPT_R" in row["config"] else "compiler's",
    "loop instructions": lambda row: row["loop_instructions"],
    "scan share": lambda row: f"{row['scan_share']:.0%}",
    "barriers": lambda row: row["barriers"],
    "shared ld/st": lambda row: f"{row['shared_loads']}/{row['shared_stores']}",
    "global loads": lambda row: row["global_loads"],
    "registers": lambda row: row["reg"],
    "stack bytes": lambda row: row["stack"],
}
MEASURED = {
    "ms": lambda row: f"{row['ms']:.2f}",
    "T pairs/s": lambda row: f"{row['pairs_per_s'] / 1e12:.2f}",
    "max diff": lambda row: f"{row['max_abs_difference']:.1e}",
}


def table(rows: list[dict]) -> str:
    columns = {**COLUMNS, **(MEASURED if "ms" in rows[0] else {})}
    lines = ["| " + " | ".join(columns) + " |", "|---|---|---|" + "---:|" * (len(columns) - 3)]
    lines += ["| " + " | ".join(str(cell(row)) for cell in columns.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--measure", action="store_true", help="also time every variant on the GPU")
    args = parser.parse_args()
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            parser.error("--measure times the kernels on a CUDA GPU and none is visible; drop it for the static counts")
    rows = [analyse(*variant) for variant in VARIANTS + EXPLORED]
    if args.measure:
        measure(rows)
    result = {"target": "sm_90 (H100)", "triton": triton.__version__, "variants": rows}
    args.out.write_text(json.dumps(result, indent=1))
    markdown = (f"# The scan's i loop in SASS (sm_90, Triton {triton.__version__}, compiled offline)\n\n"
                "Per loop iteration (UNROLL values of i, or CHUNK for the kernels that stage i in shared memory); the "
                "scan's own arithmetic is FMUL + FFMA + FMNMX, 3 per pair.\n\n" + table(rows))
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
