"""catprune: Cluster-Aware Token Pruning for diffusion transformers."""
