#!/usr/bin/env python3
"""The crate's CPU path against PyTorch eager and torch.compile, interleaved step by step.

One step = the mean loss and d(loss)/d(input) for a [B, C] input (label smoothing 0.1). The
crate runs in a second process, `examples/cpu_peer.rs`, kept alive; the driver alternates single
steps of every provider (the crate's `loss_and_grad`, `loss_and_grad_into` with a reused buffer,
`loss` + `backward()`; PyTorch eager; `torch.compile`) for many cycles, so that load changes on a
shared machine reach every provider alike, and prints medians, the 25th-75th percentile spread,
and the ratios torch / crate. Before timing, every provider's loss and gradient is compared with
the crate's `loss_and_grad`.

Also printed per case, measured the same way: the two floors of one step on this machine,
`copy` (torch `out.copy_(x)`: B·C·sizeof read + written, the bandwidth floor of a step that reads
the input once and writes the gradient once) and `exp` (torch `torch.exp(x, out=out)`: one
vectorized exp per element plus the same traffic).

Usage (from the repository root; PyTorch is not a dependency of the crate and not in CI):

    python3 -m venv venv && venv/bin/pip install torch numpy
    venv/bin/python benches/torch_cpu.py [--cycles 15] [--cases softmax,arcface] [--no-compile]

The script runs `cargo build --release --example cpu_peer` first. Threads: PyTorch's default
intra-op thread count and rayon's default (both = the number of CPUs) unless set
(`--threads N` sets both).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOOTHING = 0.1

# (B, C, dtype) of the goal table.
SHAPES = [(1024, 32000, "f32"), (1024, 32000, "bf16"), (64, 100000, "f32"), (256, 1000, "f32")]
HEADS = ["softmax", "arcface-detached", "arcface", "rbf"]

ARC_S, ARC_M = 64.0, 0.5
RBF_S, RBF_GAMMA = 35.0, 16.0


def torch_loss(head):
    """The PyTorch formulation matching the crate's head, as a function (x, t) -> loss."""
    if head == "softmax":
        return lambda x, t: F.cross_entropy(x, t, label_smoothing=SMOOTHING)
    if head == "rbf":
        def rbf(x, t):
            logits = RBF_S * torch.exp(-torch.clamp(x, min=0.0) / RBF_GAMMA)
            return F.cross_entropy(logits, t, label_smoothing=SMOOTHING)
        return rbf
    cos_m, sin_m = np.cos(ARC_M), np.sin(ARC_M)
    theta = np.cos(np.pi - ARC_M)
    sinmm = np.sin(np.pi - ARC_M) * ARC_M
    if head == "arcface":
        # Fully differentiable: cos(θ + m) = c·cos m − sqrt(1 − c²)·sin m on the target, with
        # InsightFace's fallback c − m·sin m where θ + m > π.
        def arcface(x, t):
            c = x.clamp(-1.0, 1.0)
            ct = c.gather(1, t[:, None])
            st = torch.sqrt((1.0 - ct * ct).clamp(min=0.0))
            phi = torch.where(ct > theta, ct * cos_m - st * sin_m, ct - sinmm)
            logits = c.scatter(1, t[:, None], phi) * ARC_S
            return F.cross_entropy(logits, t, label_smoothing=SMOOTHING)
        return arcface

    # InsightFace arcface_torch (CombinedMarginLoss, ArcFace branch): the margin is applied to
    # the target logit under no_grad, so the gradient passes as if the margin were a constant.
    def arcface_detached(x, t):
        c = x.clamp(-1.0, 1.0)
        ct = c.gather(1, t[:, None])
        with torch.no_grad():
            st = torch.sqrt((1.0 - ct * ct).clamp(min=0.0))
            phi = torch.where(ct > theta, ct * cos_m - st * sin_m, ct - sinmm)
            shift = phi - ct
        logits = (c + torch.zeros_like(c).scatter(1, t[:, None], shift)) * ARC_S
        return F.cross_entropy(logits, t, label_smoothing=SMOOTHING)
    return arcface_detached


def make_step(fn):
    def step(x, t):
        x = x.detach().requires_grad_(True)
        loss = fn(x, t)
        loss.backward()
        return loss.detach(), x.grad
    return step


def gen_input(head, b, c, seed):
    g = np.random.default_rng(seed)
    if head == "softmax":
        x = g.uniform(-4.0, 4.0, (b, c))
    elif head == "rbf":
        x = g.uniform(0.0, 32.0, (b, c))
    else:
        x = g.uniform(-0.5, 0.5, (b, c))
    t = g.integers(0, c, b)
    return x.astype(np.float32), t.astype(np.int64)


class Peer:
    def __init__(self, threads):
        subprocess.run(["cargo", "build", "--release", "--example", "cpu_peer"], cwd=ROOT,
                       check=True)
        env = dict(os.environ)
        if threads:
            env["RAYON_NUM_THREADS"] = str(threads)
        self.p = subprocess.Popen([os.path.join(ROOT, "target/release/examples/cpu_peer")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        reply = self.p.stdout.readline().strip()
        if not reply:
            raise RuntimeError(f"cpu_peer gave no reply to {line!r}")
        return reply

    def close(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        self.p.wait()


def quartiles(v):
    v = sorted(v)
    at = lambda q: v[round((len(v) - 1) * q)]
    return at(0.25), at(0.5), at(0.75)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=15)
    ap.add_argument("--cases", default="", help="comma-separated words filtering 'BxC dtype head'")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--pause-ms", type=float, default=2.0,
                    help="busy wait before each timed step (see pause())")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    words = [w for w in args.cases.split(",") if w]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"numpy {np.__version__}, python {sys.version.split()[0]}, cycles {args.cycles}, "
          f"pause {args.pause_ms} ms")
    peer = Peer(args.threads)
    tmp = tempfile.mkdtemp()
    rows = []
    for b, c, dtype in SHAPES:
        for head in HEADS:
            case = f"{b}x{c} {dtype} {head}"
            if words and not any(w in case for w in words):
                continue
            x32, t = gen_input(head, b, c, seed=b * 1_000_003 + c)
            xp, tp = os.path.join(tmp, "x.bin"), os.path.join(tmp, "t.bin")
            x32.tofile(xp)
            t.tofile(tp)
            assert peer.ask(f"load {xp} {tp} {b} {c} {dtype} {head}") == "ok"
            tdt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
            x = torch.from_numpy(x32).to(tdt)
            tt = torch.from_numpy(t)
            fn = torch_loss(head)
            providers = {"torch eager": make_step(fn)}
            if not args.no_compile:
                t0 = time.time()
                compiled = make_step(torch.compile(fn, dynamic=False))
                compiled(x, tt)
                print(f"  [{case}] torch.compile warm-up (compilation) {time.time() - t0:.1f} s",
                      flush=True)
                providers["torch.compile"] = compiled
            # Correctness before timing: every provider against the crate's loss_and_grad.
            out = os.path.join(tmp, "ours.bin")
            assert peer.ask(f"check {out}") == "ok"
            raw = np.fromfile(out, dtype=np.uint8)
            ours_loss = raw[:8].view(np.float64)[0]
            ours_grad = raw[8:].view(np.float32).reshape(b, c).astype(np.float64)
            tol = 2e-2 if dtype == "bf16" else 1e-4
            for name, step in providers.items():
                loss, grad = step(x, tt)
                g = grad.double().numpy()
                scale = max(np.abs(g).max(), 1e-30)
                gerr = np.abs(g - ours_grad).max() / scale
                lerr = abs(float(loss) - ours_loss) / max(abs(ours_loss), 1e-30)
                status = "ok" if gerr <= tol and lerr <= tol else "MISMATCH"
                print(f"  [{case}] {name}: loss {float(loss):.6f} vs ours {ours_loss:.6f} "
                      f"(rel {lerr:.1e}), grad max rel {gerr:.1e}: {status}", flush=True)
            floor_out = torch.empty_like(x)
            floors = {
                "copy": lambda: floor_out.copy_(x),
                "exp": lambda: torch.exp(x, out=floor_out),
            }
            times = {k: [] for k in ["lag", "into", "autograd", *providers, *floors]}
            # Before each timed step a busy pause, so that the other side's idle worker threads
            # (PyTorch's OpenMP threads spin for a while after a parallel region, rayon's too)
            # stop spinning and do not take a core from the step being timed. Busy, not
            # sleeping: on this VM a sleep lets the vCPUs halt, and waking them costs the next
            # step milliseconds (PyTorch's multi-threaded small steps most: 2 ms became 6 ms).
            def pause():
                end = time.perf_counter() + args.pause_ms / 1e3
                while time.perf_counter() < end:
                    pass
            for cycle in range(args.cycles + 1):
                for mode in ["lag", "into", "autograd"]:
                    pause()
                    ns = int(peer.ask(f"step {mode}"))
                    if cycle:
                        times[mode].append(ns / 1e6)
                for name, step in providers.items():
                    pause()
                    t0 = time.perf_counter()
                    step(x, tt)
                    if cycle:
                        times[name].append((time.perf_counter() - t0) * 1e3)
                for name, f in floors.items():
                    pause()
                    t0 = time.perf_counter()
                    f()
                    if cycle:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            q = {k: quartiles(v) for k, v in times.items()}
            lag = q["lag"][1]
            cells = []
            for k, (lo, med, hi) in q.items():
                cells.append(f"{k} {med:.2f} [{lo:.2f},{hi:.2f}]")
            print(f"{case}: " + "; ".join(cells), flush=True)
            row = {"case": case, **{k: v[1] for k, v in q.items()}}
            rows.append(row)
            ratios = [f"eager/lag {q['torch eager'][1] / lag:.2f}x"]
            if "torch.compile" in q:
                ratios.append(f"compile/lag {q['torch.compile'][1] / lag:.2f}x")
                ratios.append(f"compile/into {q['torch.compile'][1] / q['into'][1]:.2f}x")
            ratios.append(f"eager/into {q['torch eager'][1] / q['into'][1]:.2f}x")
            ratios.append(f"autograd/lag {q['autograd'][1] / lag:.2f}x")
            print(f"  ratios: " + ", ".join(ratios), flush=True)
    peer.close()
    print("\nsummary (medians, ms; ratios = torch / crate)")
    print(f"{'case':<30}{'lag':>8}{'into':>8}{'autograd':>9}{'eager':>8}{'compile':>8}"
          f"{'copy':>7}{'exp':>7}{'eager/lag':>10}{'comp/lag':>9}{'ag/lag':>7}")
    for r in rows:
        comp = r.get("torch.compile", float("nan"))
        print(f"{r['case']:<30}{r['lag']:>8.2f}{r['into']:>8.2f}{r['autograd']:>9.2f}"
              f"{r['torch eager']:>8.2f}{comp:>8.2f}{r['copy']:>7.2f}{r['exp']:>7.2f}"
              f"{r['torch eager'] / r['lag']:>9.2f}x{comp / r['lag']:>8.2f}x"
              f"{r['autograd'] / r['lag']:>6.2f}x")


if __name__ == "__main__":
    main()
