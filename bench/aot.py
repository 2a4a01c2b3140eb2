"""Compile mpd_triton's kernels for a GPU that is not here: registers, spills, vector width.

    python -m bench.aot                  # every kernel variant, for an H100 (sm_90)
    python -m bench.aot --arch 80        # for an A100
    python -m bench.aot --sweep          # registers and occupancy over tile size x warps
    python -m bench.aot --quick          # the training hot path only (what the tests run)

Triton compiles to PTX and then to SASS with the ptxas that ships in its wheel, so
this needs neither a GPU nor a CUDA driver. The real ``lif_forward`` / ``lif_backward``
run on meta tensors while a stand-in driver names the target, and each kernel launch
is replaced by ``JITFunction.warmup`` (compile, no launch): every kernel compiles
with its launch's own arguments, constexprs and alignment specialization. That
catches compile errors the tests cannot see (they run the kernels in the Triton
interpreter) and shows, before a GPU session, what bounds a bandwidth-bound kernel:
registers per thread (hence occupancy), local-memory spills, and whether global
loads and stores are 128 bits wide. It times nothing; speed is `python -m
bench.kernels` on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from mpd_triton.kernels import lif as lif_kernels
from mpd_triton.kernels import runtime
from mpd_triton.neuron import LIFConfig
from plumbing.files import ensure_writable, write_text

from .cli import command_line, write_errors_in_one_line
from .kernels import bench_shape
from .report import markdown_table, text_table, write_json

__all__ = ["ARCHS", "CASES", "QUICK_CASES", "compile_case", "resource_usage", "occupancy", "main"]

# Streaming multiprocessor limits used for the occupancy estimate (the same on sm_80 and sm_90;
# sm_100 keeps them): 64K 32-bit registers, 64 resident warps, 32 resident blocks.
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_BLOCKS = 65536, 64, 32
ARCHS = {"80": "A100", "86": "RTX 30xx / A10", "89": "L4 / RTX 40xx", "90": "H100 / H200", "100": "B200"}
HOT_SIZE = 2**27  # T*N of the bandwidth targets (docs/benchmarks.md, "Targets")


@dataclass(frozen=True)
class Case:
    """One lif_forward or lif_backward call; its kernels are what gets compiled."""

    name: str
    what: str  # "forward" or "backward"
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # contiguous, channels_last, expanded_t (stride-0 T), strided
    stats: bool = False
    save_u: bool = True
    v_init: bool = False
    save_state: bool = False
    cfg: LIFConfig = LIFConfig()
    mpd: bool = False  # backward: MPD-SGR term
    grad_spikes: bool = True
    grad_v_T: bool = False
    need_grad_v0: bool = False
    surrogate_param: str | None = None  # backward: None (scalar), "channel" ([C]) or "element" (x's shape)


def _hot_shape(T: int = 8) -> tuple[int, ...]:
    T, B, C, S = bench_shape(T, HOT_SIZE)
    side = int(round(S ** 0.5))
    return (T, B, C, side, side) if side * side == S else (T, B, C, S)


_SOFT = LIFConfig(v_reset=None, decay_input=False)
CASES = [
    Case("fwd f32 + stats (training)", "forward", _hot_shape(), stats=True),
    Case("fwd bf16 + stats (training)", "forward", _hot_shape(), torch.bfloat16, stats=True),
    Case("fwd f16", "forward", _hot_shape(), torch.float16),
    Case("fwd f32 inference (no u saved)", "forward", _hot_shape(), save_u=False),
    Case("fwd f32 soft reset, v_init, v_T", "forward", (8, 32, 64, 17, 17), v_init=True, save_state=True, cfg=_SOFT),
    Case("fwd f32 channels-last + stats", "forward", (8, 32, 64, 17, 17), layout="channels_last", stats=True),
    Case("fwd f32 expanded over T (first layer)", "forward", (8, 32, 3, 32, 32), layout="expanded_t", stats=True),
    Case("fwd f32 linear [T, B, F] + stats", "forward", (8, 128, 1000), stats=True),
    Case("bwd f32 triangle + MPD (training)", "backward", _hot_shape(), mpd=True),
    Case("bwd bf16 triangle + MPD (training)", "backward", _hot_shape(), torch.bfloat16, mpd=True),
    Case("bwd f16 triangle", "backward", _hot_shape(), torch.float16),
    *[Case(f"bwd f32 {name}, soft reset, detach_reset", "backward", (8, 32, 64, 17, 17),
           cfg=LIFConfig(v_reset=None, detach_reset=True, surrogate=name), mpd=True)
      for name in ("rectangular", "sigmoid", "atan", "superspike")],
    Case("bwd f32 v_T grad, v0 grad, no spike grad", "backward", (8, 32, 64, 17, 17), grad_spikes=False,
         grad_v_T=True, need_grad_v0=True),
    Case("bwd f32 channels-last, strided grad", "backward", (8, 32, 64, 17, 17), layout="channels_last", mpd=True),
    # the attacker's backward (ASSG): the surrogate's parameter per channel, and per element
    Case("bwd f32 atan, alpha per channel", "backward", (8, 32, 64, 17, 17), cfg=LIFConfig(surrogate="atan"),
         surrogate_param="channel"),
    Case("bwd f32 atan, alpha per element", "backward", (8, 32, 64, 17, 17), cfg=LIFConfig(surrogate="atan"),
         surrogate_param="element"),
]
QUICK_CASES = [c for c in CASES if "(training)" in c.name]


# ---------------------------------------------------------------- compiling without a GPU


class _TargetDriver:
    """What JITFunction.run asks of the active driver on the way to compiling."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Compile:
    """Stands in for a @triton.jit kernel in lif_kernels: ``kernel[grid](...)`` compiles."""

    def __init__(self, fn, sink: list, num_warps: int | None):
        self.fn, self.sink, self.num_warps = fn, sink, num_warps

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.num_warps is not None:
                kwargs["num_warps"] = self.num_warps
            self.sink.append((self.fn.__name__, grid, self.fn.warmup(*args, grid=grid, **kwargs)))

        return launch


@contextlib.contextmanager
def _compiling_for(arch: str, num_warps: int | None, tile_elements: int | None):
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    compiled: list = []
    saved = dict(lif_kernels.KERNELS)  # the launchers' registry: every kernel they run, by role
    saved_tile = lif_kernels.TILE_ELEMENTS
    saved_driver = getattr(driver, "_active", None)  # reset_active() would look for a real GPU driver
    driver.set_active(_TargetDriver(GPUTarget("cuda", int(arch), 32)))
    try:
        for name in saved:
            lif_kernels.KERNELS[name] = _Compile(saved[name], compiled, num_warps)
        if tile_elements is not None:
            lif_kernels.TILE_ELEMENTS = tile_elements
        yield compiled
    finally:
        lif_kernels.KERNELS.update(saved)
        lif_kernels.TILE_ELEMENTS = saved_tile
        driver.set_active(saved_driver)


def _tensor(case: Case) -> torch.Tensor:
    meta = torch.device("meta")
    if case.layout == "expanded_t":
        return torch.empty(case.shape[1:], dtype=case.dtype, device=meta).expand(case.shape)
    t = torch.empty(case.shape, dtype=case.dtype, device=meta)
    if case.layout == "channels_last":
        T, B = case.shape[:2]
        t = t.reshape(T * B, *case.shape[2:]).contiguous(memory_format=torch.channels_last).reshape(case.shape)
    return t


def _run_case(case: Case) -> None:
    params = case.cfg.kernel_params
    x = _tensor(case)
    if case.what == "forward":
        v_init = torch.empty(case.shape[1:], dtype=case.dtype, device="meta") if case.v_init else None
        lif_kernels.lif_forward(x, params, v_init=v_init, stats=case.stats, save_state=case.save_state,
                                save_u=case.save_u)
        return
    T, C = case.shape[0], case.shape[2]
    grad = None
    if case.grad_spikes:
        grad = x if case.layout != "channels_last" else torch.empty(
            case.shape[:2] + (C * 2,) + case.shape[3:], dtype=case.dtype, device="meta")[:, :, ::2]
    mpd = torch.empty((T, C), device="meta") if case.mpd else None
    grad_v_T = torch.empty(case.shape[1:], dtype=case.dtype, device="meta") if case.grad_v_T else None
    sg_param = {None: None, "channel": torch.empty((C,), device="meta"),
                "element": torch.empty(case.shape, device="meta")}[case.surrogate_param]
    lif_kernels.lif_backward(grad, x, params, mpd_a=mpd, mpd_b=mpd, grad_v_T=grad_v_T,
                             need_grad_v0=case.need_grad_v0, surrogate_param=sg_param)


def _tool(name: str) -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in this triton wheel ({path}); bench.aot needs triton's NVIDIA "
                                "backend with its bundled CUDA tools")
    return path


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread, local memory (spills) and static shared memory, as cuobjdump reads them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", str(path)],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0)), "static_shared_bytes": int(fields.get("SHARED", 0))}


def _vector_widths(ptx: str) -> dict:
    """Global loads / stores in the PTX by width: v4 (128 bits for 32-bit values), v2, scalar."""
    out = {}
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global(?:\.[a-z0-9:]+)*?(\.v[248])?\.(?:b|f|u|s)(\d+)\b", ptx)
        out[f"{op}_v4"] = sum(1 for vec, _ in found if vec == ".v4")
        out[f"{op}_v2"] = sum(1 for vec, _ in found if vec == ".v2")
        out[f"{op}_scalar"] = sum(1 for vec, _ in found if not vec)
    return out


def occupancy(registers: int, num_warps: int, shared_bytes: int = 0) -> dict:
    """Resident blocks and warps per SM as limited by registers (allocated per warp in units of 256),
    warps and blocks; shared memory is far from a limit for these kernels."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(SM_REGISTERS // (per_warp * num_warps), SM_MAX_WARPS // num_warps, SM_MAX_BLOCKS)
    if shared_bytes:
        blocks = min(blocks, (227 * 1024) // shared_bytes)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / SM_MAX_WARPS}


def compile_case(case: Case, arch: str = "90", *, num_warps: int | None = None,
                 tile_elements: int | None = None) -> list[dict]:
    """Compile the kernels of one call for sm_<arch>; a record per kernel launch."""
    with _compiling_for(arch, num_warps, tile_elements) as compiled:
        _run_case(case)
    records = []
    for name, grid, kernel in compiled:
        md = kernel.metadata
        usage = resource_usage(kernel.asm["cubin"])
        shared = max(int(md.shared), usage["static_shared_bytes"])
        records.append({
            "case": case.name, "kernel": name.strip("_"), "dtype": str(case.dtype).removeprefix("torch."),
            "shape": list(case.shape), "grid": list(grid), "num_warps": md.num_warps, "num_stages": md.num_stages,
            "shared_bytes": shared, **usage, **_vector_widths(kernel.asm["ptx"]),
            **occupancy(usage["registers"], md.num_warps, shared),
        })
    return records


# ---------------------------------------------------------------- the command


def _vec_cell(r: dict, op: str) -> str:
    return f"{r[op + '_v4']}/{r[op + '_v2']}/{r[op + '_scalar']}"


def _rows(records: list[dict]) -> list[list[str]]:
    return [[r["case"], r["kernel"], str(r["num_warps"]), str(r["registers"]), str(r["local_bytes"]),
             str(r["shared_bytes"]), f"{r['warps_per_sm']} ({100 * r['occupancy']:.0f}%)", _vec_cell(r, "ld"),
             _vec_cell(r, "st")] for r in records]


HEADERS = ["case", "kernel", "warps", "regs/thread", "spill (local B)", "shared B", "warps/SM (occupancy)",
           "ld.global v4/v2/scalar", "st.global v4/v2/scalar"]
SWEEP_HEADERS = ["case", "kernel", "tile elements", "warps", "elements/thread", "regs/thread", "spill (local B)",
                 "warps/SM (occupancy)", "bytes loaded per SM per step"]


def _sweep(arch: str, tiles: list[int], warps: list[int], progress) -> list[dict]:
    records = []
    for case in QUICK_CASES:
        for tile in tiles:
            for w in warps:
                progress(f"sweep: {case.name}, tile {tile}, {w} warps")
                for r in compile_case(case, arch, num_warps=w, tile_elements=tile):
                    if r["kernel"] == "stats_merge_kernel":
                        continue
                    per_thread = tile / (32 * w)
                    loads = 1 if case.what == "forward" else 2  # x; or grad_spikes and u
                    r.update(tile_elements=tile, elements_per_thread=per_thread,
                             bytes_per_sm_per_step=int(r["warps_per_sm"] * 32 * per_thread * loads
                                                       * case.dtype.itemsize))
                    records.append(r)
    return records


def _sweep_rows(records: list[dict]) -> list[list[str]]:
    return [[r["case"], r["kernel"], str(r["tile_elements"]), str(r["num_warps"]), f"{r['elements_per_thread']:g}",
             str(r["registers"]), str(r["local_bytes"]), f"{r['warps_per_sm']} ({100 * r['occupancy']:.0f}%)",
             f"{r['bytes_per_sm_per_step'] / 1024:.0f} KiB"] for r in records]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90", help="compute capability without the dot: " + ", ".join(
        f"{k} ({v})" for k, v in ARCHS.items()) + " (default: 90)")
    p.add_argument("--quick", action="store_true", help="only the training hot path (forward and backward with "
                   "MPD-SGR, float32 and bfloat16, at T*N = 2^27)")
    p.add_argument("--sweep", action="store_true", help="also compile the hot path over --tiles x --warps")
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="tile elements for --sweep")
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8], help="warps per block for --sweep")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench/aot-<time>)")
    return p


@write_errors_in_one_line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.arch not in ARCHS:
        parser.error(f"--arch must be one of {', '.join(ARCHS)}, got {args.arch!r}")
    for tile in args.tiles:
        if tile < 32 or tile & (tile - 1):
            parser.error(f"--tiles take powers of two >= 32, got {tile}")
    for w in args.warps:
        if w not in (1, 2, 4, 8, 16, 32):
            parser.error(f"--warps take 1, 2, 4, 8, 16 or 32, got {w}")
    if runtime.INTERPRETED:
        print("error: TRITON_INTERPRET=1 is set, so the kernels are interpreter functions that do not compile; "
              "run `env -u TRITON_INTERPRET python -m bench.aot`", file=sys.stderr)
        return 2
    try:
        _tool("ptxas")
        _tool("cuobjdump")
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = ensure_writable(args.out or Path("runs") / "bench" / (
        "aot-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")))
    print(f"mpd-triton bench.aot: compiling for sm_{args.arch} ({ARCHS[args.arch]}) with triton {triton.__version__}"
          f" (no GPU used), tile {lif_kernels.TILE_ELEMENTS} elements", flush=True)

    progress = (lambda text: print(f"  {text}", file=sys.stderr, flush=True)) if sys.stderr.isatty() else (
        lambda text: None)
    records, failures = [], []
    for case in (QUICK_CASES if args.quick else CASES):
        progress(case.name)
        try:
            records += compile_case(case, args.arch)
        except Exception as error:  # a kernel that does not compile is the finding: report it, go on
            failures.append({"case": case.name, "error": f"{type(error).__name__}: {error}"})
            print(f"FAILED to compile {case.name}: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
    print(text_table(HEADERS, _rows(records)), flush=True)
    sweep = _sweep(args.arch, args.tiles, args.warps, progress) if args.sweep else []
    if sweep:
        print("\n" + text_table(SWEEP_HEADERS, _sweep_rows(sweep)), flush=True)

    payload = {"command": command_line(argv, "bench.aot"), "arch": args.arch, "gpu": ARCHS[args.arch],
               "triton": triton.__version__, "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "tile_elements": lif_kernels.TILE_ELEMENTS, "records": records, "failures": failures,
               "sweep": sweep}
    write_json(out / "aot.json", payload)
    md = [f"# Kernels compiled for sm_{args.arch} ({ARCHS[args.arch]})", "",
          f"`{payload['command']}`; triton {triton.__version__}, torch {torch.__version__}, {payload['date']}. "
          "Compiled without a GPU; nothing is timed.", "", markdown_table(HEADERS, _rows(records))]
    if failures:
        md += ["", "## Did not compile", ""] + [f"- {f['case']}: `{f['error']}`" for f in failures]
    if sweep:
        md += ["", "## Tile size x warps (hot path)", "", markdown_table(SWEEP_HEADERS, _sweep_rows(sweep))]
    write_text(out / "aot.md", "\n".join(md) + "\n")
    spills = [r for r in records if r["local_bytes"]]
    print(f"\n{len(records)} kernels compiled, {len(failures)} failed, {len(spills)} spill to local memory; "
          f"wrote {out / 'aot.json'}, {out / 'aot.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
