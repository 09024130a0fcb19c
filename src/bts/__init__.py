"""bts: Branch-Train-Stitch. Combine frozen domain experts with a frozen hub through stitch layers."""

from bts.errors import BtsError
from bts.hf import register as _register_hf
from bts.stitch import StitchedModel, StitchLayer, StitchPoint, default_placement

# `bts export` directories then load with AutoModelForCausalLM, no trust_remote_code needed
_register_hf()

__all__ = ["BtsError", "StitchLayer", "StitchPoint", "StitchedModel", "default_placement"]
__version__ = "0.1.0"
