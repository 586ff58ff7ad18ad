"""The offline demo: a synthetic compositional world (``world/``), a tiny randomly initialised
LLaVA-OneVision-style model (``model.py``) with an offline tokenizer (``tokenizers.py``), and its
held-out evaluation (``heldout.py``). Everything runs without downloads."""
