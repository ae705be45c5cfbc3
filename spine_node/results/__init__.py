"""Result types and the DICOM objects built from them."""
