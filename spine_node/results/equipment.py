"""The algorithm as contributing equipment, the IHE AI Results way.

IHE AI Results (AIR) asks every result object to name the algorithm that produced it in
the SOP Common Module's Contributing Equipment Sequence (0018,A001), besides the SR's
algorithm identification (TID 4019). Our item:

- Manufacturer (0008,0070): the algorithm's manufacturer (``ResultOptions.manufacturer``);
- Manufacturer's Model Name (0008,1090): the model bundle's name;
- Software Versions (0018,1020): the bundle version, then the node version;
- Purpose of Reference Code Sequence (0040,A170): (109102, DCM, "Processing Equipment"),
  CID 7005 "Contributing Equipment Purposes of Reference" (PS3.16): the equipment that
  processed the source image into this result. CID 7005 has no more specific concept for an
  algorithm, and highdicom accepts only CID 7005 codes here;
- Contribution Description (0018,A003): what the algorithm did, with "DEMO" for a
  phantom-trained bundle.

highdicom adds its own item (the library that encoded the object) after ours.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes as dcm_codes

from spine_node import __version__
from spine_node.results.codes import DEMO_TEXT
from spine_node.results.options import ResultOptions
from spine_node.results.text import clean_string
from spine_node.results.types import ModelInfo

#: Purpose of reference of the algorithm's item (CID 7005).
PURPOSE_OF_REFERENCE = dcm_codes.DCM.ProcessingEquipment


def software_versions(model: ModelInfo) -> list[str]:
    """Return Software Versions: the bundle version, then ``spine-node <version>``."""
    return [clean_string(model.version, "LO"), clean_string(f"spine-node {__version__}", "LO")]


def algorithm_equipment(model: ModelInfo, options: ResultOptions) -> hd.ContributingEquipment:
    """Return the Contributing Equipment item naming the algorithm (model bundle).

    Parameters
    ----------
    model : ModelInfo
        The bundle that produced the result.
    options : ResultOptions
        Manufacturer and institution.

    Returns
    -------
    highdicom.ContributingEquipment
    """
    if not isinstance(model, ModelInfo):
        raise TypeError(f"model must be a ModelInfo, got {type(model).__name__}")
    description = f"AI spine radiograph triage and lesion detection ({model.name} {model.version})"
    if model.demo:
        description += f"; {DEMO_TEXT}"
    return hd.ContributingEquipment(
        manufacturer=clean_string(options.manufacturer, "LO"),
        purpose_of_reference=PURPOSE_OF_REFERENCE,
        manufacturer_model_name=clean_string(model.name, "LO"),
        software_versions=software_versions(model),
        institution_name=options.institution_name or None,
        institutional_department_name=options.institutional_department_name or None,
        contribution_description=clean_string(description, "ST"),
    )
