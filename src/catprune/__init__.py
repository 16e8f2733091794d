"""catprune: Cluster-Aware Token Pruning for diffusion transformers."""

# --- shapes exports (owned by the embedded-model work; keep between these markers) ---
# --- end shapes exports ---
