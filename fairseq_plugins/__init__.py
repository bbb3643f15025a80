"""fairseq `--user-dir`: importing this package registers SoftAdam with fairseq.

    fairseq-train DATA --user-dir fairseq_plugins --optimizer softadam --lr 0.1 ...

registers `--optimizer softadam` (fairseq_plugins/softadam_optimizer.py) and
`--lr-scheduler linear`, the linear warmup and decay of the recipe Table 3 follows
(fairseq_plugins/linear_schedule.py), and lets
fairseq 0.12 load its checkpoints on current torch (fairseq_plugins/compat.py), so
pass the same `--user-dir` to fairseq-generate too.
"""

from fairseq_plugins import linear_schedule, softadam_optimizer  # noqa: F401  (register "linear", "softadam")
from fairseq_plugins.compat import allow_fairseq_checkpoints

allow_fairseq_checkpoints()
