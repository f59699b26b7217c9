"""vzbackup destroy: remove a stopped CT."""

from vzbackup.cli.common import ct_verb
from vzbackup.ct import ops

COMMANDS = [
    ct_verb(
        "destroy",
        ops.destroy,
        "destroyed",
        "Destroy stopped container CTID (private area, config and CRIU checkpoint).",
    )
]
