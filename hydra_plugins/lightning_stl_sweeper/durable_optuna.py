"""The plugin class Hydra instantiates (Hydra requires it to live in ``hydra_plugins``)."""

from lightning_stl.sweeper import DurableOptunaSweeper as _DurableOptunaSweeper


class DurableOptunaSweeper(_DurableOptunaSweeper):
    """See :mod:`lightning_stl.sweeper`."""
