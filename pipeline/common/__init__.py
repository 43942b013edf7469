"""Helpers every stage uses: validated CT/label reading (NIfTI, DICOM), atomic writes, bundle location, CLI
argument types, the process pool for many cases."""
