"""softadam_nlp: the SoftAdam optimizer for NLP research in PyTorch.

``from softadam_nlp import SoftAdam`` gives the optimizer; the fairseq plugin lives
in ``fairseq_plugins/`` and the transformers integration in ``softadam_nlp.hf``.
"""

from softadam_nlp.softadam import SoftAdam, softadam

__all__ = ["SoftAdam", "softadam", "__version__"]
__version__ = "0.1.0"
