#!/usr/bin/env python
"""GPU parity: our PyTorch ops vs fla's Triton kernels inside every fast-weight family (fp32).

For each fast-weight model type of the registry (DeltaNet, GatedDeltaNet: delta-rule kernels,
short conv, norms, SwiGLU; LaCT: its norms and SwiGLU MLP, the shared ``layers.common``
modules), on CUDA, it checks:
  1. logits and parameter gradients: REFINE_KERNELS=torch vs REFINE_KERNELS=fla;
  2. segment carry on the fla path: segments with carried state == one forward
     (logits and gradients), incl. a segment shorter than the conv width;
  3. decode steps on the fla path (fused-recurrent kernels, no grad) == the fla forward;
  4. prefix sharing on the fla path (offset-free families): states kept at positions
     (``keep_states_at``, sliced kernel calls) and their gradients, and per-row ``lengths``
     states, vs the torch path;
  5. in bf16 (fla 0.6.0's DeltaNet chunk kernel rejects fp32): torch vs fla logits, segment
     carry, kept states (offset-free families), and, for families on fla's config classes, our
     model (fla path) vs fla's own ``*ForCausalLM`` with the same weights.
Prints max abs diffs (gradients: relative to the largest entry) and PASS/FAIL per check;
``--json PATH`` also writes them (``{"checks": [{family, check, diff, tol, ok}], "failures": [...],
"skipped": reason or null}``); exits 1 on any FAIL, 0 with "SKIP" when CUDA or fla's kernels
are missing. Triton's fp32 dots default to TF32; we force IEEE fp32 (TRITON_F32_DEFAULT=ieee) and
turn TF32 off in torch unless --tf32 is given, so the thresholds below are fp32 thresholds.
First-call Triton compilation/autotuning is slow: on an H200 ``--only lact`` then ``--only delta_net``
took ~5 min together (all PASS, max fp32 diffs ~1e-6); the GatedDeltaNet half had printed nothing
after 5 more minutes in an earlier run (fp32 chunk-kernel autotune, unconfirmed). The prepared
acceptance run (``scripts/gpu_check.sh``) gives each family its own process and time budget.
``--cpu`` runs the same flow with the torch path on both sides (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from refine_ray.models.registry import FAST_WEIGHT_TYPES, family, tiny_config  # noqa: E402  (torch-free)


class Checker:
    """Runs the checks of one model on both kernel paths and collects PASS/FAIL lines."""

    def __init__(self, fast: str, tol_logits: float, tol_grad: float, tol_bf16: float):
        self.fast, self.tol_logits, self.tol_grad, self.tol_bf16 = fast, tol_logits, tol_grad, tol_bf16
        self.failures: list[str] = []
        self.results: list[dict] = []
        self.family = ""

    def report(self, name, diff, tol):
        ok = diff <= tol
        print(f"  {'PASS' if ok else 'FAIL'} {name:<48s} max diff {diff:.3e} (tol {tol:.1e})", flush=True)
        self.results.append(dict(family=self.family, check=name, diff=diff, tol=tol, ok=ok))
        if not ok:
            self.failures.append(f"{self.family}: {name}")

    @staticmethod
    def rel(a, b):
        return (a - b).abs().max().item() / max(1.0, a.abs().max().item())

    def rel_grads(self, ga, gb):
        return max(self.rel(a, b) for a, b in zip(ga, gb) if a is not None)

    @staticmethod
    def state_diff(sa, sb):
        return max((a[k] - b[k]).abs().max().item() for a, b in zip(sa.layers, sb.layers) for k in a if a[k].numel())

    @staticmethod
    def run(model, ids, backend, segments=None, w=None):
        """(logits, parameter grads of sum(logits * w), final state) on one kernel path."""
        import torch

        os.environ["REFINE_KERNELS"] = backend
        state, parts = None, []
        for lo, hi in (segments or [(0, ids.shape[1])]):
            out = model.forward_segment(ids[:, lo:hi], state)
            state = out.state
            parts.append(out.logits)
        logits = torch.cat(parts, 1)
        grads = torch.autograd.grad((logits.float() * w).sum(), list(model.parameters()), allow_unused=True)
        return logits.detach(), grads, state

    def fp32(self, model, ids, w, segs):
        """Checks 1-3; returns the fla-path logits."""
        import torch

        fast, T = self.fast, ids.shape[1]
        ref_logits, ref_grads, ref_state = self.run(model, ids, "torch", w=w)
        fla_logits, fla_grads, fla_state = self.run(model, ids, fast, w=w)
        self.report("logits torch vs fla", (ref_logits - fla_logits).abs().max().item(), self.tol_logits)
        self.report("param grads torch vs fla (rel)", self.rel_grads(ref_grads, fla_grads), self.tol_grad)
        self.report("final state torch vs fla", self.state_diff(ref_state, fla_state), self.tol_logits)
        seg_logits, seg_grads, _ = self.run(model, ids, fast, segments=segs, w=w)
        self.report("segment carry logits (fla path)", (seg_logits - fla_logits).abs().max().item(), self.tol_logits)
        self.report("segment carry grads (fla path, rel)", self.rel_grads(fla_grads, seg_grads), self.tol_grad)
        os.environ["REFINE_KERNELS"] = fast
        cut = max(1, T - 40)
        with torch.no_grad():
            state, steps = model.forward_segment(ids[:, :cut]).state, []
            for t in range(cut, T):
                out = model.forward_segment(ids[:, t:t + 1], state)
                state = out.state
                steps.append(out.logits)
        dec = torch.cat(steps, 1)
        self.report("decode steps vs forward (fla path)", (dec - fla_logits[:, cut:]).abs().max().item(),
                    self.tol_logits)

    def prefix_sharing(self, model, ids):
        """Check 4: kept states and their gradients, ``lengths`` states (offset-free families)."""
        import torch

        T, kept, kept_grads = ids.shape[1], {}, {}
        positions = torch.tensor([1, 37, 64, T // 2, T - 1], device=ids.device)
        for backend in ("torch", self.fast):
            os.environ["REFINE_KERNELS"] = backend
            out = model.forward_segment(ids, None, return_logits=False, keep_states_at=positions)
            loss = out.hidden.float().square().mean() + sum(
                t.float().square().mean() for layer in out.kept_states.layers for t in layer.values())
            kept_grads[backend] = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            kept[backend] = out.kept_states.detach()
        self.report("kept states torch vs fla", self.state_diff(kept["torch"], kept[self.fast]), self.tol_logits)
        self.report("grads through kept states torch vs fla (rel)",
                    self.rel_grads(kept_grads["torch"], kept_grads[self.fast]), self.tol_grad)
        lengths = torch.tensor([T // 3, T - 5], device=ids.device)
        by_len = {}
        with torch.no_grad():
            for backend in ("torch", self.fast):
                os.environ["REFINE_KERNELS"] = backend
                by_len[backend] = model.forward_segment(ids, None, lengths=lengths).state
        self.report("lengths states torch vs fla", self.state_diff(by_len["torch"], by_len[self.fast]),
                    self.tol_logits)

    def bf16(self, model, cfg, ids, segs):
        """Check 5: bf16 torch vs fla, segment carry, and vs fla's own model where fla has the family."""
        import torch
        from transformers import AutoModelForCausalLM

        mb = model.to(torch.bfloat16).eval()
        with torch.no_grad():
            os.environ["REFINE_KERNELS"] = "torch"
            tb = mb.forward_segment(ids).logits.float()
            os.environ["REFINE_KERNELS"] = self.fast
            fb = mb.forward_segment(ids).logits.float()
            st, parts = None, []
            for lo, hi in segs:
                o = mb.forward_segment(ids[:, lo:hi], st)
                st = o.state
                parts.append(o.logits.float())
        self.report("bf16 logits torch vs fla (rel)", self.rel(tb, fb), self.tol_bf16)
        self.report("bf16 segment carry logits (fla path, rel)", self.rel(fb, torch.cat(parts, 1)), self.tol_bf16)
        if family(cfg.model_type).offset_free_state:      # prefix sharing's kept states, in bf16
            positions = torch.tensor([1, 37, 64, ids.shape[1] // 2, ids.shape[1] - 1], device=ids.device)
            kept = {}
            with torch.no_grad():
                for backend in ("torch", self.fast):
                    os.environ["REFINE_KERNELS"] = backend
                    kept[backend] = mb.forward_segment(ids, None, return_logits=False, keep_states_at=positions)
            self.report("bf16 kept states torch vs fla (rel)", max(
                self.rel(a[k].float(), b[k].float()) for a, b in zip(kept["torch"].kept_states.layers,
                                                                     kept[self.fast].kept_states.layers) for k in a),
                self.tol_bf16)
        if type(cfg).__module__.startswith("fla."):   # the config class is fla's: fla has the model too
            import fla.models  # noqa: F401  registers fla's classes with the Auto classes

            theirs = AutoModelForCausalLM.from_config(cfg).to(device=ids.device, dtype=torch.bfloat16).eval()
            theirs.load_state_dict(mb.state_dict())
            with torch.no_grad():
                their_logits = theirs(ids).logits.float()
            self.report("bf16 ours (fla path) vs fla's own model (rel)", self.rel(fb, their_logits), self.tol_bf16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tf32", action="store_true", help="leave TF32 on (looser numbers, thresholds x100)")
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script on CPU (torch vs torch)")
    ap.add_argument("--only", choices=FAST_WEIGHT_TYPES, help="check one model type")
    ap.add_argument("--T", type=int, default=200, help="sequence length >= 8 (default 200, not a multiple of 64)")
    ap.add_argument("--json", help="also write the checks to this JSON file")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (default 256: 4 heads of 64)")
    args = ap.parse_args()
    if not args.tf32:
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    import torch

    def write(payload: dict) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1)

    skip = None
    if not args.cpu and not torch.cuda.is_available():
        skip = "no CUDA device"
    from refine_ray.models.ops import fla_kernels_available
    if skip is None and not args.cpu and not fla_kernels_available():
        skip = "fla's kernels (fla.ops) do not import"
    if skip:
        print(f"SKIP: {skip}")
        write({"checks": [], "failures": [], "skipped": skip})
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = "cpu" if args.cpu else "cuda"
    scale = 100.0 if args.tf32 else 1.0
    # tol_bf16 is relative to the largest |logit|; bf16 activations carry ~3 significant digits
    check = Checker("torch" if args.cpu else "fla", 2e-4 * scale, 2e-4 * scale, 5e-2)
    # hidden 256, 4 heads of 64 over each registry tiny preset; T spans several 64-token kernel chunks
    size = dict(hidden_size=args.hidden, num_heads=max(2, args.hidden // 64), intermediate_size=2 * args.hidden)
    for kind in FAST_WEIGHT_TYPES:
        if args.only and kind != args.only:
            continue
        print(f"[{kind}] T={args.T} device={device}", flush=True)
        check.family = kind
        cfg = tiny_config(kind, 512, **size)
        torch.manual_seed(0)
        model = family(kind).classes().causal_lm(cfg).to(device).train()
        ids = torch.randint(0, cfg.vocab_size, (2, args.T), device=device)
        w = torch.randn(2, args.T, cfg.vocab_size, device=device)
        segs = [(0, 3), (3, args.T // 3), (args.T // 3, args.T)]
        check.fp32(model, ids, w, segs)
        if family(kind).offset_free_state:
            check.prefix_sharing(model, ids)
        if not args.cpu:  # bf16, the production dtype: DeltaNet's chunk kernel only runs here
            check.bf16(model, cfg, ids, segs)
        os.environ["REFINE_KERNELS"] = "auto"

    print("FAIL:" if check.failures else "ALL PASS", ", ".join(check.failures))
    write({"checks": check.results, "failures": check.failures, "skipped": None})
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
