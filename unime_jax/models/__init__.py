"""Device code only: Flax NNX modules, attention, RoPE, LoRA and the typed model inputs."""
