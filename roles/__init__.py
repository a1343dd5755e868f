"""Ray actors: thin wrappers that give each REFINE role its own process and resources.

Each module defines a plain class; the driver turns it into an actor with
``ray.remote(Class).options(...)`` so placement stays in one place
(refine_ray.system.placement) and the classes stay testable without Ray.
"""
