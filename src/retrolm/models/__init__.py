"""Model families: ``registry.py`` (the mechanism: families named by import path, their
hooks), ``autoregressive.py`` (the shared next-token loss-and-sample wrapper) and one package
per family (``retro/``, ``routing/``, ``hierarchical/``, ``delight/``), whose ``model.py``
holds the paper's idea. Models import ``retrolm.nn`` and never the pipeline."""
