"""Whole-volume inference, one concern per module (each imports only those above it):

    settings    the bundle's weights and models/inference.json: read, check, write; load/build the detector
    threshold   the Dice-optimal decision threshold; ThresholdSelector writes inference.json after training
    paths       case ids and output files, checked before anything is written
    candidates  lesion candidates: 3D components of the thresholded heatmap
    overlay     the PNG of the top-scoring slices
    slices      SliceInferer: the detector over the liver slices of a ROI volume (a MONAI inferer)
    workflow    LoadCased, the recorded preprocessing, output names: the rest of configs/inference.yaml's workflow
    volume      infer_volume: prepare's transforms -> detector per slice -> Invertd back to the input grid -> files
    batch       infer_cases: many cases, worker processes, the summary JSON
    command     ``python -m pipeline infer``
"""
