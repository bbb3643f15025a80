"""softadam_nlp: the SoftAdam optimizer for NLP research in PyTorch.

`from softadam_nlp import SoftAdam` gives the optimizer and `EtaScheduler` a
schedule on its eta; the fairseq plugin lives in `fairseq_plugins/` and the
transformers integration in `softadam_nlp.hf`.
"""

from softadam_nlp.eta_schedule import EtaScheduler
from softadam_nlp.softadam import SoftAdam, softadam

__all__ = ["EtaScheduler", "SoftAdam", "softadam", "__version__"]
__version__ = "0.2.0"
