"""``import refine_ray.models.auto``: transformers' Auto classes load every exported family with our classes.

    import refine_ray.models.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("outputs/run/hf")       # any device, CPU included
    tok = AutoTokenizer.from_pretrained("outputs/run/hf")
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))

Importing this module registers, for every registry family whose config class is not one of
transformers' own, our causal-LM class with ``AutoConfig`` / ``AutoModelForCausalLM``: DeltaNet
and GatedDeltaNet (fla's config classes; this replaces the registration ``import fla`` makes,
whose classes run fla's Triton kernels and cannot generate on CPU) and LaCT. Our classes run
anywhere (pure-PyTorch ops on CPU, fla's kernels on CUDA when fla's Triton is available) and
``generate`` through their recurrent state (:mod:`.hf_generate`). Llama checkpoints load as
transformers' own ``LlamaForCausalLM`` without this import. Without it, in a process that imports
``fla`` (``import fla``), the same directories load with fla's own classes (its GPU kernels).

Kept out of ``refine_ray.models`` itself: that package is imported by the config loader and
stays free of torch, transformers and fla (see its docstring).
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .registry import FAMILIES


def register() -> list[str]:
    """Register our classes (see the module docstring); returns the model types registered. Idempotent."""
    done = []
    for model_type, fam in FAMILIES.items():
        classes = fam.classes()
        if classes.config.__module__.startswith("transformers."):
            continue                                   # transformers' own architecture and class
        AutoConfig.register(model_type, classes.config, exist_ok=True)
        AutoModelForCausalLM.register(classes.config, classes.causal_lm, exist_ok=True)
        done.append(model_type)
    return done


REGISTERED = register()
