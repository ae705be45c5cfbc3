"""De-identification for research exports: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile (no options retained).

Actions, per the profile's table E.1-1 for the attributes listed in :data:`ACTIONS`:
``X`` remove, ``Z`` replace by an empty value, ``D`` replace by a dummy value, ``U`` replace the
UID by a consistent new one. Beyond the table: every private element, overlay, curve and
free-text comment is removed, and every instance UID anywhere (references inside sequences
too) is replaced through the same mapping, so the exported objects still reference each other.
Well-known DICOM UIDs (SOP classes, transfer syntaxes, coding schemes) are kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import UID

#: Table E.1-1 actions for the attributes a radiograph, SR or SC of ours can carry.
ACTIONS: dict[str, str] = {
    "AccessionNumber": "Z",
    "AcquisitionDate": "X",
    "AcquisitionDateTime": "X",
    "AcquisitionTime": "X",
    "AdditionalPatientHistory": "X",
    "AdmittingDiagnosesDescription": "X",
    "ContentCreatorName": "Z",
    "ContentDate": "Z",
    "ContentTime": "Z",
    "DerivationDescription": "X",
    "DeviceSerialNumber": "X",
    "EthnicGroup": "X",
    "ImageComments": "X",
    "InstitutionAddress": "X",
    "InstitutionName": "X",
    "InstitutionalDepartmentName": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "Occupation": "X",
    "OperatorsName": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "PatientAddress": "X",
    "PatientAge": "X",
    "PatientBirthDate": "Z",
    "PatientBirthName": "X",
    "PatientBirthTime": "X",
    "PatientComments": "X",
    "PatientID": "Z",
    "PatientMotherBirthName": "X",
    "PatientName": "Z",
    "PatientSex": "Z",
    "PatientSize": "X",
    "PatientTelephoneNumbers": "X",
    "PatientWeight": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformingPhysicianName": "X",
    "PhysiciansOfRecord": "X",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X",
    "RequestAttributesSequence": "X",
    "RequestingPhysician": "X",
    "SeriesDate": "X",
    "SeriesTime": "X",
    "StationName": "X",
    "StudyDate": "Z",
    "StudyDescription": "X",
    "StudyID": "Z",
    "StudyTime": "Z",
    "InstanceCreationDate": "X",
    "InstanceCreationTime": "X",
    "IssuerOfPatientID": "X",
    "PersonName": "D",
    "VerifyingObserverName": "D",
    "VerifyingOrganization": "X",
}

_REMOVE_GROUPS = (0x5000, 0x6000)  # curves and overlays (repeating groups)
_TEXT_VRS = ("PN", "LO", "SH", "LT", "ST", "UT", "CS", "DA", "TM", "DT", "AS")


def _is_well_known(value: str) -> bool:
    return UID(value).name != value  # pydicom knows its name: a standard UID


def uid_mapper(salt: str) -> Callable[[str], str]:
    """Return a function mapping an instance UID to a new ``2.25`` UID, consistently.

    Parameters
    ----------
    salt : str
        Secret per export; the same salt maps the same UID to the same new UID.
    """
    if not salt:
        raise ValueError("salt must be a non-empty string")

    def remap(value: str) -> str:
        if not value or _is_well_known(value):
            return value
        digest = hashlib.sha256(f"{salt}\x00{value}".encode()).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"

    return remap


def deidentify(ds: Dataset, remap: Callable[[str], str]) -> Dataset:
    """De-identify ``ds`` in place (and return it).

    Parameters
    ----------
    ds : pydicom.Dataset
        The object to export.
    remap : callable
        From :func:`uid_mapper`: the same mapping for every object of one export.
    """
    ds.remove_private_tags()

    def visit(dataset: Dataset) -> None:
        for elem in list(dataset):
            group = elem.tag.group
            if (group & 0xFF00) in _REMOVE_GROUPS:
                del dataset[elem.tag]
                continue
            action = ACTIONS.get(elem.keyword)
            if action == "X":
                del dataset[elem.tag]
                continue
            if action == "Z":
                elem.value = [] if elem.VR == "SQ" else ("" if elem.VR in _TEXT_VRS else None)
                continue
            if action == "D":
                elem.value = "ANONYMIZED" if elem.VR in ("PN", "LO", "SH", "LT", "ST") else None
                continue
            if elem.VR == "UI" and elem.value:
                values = elem.value if isinstance(elem.value, list) else [elem.value]
                mapped = [remap(str(v)) for v in values]
                elem.value = mapped if len(mapped) > 1 else mapped[0]
            elif elem.VR == "SQ":
                for item in elem.value:
                    visit(item)

    visit(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.add(DataElement(0x00120064, "SQ", [code]))  # De-identification Method Code Sequence
    return ds
