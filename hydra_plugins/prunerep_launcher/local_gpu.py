"""``launcher=local_gpu`` (``hydra/launcher: prunerep_local_gpu``): the points of a multirun at once,
one per device slot. Everything is in :mod:`prunerep.local_gpu`; this module only puts the class
where Hydra accepts launchers from."""
from prunerep.local_gpu import SlotLauncher


class LocalGpuLauncher(SlotLauncher):
    """See :class:`prunerep.local_gpu.SlotLauncher`."""
