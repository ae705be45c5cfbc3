"""spine-node: an on-premises DICOM node that triages spine radiographs with AI."""

__version__ = "0.1.0"
