"""HF checkpoints <-> sharded parameters: safetensors I/O, strict name tables, loader, export."""
