"""hepafair's user-facing layer, one sub-package per stage of the data flow.

Imports point one way, down this list (``tests/test_imports.py`` checks it); only ``pipeline.cli`` imports them all
and nothing imports ``pipeline.cli``:

    common/    validated NIfTI/DICOM reading, atomic writes, bundle location, argument helpers, process pools
    data/      dataset discovery and label presets, prepare (raw volumes -> slices + manifest), shards, phantom, BMAD
    evaluate/  AUROC/AUPRO/Dice metrics, trivial baselines, the ignite metrics and evaluation report
    train/     the training step and handlers (skip-weight schedule, EMA, resume, learning curves)
    infer/     whole-volume inference, decision threshold, lesion candidates, overlays
    report/    `compare` (variants x seeds, result tables) and figures
    serve/     the MONAI Label app

A bundle config imports the package and the modules it calls: ``$import pipeline`` (binds the name) and
``$import pipeline.data.prepare`` (loads the module); ``_target_`` components need neither.
"""
