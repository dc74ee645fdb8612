"""A pickled object that runs code when unpickled: what a hostile checkpoint or weights file could hold."""
import builtins


class Payload:
    """Unpickled (torch.load with weights_only=False), it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")
