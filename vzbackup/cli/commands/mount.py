"""vzbackup mount / umount: the CT's root (VE_PRIVATE bound on VE_ROOT)."""

from vzbackup.cli.common import ct_verb
from vzbackup.ct import ops

COMMANDS = [
    ct_verb("mount", ops.mount, "mounted", "Mount the CT's private area on VE_ROOT."),
    ct_verb("umount", ops.umount, "unmounted", "Unmount a stopped CT's VE_ROOT."),
]
