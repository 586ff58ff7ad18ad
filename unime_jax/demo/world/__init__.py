"""The shapes world: deterministic synthetic compositional image–text data for the offline demo.

``scenes`` (vocabulary, scenes, captions, parsing, truth, the held-out split), ``render``
(drawing), ``negatives`` (SugarCrepe-style minimal edits) and ``sets`` (what training and
evaluation read).
"""
