"""Expert offloading: one policy model (:mod:`.policy`) run under two clocks.

- :mod:`.policy`: the policy core: named policies, prefetch settings, the rules for what
  to prefetch, what the oracle sees and when a request is stale, and the residency of the
  fast tier (capacity, pins, eviction, unused prefetches); :mod:`.eviction`: the eviction
  policies; :mod:`.settings`: fast-tier sizes and next-token settings.
- :mod:`.simulated`: a SIMULATION of that model under a hardware cost model (no weights
  move): cost model, simulator, decode order, sweeps.
- :mod:`.live`: the same model with real weights: slow tiers (disk, pinned host memory),
  expert files and layouts, the fast tier, the prefetch thread, the planner, next-token
  guessing, the decoding session and the model runtime.
"""

Key = tuple[int, int]
"""An expert of the offload runtime: ``(layer_idx, expert_idx)``."""
