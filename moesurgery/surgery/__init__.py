"""Surgery: pure functions from canonical blocks to canonical blocks.

- finer.finer_experts          MoE -> m-times finer MoE (exact)
- upcycle.upcycle_dense        dense FFN -> MoE with virtual groups + shared experts (exact at init)
- upcycle.extract_shared       MoE -> MoE + shared experts from neurons the experts have in common
- moefy.moefy                  dense FFN -> routed (+ shared) experts, training-free (lossy, measured)
"""
