"""The user-facing model classes (SCVI, SCANVI, TOTALVI), loading any saved model and importing scvi-tools'.

Importing this package registers the three classes in :data:`atlasmap.models.registry.MODEL_CLASSES`, the
fixed list a saved model's class is chosen from.
"""

from atlasmap.models.interop import from_scvi_tools, load_reference
from atlasmap.models.persistence import load_model, save_model
from atlasmap.models.scanvi import SCANVI
from atlasmap.models.scvi import SCVI
from atlasmap.models.totalvi import TOTALVI

__all__ = ["SCANVI", "SCVI", "TOTALVI", "from_scvi_tools", "load_model", "load_reference", "save_model"]
