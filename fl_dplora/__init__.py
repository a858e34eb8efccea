"""fl-dplora: federated DP-LoRA fine-tuning on Flower."""
