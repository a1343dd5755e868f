#!/usr/bin/env python
"""GPU parity: our PyTorch ops vs fla's Triton kernels inside DeltaNet / GatedDeltaNet (fp32).

For each model type, on CUDA, it checks:
  1. logits and parameter gradients: REFINE_KERNELS=torch vs REFINE_KERNELS=fla;
  2. segment carry on the fla path: segments with carried state == one forward
     (logits and gradients), incl. a segment shorter than the conv width;
  3. decode steps on the fla path (fused-recurrent kernels, no grad) == the fla forward;
  4. prefix sharing on the fla path: states kept at positions (``keep_states_at``, sliced kernel
     calls) and their gradients, and per-row ``lengths`` states, vs the torch path;
  5. in bf16 (fla 0.6.0's DeltaNet chunk kernel rejects fp32): torch vs fla logits, segment
     carry, and our model (fla path) vs fla's own ``*ForCausalLM`` with the same weights.
Prints max abs diffs (gradients: relative to the largest entry) and PASS/FAIL per check;
exits 1 on any FAIL, 0 with "SKIP" when CUDA or fla's kernels are missing.
Triton's fp32 dots default to TF32; we force IEEE fp32 (TRITON_F32_DEFAULT=ieee) and turn
TF32 off in torch unless --tf32 is given, so the thresholds below are fp32 thresholds.
First-call Triton compilation/autotuning is slow: on an H200 the DeltaNet half took ~2 min;
the GatedDeltaNet half had printed nothing after 5 more minutes (fp32 chunk-kernel autotune,
unconfirmed), so give it its own call: ``--only gated_deltanet`` with a 10-minute limit.
``--cpu`` runs the same flow with the torch path on both sides (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tf32", action="store_true", help="leave TF32 on (looser numbers, thresholds x100)")
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU (torch vs torch)")
    ap.add_argument("--only", choices=["delta_net", "gated_deltanet"], help="check one model type")
    ap.add_argument("--T", type=int, default=200, help="sequence length >= 8 (default 200, not a multiple of 64)")
    args = ap.parse_args()
    if not args.tf32:
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    from refine_ray.models.ops import fla_kernels_available
    if not args.cpu and not fla_kernels_available():
        print("SKIP: fla's kernels (fla.ops) do not import")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = "cpu" if args.cpu else "cuda"
    fast = "torch" if args.cpu else "fla"
    scale = 100.0 if args.tf32 else 1.0
    tol_logits, tol_grad = 2e-4 * scale, 2e-4 * scale
    tol_bf16 = 5e-2  # relative to the largest |logit|; bf16 activations carry ~3 significant digits

    from fla.models import DeltaNetConfig, GatedDeltaNetConfig
    import fla.models as fla_models
    from refine_ray.models.deltanet import DeltaNetForCausalLM, GatedDeltaNetForCausalLM

    configs = {
        "delta_net": (DeltaNetForCausalLM, fla_models.DeltaNetForCausalLM,
                      DeltaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, vocab_size=512,
                                     intermediate_size=512)),
        "gated_deltanet": (GatedDeltaNetForCausalLM, fla_models.GatedDeltaNetForCausalLM,
                           GatedDeltaNetConfig(hidden_size=256, num_hidden_layers=2, num_heads=2, head_dim=64,
                                               expand_v=2.0, vocab_size=512, intermediate_size=512)),
    }
    failures = []

    def report(name, diff, tol):
        ok = diff <= tol
        print(f"  {'PASS' if ok else 'FAIL'} {name:<48s} max diff {diff:.3e} (tol {tol:.1e})", flush=True)
        if not ok:
            failures.append(name)

    def rel(a, b):
        return (a - b).abs().max().item() / max(1.0, a.abs().max().item())

    def run(model, ids, backend, segments=None, w=None):
        os.environ["REFINE_KERNELS"] = backend
        state, parts = None, []
        for lo, hi in (segments or [(0, ids.shape[1])]):
            out = model.forward_segment(ids[:, lo:hi], state)
            state = out.state
            parts.append(out.logits)
        logits = torch.cat(parts, 1)
        grads = torch.autograd.grad((logits.float() * w).sum(), list(model.parameters()), allow_unused=True)
        return logits.detach(), grads, state

    for kind, (ours_cls, fla_cls, cfg) in configs.items():
        if args.only and kind != args.only:
            continue
        print(f"[{kind}] T={args.T} device={device}", flush=True)
        torch.manual_seed(0)
        model = ours_cls(cfg).to(device).train()
        ids = torch.randint(0, cfg.vocab_size, (2, args.T), device=device)
        w = torch.randn(2, args.T, cfg.vocab_size, device=device)
        ref_logits, ref_grads, ref_state = run(model, ids, "torch", w=w)
        fla_logits, fla_grads, fla_state = run(model, ids, fast, w=w)
        report("logits torch vs fla", (ref_logits - fla_logits).abs().max().item(), tol_logits)
        report("param grads torch vs fla (rel)",
               max(rel(a, b) for a, b in zip(ref_grads, fla_grads) if a is not None), tol_grad)
        report("final state torch vs fla",
               max((a[k] - b[k]).abs().max().item() for a, b in zip(ref_state.layers, fla_state.layers) for k in a),
               tol_logits)
        segs = [(0, 3), (3, args.T // 3), (args.T // 3, args.T)]
        seg_logits, seg_grads, _ = run(model, ids, fast, segments=segs, w=w)
        report("segment carry logits (fla path)", (seg_logits - fla_logits).abs().max().item(), tol_logits)
        report("segment carry grads (fla path, rel)",
               max(rel(a, b) for a, b in zip(fla_grads, seg_grads) if a is not None), tol_grad)
        os.environ["REFINE_KERNELS"] = fast
        cut = max(1, args.T - 40)
        with torch.no_grad():
            pre = model.forward_segment(ids[:, :cut])
            state, steps = pre.state, []
            for t in range(cut, args.T):
                out = model.forward_segment(ids[:, t:t + 1], state)
                state = out.state
                steps.append(out.logits)
            dec = torch.cat(steps, 1)
        report("decode steps vs forward (fla path)", (dec - fla_logits[:, cut:]).abs().max().item(), tol_logits)
        kept, kept_grads = {}, {}
        positions = torch.tensor([1, 37, 64, args.T // 2, args.T - 1], device=device)
        for backend in ("torch", fast):
            os.environ["REFINE_KERNELS"] = backend
            out = model.forward_segment(ids, None, return_logits=False, keep_states_at=positions)
            loss = out.hidden.float().square().mean() + sum(
                t.float().square().mean() for layer in out.kept_states.layers for t in layer.values())
            kept_grads[backend] = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            kept[backend] = out.kept_states.detach()
        report("kept states torch vs fla", max((a[k] - b[k]).abs().max().item() for a, b in
                                               zip(kept["torch"].layers, kept[fast].layers) for k in a), tol_logits)
        report("grads through kept states torch vs fla (rel)",
               max(rel(a, b) for a, b in zip(kept_grads["torch"], kept_grads[fast]) if a is not None), tol_grad)
        lengths = torch.tensor([args.T // 3, args.T - 5], device=device)
        with torch.no_grad():
            by_len = {}
            for backend in ("torch", fast):
                os.environ["REFINE_KERNELS"] = backend
                by_len[backend] = model.forward_segment(ids, None, lengths=lengths).state
        report("lengths states torch vs fla", max((a[k] - b[k]).abs().max().item() for a, b in
                                                  zip(by_len["torch"].layers, by_len[fast].layers) for k in a),
               tol_logits)
        os.environ["REFINE_KERNELS"] = fast
        if not args.cpu:  # bf16, the production dtype: DeltaNet's chunk kernel only runs here
            mb = model.to(torch.bfloat16).eval()
            with torch.no_grad():
                os.environ["REFINE_KERNELS"] = "torch"
                tb = mb.forward_segment(ids).logits.float()
                os.environ["REFINE_KERNELS"] = fast
                fb = mb.forward_segment(ids).logits.float()
                st, parts = None, []
                for lo, hi in segs:
                    o = mb.forward_segment(ids[:, lo:hi], st)
                    st = o.state
                    parts.append(o.logits.float())
                theirs = fla_cls(cfg).to(device=device, dtype=torch.bfloat16).eval()
                theirs.load_state_dict(mb.state_dict())
                their_logits = theirs(ids).logits.float()
            report("bf16 logits torch vs fla (rel)", rel(tb, fb), tol_bf16)
            report("bf16 segment carry logits (fla path, rel)", rel(fb, torch.cat(parts, 1)), tol_bf16)
            report("bf16 ours (fla path) vs fla's own model (rel)", rel(fb, their_logits), tol_bf16)
        os.environ["REFINE_KERNELS"] = "auto"

    print("FAIL:" if failures else "ALL PASS", ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
