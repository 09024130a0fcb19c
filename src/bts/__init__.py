"""bts: Branch-Train-Stitch. Combine frozen domain experts with a frozen hub through stitch layers."""

from bts.errors import BtsError
from bts.stitch import StitchedModel, StitchLayer, StitchPoint, default_placement

__all__ = ["BtsError", "StitchLayer", "StitchPoint", "StitchedModel", "default_placement"]
__version__ = "0.1.0"
