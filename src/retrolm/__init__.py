"""retrolm: retrieval-enhanced transformers (RETRO) and long-context model families.

Importing ``retrolm`` never imports faiss or transformers: retrieval lives in
``retrolm.retrieval`` and is loaded only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily so `import retrolm` stays light)
_LAZY = {
    "RETRO": "retrolm.models.retro.model",
    "RetroConfig": "retrolm.models.retro.config",
    "RETRODataset": "retrolm.seed_api",
    "TrainingWrapper": "retrolm.seed_api",
    "generate": "retrolm.generation",
    "HierarchicalTransformer": "retrolm.models.hierarchical.model",
    "HierarchicalConfig": "retrolm.models.hierarchical.config",
    "RoutingConfig": "retrolm.models.routing.config",
    "MemorizingConfig": "retrolm.models.memorizing.config",
    "MemorizingTransformer": "retrolm.models.memorizing.model",
    "MemorizingLanguageModel": "retrolm.models.memorizing.model",
    "KNNMemory": "retrolm.nn.knn_memory",
    "KNNMemoryList": "retrolm.nn.knn_memory",
    "RoutingTransformer": "retrolm.models.routing.model",
    "RoutingTransformerLM": "retrolm.models.routing.model",
    "RoutingLanguageModel": "retrolm.models.routing.model",
    "RoutingTransformerEncDec": "retrolm.models.routing.encdec",
    "AutoregressiveWrapper": "retrolm.seed_api",
    "DeLighTLM": "retrolm.models.delight.model",
    "DeLighTConfig": "retrolm.models.delight.config",
    "from_pretrained": "retrolm.models.pretrained",
    "load_tokenizer": "retrolm.models.pretrained",
    "pretrained_config": "retrolm.models.pretrained",
    "upload_pretrained": "retrolm.models.pretrained",
    "InfiniConfig": "retrolm.models.infini.config",
    "InfiniTransformer": "retrolm.models.infini.model",
    "InfiniTransformerWrapper": "retrolm.models.infini.wrapper",
    "FastweightMemory": "retrolm.models.infini.memory",
    "InfiniLanguageModel": "retrolm.models.infini.lm",
    "retrofit": "retrolm.models.retrofit.model",
    "RetrofitRETRO": "retrolm.models.retrofit.model",
    "RetrofitConfig": "retrolm.models.retrofit.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrolm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY) + ["__version__"]
