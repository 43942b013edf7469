"""A phantom cohort with brighter liver vessels than the generator's 40-80 HU (session 12 pilot of the demo cohort).

The generator has no option for the vessel contrast, so this script swaps the draw in ``_paint_liver``'s source and
writes the cohort with ``write_phantom_cohort`` (seed 0). Usage (repository root):

    python docs/results/demo_budget/vessel_cohort.py OUT VESSEL_MIN_HU VESSEL_MAX_HU KINDS PERFUSION_HU D_MIN D_MAX
    e.g. python docs/results/demo_budget/vessel_cohort.py /tmp/ph/raw_g 100 150 hypo,hyper 20 15 40
"""

import inspect
import sys

import pipeline.data.phantom as phantom

out, low, high, kinds, perfusion, d_min, d_max = sys.argv[1:8]
source = inspect.getsource(phantom._paint_liver)
assert "rng.uniform(40.0, 80.0)" in source, "the generator's vessel draw changed"
exec(source.replace("rng.uniform(40.0, 80.0)", f"rng.uniform({float(low)}, {float(high)})"), phantom.__dict__)
phantom.write_phantom_cohort(out, n_cases=24, seed=0, lesion_kinds=kinds.split(","),
                             lesion_diameter_mm=(float(d_min), float(d_max)), perfusion_hu=float(perfusion))
