#!/usr/bin/env python3
"""The crate against PyTorch on the CPU or on CUDA, interleaved step by step, in one run.

One step = the mean loss and d(loss)/d(input) of a [B, C] input (label smoothing --smoothing).
The crate runs in a second process, `examples/peer.rs`, kept alive; it calls the crate's own
entry points (`loss_and_grad`, `loss_and_grad_into` a reused buffer, `loss` + `backward()`), so
every launch is planned by the crate, and it times each of its steps itself (CUDA events on
candle's stream, wall clock on the CPU). This driver times the PyTorch providers the same way
(torch.cuda.Event / perf_counter): eager, `torch.compile` of the same function, Liger-Kernel's
cross entropy (softmax, CUDA, when importable), and the copy floor `y.copy_(x)` (B·C elements,
1 read + 1 write). Each cycle runs one timed step of every provider in turn, for many cycles, so
that load changes on a shared machine reach every provider alike; a ratio is the median over
cycles of the per-cycle ratio (provider time / the crate's `loss_and_grad` time in that cycle).

Both sides draw fresh random inputs (several sets, rotated per step, enough to defeat the L2
cache). Before timing, the peer writes its first input set to a file; every provider and every
crate mode is run on it and its loss and gradient statistics (Σg, Σ|g|, ‖g‖, Σ g[i, t_i], Σ g·x)
are compared with a float64 evaluation of the PyTorch formulation. A disagreeing PyTorch
provider is skipped, loudly; a disagreeing crate mode makes the exit code 1.

    python3 -m venv venv && venv/bin/pip install torch numpy        # not a crate dependency
    venv/bin/python benches/torch_compare.py --device cpu --cycles 15
    python3 benches/torch_compare.py --device cuda                   # builds the peer with --features cuda
    python3 benches/torch_compare.py --peer .../examples/peer        # a prebuilt peer (tools/gpu)
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARC_S, ARC_M = 64.0, 0.5
RBF_S, RBF_GAMMA = 35.0, 16.0
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}
RAW = {"f32": np.float32, "f64": np.float64, "bf16": np.int16, "f16": np.int16}
CRATE = {"crate lag": "lag", "crate into": "into", "crate autograd": "autograd"}
DEFAULTS = {  # (shapes, dtypes, heads, cycles)
    "cpu": (["1024x32000", "64x100000", "256x1000"], ["f32"],
            ["softmax", "arcface-detached", "arcface", "rbf"], 15),
    "cuda": (["8192x32000", "4096x128256", "512x1000000"], ["bf16"],
             ["softmax", "arcface-detached"], 30),
}
STATS = ["loss", "sum g", "sum |g|", "|g|_2", "sum g[t]", "sum g*x"]


# --- the PyTorch formulations, (x, t, smoothing) -> loss ------------------------------------
def softmax_ce(x, t, ls):
    return F.cross_entropy(x, t, label_smoothing=ls)


def rbf(x, t, ls):
    return F.cross_entropy(RBF_S * torch.exp(-torch.clamp(x, min=0.0) / RBF_GAMMA), t, label_smoothing=ls)


def arcface_exact(x, t, ls):
    """Fully differentiable: cos(θ + m) = c·cos m − sqrt(1 − c²)·sin m on the target, with
    InsightFace's fallback c − m·sin m where θ + m > π (the crate's MarginGrad::Exact)."""
    c = x.clamp(-1.0, 1.0)
    ct = c.gather(1, t[:, None])
    st = torch.sqrt((1.0 - ct * ct).clamp(min=0.0))
    phi = torch.where(ct > math.cos(math.pi - ARC_M), ct * math.cos(ARC_M) - st * math.sin(ARC_M),
                      ct - math.sin(math.pi - ARC_M) * ARC_M)
    return F.cross_entropy(c.scatter(1, t[:, None], phi) * ARC_S, t, label_smoothing=ls)


def arcface_torch(x, t, ls):
    """InsightFace arcface_torch as configured for ArcFace (margin_list (1.0, 0.5, 0.0)):
    PartialFC_V2 casts the cosines to float and clamps them to [-1, 1]; CombinedMarginLoss's ArcFace
    branch then, under no_grad, takes arccos of the target and of every cosine in place, adds m
    on the target, takes cos in place; the result is scaled by s. The margin is thus a constant
    shift in backward: the crate's MarginGrad::Detached. (float64 stays float64: the reference.)"""
    logits = (x if x.dtype == torch.float64 else x.float()).clamp(-1, 1)
    rows = torch.arange(t.shape[0], device=x.device)
    target = logits[rows, t]
    with torch.no_grad():
        target.arccos_()
        logits.arccos_()
        logits[rows, t] = target + ARC_M
        logits.cos_()
    return F.cross_entropy(logits * ARC_S, t, label_smoothing=ls)


FORMULAS = {"softmax": ("torch", softmax_ce), "arcface-detached": ("arcface_torch", arcface_torch),
            "arcface": ("torch", arcface_exact), "rbf": ("torch", rbf)}


def make_inputs(head, b, c, dtype, dev, gen):
    """The peer's distributions (examples/peer.rs): softmax logits U(−4, 4); ArcFace cosines
    U(−0.2, 0.2), the target's U(0.2, 0.9) (out of the θ + m > π region, where arcface_torch has
    no fallback); RBF squared distances U(0, 64)."""
    u = lambda shape, lo, hi: torch.rand(shape, generator=gen, device=dev) * (hi - lo) + lo
    t = torch.randint(0, c, (b,), generator=gen, device=dev)
    if head == "softmax":
        x = u((b, c), -4.0, 4.0)
    elif head == "rbf":
        x = u((b, c), 0.0, 64.0)
    else:
        x = u((b, c), -0.2, 0.2)
        x.scatter_(1, t[:, None], u((b, 1), 0.2, 0.9))
    return x.to(DTYPES[dtype]), t


def autograd_step(fn, ls):
    def step(x, t):
        x = x.detach().requires_grad_(True)
        loss = fn(x, t, ls)
        (g,) = torch.autograd.grad(loss, x)
        return loss.detach(), g
    return step


def liger_step(ls):
    from liger_kernel.transformers import LigerCrossEntropyLoss
    mod = LigerCrossEntropyLoss(label_smoothing=ls)
    return autograd_step(lambda x, t, _: mod(x, t), ls)


def stats(loss, g, x, t):
    g, x = g.double(), x.double()
    return [float(loss), float(g.sum()), float(g.abs().sum()), float(g.square().sum().sqrt()),
            float(g.gather(1, t[:, None]).sum()), float((g * x).sum())]


def stat_error(got, ref, xmax):
    """The largest error of the statistics, each relative to its own scale."""
    scales = [abs(ref[0]), ref[2], ref[2], ref[3], ref[2], ref[2] * xmax]
    return max(abs(a - b) / max(s, 1e-30) for a, b, s in zip(got, ref, scales))


# --- the peer ---------------------------------------------------------------------------------
def build_peer(cuda):
    cmd = ["cargo", "build", "--release", "--example", "peer", "--message-format=json"]
    cmd += ["--features", "cuda"] if cuda else []
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():
        m = json.loads(line) if line.startswith("{") else {}
        if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "peer" and m.get("executable"):
            return m["executable"]
    sys.exit("cargo built no examples/peer executable")


class Peer:
    def __init__(self, path, device, threads):
        env = dict(os.environ, **({"RAYON_NUM_THREADS": str(threads)} if threads else {}))
        self.p = subprocess.Popen([path, device], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        reply = self.p.stdout.readline().strip()
        if not reply:
            raise RuntimeError(f"peer: no reply to {line!r} (exit code {self.p.poll()}; its error is above)")
        return reply

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except OSError:
            pass
        self.p.wait(timeout=30)


# --- one case ---------------------------------------------------------------------------------
def quantiles(v):
    v = sorted(v)
    at = lambda q: v[round((len(v) - 1) * q)]
    return at(0.25), at(0.5), at(0.75)


def run_case(args, peer, dev, b, c, dtype, head, tmp):
    case = f"{b}x{c} {dtype} {head}"
    cuda = dev.type == "cuda"
    size = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    sets = args.sets or min(16, max(2, math.ceil(4 * args.l2_bytes / (b * c * size))))
    seed = args.seed + 7919 * b + c
    one_pass = int(peer.ask(f"load {b} {c} {dtype} {head} {args.smoothing} {seed} {sets} "
                            f"{0 if args.no_check_targets else 1}").split()[1])
    passes = 2 if c <= one_pass else 3
    path = "one pass" if c <= one_pass else f"two passes (C > {one_pass})"
    print(f"\n## {case}: {sets} input sets; the crate plans {path}", flush=True)
    prefix, fn = FORMULAS[head]
    providers = {f"{prefix} eager": autograd_step(fn, args.smoothing)}
    if not args.no_compile:
        providers[f"{prefix} compile"] = autograd_step(torch.compile(fn, dynamic=False), args.smoothing)
    if head == "softmax" and cuda and not args.no_liger:
        try:
            providers["liger"] = liger_step(args.smoothing)
        except Exception as e:  # noqa: BLE001
            print(f"  liger: not run ({type(e).__name__}: {e})")

    # Correctness first: the peer's first input set, every provider and crate mode against f64.
    dump = os.path.join(tmp, "check.bin")
    crate_stats = {name: [float(v) for v in peer.ask(f"check {mode}" + (f" {dump}" if mode == "lag" else "")).split()]
                   for name, mode in CRATE.items()}
    raw = np.fromfile(dump, dtype=np.uint8)
    os.remove(dump)
    nx = b * c * np.dtype(RAW[dtype]).itemsize
    x = torch.from_numpy(raw[:nx].view(RAW[dtype]).reshape(b, c)).view(DTYPES[dtype]).to(dev)
    t = torch.from_numpy(raw[nx:].view(np.int64).copy()).to(dev)
    del raw
    ref = stats(*autograd_step(fn, args.smoothing)(x.double(), t), x, t)
    xmax = float(x.double().abs().max())
    tol = args.tol or (3e-2 if dtype in ("bf16", "f16") else 1e-3)
    errors, failed = {}, []
    for name in list(CRATE) + list(providers):
        t0 = time.time()
        try:
            got = crate_stats[name] if name in CRATE else stats(*providers[name](x.clone(), t), x, t)
            err = stat_error(got, ref, xmax)
        except Exception as e:  # noqa: BLE001
            got, err = None, float("inf")
            print(f"  {name}: {type(e).__name__}: {e}")
        errors[name] = err
        ok = err <= tol
        extra = f" (first call {time.time() - t0:.1f} s)" if "compile" in name else ""
        print(f"  check {name:22} loss {got[0] if got else float('nan'):.6g} (f64 {ref[0]:.6g}), "
              f"max stat err {err:.1e}: {'ok' if ok else '!!! MISMATCH'}{extra}", flush=True)
        if not ok:
            failed.append(name)
            if name in providers:
                print(f"  !!! {name} disagrees with the float64 reference: SKIPPED from timing")
                del providers[name]
    del x, t
    if cuda:
        torch.cuda.empty_cache()

    # The timed cycles.
    gen = torch.Generator(device=dev).manual_seed(seed)
    inputs = [make_inputs(head, b, c, dtype, dev, gen) for _ in range(sets)]
    # Liger writes the gradient into its input: its own copies.
    own = {"liger": [x.clone() for x, _ in inputs]} if "liger" in providers else {}
    floor_out = torch.empty_like(inputs[0][0])
    timed = {k: None for k in CRATE} | providers | {"copy floor": None}

    def clock(f):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3

    def pause():
        # Busy, not sleeping: the other side's idle worker threads (OpenMP, rayon) stop
        # spinning, and a sleeping VM's vCPUs would halt and wake up slowly.
        end = time.perf_counter() + args.pause_ms / 1e3
        while time.perf_counter() < end:
            pass

    samples = []
    for cycle in range(args.warmup + args.cycles):
        i = cycle % sets
        row = {}
        for name, step in timed.items():
            pause()
            if name in CRATE:
                row[name] = float(peer.ask(f"step {CRATE[name]}"))
            elif name == "copy floor":
                row[name] = clock(lambda: floor_out.copy_(inputs[i][0]))
            else:
                x = own[name][i] if name in own else inputs[i][0]
                row[name] = clock(lambda: step(x, inputs[i][1]))
        if cycle >= args.warmup:
            samples.append(row)
    del inputs, own, floor_out

    results = []
    for name in timed:
        lo, med, hi = quantiles([r[name] for r in samples])
        vs_lag = sorted(r[name] / r["crate lag"] for r in samples)[len(samples) // 2]
        of_floor = sorted(r["copy floor"] / r[name] for r in samples)[len(samples) // 2]
        note = {"crate lag": path, "crate into": path, "crate autograd": "loss + backward()",
                "liger": "own copies, overwritten by its gradient"}.get(name, "")
        note = f"!!! CHECK FAILED; {note}" if name in failed else note
        results.append({"provider": name, "median_ms": med, "p25_ms": lo, "p75_ms": hi,
                        "vs_crate_lag": vs_lag, "copy_floor_fraction": of_floor,
                        "gbps_1r1w": 2 * b * c * size / (med * 1e-3) / 1e9,
                        "check_error": errors.get(name), "note": note})
    for name in failed:
        if name not in timed:
            results.append({"provider": name, "check_error": errors[name], "note": "CHECK FAILED: not timed"})
    return {"case": case, "B": b, "C": c, "dtype": dtype, "head": head, "sets": sets,
            "one_pass_max_classes": one_pass, "crate_passes": passes, "results": results,
            "crate_check_failed": [n for n in failed if n in CRATE]}


def print_table(cases, legend=True):
    print("\n| case | provider | median ms | p25–p75 ms | × crate lag | copy floor / it | GB/s (1R+1W) | check | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for cs in cases:
        for r in cs["results"]:
            err = r["check_error"]
            chk = "—" if err is None else f"{err:.0e}"
            if "median_ms" not in r:
                print(f"| {cs['case']} | {r['provider']} | | | | | | {chk} | {r['note']} |")
                continue
            print(f"| {cs['case']} | {r['provider']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f}–{r['p75_ms']:.3f} "
                  f"| {r['vs_crate_lag']:.2f} | {100 * r['copy_floor_fraction']:.0f}% | {r['gbps_1r1w']:.3g} "
                  f"| {chk} | {r['note']} |")
    if legend:
        print("\n× crate lag: median over cycles of (provider's time / the crate's loss_and_grad time in the "
              "same cycle); > 1 = the crate is faster. copy floor / it: the same for copy / provider. "
              "check: largest relative error of the loss and gradient statistics against float64.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peer", help="a built examples/peer (default: cargo build --release --example peer)")
    ap.add_argument("--shapes", nargs="+", help="BxC ... (default per device)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    ap.add_argument("--heads", nargs="+", choices=list(FORMULAS))
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--cycles", type=int)
    ap.add_argument("--warmup", type=int, default=2, help="untimed cycles first")
    ap.add_argument("--sets", type=int, default=0, help="input sets per side (default: ≥ 4× L2, 2..16)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tol", type=float, default=0.0, help="check tolerance (default 1e-3, 3e-2 for bf16/f16)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--no-check-targets", action="store_true", help="the crate's check_targets(false)")
    ap.add_argument("--threads", type=int, default=0, help="torch and rayon threads (CPU)")
    ap.add_argument("--pause-ms", type=float, help="busy wait before each step (default 2 on the CPU, 0 on CUDA)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    shapes, dtypes, heads, cycles = DEFAULTS[args.device]
    args.shapes, args.dtypes = args.shapes or shapes, args.dtypes or dtypes
    args.heads, args.cycles = args.heads or heads, args.cycles or cycles
    args.pause_ms = args.pause_ms if args.pause_ms is not None else (0.0 if cuda else 2.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda:0" if cuda else "cpu")
    args.l2_bytes = 50 << 20
    if cuda:
        props = torch.cuda.get_device_properties(0)
        args.l2_bytes = getattr(props, "L2_cache_size", 0) or args.l2_bytes
    peer_path = args.peer or build_peer(cuda)
    peer = Peer(peer_path, "cuda:0" if cuda else "cpu", args.threads)
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "peer": peer.ask("info"),
           "device": torch.cuda.get_device_name(0) if cuda else f"CPU, torch threads {torch.get_num_threads()}",
           "cycles": args.cycles, "warmup": args.warmup, "smoothing": args.smoothing,
           "command": " ".join(sys.argv)}
    try:
        import liger_kernel  # noqa: F401
        env["liger_kernel"] = getattr(liger_kernel, "__version__", "importable")
    except Exception:  # noqa: BLE001
        env["liger_kernel"] = "not importable"
    print("; ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    cases, bad = [], False
    # A timeout's SIGTERM ends the run through the `finally` below: the finished cases' table
    # and JSON are still written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    # The check's input file: in memory where /dev/shm has room (a container's is often 64 MiB).
    shm = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 8 << 30
    with tempfile.TemporaryDirectory(dir="/dev/shm" if shm else None) as tmp:
        try:
            for shape in args.shapes:
                b, c = (int(v) for v in shape.lower().split("x"))
                for dtype in args.dtypes:
                    for head in args.heads:
                        cs = run_case(args, peer, dev, b, c, dtype, head, tmp)
                        bad |= bool(cs["crate_check_failed"])
                        cases.append(cs)
                        print_table([cs], legend=False)
        finally:
            peer.close()
            print_table(cases)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"env": env, "cases": cases}, f, indent=1)
    skipped = sorted({f"{cs['case']}: {r['provider']}" for cs in cases for r in cs["results"] if "median_ms" not in r})
    print(f"torch_compare: {len(cases)} case(s) timed; crate checks {'FAILED' if bad else 'ok'}; "
          f"PyTorch providers skipped by their check: {', '.join(skipped) or 'none'}")
    if bad:
        print("!!! a crate mode disagreed with the float64 reference (see the checks above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
